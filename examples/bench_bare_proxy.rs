//! The floor of our HTTP stack, for `benches/load.sh`: the smallest reverse proxy that can be
//! built from the crates the relay uses (tokio, hyper 1's HTTP/1.1 server, hyper-util's pooled
//! client), with no routing, no checks, no headers added and no logging, served the way the
//! relay serves (one single-threaded runtime and one client pool per core, mimalloc, the body
//! read whole before it is forwarded, as a verifying proxy must). What the relay costs above
//! this is ours; what this costs above nginx is the stack's.
//!
//! Run: `cargo run --release --example bench_bare_proxy -- LISTEN_PORT MOTION_PORT`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use tokio::net::TcpListener;

type Body = http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(motion)) = (args.next(), args.next()) else {
        eprintln!("usage: bench_bare_proxy LISTEN_PORT MOTION_PORT");
        std::process::exit(2);
    };
    let port = |p: String| p.parse::<u16>().map_err(|_| std::io::Error::other(format!("bad port {p:?}")));
    let (listen, motion) = (port(listen)?, port(motion)?);
    let shared = std::net::TcpListener::bind(("127.0.0.1", listen))?;
    shared.set_nonblocking(true)?;
    eprintln!("bench_bare_proxy: 127.0.0.1:{listen} -> 127.0.0.1:{motion}");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = Vec::new();
    for _ in 0..cores {
        let socket = shared.try_clone()?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        threads.push(std::thread::spawn(move || runtime.block_on(serve(socket, motion))));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

async fn serve(socket: std::net::TcpListener, motion: u16) {
    let listener = TcpListener::from_std(socket).expect("listener");
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(512).build(http);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let client = client.clone();
                async move {
                    let (mut parts, body) = req.into_parts();
                    let Ok(body) = body.collect().await.map(|c| c.to_bytes()) else {
                        return Ok(status(hyper::StatusCode::BAD_REQUEST));
                    };
                    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                    parts.uri = format!("http://127.0.0.1:{motion}{path}").parse().expect("uri");
                    let resp = match client.request(Request::from_parts(parts, Full::new(body))).await {
                        Ok(r) => r.map(|b| b.boxed()),
                        Err(_) => status(hyper::StatusCode::BAD_GATEWAY),
                    };
                    Ok::<Response<Body>, Infallible>(resp)
                }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn status(code: hyper::StatusCode) -> Response<Body> {
    let mut r = Response::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed());
    *r.status_mut() = code;
    r
}
