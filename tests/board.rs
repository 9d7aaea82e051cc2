//! The realtime board on the admin listener: its token rules and headers, the event stream's
//! JSON, the cap on streams, and, in headless Chromium, a page that follows traffic and flags a
//! failing Motion without being reloaded.

mod support;

use base64::Engine as _;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "board-admin-token";

fn config(acme: &str, globex: &str) -> String {
    format!(
        r#"
[server]
http = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
token = "{TOKEN}"
[storage]
path = "{{DATA}}"
[delivery]
mode = "queue"
retry_initial = "100ms"
retry_max = "300ms"

[[motion]]
name = "acme"
url = "{acme}"
  [[motion.account]]
  id = "1"
  provider = "kaleyra"
  shared_token = "acme-token"

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

async fn webhook(relay: &RelayProcess, motion: &str, token: &str, i: usize) -> u16 {
    let account = if motion == "acme" { "1" } else { "7" };
    let url = relay.url(&format!("/{motion}/api/whatsapp/accounts/{account}/notify"));
    let body = format!(r#"{{"id":"m{i}","from":"1650555{i:04}","type":"text","body":"hello"}}"#);
    post(&url, &[("x-webhook-token", token), ("content-type", "application/json")], body).await.status
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

async fn get_with(url: &str, authorization: &str) -> Reply {
    send(http::Method::GET, url, &[("authorization", authorization)], bytes::Bytes::new()).await
}

#[tokio::test]
async fn the_board_needs_the_token_as_bearer_or_basic_and_is_only_on_the_admin_listener() {
    let acme = FakeMotion::start().await;
    let relay = RelayProcess::start(&config(&acme.url(), &acme.url()));
    let board = format!("http://{}/board", relay.admin.unwrap());

    let none = get(&board).await;
    assert_eq!(none.status, 401);
    assert!(none.headers["www-authenticate"].to_str().unwrap().starts_with("Basic "));
    assert_eq!(get_with(&board, &basic("ops", "wrong")).await.status, 401);
    assert_eq!(get_with(&board, "Bearer wrong").await.status, 401);

    for auth in [basic("anyone", TOKEN), format!("Bearer {TOKEN}")] {
        let page = get_with(&board, &auth).await;
        assert_eq!(page.status, 200);
        assert!(String::from_utf8_lossy(&page.body).contains("/board/app.js"));
        assert_eq!(page.headers["cache-control"], "no-store");
        let csp = page.headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(page.headers["x-frame-options"], "DENY");
    }
    // Basic is for the board's two GETs only: the admin API stays Bearer-only.
    let stats = format!("http://{}/admin/queue/stats", relay.admin.unwrap());
    assert_eq!(get_with(&stats, &basic("anyone", TOKEN)).await.status, 401);
    assert_eq!(get_with(&stats, &format!("Bearer {TOKEN}")).await.status, 200);
    // Not on the public listener.
    assert_eq!(get_with(&relay.url("/board"), &basic("x", TOKEN)).await.status, 404);
    assert_eq!(get_with(&relay.url("/board/events"), &basic("x", TOKEN)).await.status, 404);
    // Its script and styles are served by the relay itself, and hold no data.
    let script = get(&format!("http://{}/board/app.js", relay.admin.unwrap())).await;
    assert_eq!(
        (script.status, script.headers["content-type"].to_str().unwrap()),
        (200, "text/javascript; charset=utf-8")
    );
    // No external asset: the only URL it names is the SVG namespace, which loads nothing.
    let script = String::from_utf8_lossy(&script.body).replace("http://www.w3.org/2000/svg", "");
    assert!(!script.contains("http://") && !script.contains("https://"), "no external asset");
}

/// An open event stream: a raw HTTP/1.1 connection read as it comes.
struct Stream {
    conn: tokio::net::TcpStream,
    buf: String,
}

impl Stream {
    async fn open(admin: std::net::SocketAddr) -> Stream {
        let mut conn = tokio::net::TcpStream::connect(admin).await.unwrap();
        let request = format!(
            "GET /board/events HTTP/1.1\r\nHost: {admin}\r\nAuthorization: {}\r\nAccept: text/event-stream\r\n\r\n",
            basic("ops", TOKEN)
        );
        conn.write_all(request.as_bytes()).await.unwrap();
        Stream { conn, buf: String::new() }
    }

    /// The next complete `data:` event, parsed, within `within`.
    async fn next(&mut self, within: Duration) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(start) = self.buf.find("data: ") {
                if let Some(end) = self.buf[start..].find("\n\n") {
                    let json = self.buf[start + 6..start + end].to_string();
                    self.buf.drain(..start + end + 2);
                    return serde_json::from_str(&json).unwrap();
                }
            }
            let mut chunk = [0u8; 65536];
            let n =
                tokio::time::timeout_at(deadline, self.conn.read(&mut chunk)).await.expect("an event in time").unwrap();
            assert!(n > 0, "stream closed; got {}", self.buf);
            // Chunked framing lines interleave with the events; the JSON never spans them here.
            self.buf.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    }

    fn head(&self) -> &str {
        &self.buf
    }
}

#[tokio::test]
async fn the_event_stream_reports_traffic_within_two_seconds_and_streams_are_capped() {
    let acme = FakeMotion::start().await;
    let globex = FakeMotion::start().await;
    let relay = RelayProcess::start(&config(&acme.url(), &globex.url()));
    let admin = relay.admin.unwrap();
    let mut stream = Stream::open(admin).await;
    let first = stream.next(Duration::from_secs(3)).await;
    assert!(stream.head().is_empty() || !stream.head().contains("data:"));
    assert_eq!(first["motions"]["acme"]["received"], 0);
    assert_eq!(first["motions"]["globex"]["depth"], 0);
    assert_eq!(first["relay"]["storage"]["backend"], "embedded");

    for i in 0..3 {
        assert_eq!(webhook(&relay, "acme", "acme-token", i).await, 200);
    }
    let sent = Instant::now();
    loop {
        let e = stream.next(Duration::from_secs(3)).await;
        if e["motions"]["acme"]["received"] == 3 {
            assert_eq!(e["motions"]["acme"]["accounts"]["1"]["received"], 3);
            assert_eq!(e["motions"]["globex"]["received"], 0);
            break;
        }
        assert!(sent.elapsed() < Duration::from_secs(2), "no update within 2 s: {e}");
    }
    // No customer number in what the board sends.
    let e = stream.next(Duration::from_secs(3)).await;
    assert!(!e.to_string().contains("1650555"), "{e}");

    // A handful of streams at most: the fifth is refused while four are open.
    let mut open = vec![stream];
    for _ in 0..3 {
        let mut s = Stream::open(admin).await;
        s.next(Duration::from_secs(3)).await;
        open.push(s);
    }
    let refused = get_with(&format!("http://{admin}/board/events"), &basic("ops", TOKEN)).await;
    assert_eq!(refused.status, 503);
    drop(open.pop());
    until(Duration::from_secs(5), Duration::from_millis(200), async || {
        let mut s = Stream::open(admin).await;
        let mut chunk = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(3), s.conn.read(&mut chunk)).await.unwrap().unwrap();
        let given_back = String::from_utf8_lossy(&chunk[..n]).starts_with("HTTP/1.1 200");
        done_or(given_back, "a closed stream's place was never given back")
    })
    .await;
}

/// Chromium and its WebDriver, from Debian's `chromium` and `chromium-driver`.
struct Browser {
    driver: std::process::Child,
    client: fantoccini::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// None (after saying so) when Chromium is not installed; in CI that is a failure.
    async fn start() -> Option<Browser> {
        let driver_bin = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let chromium =
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().find(|p| std::path::Path::new(p).exists());
        let (Some(driver_bin), Some(chromium)) = (driver_bin, chromium) else {
            eprintln!(
                "SKIPPED: Chromium missing (apt-get install chromium chromium-driver); the board's browser test did not run"
            );
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI must run the browser test: install chromium and chromium-driver"
            );
            return None;
        };
        let port = dead_addr().await.port();
        let driver = std::process::Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let profile = tempfile::tempdir().unwrap();
        let caps: serde_json::Map<String, serde_json::Value> = serde_json::from_value(serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }))
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            let mut builder = fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
            match builder.capabilities(caps.clone()).connect(&format!("http://127.0.0.1:{port}")).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("chromedriver did not start a session: {e}"),
            }
        };
        Some(Browser { driver, client, _profile: profile })
    }

    /// Runs `script` in the page until it returns true (or panics after `within`).
    async fn wait_until(&self, what: &str, script: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let v = self.client.execute(script, vec![]).await.unwrap();
            if v == serde_json::Value::Bool(true) {
                return;
            }
            assert!(Instant::now() < deadline, "the page never showed {what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn shows(motion: &str, class: &str, value: u64) -> String {
    format!(
        "const e = document.querySelector('#motion-{motion} .{class}'); return !!e && e.textContent.replace(/,/g, '') === '{value}';"
    )
}

#[tokio::test]
async fn in_a_browser_the_board_follows_traffic_and_flags_a_failing_motion_without_reloading() {
    let Some(browser) = Browser::start().await else { return };
    let acme = FakeMotion::start().await;
    let globex = FakeMotion::start().await;
    let relay = RelayProcess::start(&config(&acme.url(), &globex.url()));
    let admin = relay.admin.unwrap();
    browser.client.goto(&format!("http://ops:{TOKEN}@{admin}/board")).await.unwrap();
    browser.wait_until("both Motions at 0", &shows("globex", "received", 0), Duration::from_secs(15)).await;
    let loaded: String = browser
        .client
        .execute("return document.body.dataset.generated", vec![])
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .into();

    for i in 0..4 {
        assert_eq!(webhook(&relay, "acme", "acme-token", i).await, 200);
    }
    for i in 0..2 {
        assert_eq!(webhook(&relay, "globex", "globex-token", i).await, 200);
    }
    browser.wait_until("acme's 4 webhooks", &shows("acme", "received", 4), Duration::from_secs(10)).await;
    browser.wait_until("globex's 2 webhooks", &shows("globex", "received", 2), Duration::from_secs(10)).await;
    browser.wait_until("acme's deliveries", &shows("acme", "delivered", 4), Duration::from_secs(10)).await;

    // Globex starts refusing with 503: its deliveries fail and its card is flagged.
    globex.answer_always(Answer::status(503));
    for i in 2..5 {
        assert_eq!(webhook(&relay, "globex", "globex-token", i).await, 200);
    }
    let flagged = "const e = document.querySelector('#motion-globex'); return !!e && e.dataset.failing === 'true' && e.classList.contains('failing');";
    browser.wait_until("globex flagged as failing", flagged, Duration::from_secs(15)).await;
    let acme_ok = "const e = document.querySelector('#motion-acme'); return !!e && e.dataset.failing === 'false';";
    browser.wait_until("acme not flagged", acme_ok, Duration::from_secs(5)).await;
    let errors = "return document.querySelector('#motion-globex .errors li')?.textContent.includes('503') === true;";
    browser.wait_until("globex's last error", errors, Duration::from_secs(5)).await;

    // All of it in the page first loaded: the same document, updated in place.
    let url = browser.client.current_url().await.unwrap();
    assert_eq!(url.path(), "/board");
    let now: String = browser
        .client
        .execute("return document.body.dataset.generated", vec![])
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .into();
    assert_ne!(now, loaded, "updates arrived by the event stream");
    let shot = browser.client.screenshot().await.unwrap();
    let dest =
        std::env::var("BOARD_SCREENSHOT").unwrap_or_else(|_| format!("{}/board.png", env!("CARGO_TARGET_TMPDIR")));
    std::fs::write(&dest, shot).unwrap();
    browser.client.clone().close().await.unwrap();
}
