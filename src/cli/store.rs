//! `whatsapp-relay store check`: verifies the embedded store offline (exit 0 sound, 1 damaged
//! with what to do).
//!
//! `whatsapp-relay store backup DEST`: a consistent copy of the embedded store while the relay
//! runs. The running relay makes the copy in one read transaction (its deliveries and
//! acknowledgements go on) and streams it through its admin API; this writes it to `DEST`
//! (through `DEST.partial`, synced, then renamed, so `DEST` is never half a file) and opens it
//! to check it is whole. With no relay running it copies the store file directly.

use super::Admin;
use crate::config::Config;
use crate::store::BackupSummary;
use crate::store::embedded;
use bytes::Bytes;
use clap::Subcommand;
use http::Method;
use http_body_util::BodyExt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Write a consistent copy of the embedded store to DEST (a file, or a folder to write
    /// queue.redb into), while the relay runs or not.
    Backup { dest: PathBuf },
    /// Verify the embedded store with the relay stopped: every event and dead letter is read
    /// back. Exit 0 sound, 1 damaged (with what to do).
    Check,
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("whatsapp-relay store: {msg}");
    ExitCode::from(code)
}

pub fn run(config: &Config, admin: Result<Admin, String>, cmd: StoreCommand) -> ExitCode {
    if !matches!(config.storage, crate::config::StorageBackend::Embedded) {
        return fail(
            2,
            "[storage] backend is postgres: back the queue up and check it with PostgreSQL's own tools (pg_dump, \
             base backups, amcheck); store backup and store check work on the embedded store",
        );
    }
    match cmd {
        StoreCommand::Check => check(config),
        StoreCommand::Backup { dest } => backup(config, admin, dest),
    }
}

fn check(config: &Config) -> ExitCode {
    match embedded::check(&config.storage_path) {
        Ok(c) if !c.exists => {
            println!("no store yet: {} does not exist; the relay creates it at its first start", c.file.display());
            ExitCode::SUCCESS
        }
        Ok(c) => {
            let repaired = if c.repaired { "; it had not been shut down cleanly and was repaired" } else { "" };
            let marked = if c.marked { "" } else { "; its marker is written at the relay's next start" };
            println!(
                "store sound: {} ({} waiting events, {} dead letters, {} dedup keys, {} window entries, {} bytes){repaired}{marked}",
                c.file.display(),
                c.waiting,
                c.dead_letters,
                c.dedup_keys,
                c.window_entries,
                c.bytes
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

fn backup(config: &Config, admin: Result<Admin, String>, dest: PathBuf) -> ExitCode {
    let dest = if dest.is_dir() { dest.join(embedded::FILE_NAME) } else { dest };
    let partial = PathBuf::from(format!("{}.partial", dest.display()));
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("cannot start the runtime: {e}")),
    };
    let made = match admin {
        Ok(admin) => match rt.block_on(online(&admin, &partial)) {
            Ok(summary) => Ok(summary),
            // Not reachable: maybe not running. A running relay holds redb's lock on the file,
            // so the direct copy cannot read a store under its feet.
            Err(Online::Unreachable(why)) => offline(config, &partial)
                .map_err(|e| format!("{why}\nand the store file could not be copied directly either: {e}")),
            Err(Online::Failed(why)) => Err(why),
        },
        Err(why) => offline(config, &partial).map_err(|e| format!("{e}\n(to back up a running relay: {why})")),
    };
    let summary = match made {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return fail(1, e);
        }
    };
    if let Err(e) = finish(&partial, &dest) {
        let _ = std::fs::remove_file(&partial);
        return fail(1, format!("cannot write {}: {e}", dest.display()));
    }
    // Read it back as a restore would: it opens without a repair and holds what was sent.
    match embedded::inspect(&dest) {
        Ok(found) if found.waiting == summary.waiting && found.dead_letters == summary.dead_letters => {
            println!(
                "backup written: {} ({} waiting events, {} dead letters, {} dedup keys, {} bytes, record format {})",
                dest.display(),
                found.waiting,
                found.dead_letters,
                found.dedup_keys,
                found.bytes,
                found.format
            );
            ExitCode::SUCCESS
        }
        Ok(found) => fail(
            1,
            format!(
                "{} does not hold what the relay copied ({found:?} instead of {summary:?}): do not use it",
                dest.display()
            ),
        ),
        Err(e) => fail(1, format!("the copy does not open cleanly: {e}; do not use it")),
    }
}

enum Online {
    Unreachable(String),
    Failed(String),
}

async fn online(admin: &Admin, partial: &Path) -> Result<BackupSummary, Online> {
    let path = "/admin/store/backup";
    let resp = super::http::send(&admin.target, Method::POST, path, &admin.auth(), Bytes::new())
        .await
        .map_err(Online::Unreachable)?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        return Err(Online::Failed(format!("{status}: {}", v["message"].as_str().unwrap_or("the relay refused"))));
    }
    let summary: BackupSummary = resp
        .headers()
        .get("x-relay-backup")
        .and_then(|v| serde_json::from_slice(v.as_bytes()).ok())
        .ok_or_else(|| Online::Failed("the relay's answer does not say what the copy holds".into()))?;
    let failed = |e: std::io::Error| Online::Failed(format!("cannot write {}: {e}", partial.display()));
    let mut out = std::fs::File::create(partial).map_err(failed)?;
    let mut body = resp.into_body();
    let mut written = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Online::Failed(format!("the copy broke off after {written} bytes: {e}")))?;
        if let Ok(data) = frame.into_data() {
            out.write_all(&data).map_err(failed)?;
            written += data.len() as u64;
        }
    }
    if written != summary.bytes {
        return Err(Online::Failed(format!("got {written} of the copy's {} bytes", summary.bytes)));
    }
    out.sync_all().map_err(failed)?;
    Ok(summary)
}

fn offline(config: &Config, partial: &Path) -> Result<BackupSummary, String> {
    let _ = std::fs::remove_file(partial);
    embedded::backup_offline(&config.storage_path, partial).map_err(|e| e.to_string())
}

/// `partial` becomes `dest`, durably: synced file, rename, synced folder.
fn finish(partial: &Path, dest: &Path) -> std::io::Result<()> {
    std::fs::File::open(partial)?.sync_all()?;
    std::fs::rename(partial, dest)?;
    let dir = dest.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}
