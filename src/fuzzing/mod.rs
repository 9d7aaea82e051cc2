//! The fuzz targets' bodies (`fuzz/`), here so that the targets are one line each and
//! `tests/fuzz_regressions.rs` feeds every kept input through the very same code. Only built
//! with the `fuzzing` feature: the shipped binary has none of it.
//!
//! Each function takes the fuzzer's bytes, runs the parsing code that sees outside input, and
//! asserts invariants that must hold whatever the bytes are (a panic is a finding):
//!
//! - [`provider`]: one provider's payload parsing, the recipient of a send, Meta's handshake,
//!   and its verification with a fixed secret: a refusal never reveals the secret or the
//!   expected signature, and what the provider's own signer signs always verifies.
//! - [`routing`]: path and Host routing, the client address behind proxies, and the outbound
//!   endpoint allow-list: no route leaves a configured account's subtree and no allowed send
//!   leaves the account's API base or the id its held credentials are for.
//! - [`meta_app`]: the split of a Meta app's batch by phone number id: each part routes back
//!   to where it was sent, and splitting a split part changes nothing.
//! - [`config`]: the config loader on arbitrary text, with secret references refused (never
//!   read): errors point inside the text, and a valid config routes every account it declares.
//!
//! Inputs to [`provider`] and [`routing`] are written like an HTTP request, so that seeds are
//! readable and easy to write by hand (see [`Request::parse`]).

mod config;
mod meta_app;
mod provider;
mod routing;

pub use config::config;
pub use meta_app::meta_app;
pub use provider::provider;
pub use routing::routing;

use http::{HeaderMap, HeaderName, HeaderValue};

/// A request as the fuzz inputs spell it.
#[derive(Debug, Default)]
pub struct Request {
    /// The first line.
    pub first: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Request {
    /// `first line\nName: value\n...\n\nbody`. Without a blank line the whole input is the body
    /// (so that raw payloads, such as the test fixtures, are useful seeds too). Header lines
    /// that are not a valid name and value are skipped; `\r` before `\n` is ignored.
    pub fn parse(data: &[u8]) -> Request {
        let Some(at) = data.windows(2).position(|w| w == b"\n\n") else {
            return Request { body: data.to_vec(), ..Default::default() };
        };
        let (head, body) = (&data[..at], &data[at + 2..]);
        let mut lines = head.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let first = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
        let mut headers = HeaderMap::new();
        for line in lines {
            let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                headers.append(n, v);
            }
        }
        Request { first, headers, body: body.to_vec() }
    }

    pub fn content_type(&self) -> Option<&str> {
        self.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_like_http() {
        let r = Request::parse(b"https://x/a?b=1\r\nContent-Type: application/json\nbad header: x\nX-A:  1 \n\n{}");
        assert_eq!(r.first, "https://x/a?b=1");
        assert_eq!(r.content_type(), Some("application/json"));
        assert_eq!(r.headers.len(), 2);
        assert_eq!(r.headers["x-a"], "1");
        assert_eq!(r.body, b"{}");
        let raw = Request::parse(b"{\"a\":1}\n");
        assert_eq!((raw.first.as_str(), raw.headers.len(), raw.body.as_slice()), ("", 0, &b"{\"a\":1}\n"[..]));
    }
}
