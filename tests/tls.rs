//! The https listener as an operator meets it: certificates from files, replaced under a
//! running relay; automatic certificates from an ACME CA (Pebble, on loopback); plain http
//! redirected to https.

mod support;

use http::Method;
use std::time::{Duration, Instant};
use support::pebble::{Pebble, on_path};
use support::tls::*;
use support::*;

const SECRET: &str = "meta-app-secret";
const ACME: &str = "/acme/api/whatsapp/accounts/13/notify";

/// Relay with http + https (from `cert`/`key`) + admin, one Meta account on `acme` (direct).
fn config(motion: &str, cert: &std::path::Path, key: &std::path::Path, extra_server: &str) -> String {
    format!(
        r#"
[server]
http = "127.0.0.1:0"
https = "127.0.0.1:0"
shutdown_grace = "5s"
{extra_server}
[server.tls]
cert_file = "{cert}"
key_file = "{key}"
[admin]
listen = "127.0.0.1:0"
[storage]
path = "{{DATA}}"
[delivery]
mode = "direct"

[[motion]]
name = "acme"
url = "{motion}"
  [[motion.account]]
  id = "13"
  provider = "meta"
  app_secret = "{SECRET}"
"#,
        cert = cert.display(),
        key = key.display(),
    )
}

fn h1_only() -> Vec<&'static [u8]> {
    vec![b"http/1.1"]
}

