//! Hostile clients on loopback against the real binary: connections that send nothing, half a
//! preface or a byte at a time, more connections than the caps allow, requests without a proper
//! `Host`. Signed webhooks from another address keep being answered promptly throughout, and
//! the admin listener stays answerable. Every loop is bounded in count and time.
//!
//! Connections come from several loopback addresses (127.0.0.0/8 is all the local host), so
//! the per-address cap can be tested against "another client".

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const SECRET: &str = "meta-app-secret";

/// One story at a time: the flood's thousands of connections would otherwise load the machine
/// under the stories that measure how soon something happens.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const WEBHOOK: &str = "/acme/api/whatsapp/accounts/13/webhook";

fn config(server: &str) -> String {
    format!(
        r#"
[server]
http = "127.0.0.1:0"
{server}
[admin]
listen = "127.0.0.1:0"
[storage]
path = "{{DATA}}"
[delivery]
mode = "queue"
timeout = "2s"

[[motion]]
name = "acme"
url = "http://127.0.0.1:9"
  [[motion.account]]
  id = "13"
  provider = "meta"
  app_secret = "{SECRET}"
"#
    )
}

/// A connection to `to` from the loopback address `127.0.0.{from}`.
async fn connect_from(from: u8, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::from([127, 0, 0, from]), 0))?;
    socket.connect(to).await
}

/// Reads until the server closes the connection (Ok(elapsed)) or `within` passes (Err).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Result<Duration, String> {
    read_to_close(stream, within).await.map(|(took, _)| took)
}

