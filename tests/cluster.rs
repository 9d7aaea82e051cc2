//! Several relays on one PostgreSQL database, as stories: webhooks spread over the relays while
//! Motion is down, one relay SIGKILLed mid-load, Motion back: every acknowledged event arrives,
//! each conversation in order, a duplicate only with the same delivery id, and the survivors
//! finish the dead relay's conversations within `takeover` plus a retry. One conversation sent
//! alternately to two relays arrives in order. PostgreSQL stopped mid-load (immediate shutdown,
//! then a restart): no 2xx for anything not committed, 503s and failing /readyz meanwhile,
//! recovery without restarting the relays.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

const SECRET: &str = "meta-app-secret";
const PATH: &str = "/acme/api/whatsapp/accounts/13/notify";
/// `[storage] takeover` in these stories (Backend::storage).
const TAKEOVER: Duration = Duration::from_secs(6);

fn config(motion: &str) -> String {
    format!(
        r#"
[server]
http = "127.0.0.1:0"
shutdown_grace = "5s"
[admin]
listen = "127.0.0.1:0"
token = "cluster-admin-token"
[storage]
path = "{{DATA}}"
[delivery]
mode = "queue"
timeout = "2s"
retry_initial = "50ms"
retry_max = "300ms"

[[motion]]
name = "acme"
url = "{motion}"
  [[motion.account]]
  id = "13"
  provider = "meta"
  app_secret = "{SECRET}"
"#
    )
}

/// Posts a signed Meta webhook; None when the relay could not be reached or did not answer
/// within 15 s (never acknowledged).
async fn try_post(url: &str, body: Vec<u8>) -> Option<u16> {
    let sig = meta_signature(SECRET, &body);
    let req = http::Request::post(url)
        .header("x-hub-signature-256", sig)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(15), client().request(req)).await {
        Ok(Ok(resp)) => Some(resp.status().as_u16()),
        _ => None,
    }
}

fn message(conv: usize, n: usize) -> Vec<u8> {
    meta_message("1", &format!("1650000{conv:04}"), &format!("wamid.{conv}.{n}"), &n.to_string())
}

/// Checks what Motion received: each conversation in increasing order (duplicates aside), every
/// copy of an event with one delivery id, and every acknowledged event there. Returns how many
/// were duplicates.
fn check_arrivals(got: &[Received], acked: &HashSet<(String, String)>) -> usize {
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut ids: HashMap<(String, String), String> = HashMap::new();
    let mut dups = 0;
    for r in got {
        let (customer, text) = meta_customer_and_text(&r.body);
        let id = r.headers["x-relay-delivery"].to_str().unwrap().to_string();
        if let Some(first) = ids.insert((customer.clone(), text.clone()), id.clone()) {
            assert_eq!(first, id, "a duplicate of {customer}/{text} with another delivery id");
            dups += 1;
            continue;
        }
        let n: i64 = text.parse().unwrap();
        let prev = last.insert(customer.clone(), n).unwrap_or(-1);
        assert!(n > prev, "conversation {customer}: {n} arrived after {prev}");
    }
    for key in acked {
        assert!(ids.contains_key(key), "acknowledged {key:?} never arrived");
    }
    dups
}

async fn wait_all(motion: &FakeMotion, acked: &HashSet<(String, String)>, within: Duration) -> Vec<Received> {
    let start = Instant::now();
    loop {
        let got = motion.received();
        let have: HashSet<(String, String)> = got.iter().map(|r| meta_customer_and_text(&r.body)).collect();
        if acked.iter().all(|k| have.contains(k)) {
            return got;
        }
        let missing = acked.iter().filter(|k| !have.contains(*k)).count();
        assert!(start.elapsed() < within, "{missing} acknowledged events still missing after {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `relays` relays, 50 conversations of 10 messages each, message n of conversation c sent to
/// relay (c + n) mod relays, each conversation waiting for its acknowledgement before the
/// next; one relay SIGKILLed once half of them were acknowledged; then Motion comes back.
async fn kill_one_of(relays: usize, test: &str) {
    let Some(backend) = Backend::postgres(test) else { return };
    let down = dead_addr().await;
    let cfg = backend.apply(&config(&format!("http://{down}")));
    let mut procs: Vec<RelayProcess> = (0..relays).map(|_| RelayProcess::start(&cfg)).collect();
    let urls: Vec<String> = procs.iter().map(|p| p.url(PATH)).collect();

    let acked: Arc<Mutex<HashSet<(String, String)>>> = Default::default();
    let mut tasks = Vec::new();
    for c in 0..50 {
        let (urls, acked) = (urls.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..10 {
                let url = &urls[(c + n) % urls.len()];
                if try_post(url, message(c, n)).await == Some(200) {
                    acked.lock().unwrap().insert((format!("1650000{c:04}"), n.to_string()));
                }
            }
        }));
    }
    while acked.lock().unwrap().len() < 250 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let victim = procs.remove(relays - 1);
    let mut victim = victim;
    victim.signal("KILL");
    victim.wait_exit(Duration::from_secs(5));
    let killed = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 250);

    let motion = FakeMotion::start_on(down).await;
    // The dead relay's leases expire and are taken within `takeover`; then a retry (at most
    // retry_max) and the deliveries themselves.
    let got = wait_all(&motion, &acked, TAKEOVER + Duration::from_secs(6)).await;
    let took = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = if motion.count() > got.len() { motion.received() } else { got };
    let dups = check_arrivals(&got, &acked);
    eprintln!(
        "{relays} relays, one killed: {} acknowledged, {} received, {dups} duplicates, all in {took:?} after the kill",
        acked.len(),
        got.len()
    );
    drop(procs);
}

