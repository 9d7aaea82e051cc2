//! Zero-downtime restarts on one host, as systemd does them with `whatsapp-relay.socket`: the
//! test holds the listening socket and passes it (`LISTEN_FDS`, `LISTEN_FDNAMES=http`) to
//! successive relay processes, each stopped by SIGTERM, under a steady stream of signed
//! webhooks on fresh connections: no connection is refused or dropped unanswered, every answer
//! is a 2xx, and every acknowledged webhook reaches Motion. Once per backend.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::*;

const SECRET: &str = "meta-app-secret";
const PATH: &str = "/acme/api/whatsapp/accounts/13/notify";

fn config(http: std::net::SocketAddr, motion: &str) -> String {
    format!(
        r#"
[server]
http = "{http}"
shutdown_grace = "10s"
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
url = "{motion}"
  [[motion.account]]
  id = "13"
  provider = "meta"
  app_secret = "{SECRET}"
"#
    )
}

/// One signed webhook on a fresh connection: its status, or what went wrong.
async fn post_once(url: &str, body: Vec<u8>) -> Result<u16, String> {
    let sig = meta_signature(SECRET, &body);
    let req = http::Request::post(url)
        .header("x-hub-signature-256", sig)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    // A new client per request: a new connection, as a provider's webhook mostly is.
    match tokio::time::timeout(Duration::from_secs(20), client().request(req)).await {
        Ok(Ok(resp)) => Ok(resp.status().as_u16()),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Err(_) => Err("no answer within 20 s".into()),
    }
}

async fn restarts_on_a_held_socket_refuse_nothing_and_lose_nothing(backend: Backend) {
    let motion = FakeMotion::start().await;
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("relay.toml");
    let data = dir.path().join("data");
    let text = backend.apply(&config(addr, &motion.url()));
    std::fs::write(&config_path, text.replace("{DATA}", &data.display().to_string())).unwrap();
    let mut relay = RelayProcess::spawn_passed(dir, config_path.clone(), &socket, "http");
    assert_eq!(relay.http, addr, "the relay serves the passed socket");

    // A steady stream: four senders, each one webhook at a time on a fresh connection.
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("http://{addr}{PATH}");
    let mut senders = Vec::new();
    for s in 0..4 {
        let (stop, url) = (stop.clone(), url.clone());
        senders.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("wamid.s{s}-{i}");
                let body = meta_message("106540352242922", &format!("3161234{s:04}"), &id, &format!("m {s} {i}"));
                answers.push((id, post_once(&url, body).await));
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            answers
        }));
    }

    tokio::time::sleep(Duration::from_millis(700)).await;
    for round in 0..3 {
        relay.signal("TERM");
        let dir = relay.dir.take().unwrap();
        // Off the test's runtime: the senders keep sending meanwhile.
        let exited = tokio::task::spawn_blocking(move || relay.wait_exit(Duration::from_secs(15))).await.unwrap();
        assert_eq!(exited, Some(0), "restart {round}: SIGTERM exits 0 once requests in flight are done");
        let (held, path) = (socket.try_clone().unwrap(), config_path.clone());
        relay =
            tokio::task::spawn_blocking(move || RelayProcess::spawn_passed(dir, path, &held, "http")).await.unwrap();
        assert_eq!(relay.http, addr);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    stop.store(true, Ordering::Relaxed);

    let mut acknowledged = Vec::new();
    let mut failures = Vec::new();
    for sender in senders {
        for (id, answer) in sender.await.unwrap() {
            match answer {
                Ok(s) if (200..300).contains(&s) => acknowledged.push(id),
                other => failures.push((id, other)),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} webhooks failed: {failures:?}",
        failures.len(),
        failures.len() + acknowledged.len()
    );
    assert!(acknowledged.len() > 40, "a steady stream: only {} webhooks", acknowledged.len());

    // Every acknowledged webhook reaches Motion (a redelivery after a restart carries the same id).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: std::collections::HashSet<String> =
            motion.received().iter().map(|r| meta_customer_and_text(&r.body).1).collect();
        let missing: Vec<_> = acknowledged
            .iter()
            .filter(|id| {
                let (s, i) = id.trim_start_matches("wamid.s").split_once('-').unwrap();
                !got.contains(&format!("m {s} {i}"))
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{} acknowledged webhooks never arrived: {missing:?}", missing.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

on_both_backends!(restarts_on_a_held_socket_refuse_nothing_and_lose_nothing);

/// A passed socket replaces the configured address of the listener it names, and says so at
/// warn when the two differ; the listeners it does not name bind their configured addresses.
#[tokio::test]
async fn a_passed_socket_replaces_the_configured_address_with_a_warning() {
    let motion = FakeMotion::start().await;
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let elsewhere = dead_addr().await;
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("relay.toml");
    let text = config(elsewhere, &motion.url()).replace("{DATA}", &dir.path().join("data").display().to_string());
    std::fs::write(&config_path, text).unwrap();
    let relay = RelayProcess::spawn_passed(dir, config_path, &socket, "http");
    assert_eq!(relay.http, addr);
    assert!(relay.admin.is_some_and(|a| a.port() != 0), "admin binds its configured address");
    relay
        .wait_log(
            &format!("serving the passed socket {addr} instead of the configured {elsewhere}"),
            Duration::from_secs(5),
        )
        .await;
    let body = meta_message("106540352242922", "31612340000", "wamid.x", "hello");
    assert_eq!(post_once(&format!("http://{addr}{PATH}"), body).await, Ok(200));
    assert!(std::net::TcpStream::connect(elsewhere).is_err(), "the configured address is not bound");
}

/// Sockets without names (or with too few) are refused: the relay cannot tell which is which.
#[test]
fn unnamed_passed_sockets_are_refused() {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("relay.toml");
    let text = config("127.0.0.1:0".parse().unwrap(), "http://127.0.0.1:9")
        .replace("{DATA}", &dir.path().join("data").display().to_string());
    std::fs::write(&config_path, text).unwrap();
    let out = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg("exec 3<&0 0</dev/null; export LISTEN_PID=$$; exec \"$0\" \"$@\"")
        .arg(bin())
        .arg("--config")
        .arg(&config_path)
        .env("LISTEN_FDS", "1")
        .env_remove("LISTEN_FDNAMES")
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(socket)))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("LISTEN_FDNAMES names 0"), "{said}");
}
