//! A store that cannot be written: webhooks get 503 `unavailable`, never 200, and /readyz fails.
//! The real server runs in-process over the store's fault-injection seam (root ignores file
//! modes, so a read-only directory would not fail).

mod support;

use std::sync::Arc;
use std::time::Duration;
use support::*;
use whatsapp_relay::clock::SystemClock;
use whatsapp_relay::server::start_with;
use whatsapp_relay::store::{EmbeddedStore, FaultyStore, Stores};

#[tokio::test]
async fn a_failing_store_answers_503_never_200() {
    let motion = FakeMotion::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[server]
http = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[storage]
path = "{}"
[[motion]]
name = "acme"
url = "{}"
  [[motion.account]]
  id = "13"
  provider = "meta"
  app_secret = "s"
"#,
        dir.path().display(),
        motion.url()
    );
    let config = whatsapp_relay::config::parse(std::path::Path::new("relay.toml"), &text).unwrap();
    let faulty = Arc::new(FaultyStore::new(Arc::new(EmbeddedStore::open(dir.path()).unwrap())));
    let running = start_with(config, Stores::of(faulty.clone()), Arc::new(SystemClock)).await.unwrap();
    let url = format!("http://{}/acme/api/whatsapp/accounts/13/notify", running.http.unwrap());
    let admin = running.admin.unwrap();

    // Healthy first.
    let reply = post_meta(&url, "s", meta_message("1", "1650", "wamid.ok", "0")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(get(&format!("http://{admin}/readyz")).await.status, 200);

    // The disk fails: never a 200.
    faulty.set_fail_writes(true);
    for i in 1..20 {
        let reply = post_meta(&url, "s", meta_message("1", "1650", &format!("wamid.{i}"), &i.to_string())).await;
        assert_eq!(reply.status, 503, "attempt {i}");
        assert_eq!(reply.error_code(), "unavailable");
    }
    assert_eq!(get(&format!("http://{admin}/readyz")).await.status, 503);

    // It recovers by itself once writes work again.
    faulty.set_fail_writes(false);
    let reply = post_meta(&url, "s", meta_message("1", "1650", "wamid.back", "20")).await;
    assert_eq!(reply.status, 200);
    let got = motion.wait_for(2, Duration::from_secs(10)).await;
    let texts: Vec<String> = got.iter().map(|r| meta_customer_and_text(&r.body).1).collect();
    assert_eq!(texts, ["0", "20"], "only acknowledged events are delivered");
    running.shutdown().await;
}

/// The provider hangs up while its event is being synced (a slow disk), then redelivers. The
/// event was stored; it must still reach Motion, though the redelivery is taken as a duplicate.
#[tokio::test]
async fn an_event_stored_after_its_request_went_away_is_still_delivered() {
    let motion = FakeMotion::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nhttp = \"127.0.0.1:0\"\n[storage]\npath = \"{}\"\n[[motion]]\nname = \"acme\"\nurl = \"{}\"\n  [[motion.account]]\n  id = \"13\"\n  provider = \"meta\"\n  app_secret = \"s\"\n",
        dir.path().display(),
        motion.url()
    );
    let config = whatsapp_relay::config::parse(std::path::Path::new("relay.toml"), &text).unwrap();
    let faulty = Arc::new(FaultyStore::new(Arc::new(EmbeddedStore::open(dir.path()).unwrap())));
    let running = start_with(config, Stores::of(faulty.clone()), Arc::new(SystemClock)).await.unwrap();
    let url = format!("http://{}/acme/api/whatsapp/accounts/13/notify", running.http.unwrap());
    let body = meta_message("1", "1650", "wamid.slow", "slow disk");

    faulty.set_append_delay(Duration::from_millis(600));
    let gave_up = tokio::time::timeout(Duration::from_millis(100), post_meta(&url, "s", body.clone())).await;
    assert!(gave_up.is_err(), "the provider hung up before the acknowledgement");
    tokio::time::sleep(Duration::from_millis(800)).await;
    faulty.set_append_delay(Duration::ZERO);
    assert_eq!(post_meta(&url, "s", body.clone()).await.status, 200, "the redelivery is acknowledged");
    let got = motion.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].body, body);
    running.shutdown().await;
}