#[tokio::test]
async fn two_relays_one_killed_mid_load_lose_nothing_and_keep_order() {
    kill_one_of(2, "two_relays_one_killed_mid_load_lose_nothing_and_keep_order").await;
}

#[tokio::test]
async fn three_relays_one_killed_mid_load_lose_nothing_and_keep_order() {
    kill_one_of(3, "three_relays_one_killed_mid_load_lose_nothing_and_keep_order").await;
}

#[tokio::test]
async fn one_conversation_sent_alternately_to_two_relays_arrives_in_order() {
    let Some(backend) = Backend::postgres("one_conversation_sent_alternately_to_two_relays_arrives_in_order") else {
        return;
    };
    let motion = FakeMotion::start().await;
    let cfg = backend.apply(&config(&motion.url()));
    let relays = [RelayProcess::start(&cfg), RelayProcess::start(&cfg)];
    let mut acked = HashSet::new();
    for n in 0..40 {
        let url = relays[n % 2].url(PATH);
        assert_eq!(try_post(&url, message(7, n)).await, Some(200));
        acked.insert(("16500000007".to_string(), n.to_string()));
    }
    let got = wait_all(&motion, &acked, Duration::from_secs(15)).await;
    check_arrivals(&got, &acked);
    // A provider's redelivery to the other relay is acknowledged and not stored again.
    assert_eq!(try_post(&relays[1].url(PATH), message(7, 0)).await, Some(200));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let copies = motion.received().iter().filter(|r| meta_customer_and_text(&r.body).1 == "0").count();
    assert_eq!(copies, 1, "the redelivery to the other relay was a duplicate");

    // The board names the live relays and what each holds: every partition, once.
    until(Duration::from_secs(15), Duration::from_millis(500), async || {
        let event = first_board_event(relays[0].admin.unwrap()).await;
        let cluster = &event["relay"]["cluster"];
        let held: u64 = cluster["relays"].as_array().map_or(0, |r| r.iter().map(|r| r[1].as_u64().unwrap()).sum());
        let whole =
            cluster["relays"].as_array().map(Vec::len) == Some(2) && held == cluster["partitions"].as_u64().unwrap();
        done_or(whole, format!("the board's cluster view: {cluster}"))
    })
    .await;
}

/// The first event of the board's stream on `admin`.
async fn first_board_event(admin: std::net::SocketAddr) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(admin).await.unwrap();
    let request =
        format!("GET /board/events HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer cluster-admin-token\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut buf = String::new();
    loop {
        if let Some(start) = buf.find("data: ") {
            if let Some(end) = buf[start..].find("\n\n") {
                return serde_json::from_str(&buf[start + 6..start + end]).unwrap();
            }
        }
        let mut chunk = [0u8; 65536];
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "stream closed: {buf}");
        buf.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
}

