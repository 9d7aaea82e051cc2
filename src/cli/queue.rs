//! `whatsapp-relay queue ...`: the operator's queue tools, talking to the running daemon's admin
//! API (`[admin] listen`, `Authorization: Bearer {admin.token}`). Tables for people, `--json`
//! for scripts.

use super::Admin;
use crate::clock::{Clock, SystemClock};
use crate::queue::ops::{Count, Dead, Stats, Waiting};
use bytes::Bytes;
use clap::Subcommand;
use http::Method;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// Depth and oldest age per Motion and account.
    Stats {
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The waiting events (the oldest first).
    List {
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// At most this many events.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// The dead letters, one per line.
    Dead {
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters again: one by its delivery id, or --all.
    Replay {
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters: one by its delivery id, or all of them. Needs --dead and --yes.
    Purge {
        #[arg(long, required = true)]
        dead: bool,
        id: Option<String>,
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(admin: &Admin, cmd: QueueCommand) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("cannot start the runtime: {e}")),
    };
    rt.block_on(run_async(admin, cmd))
}

fn fail(code: u8, msg: String) -> ExitCode {
    eprintln!("whatsapp-relay queue: {msg}");
    ExitCode::from(code)
}

async fn run_async(admin: &Admin, cmd: QueueCommand) -> ExitCode {
    let base = "/admin/queue";
    let call = |method: Method, path: String| async move { request(admin, method, &path).await };
    match cmd {
        QueueCommand::Stats { json } => match call(Method::GET, format!("{base}/stats")).await {
            Ok(v) => show::<Stats>(v, json, print_stats),
            Err(e) => fail(1, e),
        },
        QueueCommand::List { json, limit } => match call(Method::GET, format!("{base}/list?limit={limit}")).await {
            Ok(v) => show::<Vec<Waiting>>(v, json, print_list),
            Err(e) => fail(1, e),
        },
        QueueCommand::Dead { json } => match call(Method::GET, format!("{base}/dead")).await {
            Ok(v) => show::<Vec<Dead>>(v, json, print_dead),
            Err(e) => fail(1, e),
        },
        QueueCommand::Replay { id, all, json } => {
            let path = match (id, all) {
                (Some(id), false) => format!("{base}/dead/{}/replay", encode(&id)),
                (None, true) => format!("{base}/dead/replay"),
                _ => return fail(2, "say which: queue replay ID, or queue replay --all".into()),
            };
            match call(Method::POST, path).await {
                Ok(v) => show::<Count>(v, json, |c| println!("replayed {} dead letter(s)", c.count)),
                Err(e) => fail(1, e),
            }
        }
        QueueCommand::Purge { dead: _, id, yes, json } => {
            if !yes {
                return fail(2, "purging deletes dead letters for good; add --yes to confirm".into());
            }
            let path = match id {
                Some(id) => format!("{base}/dead/{}", encode(&id)),
                None => format!("{base}/dead"),
            };
            match call(Method::DELETE, path).await {
                Ok(v) => show::<Count>(v, json, |c| println!("deleted {} dead letter(s)", c.count)),
                Err(e) => fail(1, e),
            }
        }
    }
}

fn encode(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Prints the JSON as it came (`--json`) or as a table.
fn show<T: serde::de::DeserializeOwned>(v: serde_json::Value, json: bool, table: impl Fn(T)) -> ExitCode {
    if json {
        println!("{v}");
        return ExitCode::SUCCESS;
    }
    match serde_json::from_value::<T>(v) {
        Ok(t) => {
            table(t);
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, format!("unexpected answer from the daemon: {e}")),
    }
}

async fn request(admin: &Admin, method: Method, path: &str) -> Result<serde_json::Value, String> {
    let (status, _, body) = super::http::call(&admin.target, method, path, &admin.auth(), Bytes::new()).await?;
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("bad answer ({status}): {e}"))?;
    if !status.is_success() {
        return Err(format!("{status}: {}", v["message"].as_str().unwrap_or("")));
    }
    Ok(v)
}

fn print_stats(s: Stats) {
    println!("{:<20} {:<20} {:>10} {:>12}", "MOTION", "ACCOUNT", "DEPTH", "OLDEST");
    for m in &s.motions {
        println!("{:<20} {:<20} {:>10} {:>12}", m.motion, "*", m.depth, secs(m.oldest_age_seconds));
        for a in &m.accounts {
            println!("{:<20} {:<20} {:>10} {:>12}", "", a.account, a.depth, secs(a.oldest_age_seconds));
        }
    }
    println!("dead letters: {}", s.dead_letters);
}

fn print_list(list: Vec<Waiting>) {
    println!(
        "{:<38} {:<16} {:<16} {:>8} {:>10} {:>10}  LAST ERROR",
        "ID", "MOTION", "ACCOUNT", "ATTEMPTS", "AGE", "NEXT IN"
    );
    let now = SystemClock.now_unix_ms();
    for w in list {
        let next = w.next_attempt_unix_ms.map_or("-".to_string(), |t| secs(t.saturating_sub(now) / 1000));
        println!(
            "{:<38} {:<16} {:<16} {:>8} {:>10} {:>10}  {}",
            w.id,
            w.motion,
            w.account,
            w.attempts,
            secs(w.age_seconds),
            next,
            w.last_error.as_deref().unwrap_or("-")
        );
    }
}

fn print_dead(list: Vec<Dead>) {
    println!("{:<38} {:<16} {:<24} {:>10}  REASON", "ID", "MOTION", "ACCOUNT", "AGE");
    for d in list {
        let account = if d.account.is_empty() { d.note.as_str() } else { d.account.as_str() };
        println!("{:<38} {:<16} {:<24} {:>10}  {}", d.id, d.motion, account, secs(d.age_seconds), d.reason);
    }
}

/// `93` -> `1m33s`.
fn secs(s: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(s)).to_string().replace(' ', "")
}
