//! The one HTTP call the command line makes to a running relay (admin API, `simulate`).

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};

/// Sends one request; `Err` says why the relay could not be reached.
pub async fn call(
    method: Method,
    url: &str,
    headers: &[(String, String)],
    body: Bytes,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| {
        format!("cannot reach the relay at {url}: {} (is it running?)", crate::http_util::error_chain(&e))
    })?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// A listener address the command line can connect to (`0.0.0.0` means this machine).
pub fn reachable(mut addr: std::net::SocketAddr) -> std::net::SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    addr
}
