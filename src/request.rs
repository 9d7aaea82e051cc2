//! A request's facts, read once: where it came in ([`Conn`], its [`Scheme`]), who sent it
//! ([`client_ip`], through trusted proxies), the host it named without its port, one path
//! segment decoded safely, and what the access line reports about it ([`AccessInfo`]).
//! A leaf: it knows nothing of routes, providers or Motions.

use ipnet::IpNet;
use percent_encoding::percent_decode_str;
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

/// The scheme of the listener a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Where a request came in.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    pub peer: SocketAddr,
    pub scheme: Scheme,
}

/// What the access line reports about a request, filled in by the pipeline that served it.
/// Borrowed from the request's snapshot where it can be: nothing is copied for the log line.
#[derive(Default)]
pub struct AccessInfo<'a> {
    pub motion: Option<&'a str>,
    pub account: Option<Cow<'a, str>>,
    pub provider: &'static str,
    pub delivery_id: Option<String>,
}

/// The host a request named: the URI's authority (HTTP/2 `:authority`, or an absolute-form
/// request line) or else its `Host` header, with the port as sent.
pub fn host<'a>(uri: &'a http::Uri, headers: &'a http::HeaderMap) -> Option<&'a str> {
    uri.authority().map(|a| a.as_str()).or_else(|| headers.get(http::header::HOST).and_then(|v| v.to_str().ok()))
}

/// A host without its port (`chat.example.com:8080` -> `chat.example.com`, `[::1]:80` ->
/// `[::1]`), lower-cased only when needed.
pub fn host_without_port(host: &str) -> Cow<'_, str> {
    let h = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    if h.bytes().any(|b| b.is_ascii_uppercase()) { Cow::Owned(h.to_ascii_lowercase()) } else { Cow::Borrowed(h) }
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the right-most
/// `X-Forwarded-For` hop that is not itself a trusted proxy. Hops are read from the right and
/// the walk stops at one that is not an address (`ip:port` and `[v6]:port` are read as their
/// address): what lies left of it was not written by a proxy we trust, so the last trusted hop
/// reached stands in for the client (and fails an `allow_from` that lists providers only).
pub fn client_ip(peer: IpAddr, headers: &http::HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let values: Vec<Option<&str>> = headers.get_all("x-forwarded-for").iter().map(|v| v.to_str().ok()).collect();
    let mut last = peer;
    for value in values.iter().rev() {
        let Some(value) = value else { return last };
        for hop in value.rsplit(',') {
            let hop = hop.trim();
            let Some(ip) = hop.parse::<IpAddr>().ok().or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip())) else {
                return last;
            };
            let ip = ip.to_canonical();
            if !is_trusted(&ip) {
                return ip;
            }
            last = ip;
        }
    }
    last
}

/// Decodes one segment once; `None` for dot segments and smuggled separators. Shared with the
/// outbound endpoint allow-list, so both read a path the same way.
pub fn decode_segment(seg: &str) -> Option<Cow<'_, str>> {
    // Most segments hold no escapes: no decoding, no UTF-8 check (a &str is valid UTF-8).
    if !seg.contains('%') {
        let bad = seg == "." || seg == ".." || seg.bytes().any(|b| matches!(b, b'\\' | 0));
        return (!bad).then_some(Cow::Borrowed(seg));
    }
    let d = percent_decode_str(seg).decode_utf8().ok()?;
    let bad = d == "." || d == ".." || d.bytes().any(|b| matches!(b, b'/' | b'\\' | 0));
    (!bad).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_without_port_strips_the_port() {
        assert_eq!(host_without_port("chat.example.com:8080"), "chat.example.com");
        assert_eq!(host_without_port("Chat.Example.com"), "chat.example.com");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
    }

    #[test]
    fn client_ip_through_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = http::HeaderMap::new();
        h.insert("x-forwarded-for", "198.51.100.7, 203.0.113.5, 10.1.1.1".parse().unwrap());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("203.0.113.5"));
        // An untrusted peer's header is ignored.
        assert_eq!(client_ip(ip("192.0.2.1"), &h, &trusted), ip("192.0.2.1"));
        assert_eq!(client_ip(ip("::ffff:192.0.2.1"), &h, &trusted), ip("192.0.2.1"));
        // A trusted proxy that writes ports.
        h.insert("x-forwarded-for", "198.51.100.7, 203.0.113.5:4711, 10.1.1.1".parse().unwrap());
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("203.0.113.5"));
        // Something that is not an address: the walk stops there, at the last trusted hop, and
        // never reaches the caller-supplied address on its left.
        h.insert("x-forwarded-for", "198.51.100.7, unknown, 10.1.1.1".parse().unwrap());
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("10.1.1.1"));
        // Several headers read as one list, in order.
        let mut h = http::HeaderMap::new();
        h.append("x-forwarded-for", "198.51.100.7".parse().unwrap());
        h.append("x-forwarded-for", "203.0.113.5, 10.1.1.1".parse().unwrap());
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("203.0.113.5"));
        h.remove("x-forwarded-for");
        h.insert("x-forwarded-for", "10.9.9.9".parse().unwrap());
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("10.9.9.9"), "all trusted");
    }
}