#[tokio::test]
async fn postgres_stopped_mid_load_means_503_and_unready_then_recovery_without_restart() {
    let Some(backend) =
        Backend::postgres("postgres_stopped_mid_load_means_503_and_unready_then_recovery_without_restart")
    else {
        return;
    };
    let Backend::Postgres(pg, _) = &backend else { unreachable!() };
    let pg = pg.clone();
    let motion = FakeMotion::start().await;
    let cfg = backend.apply(&config(&motion.url()));
    let relays = [RelayProcess::start(&cfg), RelayProcess::start(&cfg)];
    let urls: Vec<String> = relays.iter().map(|p| p.url(PATH)).collect();

    // A steady stream over 20 conversations until `stop`.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked: Arc<Mutex<HashSet<(String, String)>>> = Default::default();
    type Answers = Arc<Mutex<Vec<(Instant, Option<u16>)>>>;
    let statuses: Answers = Default::default();
    let mut tasks = Vec::new();
    for c in 0..20 {
        let (urls, acked, statuses, stop) = (urls.clone(), acked.clone(), statuses.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let status = try_post(&urls[(c + n) % 2], message(c, n)).await;
                if status == Some(200) {
                    acked.lock().unwrap().insert((format!("1650000{c:04}"), n.to_string()));
                }
                statuses.lock().unwrap().push((Instant::now(), status));
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    while acked.lock().unwrap().len() < 100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The database goes away at once (no checkpoint, like a crash).
    let stopped = Instant::now();
    // Off the test's runtime: the senders note each answer as it comes meanwhile (one that came
    // while this thread waited for the server to go would be noted late, as if in the outage).
    let server = pg.clone();
    tokio::task::spawn_blocking(move || server.lock().unwrap().stop("immediate")).await.unwrap();
    // /readyz fails within 5 s on every relay.
    for r in &relays {
        loop {
            if get(&r.admin_url("/readyz")).await.status == 503 {
                break;
            }
            assert!(stopped.elapsed() < Duration::from_secs(5), "/readyz still ready 5 s into the outage");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(7)).await;
    let during: Vec<Option<u16>> = statuses
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| *at > stopped + Duration::from_secs(1))
        .map(|(_, s)| *s)
        .collect();
    assert!(during.contains(&Some(503)), "no 503 during the outage: {during:?}");
    assert!(!during.contains(&Some(200)), "a 2xx while the database was down");
    // Every answer came within the 5 s wait (plus the request's own time), none hung.
    assert!(during.iter().all(|s| s.is_some()), "a webhook got no answer during the outage");

    // It comes back: the relays recover by themselves.
    pg.lock().unwrap().restart();
    let back = Instant::now();
    let acked_before = acked.lock().unwrap().len();
    for r in &relays {
        loop {
            if get(&r.admin_url("/readyz")).await.status == 200 {
                break;
            }
            assert!(back.elapsed() < Duration::from_secs(15), "/readyz not ready 15 s after the database came back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    while acked.lock().unwrap().len() < acked_before + 100 {
        assert!(back.elapsed() < Duration::from_secs(30), "no new acknowledgements after the database came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let got = wait_all(&motion, &acked, TAKEOVER + Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = if motion.count() > got.len() { motion.received() } else { got };
    let dups = check_arrivals(&got, &acked);
    eprintln!(
        "database outage: {} acknowledged, {} received, {dups} duplicates; ready again in {:?}",
        acked.len(),
        got.len(),
        back.elapsed()
    );
}

/// `max_queued` holds for the cluster: ten events spread over two relays (each holding only
/// some of their conversations) fill a Motion whose max_queued is 10, and both relays then
/// answer 503 for it; once Motion is back and the backlog drains, both accept again.
#[tokio::test]
async fn max_queued_counts_every_relays_events() {
    let Some(backend) = Backend::postgres("max_queued_cluster") else { return };
    let motion_addr = dead_addr().await;
    let cfg = backend.apply(
        &config(&format!("http://{motion_addr}"))
            .replace("  [[motion.account]]", "max_queued = 10\n  [[motion.account]]"),
    );
    let relays = [RelayProcess::start(&cfg), RelayProcess::start(&cfg)];
    for c in 0..10 {
        let status = try_post(&relays[c % 2].url(PATH), message(c, 0)).await;
        assert_eq!(status, Some(200), "event {c}");
    }
    // Each relay counts the cluster's backlog about once a second.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    for (i, relay) in relays.iter().enumerate() {
        let status = try_post(&relay.url(PATH), message(100 + i, 0)).await;
        assert_eq!(status, Some(503), "relay {i} accepted an 11th event for a Motion with max_queued = 10");
    }
    // Motion comes back: the backlog drains and both accept again.
    let motion = FakeMotion::start_on(motion_addr).await;
    motion.wait_for(10, Duration::from_secs(30)).await;
    // Counted drained a moment later: the relay reads Motion's last answer, prunes what it
    // delivered at its next housekeeping, and each relay counts the cluster again about once a
    // second. A 503 stores nothing, so asking again is harmless.
    for (i, relay) in relays.iter().enumerate() {
        until(Duration::from_secs(15), Duration::from_millis(200), async || {
            let status = try_post(&relay.url(PATH), message(200 + i, 0)).await;
            done_or(status == Some(200), format!("relay {i} after draining: {status:?}"))
        })
        .await;
    }
}