/// The disk fills up after events were delivered and their deletion was committed cheaply (not
/// yet synced): the next durable commit fails, and redb forgets those deletions when the store
/// is re-opened. Once the disk has room again the delivered events are deleted again: the
/// store's depth returns to 0 (it never counted against `max_queued` meanwhile), and a restart
/// delivers nothing a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_events_are_pruned_once_a_full_disk_has_room_again_and_not_delivered_twice() {
    use whatsapp_relay::store::{DiskFault, QueueStore};
    // Motion is down while the events are accepted.
    let motion_addr = dead_addr().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nhttp = \"127.0.0.1:0\"\n[storage]\npath = \"{}\"\n[delivery]\nretry_initial = \"50ms\"\nretry_max = \"100ms\"\n[[motion]]\nname = \"acme\"\nurl = \"http://{motion_addr}\"\n  [[motion.account]]\n  id = \"13\"\n  provider = \"meta\"\n  app_secret = \"s\"\n",
        dir.path().display(),
    );
    let config = || whatsapp_relay::config::parse(std::path::Path::new("relay.toml"), &text).unwrap();
    let disk = Arc::new(DiskFault::default());
    let store = Arc::new(EmbeddedStore::open_on_faulty_disk(dir.path(), disk.clone()).unwrap());
    let running = start_with(config(), Stores::of(store.clone()), Arc::new(SystemClock)).await.unwrap();
    let url = format!("http://{}/acme/api/whatsapp/accounts/13/notify", running.http.unwrap());
    const N: usize = 30;
    for i in 0..N {
        let body = meta_message("1", &format!("1650{i}"), &format!("wamid.{i}"), &i.to_string());
        assert_eq!(post_meta(&url, "s", body).await.status, 200);
    }
    // Motion comes up and takes them; their deletion is noted in the journal, not synced.
    let motion = FakeMotion::start_on(motion_addr).await;
    let got = motion.wait_for(N, Duration::from_secs(20)).await;
    assert_eq!(got.len(), N);
    let queue = running.services.queue.clone();
    // (Motion has the last one a moment before the relay reads its answer.)
    until(Duration::from_secs(2), Duration::from_millis(10), async || {
        done_or(queue.depth("acme") == 0, "delivered events do not count as waiting")
    })
    .await;
    until(Duration::from_secs(10), Duration::from_millis(50), async || {
        done_or(store.pending().unwrap().is_empty(), "the delivered events were pruned")
    })
    .await;

    // The disk fills up: a webhook's durable commit fails, and the store is re-opened.
    disk.set_full(true);
    let body = meta_message("1", "1650x", "wamid.full", "full");
    assert_eq!(post_meta(&url, "s", body).await.status, 503, "a full disk acknowledges nothing");
    assert_eq!(queue.depth("acme"), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    disk.set_full(false);

    // Room again: the store re-opens and its depth returns to 0.
    until(Duration::from_secs(15), Duration::from_millis(100), async || {
        let store = store.clone();
        let waiting = tokio::task::spawn_blocking(move || {
            store.writable();
            store.pending().map(|p| p.len()).unwrap_or(usize::MAX)
        })
        .await
        .unwrap();
        done_or(waiting == 0, format!("{waiting} delivered events stay in the store"))
    })
    .await;
    assert_eq!(queue.depth("acme"), 0);
    running.shutdown().await;
    let delivered = motion.count();
    assert_eq!(delivered, N);
    drop(queue);
    drop(store);

    // A restart on the store as it is on disk delivers nothing a second time. (On a copy: this
    // process still holds the file through the stopped relay's last references.)
    let restarted = tempfile::tempdir().unwrap();
    for file in ["queue.redb", "queue.journal"] {
        std::fs::copy(dir.path().join(file), restarted.path().join(file)).unwrap();
    }
    let text = text.replace(&dir.path().display().to_string(), &restarted.path().display().to_string());
    let config = || whatsapp_relay::config::parse(std::path::Path::new("relay.toml"), &text).unwrap();
    let store = Arc::new(EmbeddedStore::open(restarted.path()).unwrap());
    assert!(store.pending().unwrap().is_empty());
    let running = start_with(config(), Stores::of(store), Arc::new(SystemClock)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(motion.count(), delivered, "nothing was delivered twice");
    running.shutdown().await;
}