/// Connects until the server shows `want` (the file watcher polls every 2 s), or panics.
async fn wait_for_cert(addr: std::net::SocketAddr, ca: &TestCa, want: &Leaf, timeout: Duration) {
    let start = Instant::now();
    loop {
        let tls = connect(addr, "relay.test", client_config(&[&ca.pem()], &h1_only(), Versions::Both)).await.unwrap();
        if peer_leaf(&tls) == want.der {
            return;
        }
        assert!(start.elapsed() < timeout, "the relay did not switch to the new certificate within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn webhook(conn: &mut Conn, authority: &str, n: usize) -> Reply {
    let body = meta_message("106540352242922", "16505550000", &format!("wamid.{n}"), &n.to_string());
    let sig = meta_signature(SECRET, &body);
    conn.send(
        Method::POST,
        authority,
        ACME,
        &[("x-hub-signature-256", &sig), ("content-type", "application/json")],
        body,
    )
    .await
    .expect("request on an open connection")
}

#[tokio::test]
async fn file_certificate_is_served_replaced_for_new_connections_and_old_connections_keep_working() {
    let motion = FakeMotion::start().await;
    let ca = TestCa::new("relay test CA");
    let dir = tempfile::tempdir().unwrap();
    let first = ca.leaf(&["relay.test"]);
    let (cert, key) = write_leaf(dir.path(), &first);
    let relay = RelayProcess::start(&config(&motion.url(), &cert, &key, ""));
    let https = relay.https.expect("https listener in the listening line");
    let authority = format!("relay.test:{}", https.port());
    let roots = [ca.pem()];
    let roots: Vec<&str> = roots.iter().map(String::as_str).collect();

    // TLS 1.3 and TLS 1.2 both work; ALPN picks h2 when offered, http/1.1 otherwise.
    for (versions, want) in
        [(Versions::Tls13, rustls::ProtocolVersion::TLSv1_3), (Versions::Tls12, rustls::ProtocolVersion::TLSv1_2)]
    {
        let tls = connect(https, "relay.test", client_config(&roots, &h1_only(), versions)).await.unwrap();
        assert_eq!(version(&tls), Some(want));
        assert_eq!(peer_leaf(&tls), first.der);
        assert_eq!(alpn(&tls).as_deref(), Some(&b"http/1.1"[..]));
        let mut c = Conn::h1(tls).await;
        let r = c.send(Method::GET, &authority, "/healthz", &[], "").await.unwrap();
        assert_eq!(r.status, 200);
    }
    let tls = connect(https, "relay.test", client_config(&roots, &[b"h2", b"http/1.1"], Versions::Both)).await.unwrap();
    assert_eq!(alpn(&tls).as_deref(), Some(&b"h2"[..]));
    let mut h2 = Conn::h2(tls).await;
    assert_eq!(webhook(&mut h2, &authority, 0).await.status, 200);

    // A keep-alive connection opened on the first certificate.
    let old_tls = connect(https, "relay.test", client_config(&roots, &h1_only(), Versions::Both)).await.unwrap();
    assert_eq!(peer_leaf(&old_tls), first.der);
    let mut old = Conn::h1(old_tls).await;
    assert_eq!(webhook(&mut old, &authority, 1).await.status, 200);

    // The operator's tooling renews: new key, new certificate, same file names.
    let second = ca.leaf(&["relay.test"]);
    write_leaf(dir.path(), &second);
    wait_for_cert(https, &ca, &second, Duration::from_secs(15)).await;
    // The old connection was not dropped and still works, on the session it negotiated.
    for n in 2..5 {
        assert_eq!(webhook(&mut old, &authority, n).await.status, 200);
    }
    assert_eq!(webhook(&mut h2, &authority, 5).await.status, 200);

    // What Motion received over https says so.
    let got = motion.received();
    assert_eq!(got.len(), 6);
    assert!(got.iter().all(|r| r.headers["x-forwarded-proto"] == "https"));

    // A bad new pair is refused and logged; the good one stays.
    let third = ca.leaf(&["relay.test"]);
    // (Counted from here: the poll may also have caught the renewal above half-written.)
    let refused_before = relay.count_log("new certificate refused");
    replace_file(&cert, &third.cert_pem); // the key file still holds the second key: a mismatch
    let start = Instant::now();
    while relay.count_log("new certificate refused") == refused_before {
        assert!(start.elapsed() < Duration::from_secs(15), "mismatched pair not refused; logs:\n{}", relay.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(relay.logs().contains("does not belong to the certificate"), "{}", relay.logs());
    let tls = connect(https, "relay.test", client_config(&roots, &h1_only(), Versions::Both)).await.unwrap();
    assert_eq!(peer_leaf(&tls), second.der);
    let ready = get(&relay.admin_url("/readyz")).await;
    assert_eq!(ready.status, 200, "a refused renewal leaves the relay serving");
    let body = String::from_utf8_lossy(&ready.body).to_string();
    assert!(body.contains("warning: tls: new certificate files refused"), "{body}");
    let metrics = String::from_utf8_lossy(&get(&relay.admin_url("/metrics")).await.body).to_string();
    assert!(
        metrics.contains("whatsapp_relay_tls_certificate_loads_total{source=\"files\",result=\"refused\"} "),
        "{metrics}"
    );

    // Garbage is refused the same way; SIGHUP forces a re-read.
    replace_file(&cert, "not a certificate\n");
    relay.signal("HUP");
    relay.wait_log("no certificate found", Duration::from_secs(10)).await;
    let tls = connect(https, "relay.test", client_config(&roots, &h1_only(), Versions::Both)).await.unwrap();
    assert_eq!(peer_leaf(&tls), second.der);

    // The pair made whole again (key, then certificate) is taken on SIGHUP.
    write_leaf(dir.path(), &third);
    relay.signal("HUP");
    wait_for_cert(https, &ca, &third, Duration::from_secs(10)).await;
    assert_eq!(webhook(&mut old, &authority, 6).await.status, 200);
    assert!(!relay.logs().contains("PRIVATE KEY"), "key material must never be logged");
}

#[tokio::test]
async fn a_bad_certificate_at_start_is_a_clear_error() {
    let ca = TestCa::new("relay test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_leaf(dir.path(), &ca.leaf(&["relay.test"]));
    std::fs::write(&key, ca.leaf(&["relay.test"]).key_pem).unwrap();
    let cfg = config("http://127.0.0.1:9", &cert, &key, "");
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, cfg.replace("{DATA}", &dir.path().join("data").display().to_string())).unwrap();
    let out = std::process::Command::new(bin()).arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("[server.tls]") && stderr.contains("does not belong to the certificate"), "{stderr}");
}

#[tokio::test]
async fn redirect_http_sends_routed_paths_to_https_and_keeps_health() {
    let motion = FakeMotion::start().await;
    let ca = TestCa::new("relay test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_leaf(dir.path(), &ca.leaf(&["relay.test"]));
    let relay = RelayProcess::start(&config(&motion.url(), &cert, &key, "redirect_http = true"));
    let https = relay.https.unwrap();

    let body = meta_message("1", "16505550000", "wamid.r", "r");
    let sig = meta_signature(SECRET, &body);
    let reply = post(&format!("{}?x=1", relay.url(ACME)), &[("x-hub-signature-256", &sig)], body.clone()).await;
    assert_eq!(reply.status, 308, "308 keeps the method and body of a provider's POST");
    let location = reply.headers["location"].to_str().unwrap();
    assert_eq!(location, format!("https://127.0.0.1:{}{ACME}?x=1", https.port()));
    assert_eq!(motion.count(), 0, "a redirected webhook is not delivered");
    assert_eq!(get(&relay.url("/healthz")).await.status, 200, "health stays on plain http");
    assert_eq!(post(&relay.url("/nowhere"), &[], "").await.status, 404);

    // Following it over TLS delivers.
    let tls = connect(https, "relay.test", client_config(&[&ca.pem()], &h1_only(), Versions::Both)).await.unwrap();
    let mut c = Conn::h1(tls).await;
    let r = c
        .send(Method::POST, &format!("relay.test:{}", https.port()), ACME, &[("x-hub-signature-256", &sig)], body)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(motion.count(), 1);
}

/// `[server.acme]` pointing at a CA that is not there: the relay runs, says why it has no
/// certificate in the log, on `/readyz` and in the metrics.
#[tokio::test]
async fn acme_failures_are_logged_and_visible_on_readyz_and_metrics() {
    let dead = dead_addr().await;
    let relay = RelayProcess::start(&format!(
        r#"
[server]
http = "127.0.0.1:0"
https = "127.0.0.1:0"
[server.acme]
domains = ["relay.test"]
contact = ["mailto:ops@relay.test"]
directory = "https://{dead}/dir"
[admin]
listen = "127.0.0.1:0"
[storage]
path = "{{DATA}}"
"#
    ));
    relay.wait_log("acme: order", Duration::from_secs(15)).await;
    let ready = get(&relay.admin_url("/readyz")).await;
    assert_eq!(ready.status, 503);
    let msg = ready.json()["message"].as_str().unwrap().to_string();
    assert!(msg.contains("acme: no certificate yet; last attempt failed"), "{msg}");
    let metrics = String::from_utf8_lossy(&get(&relay.admin_url("/metrics")).await.body).to_string();
    assert!(metrics.contains("whatsapp_relay_acme_failing 1"), "{metrics}");
    assert!(
        metrics.contains("whatsapp_relay_tls_certificate_loads_total{source=\"acme\",result=\"error\"}"),
        "{metrics}"
    );
    // The cache directory was created, private to the relay's user.
    use std::os::unix::fs::PermissionsExt;
    let cache = relay.dir.as_ref().unwrap().path().join("data/acme");
    assert_eq!(std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777, 0o700);
}

#[tokio::test]
async fn acme_certificate_from_pebble_then_from_the_cache_after_a_restart() {
    if !on_path("pebble") || !on_path("pebble-challtestsrv") {
        eprintln!(
            "\n!!!!!!!! SKIPPED acme_certificate_from_pebble: the `pebble` ACME test server is not installed \
             (apt-get install -y pebble; .ci/run installs it) !!!!!!!!\n"
        );
        return;
    }
    let https = dead_addr().await;
    let pebble = Pebble::start(https.port()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = pebble.ca.write(dir.path());
    let relay = RelayProcess::start_in(
        dir,
        &format!(
            r#"
[server]
http = "127.0.0.1:0"
https = "{https}"
[server.acme]
domains = ["relay.test"]
contact = ["mailto:ops@relay.test"]
directory = "https://127.0.0.1:{port}/dir"
ca_file = "{ca}"
[admin]
listen = "127.0.0.1:0"
[storage]
path = "{{DATA}}"
"#,
            port = pebble.acme.port(),
            ca = ca_file.display()
        ),
    );
    // Ordering, the TLS-ALPN-01 validation on the relay's https port, issuance.
    let start = Instant::now();
    loop {
        let ready = get(&relay.admin_url("/readyz")).await;
        if ready.status == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "no certificate from Pebble: {:?}\nrelay:\n{}\npebble:\n{}",
            ready.body,
            relay.logs(),
            pebble.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("certificate obtained from Pebble in {:?}", start.elapsed());
    assert!(relay.logs().contains("answering a TLS-ALPN-01 validation"), "{}", relay.logs());

    // A client that trusts Pebble's root sees the certificate.
    let root = pebble.root().await;
    let tls = connect(https, "relay.test", client_config(&[&root], &[b"http/1.1"], Versions::Both))
        .await
        .expect("the relay's certificate verifies against Pebble's root");
    let mut c = Conn::h1(tls).await;
    assert_eq!(c.send(Method::GET, "relay.test", "/healthz", &[], "").await.unwrap().status, 200);
    let metrics = String::from_utf8_lossy(&get(&relay.admin_url("/metrics")).await.body).to_string();
    let expiry: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("whatsapp_relay_tls_certificate_expiry_timestamp_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(expiry > unix_now() as i64 + 86400, "expiry {expiry}");
    assert!(metrics.contains("whatsapp_relay_acme_failing 0"), "{metrics}");

    // Restart with the CA gone: the cached certificate is served before any call to a CA.
    drop(pebble);
    let relay = relay.restart();
    relay.wait_log("serving the cached certificate for relay.test", Duration::from_secs(10)).await;
    let tls = connect(relay.https.unwrap(), "relay.test", client_config(&[&root], &[b"http/1.1"], Versions::Both))
        .await
        .expect("the cached certificate is served");
    drop(tls);
    assert_eq!(get(&relay.admin_url("/readyz")).await.status, 200);
    assert!(!relay.logs().contains("acme: order"), "no order while the cached certificate is fresh");
}
