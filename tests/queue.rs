//! `queue` mode as stories: Motion down, slow, failing, the relay killed; nothing acknowledged
//! is lost, and each conversation arrives in order.

mod support;

use std::collections::HashMap;
use std::time::Duration;
use support::*;

const SECRET: &str = "meta-app-secret";

/// One Meta account on `acme` (queue mode), one kaleyra account on `globex`.
fn config(acme: &str, globex: &str, acme_extra: &str) -> String {
    format!(
        r#"
[server]
http = "127.0.0.1:0"
shutdown_grace = "5s"
[admin]
listen = "127.0.0.1:0"
[storage]
path = "{{DATA}}"
[delivery]
mode = "queue"
timeout = "2s"
retry_initial = "50ms"
retry_max = "300ms"

[[motion]]
name = "acme"
url = "{acme}"
{acme_extra}
  [[motion.account]]
  id = "13"
  provider = "meta"
  app_secret = "{SECRET}"

[[motion]]
name = "globex"
url = "{globex}"
  [[motion.account]]
  id = "7"
  provider = "kaleyra"
  shared_token = "globex-token"
"#
    )
}

const ACME: &str = "/acme/api/whatsapp/accounts/13/notify";

/// Checks that, per customer, the texts `"{n}"` arrived in increasing order; returns how many
/// arrived more than once.
fn assert_in_order_per_conversation(got: &[Received]) -> usize {
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut dups = 0;
    for r in got {
        let (customer, text) = meta_customer_and_text(&r.body);
        let n: i64 = text.parse().unwrap();
        if !seen.insert((customer.clone(), n)) {
            dups += 1;
            continue;
        }
        let prev = last.insert(customer.clone(), n).unwrap_or(-1);
        assert!(n > prev, "conversation {customer}: {n} arrived after {prev}");
    }
    dups
}

async fn motion_down_then_up_every_acknowledged_webhook_arrives_in_order(backend: Backend) {
    let down = dead_addr().await;
    let globex = FakeMotion::start().await;
    let relay = RelayProcess::start(&backend.apply(&config(&format!("http://{down}"), &globex.url(), "")));

    for i in 0..200 {
        let body =
            meta_message("106540352242922", &format!("1650555{:04}", i % 10), &format!("wamid.{i}"), &i.to_string());
        let reply = post_meta(&relay.url(ACME), SECRET, body).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert!(reply.body.is_empty(), "Meta's acknowledgement is an empty 200");
    }
    // Motion comes up where it was down.
    let acme = FakeMotion::start_on(down).await;
    let got = acme.wait_for(200, Duration::from_secs(30)).await;
    let dups = assert_in_order_per_conversation(&got);
    assert_eq!(got.len() - dups, 200);
    assert_eq!(globex.count(), 0);
    // Every request is signed by Meta as received (byte for byte, header kept).
    for r in &got {
        assert_eq!(r.headers["x-hub-signature-256"].to_str().unwrap(), meta_signature(SECRET, &r.body));
    }
}

async fn a_failing_motion_is_retried_with_the_same_delivery_id(backend: Backend) {
    let acme = FakeMotion::start().await;
    acme.script([Answer::status(500), Answer::status(503), Answer::ok()]);
    let globex = FakeMotion::start().await;
    let relay = RelayProcess::start(&backend.apply(&config(&acme.url(), &globex.url(), "")));
    let reply = post_meta(&relay.url(ACME), SECRET, meta_message("1", "16505550000", "wamid.x", "0")).await;
    assert_eq!(reply.status, 200);
    let got = acme.wait_for(3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_after = acme.received();
    assert_eq!(got_after.len(), 3, "delivered once it got a 200; no more attempts");
    let attempts: Vec<_> = got.iter().map(|r| r.headers["x-relay-attempt"].to_str().unwrap().to_string()).collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    let ids: std::collections::HashSet<_> = got.iter().map(|r| r.headers["x-relay-delivery"].clone()).collect();
    assert_eq!(ids.len(), 1, "one event, one delivery id");
    assert!(got.iter().all(|r| r.body == got[0].body));
}

async fn motion_refusing_with_a_4xx_is_not_retried(backend: Backend) {
    let acme = FakeMotion::start().await;
    acme.script([Answer::status(404)]);
    let globex = FakeMotion::start().await;
    let relay = RelayProcess::start(&backend.apply(&config(&acme.url(), &globex.url(), "")));
    post_meta(&relay.url(ACME), SECRET, meta_message("1", "16505550000", "wamid.a", "0")).await;
    post_meta(&relay.url(ACME), SECRET, meta_message("1", "16505550000", "wamid.b", "1")).await;
    // The 404'd event goes to the dead letters; the next one of the conversation follows.
    let got = acme.wait_for(2, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(acme.count(), 2);
    assert_eq!(meta_customer_and_text(&got[1].body).1, "1");
    let metrics = get(&format!("http://{}/metrics", relay.admin.unwrap())).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("whatsapp_relay_dead_letters_total{motion=\"acme\",reason=\"refused\"} 1"), "{text}");
}

async fn sigkill_mid_stream_loses_nothing_acknowledged(backend: Backend) {
    let down = dead_addr().await;
    let globex = FakeMotion::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&format!("http://{down}"), &globex.url(), "");
    let relay = RelayProcess::start_in(dir, &backend.apply(&cfg));
    let url = relay.url(ACME);

    // 50 conversations, 10 messages each, sent concurrently; each conversation waits for its ack.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for c in 0..50 {
        let (url, tx) = (url.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..10 {
                let body = meta_message("1", &format!("1650000{c:04}"), &format!("wamid.{c}.{n}"), &n.to_string());
                let sig = meta_signature(SECRET, &body);
                let req = http::Request::post(&url)
                    .header("x-hub-signature-256", sig)
                    .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
                    .unwrap();
                match client().request(req).await {
                    Ok(resp) if resp.status() == 200 => tx.send(body).unwrap(),
                    _ => return, // the relay died under us: this one was never acknowledged
                }
            }
        }));
    }
    drop(tx);
    // Kill it mid-stream.
    let mut acked = Vec::new();
    while acked.len() < 200 {
        acked.push(rx.recv().await.expect("acks before the kill"));
    }
    let mut relay = relay;
    relay.signal("KILL");
    relay.wait_exit(Duration::from_secs(5));
    for t in tasks {
        let _ = t.await;
    }
    while let Ok(b) = rx.try_recv() {
        acked.push(b);
    }
    let acked_count = acked.len();
    assert!(acked_count >= 200);

    // Restart on the same store, then Motion comes up.
    let _relay = relay.restart();
    let acme = FakeMotion::start_on(down).await;
    let got = acme.wait_for(acked_count, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = if acme.count() > got.len() { acme.received() } else { got };
    let received: std::collections::HashSet<&[u8]> = got.iter().map(|r| &r.body[..]).collect();
    for body in &acked {
        assert!(received.contains(&body[..]), "an acknowledged webhook was lost");
    }
    let dups = assert_in_order_per_conversation(&got);
    eprintln!("SIGKILL story: {acked_count} acknowledged, {} received, {dups} duplicates", got.len());
}

