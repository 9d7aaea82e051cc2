//! One attempt to hand an event to a Motion server: the request Motion receives (SPEC "What
//! Motion receives") and the classification of what came back. Direct mode and the queue both
//! deliver through here, so the two can never disagree on headers or signatures.

use crate::config::{Motion, Secret};
use crate::http_util::{error_chain, strip_hop_by_hop};
use crate::provider::ProviderKind;
use crate::request::Scheme;
use crate::upstream::Client;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::header::{HOST, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use sha2::Sha256;
use std::net::IpAddr;
use std::time::Duration;

pub const X_RELAY_DELIVERY: HeaderName = HeaderName::from_static("x-relay-delivery");
pub const X_RELAY_ATTEMPT: HeaderName = HeaderName::from_static("x-relay-attempt");
pub const X_RELAY_PROVIDER: HeaderName = HeaderName::from_static("x-relay-provider");
pub const X_RELAY_SIGNATURE: HeaderName = HeaderName::from_static("x-relay-signature");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Turns the provider's request headers into the headers Motion receives (before the per-attempt
/// `X-Relay-*` ones): hop-by-hop headers go, and so does anything a caller sent as `X-Relay-*`
/// (a provider must not be able to forge the relay's own signature or ids), `Host` (the client
/// sets the Motion's), `Forwarded` and `X-Real-IP`, and the `X-Forwarded-*` set is written by
/// the relay. `X-Forwarded-Host` is the host the provider called: the URI's authority (HTTP/2's
/// `:authority`) or else its `Host` header.
pub fn forwarded_headers(mut headers: HeaderMap, uri: &http::Uri, client_ip: IpAddr, scheme: Scheme) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    let host_header = headers.remove(HOST);
    let host = uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()).or(host_header);
    if headers.keys().any(is_replaced) {
        let replaced: Vec<HeaderName> = headers.keys().filter(|k| is_replaced(k)).cloned().collect();
        for k in replaced {
            headers.remove(k);
        }
    }
    let ip = client_ip.to_canonical().to_string();
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip,
    };
    headers
        .insert(X_FORWARDED_FOR, HeaderValue::from_str(&xff).unwrap_or_else(|_| HeaderValue::from_static("unknown")));
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme.as_str()));
    match host {
        Some(h) => headers.insert(X_FORWARDED_HOST, h),
        None => headers.remove(X_FORWARDED_HOST),
    };
    headers
}

/// Headers the relay writes itself (`X-Relay-*`), and other spellings of the client's address
/// (`Forwarded`, `X-Real-IP`) that would contradict the `X-Forwarded-For` it writes.
fn is_replaced(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-relay-") || name == http::header::FORWARDED || name.as_str() == "x-real-ip"
}

/// `t=UNIX,v1=HEX(HMAC-SHA256(secret, "{t}.{body}"))`.
pub fn relay_signature(secret: &Secret, unix: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()).expect("HMAC takes any key length");
    mac.update(unix.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={unix},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Why an attempt did not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("Motion unreachable: {0}")]
    Unreachable(String),
    #[error("Motion did not answer within {0:?}")]
    Timeout(Duration),
}

/// What one attempt carries.
pub struct Attempt<'a> {
    pub motion: &'a Motion,
    pub client: &'a Client,
    pub method: Method,
    /// Path and query below the relay's prefix, starting with `/`.
    pub path_and_query: &'a str,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub delivery_id: &'a str,
    pub attempt: u32,
    pub provider: ProviderKind,
    pub timeout: Duration,
    /// Unix seconds, for `X-Relay-Signature` (from the relay's clock).
    pub now_unix: u64,
}

/// Sends one attempt; the answer's body is left streaming for the caller.
pub async fn send(a: Attempt<'_>) -> Result<Response<Incoming>, AttemptError> {
    let uri = motion_uri(&a.motion.url, a.path_and_query)?;
    let mut headers = a.headers;
    headers.insert(
        X_RELAY_DELIVERY,
        HeaderValue::from_str(a.delivery_id).unwrap_or_else(|_| HeaderValue::from_static("invalid")),
    );
    headers.insert(X_RELAY_ATTEMPT, HeaderValue::from(a.attempt));
    headers.insert(X_RELAY_PROVIDER, HeaderValue::from_static(a.provider.as_str()));
    if let Some(secret) = &a.motion.signing_secret {
        let sig = relay_signature(secret, a.now_unix, &a.body);
        headers.insert(X_RELAY_SIGNATURE, HeaderValue::from_str(&sig).expect("ascii"));
    }
    let mut req = Request::new(Full::new(a.body));
    *req.method_mut() = a.method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    match tokio::time::timeout(a.timeout, a.client.request(req)).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => Err(AttemptError::Unreachable(error_chain(&e))),
        Err(_) => Err(AttemptError::Timeout(a.timeout)),
    }
}

