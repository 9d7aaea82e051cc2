//! Live reload and graceful shutdown as an operator relies on them: routes added and removed
//! under a load of signed webhooks with nothing failed or dropped; a broken file refused with
//! the old routes kept; SIGTERM letting every request in flight finish.

mod support;

use http::Method;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::tls::*;
use support::*;

const SECRET: &str = "meta-app-secret";
const ADMIN_TOKEN: &str = "admin-token-for-tests";
const ACME: &str = "/acme/api/whatsapp/accounts/13/notify";
const EXTRA: &str = "/extra/api/whatsapp/accounts/1/notify";

/// `acme` (Meta, always there) and, when `extra` is set, a second Motion `extra` (Kaleyra,
/// shared token) at `extra_url`. http + https (files) + admin with a token.
fn config(mode: &str, acme: &str, extra: Option<&str>, tls: Option<(&std::path::Path, &std::path::Path)>) -> String {
    let tls = tls.map_or(String::new(), |(c, k)| {
        format!(
            "https = \"127.0.0.1:0\"\n[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            c.display(),
            k.display()
        )
    });
    let extra = extra.map_or(String::new(), |url| {
        format!(
            "[[motion]]\nname = \"extra\"\nurl = \"{url}\"\n  [[motion.account]]\n  id = \"1\"\n  provider = \"kaleyra\"\n  shared_token = \"extra-token\"\n"
        )
    });
    format!(
        r#"
[server]
http = "127.0.0.1:0"
shutdown_grace = "10s"
{tls}
[admin]
listen = "127.0.0.1:0"
token = "{ADMIN_TOKEN}"
[storage]
path = "{{DATA}}"
[delivery]
mode = "{mode}"
timeout = "5s"
retry_initial = "50ms"
retry_max = "200ms"

[[motion]]
name = "acme"
url = "{acme}"
  [[motion.account]]
  id = "13"
  provider = "meta"
  app_secret = "{SECRET}"

{extra}"#
    )
}

/// Writes `text` over the relay's config file (replacing `{DATA}` as at start).
fn rewrite(relay: &RelayProcess, text: &str) {
    let data = relay.dir.as_ref().unwrap().path().join("data");
    let tmp = relay.config_path.with_extension("new");
    std::fs::write(&tmp, text.replace("{DATA}", &data.display().to_string())).unwrap();
    std::fs::rename(&tmp, &relay.config_path).unwrap();
}

async fn admin_reload(relay: &RelayProcess) -> Reply {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    send(Method::POST, &relay.admin_url("/admin/reload"), &[("authorization", &auth)], "").await
}

