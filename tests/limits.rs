//! Limits per tenant: one Motion's flood is refused with 429 past its `rate_limit`, one
//! Motion's backlog of large payloads stops at `max_queued_bytes` with 503, and the other
//! Motions are served as before. Against the real binary.

mod support;

use std::time::{Duration, Instant};
use support::*;

fn config(noisy: &str, quiet: &str, noisy_extra: &str) -> String {
    format!(
        r#"
[server]
http = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[storage]
path = "{{DATA}}"
[delivery]
mode = "queue"
retry_initial = "50ms"
retry_max = "200ms"

[[motion]]
name = "noisy"
url = "{noisy}"
{noisy_extra}
  [[motion.account]]
  id = "1"
  provider = "kaleyra"
  shared_token = "noisy-token"

[[motion]]
name = "quiet"
url = "{quiet}"
  [[motion.account]]
  id = "1"
  provider = "kaleyra"
  shared_token = "quiet-token"
"#
    )
}

fn message(i: usize, pad: usize) -> String {
    format!(r#"{{"id":"m{i}","from":"1650555{i:04}","type":"text","body":"{}"}}"#, "x".repeat(pad))
}

async fn send(relay: &RelayProcess, motion: &str, token: &str, i: usize, pad: usize) -> Reply {
    let url = relay.url(&format!("/{motion}/api/whatsapp/accounts/1/notify"));
    post(&url, &[("x-webhook-token", token), ("content-type", "application/json")], message(i, pad)).await
}

#[tokio::test]
async fn a_flood_past_one_motions_rate_limit_gets_429_and_the_other_motion_is_served() {
    let noisy = FakeMotion::start().await;
    let quiet = FakeMotion::start().await;
    let relay = RelayProcess::start(&config(&noisy.url(), &quiet.url(), "rate_limit = \"5/s\"\nburst = 5"));
    let (mut accepted, mut limited) = (0, 0);
    for i in 0..40 {
        // The other Motion's webhooks go on at the same time, each answered promptly.
        let started = Instant::now();
        let r = send(&relay, "quiet", "quiet-token", i, 10).await;
        assert_eq!(r.status, 200, "quiet motion");
        assert!(started.elapsed() < Duration::from_secs(2));
        let r = send(&relay, "noisy", "noisy-token", i, 10).await;
        match r.status {
            200 => accepted += 1,
            429 => {
                limited += 1;
                let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=2).contains(&after), "Retry-After {after}");
                let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                assert_eq!(body["error"], "rate_limited");
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(limited > 0 && accepted >= 5, "accepted {accepted}, limited {limited}");
    // Only what was accepted reaches the noisy Motion; everything reaches the quiet one.
    quiet.wait_for(40, Duration::from_secs(10)).await;
    noisy.wait_for(accepted, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(noisy.count(), accepted);
    let metrics = get(&format!("http://{}/metrics", relay.admin.unwrap())).await;
    let text = String::from_utf8_lossy(&metrics.body);
    let line = format!("whatsapp_relay_rate_limited_total{{motion=\"noisy\"}} {limited}");
    assert!(text.contains(&line), "{line} in\n{text}");
}

#[tokio::test]
async fn one_motions_backlog_stops_at_max_queued_bytes_and_the_other_motion_is_not_affected() {
    let down = dead_addr().await;
    let quiet = FakeMotion::start().await;
    let relay = RelayProcess::start(&config(&format!("http://{down}"), &quiet.url(), "max_queued_bytes = \"8KiB\""));
    // About 2 KiB each: the fifth passes 8 KiB.
    let mut statuses = Vec::new();
    for i in 0..8 {
        statuses.push(send(&relay, "noisy", "noisy-token", i, 2000).await.status);
    }
    let accepted = statuses.iter().filter(|s| **s == 200).count();
    assert!((4..=5).contains(&accepted), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&503), "{statuses:?}");
    for i in 0..5 {
        assert_eq!(send(&relay, "quiet", "quiet-token", i, 2000).await.status, 200);
    }
    quiet.wait_for(5, Duration::from_secs(10)).await;
    // Motion comes back and drains the backlog: room again.
    let noisy = FakeMotion::start_on(down).await;
    noisy.wait_for(accepted, Duration::from_secs(10)).await;
    until(Duration::from_secs(10), Duration::from_millis(100), async || {
        let status = send(&relay, "noisy", "noisy-token", 100, 2000).await.status;
        done_or(status == 200, format!("the budget never freed up ({status})"))
    })
    .await;
}
