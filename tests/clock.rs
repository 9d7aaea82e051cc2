//! Rules that span hours or days, on the relay's own clock: the real server in-process with a
//! manual clock that the story moves forward (the 24-hour window's story is in `outbound.rs`;
//! `give_up_after` is tested on the queue itself).

mod support;

use std::sync::Arc;
use std::time::Duration;
use support::*;
use whatsapp_relay::clock::ManualClock;
use whatsapp_relay::store::{EmbeddedStore, Stores};

#[tokio::test]
async fn a_redelivery_is_a_duplicate_until_the_dedup_window_has_passed() {
    let dir = tempfile::tempdir().unwrap();
    let motion = FakeMotion::start().await;
    let text = format!(
        r#"
[server]
http = "127.0.0.1:0"
[storage]
path = "{}"
[delivery]
mode = "queue"
dedup_window = "1h"

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
    let stores = Stores::of(Arc::new(EmbeddedStore::open(dir.path()).unwrap()));
    let clock = Arc::new(ManualClock::new());
    let running = whatsapp_relay::server::start_with(config, stores, clock.clone()).await.unwrap();
    let url = format!("http://{}/acme/api/whatsapp/accounts/13/notify", running.http.unwrap());
    let message = || meta_message("106", "16505551234", "wamid.same", "hello");

    assert_eq!(post_meta(&url, "s", message()).await.status, 200);
    motion.wait_for(1, Duration::from_secs(10)).await;
    // Meta redelivers it 59 minutes later: acknowledged, not stored again.
    clock.advance(Duration::from_secs(59 * 60));
    assert_eq!(post_meta(&url, "s", message()).await.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(motion.count(), 1);
    // Past the window the same id is a new event.
    clock.advance(Duration::from_secs(2 * 60));
    assert_eq!(post_meta(&url, "s", message()).await.status, 200);
    motion.wait_for(2, Duration::from_secs(10)).await;
    running.shutdown().await;
}
