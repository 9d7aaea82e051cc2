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
