//! Request builder and fixture loading shared by the providers' tests.
use super::Inbound;
use http::{HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}{name}")).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// The `[[provider]]` tables of signatures.toml.
pub fn vectors(provider: &str) -> Vec<toml::Table> {
    let text = String::from_utf8(fixture("signatures.toml")).unwrap();
    let doc: toml::Table = text.parse().unwrap();
    let list = doc[provider].as_array().unwrap_or_else(|| panic!("no [[{provider}]]"));
    assert!(!list.is_empty());
    list.iter().map(|v| v.as_table().unwrap().clone()).collect()
}

pub fn s<'a>(t: &'a toml::Table, key: &str) -> &'a str {
    t[key].as_str().unwrap_or_else(|| panic!("{key} is not a string"))
}

pub struct Req {
    pub url: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub ip: IpAddr,
    pub now: i64,
}

impl Req {
    pub fn post(url: &str, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Req {
            url: url.to_owned(),
            headers: HeaderMap::new(),
            body: body.into(),
            ip: "203.0.113.7".parse().unwrap(),
            now: 1_750_000_000,
        }
        .header("content-type", content_type)
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        self
    }

    pub fn headers(self, list: Vec<(String, String)>) -> Self {
        list.into_iter().fold(self, |r, (k, v)| r.header(&k, &v))
    }

    pub fn inbound(&self) -> Inbound<'_> {
        Inbound {
            url: &self.url,
            query: self.url.split_once('?').map(|(_, q)| q),
            headers: &self.headers,
            body: &self.body,
            client_ip: self.ip,
            now_unix: self.now,
        }
    }
}

/// The reason of a refusal ("ok" when accepted), for terse assertions.
pub fn outcome(r: Result<(), super::Rejection>) -> &'static str {
    r.err().map_or("ok", |e| e.reason)
}
