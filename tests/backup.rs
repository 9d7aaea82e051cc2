//! `store backup` as an operator runs it: while the relay takes webhooks, the copy it writes
//! opens cleanly (no repair) and, restored under a new relay, delivers every event acknowledged
//! before the backup started. With the relay stopped it copies the file directly.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use support::*;

const TOKEN: &str = "backup-admin-token";

fn config(motion: &str) -> String {
    format!(
        r#"[server]
http = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
token = "{TOKEN}"
[storage]
path = "{{DATA}}"
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
"#
    )
}

const PATH: &str = "/acme/api/whatsapp/accounts/16/notify";

fn body(i: usize) -> String {
    format!(r#"{{"from":"1555{:07}","id":"msg-{i}","text":"n{i}"}}"#, i % 50)
}

async fn accept(relay_url: &str, i: usize) -> bool {
    post(relay_url, &[("x-webhook-token", "k-token"), ("content-type", "application/json")], body(i)).await.status
        == 200
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_load_opens_cleanly_and_holds_every_acknowledged_event() {
    // Motion is down: every accepted event stays waiting in the store.
    let down = dead_addr().await;
    let mut relay = RelayProcess::start(&config(&format!("http://{down}")));
    let url = relay.url(PATH);
    const BEFORE: usize = 300;
    for i in 0..BEFORE {
        assert!(accept(&url, i).await, "event {i} acknowledged");
    }

    // Webhooks keep arriving, and retries keep failing, while the backup runs.
    let stop = Arc::new(AtomicBool::new(false));
    let during = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for w in 0..4 {
        let (stop, during, url) = (stop.clone(), during.clone(), url.clone());
        load.push(tokio::spawn(async move {
            let mut i = 10_000 * (w + 1);
            while !stop.load(Ordering::Relaxed) {
                if accept(&url, i).await {
                    during.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out_dir = tempfile::tempdir().unwrap();
    let dest = out_dir.path().join("relay-backup.redb");
    let cli_cfg = relay.config_path.with_file_name("cli.toml");
    let text = std::fs::read_to_string(&relay.config_path).unwrap();
    std::fs::write(
        &cli_cfg,
        text.replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"{}\"", relay.admin.unwrap()), 1),
    )
    .unwrap();
    let cli = Command::new(support::bin()).args(["store", "backup"]).arg(&dest).arg("--config").arg(&cli_cfg).output();
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let out = cli.unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains(&format!("backup written: {}", dest.display())), "{said}");
    assert!(during.load(Ordering::Relaxed) > 0, "webhooks were acknowledged while the backup ran");
    assert!(relay.logs().contains("store backup made"), "the relay logs the backup");
    assert!(!out_dir.path().join("relay-backup.redb.partial").exists());
    let data = relay.dir.as_ref().unwrap().path().join("data");
    let mut leftovers: Vec<_> = std::fs::read_dir(&data).unwrap().flatten().map(|e| e.file_name()).collect();
    leftovers.sort();
    assert_eq!(
        leftovers,
        ["queue.journal", "queue.redb", "queue.redb.marker"],
        "no temporary copy is left beside the store"
    );
    let waiting: usize =
        said.split(" (").nth(1).and_then(|s| s.split(' ').next()).and_then(|n| n.parse().ok()).unwrap();
    assert!(waiting >= BEFORE, "{said}");

    // Restore: a new relay on the copy, with Motion up, delivers every event acknowledged before
    // the backup started; the copy needed no repair.
    let motion = FakeMotion::start().await;
    let restored_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(restored_dir.path().join("data")).unwrap();
    std::fs::copy(&dest, restored_dir.path().join("data").join("queue.redb")).unwrap();
    let restored = RelayProcess::start_in(restored_dir, &config(&motion.url()));
    let got = motion.wait_for(waiting, Duration::from_secs(30)).await;
    let bodies: std::collections::HashSet<String> =
        got.iter().map(|r| String::from_utf8_lossy(&r.body).into_owned()).collect();
    for i in 0..BEFORE {
        assert!(bodies.contains(&body(i)), "event {i}, acknowledged before the backup, is in the copy");
    }
    assert_eq!(got.len(), waiting, "the copy holds what the backup said");
    assert!(!restored.logs().contains("not shut down cleanly"), "{}", restored.logs());
    assert!(!restored.logs().contains("repair"), "{}", restored.logs());

    // With the relay stopped, the file is copied directly.
    relay.signal("TERM");
    assert_eq!(relay.wait_exit(Duration::from_secs(20)), Some(0));
    let offline = out_dir.path().join("offline.redb");
    let out = Command::new(support::bin())
        .args(["store", "backup"])
        .arg(&offline)
        .arg("--config")
        .arg(&cli_cfg)
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("backup written"), "{said}");
}