async fn a_full_motion_gets_503_while_others_flow(backend: Backend) {
    let down = dead_addr().await;
    let globex = FakeMotion::start().await;
    let relay =
        RelayProcess::start(&backend.apply(&config(&format!("http://{down}"), &globex.url(), "max_queued = 5")));
    for i in 0..5 {
        let reply = post_meta(&relay.url(ACME), SECRET, meta_message("1", "1", &format!("w{i}"), &i.to_string())).await;
        assert_eq!(reply.status, 200);
    }
    let reply = post_meta(&relay.url(ACME), SECRET, meta_message("1", "1", "w5", "5")).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.error_code(), "unavailable");
    for i in 0..20 {
        let reply = post(
            &relay.url("/globex/api/whatsapp/accounts/7/notify"),
            &[("x-webhook-token", "globex-token")],
            format!("{{\"from\":\"1650\",\"n\":{i}}}"),
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    globex.wait_for(20, Duration::from_secs(10)).await;
}

async fn twilio_gets_empty_twiml_and_sigterm_keeps_undelivered_events(backend: Backend) {
    let down = dead_addr().await;
    let cfg = format!(
        r#"
[server]
http = "127.0.0.1:0"
public_url = "https://chat.example.com"
[storage]
path = "{{DATA}}"
[delivery]
retry_initial = "50ms"
retry_max = "200ms"
[[motion]]
name = "acme"
url = "http://{down}"
  [[motion.account]]
  id = "12"
  provider = "twilio"
  auth_token = "12345"
"#
    );
    let mut relay = RelayProcess::start(&backend.apply(&cfg));
    let body = fixture("twilio-inbound.form");
    let url = "https://chat.example.com/acme/api/whatsapp/accounts/12/notify";
    let sig = twilio_signature("12345", url, &body);
    let reply = post(
        &relay.url("/acme/api/whatsapp/accounts/12/notify"),
        &[("x-twilio-signature", &sig), ("content-type", "application/x-www-form-urlencoded")],
        body.clone(),
    )
    .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.headers["content-type"], "text/xml");
    assert!(String::from_utf8_lossy(&reply.body).contains("<Response/>"));

    relay.signal("TERM");
    assert_eq!(relay.wait_exit(Duration::from_secs(10)), Some(0), "SIGTERM exits 0");
    let relay = relay.restart();
    let acme = FakeMotion::start_on(down).await;
    let got = acme.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].body, body);
    assert_eq!(got[0].headers["x-twilio-signature"].to_str().unwrap(), sig);
    drop(relay);
}

async fn a_motion_that_stalls_mid_answer_does_not_hold_the_conversation(backend: Backend) {
    let (acme, bodies) = stalling_motion().await;
    let globex = FakeMotion::start().await;
    let relay = RelayProcess::start(&backend.apply(&config(&acme, &globex.url(), "")));
    for (i, wamid) in ["wamid.s0", "wamid.s1"].into_iter().enumerate() {
        let reply = post_meta(&relay.url(ACME), SECRET, meta_message("1", "16505550000", wamid, &i.to_string())).await;
        assert_eq!(reply.status, 200);
    }
    // The first attempt got a 200 and then nothing more: after the 2 s delivery timeout it
    // counts as delivered (Motion said so) and the conversation's next event follows.
    let start = std::time::Instant::now();
    while bodies.lock().unwrap().len() < 2 {
        assert!(start.elapsed() < Duration::from_secs(15), "the conversation is stuck behind the stalled answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = bodies.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "the 200 was not retried");
    assert_eq!(meta_customer_and_text(&got[1]).1, "1");
}

on_both_backends!(
    motion_down_then_up_every_acknowledged_webhook_arrives_in_order,
    a_failing_motion_is_retried_with_the_same_delivery_id,
    motion_refusing_with_a_4xx_is_not_retried,
    sigkill_mid_stream_loses_nothing_acknowledged,
    a_full_motion_gets_503_while_others_flow,
    twilio_gets_empty_twiml_and_sigterm_keeps_undelivered_events,
    a_motion_that_stalls_mid_answer_does_not_hold_the_conversation,
);