/// Like [`closed_within`], with what the server sent before closing.
async fn read_to_close(stream: &mut TcpStream, within: Duration) -> Result<(Duration, Vec<u8>), String> {
    let start = Instant::now();
    let (mut buf, mut got) = ([0u8; 4096], Vec::new());
    loop {
        match tokio::time::timeout_at((start + within).into(), stream.read(&mut buf)).await {
            Err(_) => return Err(format!("still open after {within:?}")),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok((start.elapsed(), got)),
            // The server's own SETTINGS, a 408: read on to the close.
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The test opens thousands of sockets: take all the open files this process may have.
fn more_files() {
    let limit = rlimit::increase_nofile_limit(u64::MAX).expect("raise the open files limit");
    assert!(limit >= 6_000, "this test needs 6,000 open files, the hard limit is {limit}: raise it (ulimit -Hn)");
}

/// Posts one signed webhook and returns its status and how long the answer took.
async fn timed_webhook(relay: &RelayProcess, i: usize) -> (u16, Duration) {
    let start = Instant::now();
    let body = meta_message("1", "16505550000", &format!("wamid.abuse{i}"), "hi");
    let reply = post_meta(&relay.url(WEBHOOK), SECRET, body).await;
    (reply.status, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_trickling_connections_do_not_starve_signed_webhooks() {
    let _alone = ONE_AT_A_TIME.lock().await;
    more_files();
    let relay = RelayProcess::start(&config("header_timeout = \"4s\"\nidle_timeout = \"4s\""));
    let to = relay.http;

    // 2,000 connections that send nothing, 125 from each of 16 addresses (under the per-address cap).
    let mut idle = Vec::new();
    for i in 0..2_000 {
        idle.push(connect_from(2 + (i % 16) as u8, to).await.expect("idle connection"));
    }
    // 500 that trickle a request head one byte every 200 ms, from 4 more addresses.
    let mut trickling = tokio::task::JoinSet::new();
    for i in 0..500u32 {
        let mut s = connect_from(20 + (i % 4) as u8, to).await.expect("trickling connection");
        trickling.spawn(async move {
            let head = b"POST /acme/api/whatsapp/accounts/13/webhook HTTP/1.1\r\nHost: chat.example.com\r\n";
            for b in head.iter().take(40) {
                if s.write_all(&[*b]).await.is_err() {
                    return true; // closed by the relay
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            false
        });
    }

    // Meanwhile every signed webhook and /readyz is answered within 2 s.
    for i in 0..20 {
        let (status, took) = timed_webhook(&relay, i).await;
        assert_eq!(status, 200, "webhook {i}");
        assert!(took < Duration::from_secs(2), "webhook {i} took {took:?} with 2,500 hostile connections open");
        let start = Instant::now();
        assert_eq!(get(&relay.admin_url("/readyz")).await.status, 200);
        assert!(start.elapsed() < Duration::from_secs(2), "/readyz took {:?}", start.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The silent ones are closed by the first-bytes deadline (4 s from their accept).
    for (i, s) in idle.iter_mut().enumerate().step_by(97) {
        closed_within(s, Duration::from_secs(8)).await.unwrap_or_else(|e| panic!("idle connection {i}: {e}"));
    }
    // The trickling ones by the header deadline, before their 8 s of bytes are out.
    let mut cut = 0;
    while let Some(closed) = trickling.join_next().await {
        cut += usize::from(closed.unwrap());
    }
    assert!(cut >= 490, "only {cut} of 500 trickling connections were closed before they finished");
}

#[tokio::test]
async fn silent_half_preface_and_idle_connections_are_closed_on_time() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let relay = RelayProcess::start(&config("header_timeout = \"1s\"\nidle_timeout = \"2s\""));
    let to = relay.http;
    let h2c_preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // An empty SETTINGS frame: length 0, type 4, flags 0, stream 0.
    let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];

    let opened = Instant::now();
    let mut zero = TcpStream::connect(to).await.unwrap();
    let mut one_byte = TcpStream::connect(to).await.unwrap();
    one_byte.write_all(b"P").await.unwrap();
    let mut half_preface = TcpStream::connect(to).await.unwrap();
    half_preface.write_all(&h2c_preface[..10]).await.unwrap();
    let mut h2c_silent = TcpStream::connect(to).await.unwrap();
    h2c_silent.write_all(h2c_preface).await.unwrap();
    h2c_silent.write_all(&settings).await.unwrap();
    for (what, s) in [
        ("0 bytes", &mut zero),
        ("1 byte", &mut one_byte),
        ("half a preface", &mut half_preface),
        ("h2c", &mut h2c_silent),
    ] {
        closed_within(s, Duration::from_secs(4)).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let took = opened.elapsed();
        assert!(took >= Duration::from_millis(700), "{what} closed too early ({took:?} after it opened)");
    }

    // After a request, an HTTP/1.1 keep-alive connection is closed once idle for 2 s.
    let mut kept = TcpStream::connect(to).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 256];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let took = closed_within(&mut kept, Duration::from_secs(5)).await.expect("idle keep-alive connection");
    assert!(took >= Duration::from_millis(1_500), "closed before idle_timeout: {took:?}");

    // Busy connections are not idle: a client that keeps sending requests stays connected.
    let mut busy = TcpStream::connect(to).await.unwrap();
    for _ in 0..8 {
        busy.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let n = busy.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "busy connection closed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One HTTP/2 frame: length, type, flags, stream, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HTTP/2 client that opens its flow-control window to nothing and leaves it there, so no
/// response body can reach it, while it answers the server's pings and settings as a live peer
/// does: the connection is closed once its responses have waited `idle_timeout`.
#[tokio::test]
async fn an_http2_client_that_never_opens_its_window_is_closed_after_idle_timeout() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let relay = RelayProcess::start(&config("header_timeout = \"1s\"\nidle_timeout = \"2s\""));
    let mut conn = TcpStream::connect(relay.http).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE (4) = 0.
    hello.extend(h2_frame(4, 0, 0, &[0, 4, 0, 0, 0, 0]));
    // GET /healthz on streams 1, 3, 5: HPACK :method GET (2), :scheme http (6), then :path and
    // :authority as literals with indexed names (4 and 1).
    let authority = relay.http.to_string();
    for stream in [1, 3, 5] {
        let mut block = vec![0x82, 0x86, 0x04, 8];
        block.extend_from_slice(b"/healthz");
        block.extend_from_slice(&[0x01, authority.len() as u8]);
        block.extend_from_slice(authority.as_bytes());
        hello.extend(h2_frame(1, 0x4 | 0x1, stream, &block)); // END_HEADERS | END_STREAM
    }
    conn.write_all(&hello).await.unwrap();

    let start = Instant::now();
    let (mut answered, mut data, mut last_answer) = (0, 0, start);
    let mut head = [0u8; 9];
    let closed = loop {
        let read = tokio::time::timeout_at((start + Duration::from_secs(10)).into(), conn.read_exact(&mut head)).await;
        let Ok(Ok(_)) = read else { break read.is_ok() };
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let mut payload = vec![0u8; len];
        if conn.read_exact(&mut payload).await.is_err() {
            break true;
        }
        match kind {
            0 => data += 1,
            1 => {
                answered += 1;
                last_answer = Instant::now();
            }
            4 if flags & 1 == 0 => conn.write_all(&h2_frame(4, 1, 0, &[])).await.unwrap(),
            6 if flags & 1 == 0 => conn.write_all(&h2_frame(6, 1, 0, &payload)).await.unwrap(),
            7 => break true, // GOAWAY
            _ => {}
        }
    };
    assert!(closed, "still open {:?} after the requests", start.elapsed());
    assert_eq!((answered, data), (3, 0), "three answers' headers, no body");
    let held = last_answer.elapsed();
    assert!(held >= Duration::from_millis(1_500), "closed {held:?} after the answers, before idle_timeout");
    assert!(start.elapsed() < Duration::from_secs(8), "closed only after {:?}", start.elapsed());
}

#[tokio::test]
async fn connections_past_the_caps_are_refused_while_others_are_served() {
    let _alone = ONE_AT_A_TIME.lock().await;
    // A long header deadline: a close within the bounds below can only be the refusal.
    let relay =
        RelayProcess::start(&config("max_connections = 8\nmax_connections_per_ip = 5\nheader_timeout = \"60s\""));
    let to = relay.http;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect_from(2, to).await.unwrap());
    }
    // The sixth from the same address is closed at once, without an answer. (The bound is
    // loose for a loaded machine.)
    let mut sixth = connect_from(2, to).await.unwrap();
    let _ = sixth.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (_, answer) = read_to_close(&mut sixth, Duration::from_secs(15)).await.expect("sixth from one address refused");
    assert!(answer.is_empty(), "a refused connection gets no answer: {}", String::from_utf8_lossy(&answer));
    // Another address is served.
    let mut other = connect_from(3, to).await.unwrap();
    other.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 256];
    let n = other.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // 5 + 1 open; two more reach the listener's cap of 8; the ninth is refused.
    held.push(connect_from(4, to).await.unwrap());
    held.push(connect_from(5, to).await.unwrap());
    let mut ninth = connect_from(6, to).await.unwrap();
    let _ = ninth.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (_, answer) = read_to_close(&mut ninth, Duration::from_secs(15)).await.expect("ninth connection refused");
    assert!(answer.is_empty(), "a refused connection gets no answer");
    // The admin listener has its own count.
    assert_eq!(get(&relay.admin_url("/readyz")).await.status, 200);
    relay.wait_log("refused", Duration::from_secs(2)).await;
    let metrics = String::from_utf8_lossy(&get(&relay.admin_url("/metrics")).await.body).into_owned();
    for reason in ["max_connections", "max_connections_per_ip"] {
        let line = format!("whatsapp_relay_connections_refused_total{{listener=\"http\",reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }
    assert!(metrics.contains("whatsapp_relay_connections_open{listener=\"http\"} 8"), "{metrics}");
    // Closing some gives their places back, once the relay has seen them close.
    held.truncate(2);
    drop(other);
    until(Duration::from_secs(10), Duration::from_millis(100), async || {
        let mut again = connect_from(2, to).await.unwrap();
        let _ = again.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let n = again.read(&mut buf).await.unwrap_or(0);
        done_or(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "place not given back")
    })
    .await;
}

#[tokio::test]
async fn http11_needs_exactly_one_host() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let relay = RelayProcess::start(&config(""));
    let none = raw(relay.http, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(none.starts_with("HTTP/1.1 400") && none.contains("\"bad_request\""), "{none}");
    let two = raw(relay.http, b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n").await;
    assert!(two.starts_with("HTTP/1.1 400") && two.contains("exactly one Host"), "{two}");
    let one = raw(relay.http, b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert!(one.starts_with("HTTP/1.1 200"), "{one}");
    // HTTP/1.0 has no such rule.
    let old = raw(relay.http, b"GET /healthz HTTP/1.0\r\n\r\n").await;
    assert!(old.starts_with("HTTP/1.0 200"), "{old}");
}
