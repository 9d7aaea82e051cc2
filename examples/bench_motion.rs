//! A stand-in Motion server for load tests (`benches/load.sh`, see BENCHMARKS.md) and for
//! trying the relay locally (the README's quick start): a tokio + hyper 1 HTTP/1.1 server on
//! `127.0.0.1:PORT` that reads each request's whole body and answers `200 {"ok":true}`.
//!
//! It counts requests, non-empty bodies and body bytes. SIGUSR1 prints the counts to stderr and
//! carries on (the load script reads them between targets, e.g. to check that queued deliveries
//! keep up); SIGTERM or SIGINT prints them and exits.
//!
//! Run: `cargo run --release --example bench_motion -- [PORT]` (PORT defaults to 9000).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

static REQUESTS: AtomicU64 = AtomicU64::new(0);
static BODIES: AtomicU64 = AtomicU64::new(0);
static BODY_BYTES: AtomicU64 = AtomicU64::new(0);

/// Every request: read the body to the end, count it, answer `{"ok":true}`.
async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let body = req.into_body().collect().await?.to_bytes();
    REQUESTS.fetch_add(1, Relaxed);
    if !body.is_empty() {
        BODIES.fetch_add(1, Relaxed);
        BODY_BYTES.fetch_add(body.len() as u64, Relaxed);
    }
    let mut resp = Response::new(Full::new(Bytes::from_static(br#"{"ok":true}"#)));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

/// One line the load script greps: `bench_motion: requests=N bodies=N body_bytes=N`.
fn report() {
    eprintln!(
        "bench_motion: requests={} bodies={} body_bytes={}",
        REQUESTS.load(Relaxed),
        BODIES.load(Relaxed),
        BODY_BYTES.load(Relaxed)
    );
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = match std::env::args().nth(1) {
        Some(p) => p.parse().map_err(|_| std::io::Error::other(format!("bad port {p:?}")))?,
        None => 9000,
    };
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("bench_motion: listening on 127.0.0.1:{port}");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    // e.g. EMFILE under a connection storm: skip this one, keep serving.
                    Err(e) => { eprintln!("bench_motion: accept: {e}"); continue; }
                };
                let _ = stream.set_nodelay(true);
                // One task per connection; HTTP/1.1 keep-alive is on by default.
                tokio::spawn(async move {
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(handle)).await;
                });
            }
            _ = usr1.recv() => report(),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Open connections are dropped with the runtime; the counts are final for the caller.
    report();
    Ok(())
}