/// `whatsapp_relay_config_reloads_total{result=...}` from `/metrics`.
async fn reloads(relay: &RelayProcess, result: &str) -> u64 {
    let metrics = String::from_utf8_lossy(&get(&relay.admin_url("/metrics")).await.body).to_string();
    let prefix = format!("whatsapp_relay_config_reloads_total{{result=\"{result}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.trim().parse().unwrap())
}

async fn sighup_and_wait(relay: &RelayProcess, result: &str) {
    let before = reloads(relay, result).await;
    relay.signal("HUP");
    let start = Instant::now();
    while reloads(relay, result).await == before {
        assert!(start.elapsed() < Duration::from_secs(10), "SIGHUP reload not seen; logs:\n{}", relay.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn signed(n: usize, customer: &str) -> (Vec<u8>, String) {
    let body = meta_message("106540352242922", customer, &format!("wamid.{customer}.{n}"), &n.to_string());
    let sig = meta_signature(SECRET, &body);
    (body, sig)
}

/// Sends signed webhooks on one connection until `stop`; returns (answered 200, failures).
async fn load(mut conn: Conn, authority: String, customer: String, stop: Arc<AtomicBool>) -> (usize, Vec<String>) {
    let (mut ok, mut failures) = (0, Vec::new());
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let (body, sig) = signed(n, &customer);
        n += 1;
        let headers = [("x-hub-signature-256", sig.as_str()), ("content-type", "application/json")];
        match conn.send(Method::POST, &authority, ACME, &headers, body).await {
            Ok(r) if r.status == 200 => ok += 1,
            Ok(r) => failures.push(format!("{customer} #{n}: status {} {:?}", r.status, r.body)),
            Err(e) => {
                // The connection is gone: that is a dropped connection, and the end of this client.
                failures.push(format!("{customer} #{n}: connection failed: {e}"));
                break;
            }
        }
    }
    (ok, failures)
}

#[tokio::test]
async fn twenty_reloads_under_load_fail_no_request_and_drop_no_connection() {
    let motion = FakeMotion::start().await;
    let slow = FakeMotion::start().await;
    slow.script([Answer { status: 200, body: "{}", delay: Duration::from_millis(700) }]);
    let ca = TestCa::new("reload test CA");
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = write_leaf(certs.path(), &ca.leaf(&["relay.test"]));
    let with_extra = config("direct", &motion.url(), Some(&slow.url()), Some((&cert, &key)));
    let without_extra = config("direct", &motion.url(), None, Some((&cert, &key)));
    let relay = RelayProcess::start(&with_extra);
    let https = relay.https.unwrap();

    // Four keep-alive clients: two plain HTTP/1.1, one HTTP/1.1 over TLS, one HTTP/2 over TLS.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..4 {
        let conn = match i {
            0 | 1 => Conn::h1(tokio::net::TcpStream::connect(relay.http).await.unwrap()).await,
            2 => {
                Conn::h1(
                    connect(https, "relay.test", client_config(&[&ca.pem()], &[b"http/1.1"], Versions::Both))
                        .await
                        .unwrap(),
                )
                .await
            }
            _ => {
                Conn::h2(
                    connect(https, "relay.test", client_config(&[&ca.pem()], &[b"h2"], Versions::Both)).await.unwrap(),
                )
                .await
            }
        };
        let authority = if i < 2 { relay.http.to_string() } else { format!("relay.test:{}", https.port()) };
        clients.push(tokio::spawn(load(conn, authority, format!("1650555000{i}"), stop.clone())));
    }

    // A request in flight on `extra` (its Motion takes 700 ms) while the route is removed.
    let token = [("x-webhook-token", "extra-token")];
    let url = relay.url(EXTRA);
    let mut in_flight =
        Some(tokio::spawn(async move { post(&url, &[("x-webhook-token", "extra-token")], "in flight").await }));
    slow.wait_for(1, Duration::from_secs(5)).await;

    let started = Instant::now();
    let mut extra_ok = 0;
    for i in 0..20 {
        // Even reloads remove `extra`, odd ones add it back; admin API and SIGHUP in turn.
        let present = i % 2 == 1;
        rewrite(&relay, if present { &with_extra } else { &without_extra });
        if i % 4 < 2 {
            let reply = admin_reload(&relay).await;
            assert_eq!(reply.status, 200, "{:?}", reply.body);
            assert_eq!(reply.json()["reloaded"], true);
        } else {
            sighup_and_wait(&relay, "ok").await;
        }
        // The new table is in force as soon as the reload answered.
        let reply = post(&relay.url(EXTRA), &token, "probe").await;
        if present {
            assert_eq!(reply.status, 200, "reload {i} added extra");
            extra_ok += 1;
        } else {
            assert_eq!(reply.status, 404, "reload {i} removed extra");
        }
        if let Some(request) = in_flight.take() {
            let reply = request.await.unwrap();
            assert_eq!(reply.status, 200, "a request in flight finishes on the table it started with");
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let reload_time = started.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    for (i, c) in clients.into_iter().enumerate() {
        let (ok, failures) = c.await.unwrap();
        assert!(failures.is_empty(), "client {i}: {failures:#?}");
        assert!(ok > 10, "client {i} sent only {ok} requests");
        total += ok;
    }
    eprintln!("20 reloads in {reload_time:?} under a load of {total} webhooks: none failed, no connection dropped");
    assert_eq!(reloads(&relay, "ok").await, 20);
    assert_eq!(motion.count(), total, "every webhook answered 200 reached Motion");
    assert_eq!(slow.count(), 1 + extra_ok);
    assert!(!relay.logs().contains("\"level\":\"ERROR\""), "{}", relay.logs());
}

#[tokio::test]
async fn an_invalid_config_on_reload_is_refused_and_the_old_routes_stay() {
    let motion = FakeMotion::start().await;
    let good = config("direct", &motion.url(), Some(&motion.url()), None);
    let relay = RelayProcess::start(&good);
    let token = [("x-webhook-token", "extra-token")];
    assert_eq!(post(&relay.url(EXTRA), &token, "1").await.status, 200);

    // A typo: an unknown key. The admin call answers with the file's own error, line and column.
    rewrite(&relay, &good.replace("shared_token = \"extra-token\"", "shared_tokn = \"extra-token\""));
    let reply = admin_reload(&relay).await;
    assert_eq!(reply.status, 400);
    let msg = reply.json()["message"].as_str().unwrap().to_string();
    assert!(msg.contains("relay.toml:") && msg.contains("unknown field `shared_tokn`"), "{msg}");
    assert!(msg.contains("the running configuration stays"), "{msg}");
    relay.wait_log("reload refused, keeping the running configuration", Duration::from_secs(5)).await;
    // SIGHUP with the same file: refused too.
    sighup_and_wait(&relay, "refused").await;
    assert_eq!(reloads(&relay, "refused").await, 2);
    assert_eq!(post(&relay.url(EXTRA), &token, "2").await.status, 200, "old routes still served");
    let (body, sig) = signed(0, "16505550000");
    assert_eq!(post(&relay.url(ACME), &[("x-hub-signature-256", &sig)], body).await.status, 200);

    // Not even the admin token changed: the old file's is still the one.
    let unauth = send(Method::POST, &relay.admin_url("/admin/reload"), &[("authorization", "Bearer nope")], "").await;
    assert_eq!(unauth.status, 401);

    // A valid file moving a listener: applied except for the listener, and the log says so.
    rewrite(&relay, &good.replace("http = \"127.0.0.1:0\"", "http = \"127.0.0.1:1\""));
    let reply = admin_reload(&relay).await;
    assert_eq!(reply.status, 200);
    let warnings = reply.json()["warnings"].to_string();
    assert!(warnings.contains("[server] http changed from 127.0.0.1:0 to 127.0.0.1:1"), "{warnings}");
    assert!(warnings.contains("restart the relay to apply it"), "{warnings}");
    relay.wait_log("restart the relay to apply it", Duration::from_secs(5)).await;
    assert_eq!(post(&relay.url(EXTRA), &token, "3").await.status, 200, "still on the address it was bound to");
    assert_eq!(motion.count(), 4);
}

#[tokio::test]
async fn sigterm_lets_every_request_in_flight_finish_then_exits_0() {
    let motion = FakeMotion::start().await;
    motion.answer_always(Answer { status: 200, body: "{\"slow\":true}", delay: Duration::from_millis(1500) });
    let mut relay = RelayProcess::start(&config("direct", &motion.url(), None, None));
    let mut in_flight = Vec::new();
    for i in 0..8 {
        let (body, sig) = signed(i, &format!("1650555100{i}"));
        let url = relay.url(ACME);
        in_flight.push(tokio::spawn(async move { post(&url, &[("x-hub-signature-256", &sig)], body).await }));
    }
    // All eight are at Motion, waiting for its answer.
    motion.wait_for(8, Duration::from_secs(5)).await;
    relay.signal("TERM");
    // The listener closes a moment after the signal (the relay's main loop hears it, then each
    // serving thread drops its socket), while the eight still wait for Motion's answer.
    until(Duration::from_secs(10), Duration::from_millis(20), async || {
        let refused = tokio::net::TcpStream::connect(relay.http).await.is_err();
        done_or(refused, "new connections still accepted after SIGTERM")
    })
    .await;
    assert!(in_flight.iter().any(|r| !r.is_finished()), "no new connections once stopping, with requests in flight");
    for r in in_flight {
        let reply = r.await.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(&reply.body[..], b"{\"slow\":true}");
    }
    assert_eq!(relay.wait_exit(Duration::from_secs(10)), Some(0), "{}", relay.logs());
    // Its last line, written just before it exited: read off its stderr by another thread.
    relay.wait_log("stopped", Duration::from_secs(5)).await;
}

#[tokio::test]
async fn sigterm_under_a_queue_load_loses_no_acknowledged_event() {
    let down = dead_addr().await;
    let mut relay = RelayProcess::start(&config("queue", &format!("http://{down}"), None, None));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..4 {
        let conn = Conn::h1(tokio::net::TcpStream::connect(relay.http).await.unwrap()).await;
        let (authority, customer, stop) = (relay.http.to_string(), format!("1650555200{i}"), stop.clone());
        clients.push(tokio::spawn(async move {
            // Runs until the relay closes the connection: the shutdown ends it.
            let (ok, failures) = load(conn, authority, customer.clone(), stop).await;
            (customer, ok, failures)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    relay.signal("TERM");
    let mut acknowledged = Vec::new();
    for c in clients {
        let (customer, ok, failures) = c.await.unwrap();
        // The one failure allowed is the connection closing after the last answer; never an
        // error status.
        assert!(failures.len() <= 1 && failures.iter().all(|f| f.contains("connection")), "{failures:#?}");
        assert!(ok > 0);
        acknowledged.push((customer, ok));
    }
    stop.store(true, Ordering::Relaxed);
    assert_eq!(relay.wait_exit(Duration::from_secs(15)), Some(0), "{}", relay.logs());

    // Motion comes up; a new relay on the same store delivers every acknowledged event.
    let motion = FakeMotion::start_on(down).await;
    let relay = relay.restart();
    let total: usize = acknowledged.iter().map(|(_, n)| n).sum();
    let got = motion.wait_for(total, Duration::from_secs(60)).await;
    for (customer, ok) in &acknowledged {
        let mut texts: Vec<usize> = got
            .iter()
            .map(|r| meta_customer_and_text(&r.body))
            .filter(|(c, _)| c == customer)
            .map(|(_, t)| t.parse().unwrap())
            .collect();
        texts.sort();
        texts.dedup();
        // Every acknowledged one (0..ok); one more may have been stored as its answer was cut.
        assert!(texts.starts_with(&(0..*ok).collect::<Vec<_>>()), "customer {customer}: {texts:?}");
    }
    drop(relay);
}

/// A large config (5,000 Meta accounts with their own secrets on 10 Motions), reloaded again
/// and again with accounts removed, restored and re-keyed: after every reload each sampled
/// account answers as the new file says (200 with its current secret, 401 with a replaced one,
/// 404 once removed), and webhooks sent meanwhile to an account every version keeps all pass.
#[tokio::test]
async fn a_large_config_reloaded_repeatedly_routes_every_account_as_its_file_says() {
    use std::fmt::Write as _;
    const MOTIONS: usize = 10;
    const PER_MOTION: usize = 500;
    let motion = FakeMotion::start().await;
    // Version `v` (0, 1, 2): version 1 leaves out every account whose id ends in 3, version 2
    // gives every account ending in 7 a new secret; version 0 is the original.
    let secret = |id: usize, v: usize| {
        if v == 2 && id % 10 == 7 { format!("rekeyed-{id}") } else { format!("app-secret-{id:06}") }
    };
    let present = |id: usize, v: usize| !(v == 1 && id % 10 == 3);
    let text = |v: usize| {
        let mut t = config("queue", &motion.url(), None, None);
        for m in 0..MOTIONS {
            let _ = write!(t, "\n[[motion]]\nname = \"m{m}\"\nurl = \"{}\"\n", motion.url());
            for id in (m * PER_MOTION..(m + 1) * PER_MOTION).filter(|id| present(*id, v)) {
                let _ = write!(
                    t,
                    "  [[motion.account]]\n  id = \"{id}\"\n  provider = \"meta\"\n  app_secret = \"{}\"\n",
                    secret(id, v)
                );
            }
        }
        t
    };
    let relay = RelayProcess::start(&text(0));
    let url = |id: usize| relay.url(&format!("/m{}/api/whatsapp/accounts/{id}", id / PER_MOTION));
    let webhook = |id: usize, key: &str, n: usize| {
        let body = meta_message("106540352242922", "16505550000", &format!("wamid.large.{id}.{n}"), "hi");
        let sig = meta_signature(key, &body);
        (body, sig)
    };

    // Account 0 is in every version with the same secret: a steady load on it meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let steady = {
        let (stop, url) = (stop.clone(), url(0));
        tokio::spawn(async move {
            let (mut n, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let body = meta_message("106540352242922", "16505550001", &format!("wamid.steady.{n}"), "x");
                let sig = meta_signature("app-secret-000000", &body);
                let reply =
                    post(&url, &[("x-hub-signature-256", &sig), ("content-type", "application/json")], body).await;
                if reply.status != 200 {
                    failures.push(format!("#{n}: {} {:?}", reply.status, reply.body));
                }
                n += 1;
            }
            (n, failures)
        })
    };

    let sample: Vec<usize> = (0..MOTIONS * PER_MOTION).step_by(97).chain([3, 7, 4_993, 4_997, 4_999]).collect();
    let mut sent = 0;
    for (round, v) in [1, 2, 0, 2, 1, 0].into_iter().enumerate() {
        rewrite(&relay, &text(v));
        let reply = admin_reload(&relay).await;
        assert_eq!(reply.status, 200, "reload {round}: {:?}", reply.body);
        // With the base config's own account (acme/13).
        let expected = 1 + MOTIONS * PER_MOTION - if v == 1 { MOTIONS * PER_MOTION / 10 } else { 0 };
        assert_eq!(reply.json()["accounts"], expected, "reload {round}");
        for &id in &sample {
            let (body, sig) = webhook(id, &secret(id, v), round);
            let headers = [("x-hub-signature-256", sig.as_str()), ("content-type", "application/json")];
            let status = post(&url(id), &headers, body).await.status;
            let want = if present(id, v) { 200 } else { 404 };
            assert_eq!(status, want, "reload {round} (version {v}): account {id}");
            sent += usize::from(want == 200);
            if v == 2 && id % 10 == 7 {
                // The secret it had before no longer passes.
                let (body, sig) = webhook(id, &secret(id, 0), round);
                let headers = [("x-hub-signature-256", sig.as_str()), ("content-type", "application/json")];
                assert_eq!(post(&url(id), &headers, body).await.status, 401, "reload {round}: account {id} re-keyed");
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (steady_sent, failures) = steady.await.unwrap();
    assert!(failures.is_empty(), "webhooks failed during the reloads: {failures:#?}");
    assert!(steady_sent > 0);
    assert_eq!(reloads(&relay, "ok").await, 6);
    motion.wait_for(sent + steady_sent, Duration::from_secs(30)).await;
}

/// A measurement, not a pass/fail check on time: prints how long a reload of 100,000 accounts
/// takes through the real binary. Ignored by default (a debug build takes about 10 s to parse
/// the 7 MB file, twice); run it with
/// `cargo test --release --test reload reload_time_with_100k_accounts -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement; slow in debug builds"]
async fn reload_time_with_100k_accounts() {
    use std::fmt::Write as _;
    let motion = FakeMotion::start().await;
    let mut text = config("direct", &motion.url(), None, None);
    // 100 Motions x 1,000 accounts, the providers mixed as in a public relay.
    for m in 0..100 {
        let _ = write!(text, "\n[[motion]]\nname = \"m{m}\"\nurl = \"{}\"\n", motion.url());
        for a in 0..1000 {
            let id = m * 1000 + a;
            let _ = match a % 3 {
                0 => write!(text, "[[motion.account]]\nid = \"{id}\"\nprovider = \"meta\"\napp_secret = \"s{id}\"\n"),
                1 => write!(text, "[[motion.account]]\nid = \"{id}\"\nprovider = \"twilio\"\nauth_token = \"t{id}\"\n"),
                _ => write!(
                    text,
                    "[[motion.account]]\nid = \"{id}\"\nprovider = \"kaleyra\"\nshared_token = \"k{id}\"\n"
                ),
            };
        }
    }
    let t = Instant::now();
    let relay = RelayProcess::start(&text);
    let startup = t.elapsed();
    let t = Instant::now();
    let reply = admin_reload(&relay).await;
    let wall = t.elapsed();
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let v = reply.json();
    assert_eq!(v["accounts"], 100_001);
    eprintln!(
        "reload with 100,001 accounts ({} build): {:.0} ms to read, validate and build the table; {:.0} ms for the \
         admin call; start-up {:.0} ms",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        v["took_ms"].as_f64().unwrap(),
        wall.as_secs_f64() * 1000.0,
        startup.as_secs_f64() * 1000.0,
    );
    // Serving went on during the reload (it runs off the runtime's workers).
    let (body, sig) = signed(0, "16505550000");
    assert_eq!(post(&relay.url(ACME), &[("x-hub-signature-256", &sig)], body).await.status, 200);
}

/// What systemd (Type=notify) hears: READY=1 once listening, RELOADING=1 then READY=1 around a
/// reload, STOPPING=1 on SIGTERM. A datagram socket stands in for systemd's NOTIFY_SOCKET.
#[tokio::test]
async fn systemd_hears_ready_reloading_and_stopping() {
    let motion = FakeMotion::start().await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let next = || {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let notify = socket_path.display().to_string();
    let mut relay = RelayProcess::start_in_with_env(
        dir,
        &config("direct", &motion.url(), None, None),
        &[("NOTIFY_SOCKET", notify.as_str())],
    );
    assert!(next().starts_with("READY=1\n"));
    relay.signal("HUP");
    let reloading = next();
    assert!(reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{reloading}");
    assert_eq!(next(), "READY=1\n");
    // The admin API reloads the same way.
    assert_eq!(admin_reload(&relay).await.status, 200);
    assert!(next().starts_with("RELOADING=1\n"));
    assert_eq!(next(), "READY=1\n");
    relay.signal("TERM");
    assert!(next().starts_with("STOPPING=1\n"));
    assert_eq!(relay.wait_exit(Duration::from_secs(10)), Some(0));
}