/// Motion's URL with `path_and_query` appended to its path. Built from the parts of the URL
/// parsed once at config load (scheme and authority are shared, not re-parsed per request).
fn motion_uri(base: &http::Uri, path_and_query: &str) -> Result<http::Uri, AttemptError> {
    // Every caller passes a path below the relay's prefix, which starts with '/'.
    debug_assert!(path_and_query.starts_with('/'), "{path_and_query:?}");
    let prefix = base.path().trim_end_matches('/');
    let pq = if prefix.is_empty() {
        PathAndQuery::try_from(path_and_query)
    } else {
        PathAndQuery::try_from(format!("{prefix}{path_and_query}"))
    };
    let bad = |e: &dyn std::fmt::Display| AttemptError::Unreachable(format!("bad Motion URL {base}: {e}"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(base.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP));
    parts.authority = base.authority().cloned();
    parts.path_and_query = Some(pq.map_err(|e| bad(&e))?);
    http::Uri::from_parts(parts).map_err(|e| bad(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_format() {
        let (secret, _) = crate::config::secret::resolve("s3cret").unwrap();
        let sig = relay_signature(&secret, 1700000000, b"{}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(b"1700000000.{}");
        assert_eq!(sig, format!("t=1700000000,v1={}", hex::encode(mac.finalize().into_bytes())));
    }

    #[test]
    fn motion_uri_keeps_the_base_path() {
        let uri = |base: &str, pq: &str| motion_uri(&base.parse().unwrap(), pq).unwrap().to_string();
        assert_eq!(uri("http://127.0.0.1:9000", "/notify?x=1"), "http://127.0.0.1:9000/notify?x=1");
        assert_eq!(uri("https://m.example/", "/a/b"), "https://m.example/a/b");
        assert_eq!(uri("http://m.example/motion/", "/a?b=c"), "http://m.example/motion/a?b=c");
        assert_eq!(uri("http://m.example/motion", "/a"), "http://m.example/motion/a");
        assert_eq!(uri("http://[::1]:9000", "/a?b"), "http://[::1]:9000/a?b");
        assert_eq!(uri("https://m.example:443/x/", "/a"), "https://m.example:443/x/a");
    }

    #[test]
    fn forwarded_headers_strip_and_append() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("chat.example.com"));
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.insert("x-relay-signature", HeaderValue::from_static("forged"));
        h.insert("x-relay-token", HeaderValue::from_static("secret"));
        h.insert("forwarded", HeaderValue::from_static("for=198.51.100.1"));
        h.insert("x-real-ip", HeaderValue::from_static("198.51.100.1"));
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        let origin: http::Uri = "/acme/api/whatsapp/accounts/1/notify".parse().unwrap();
        let out = forwarded_headers(h, &origin, "10.0.0.1".parse().unwrap(), Scheme::Https);
        assert_eq!(out["x-forwarded-for"], "203.0.113.9, 10.0.0.1");
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out["x-forwarded-host"], "chat.example.com");
        assert!(
            !out.contains_key("host") && !out.contains_key("x-relay-signature") && !out.contains_key("x-relay-token")
        );
        assert!(!out.contains_key("connection"));
        assert!(!out.contains_key("forwarded") && !out.contains_key("x-real-ip"));
    }

    /// Over HTTP/2 the host comes as `:authority` (the request URI's), and there is no `Host`.
    #[test]
    fn forwarded_host_from_the_http2_authority() {
        let absolute: http::Uri = "https://chat.example.com/acme/api/whatsapp/accounts/1/notify".parse().unwrap();
        let out = forwarded_headers(HeaderMap::new(), &absolute, "10.0.0.1".parse().unwrap(), Scheme::Https);
        assert_eq!(out["x-forwarded-host"], "chat.example.com");
        let origin: http::Uri = "/x".parse().unwrap();
        let out = forwarded_headers(HeaderMap::new(), &origin, "10.0.0.1".parse().unwrap(), Scheme::Http);
        assert!(!out.contains_key("x-forwarded-host"));
    }
}
