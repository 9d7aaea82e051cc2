//! A store that held data and is then lost or damaged (removed, emptied, truncated, overwritten)
//! stops the relay at start (exit 1 within seconds, naming the file and the recovery steps)
//! instead of starting with an empty queue; `store check` says the same offline, and says a
//! sound store is sound. A first start on an empty folder works, and a backup put back in place
//! (beside the marker) starts and delivers what it holds.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use support::*;

const PATH: &str = "/acme/api/whatsapp/accounts/16/notify";

fn config(data: &Path, motion: &str) -> String {
    format!(
        r#"[server]
http = "127.0.0.1:0"
[storage]
path = "{}"
[delivery]
retry_initial = "50ms"
retry_max = "200ms"
[[motion]]
name = "acme"
url = "{motion}"
  [[motion.account]]
  id = "16"
  provider = "kaleyra"
  shared_token = "k-token"
"#,
        data.display()
    )
}

fn body(i: usize) -> String {
    format!(r#"{{"from":"1555{:07}","id":"msg-{i}","text":"n{i}"}}"#, i % 20)
}

/// A stopped relay's store folder holding `n` acknowledged events (Motion was down), and the
/// config that names it.
async fn store_with_events(n: usize) -> (tempfile::TempDir, PathBuf) {
    let down = format!("http://{}", dead_addr().await);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut relay = RelayProcess::start(&config(&data, &down));
    for i in 0..n {
        let headers = [("x-webhook-token", "k-token"), ("content-type", "application/json")];
        assert_eq!(post(&relay.url(PATH), &headers, body(i)).await.status, 200, "event {i}");
    }
    relay.signal("TERM");
    assert_eq!(relay.wait_exit(Duration::from_secs(20)), Some(0));
    let config_path = dir.path().join("relay.toml");
    std::fs::write(&config_path, config(&data, &down)).unwrap();
    (dir, config_path)
}

fn said(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn store_check(config: &Path) -> Output {
    Command::new(bin()).args(["store", "check", "--config"]).arg(config).output().unwrap()
}

/// Runs the relay on `config` and waits (at most 20 s) for it to exit on its own.
fn run_until_exit(config: &Path) -> (Option<i32>, Duration, String) {
    let started = Instant::now();
    let mut child = Command::new(bin())
        .args(["--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while started.elapsed() < Duration::from_secs(20) {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return (out.status.code(), started.elapsed(), said(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (None, started.elapsed(), said(&out))
}

#[tokio::test]
async fn a_store_that_held_data_and_was_lost_or_damaged_stops_the_start() {
    let (dir, config_path) = store_with_events(200).await;
    let data = dir.path().join("data");
    let file = data.join("queue.redb");
    let marker = data.join("queue.redb.marker");
    assert!(marker.exists(), "the store held data: its marker is beside it");

    // Sound: `store check` says so, with what it holds.
    let out = store_check(&config_path);
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    assert!(
        said(&out).contains(&format!("store sound: {} (200 waiting events, 0 dead letters", file.display())),
        "{}",
        said(&out)
    );

    let whole = std::fs::read(&file).unwrap();
    let damages: [(&str, Option<Vec<u8>>, &str); 4] = [
        ("removed", None, "is missing"),
        ("emptied", Some(Vec::new()), "is empty (0 bytes)"),
        ("truncated to half", Some(whole[..whole.len() / 2].to_vec()), "is truncated"),
        ("overwritten", Some((0..whole.len()).map(|i| (i * 7919 % 251) as u8).collect()), "is not a store file"),
    ];
    for (how, bytes, says) in damages {
        match &bytes {
            None => std::fs::remove_file(&file).unwrap(),
            Some(b) => std::fs::write(&file, b).unwrap(),
        }
        let (code, took, logs) = run_until_exit(&config_path);
        assert_eq!(code, Some(1), "{how}: the relay refuses to start; {logs}");
        assert!(took < Duration::from_secs(5), "{how}: it took {took:?}");
        assert!(logs.contains(&format!("the store file {} {says}", file.display())), "{how}: {logs}");
        assert!(logs.contains("store backup") && logs.contains(&marker.display().to_string()), "{how}: {logs}");
        assert!(!logs.contains("panicked"), "{how}: {logs}");

        let out = store_check(&config_path);
        assert_eq!(out.status.code(), Some(1), "{how}: {}", said(&out));
        assert!(said(&out).contains(&format!("{} {says}", file.display())), "{how}: {}", said(&out));
        // Nothing was created or laid out in its place.
        assert_eq!(std::fs::read(&file).ok(), bytes, "{how}: the file is left as it was");
        std::fs::write(&file, &whole).unwrap();
    }
    // Put back whole, it starts again.
    let out = store_check(&config_path);
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
}

#[tokio::test]
async fn a_first_start_on_an_empty_folder_works() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config_path = dir.path().join("relay.toml");
    std::fs::write(&config_path, config(&data, "http://127.0.0.1:9")).unwrap();
    let out = store_check(&config_path);
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    assert!(said(&out).contains("no store yet"), "{}", said(&out));

    let relay = RelayProcess::spawn(dir, config_path.clone());
    assert!(data.join("queue.redb").exists());
    // Nothing stored yet: no marker, so removing the folder's contents is a fresh start again.
    assert!(!data.join("queue.redb.marker").exists());
    drop(relay);
}

#[tokio::test]
async fn a_backup_put_back_beside_its_marker_starts_and_delivers_what_it_holds() {
    let (dir, config_path) = store_with_events(50).await;
    let data = dir.path().join("data");
    let copy = dir.path().join("backup.redb");
    let out =
        Command::new(bin()).args(["store", "backup"]).arg(&copy).arg("--config").arg(&config_path).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));

    // The disk loses the store; the operator puts the backup in place, keeping the marker.
    std::fs::write(data.join("queue.redb"), b"").unwrap();
    assert_eq!(run_until_exit(&config_path).0, Some(1));
    std::fs::copy(&copy, data.join("queue.redb")).unwrap();
    assert!(data.join("queue.redb.marker").exists());

    let motion = FakeMotion::start().await;
    std::fs::write(&config_path, config(&data, &motion.url())).unwrap();
    let relay = RelayProcess::spawn(dir, config_path);
    let got = motion.wait_for(50, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 50);
    assert!(!relay.logs().contains("repair"), "{}", relay.logs());
}
