//! Path and Host routing, the client address behind proxies, and the outbound allow-list,
//! against one fixed configuration of two Motions.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use http::Method;

use super::Request;
use crate::request::{client_ip, decode_segment, host_without_port};
use crate::routing::{Route, RouteTable};

/// Two Motions, one with its own host, accounts of every kind of held credential (each
/// confined to its id), custom `outbound_paths`, and a Meta app whose accounts live in both.
pub(super) const CONFIG: &str = r#"
[delivery]
mode = "direct"

[[meta_app]]
name = "main"
app_secret = "fuzz-app-secret"

[[motion]]
name = "acme"
url = "http://127.0.0.1:9000"
hosts = ["acme.chat.example.com"]
outbound_token = "fuzz-acme-outbound"
signing_secret = "fuzz-acme-signing"
  [[motion.account]]
  id = "12"
  provider = "kaleyra"
  shared_token = "fuzz-kaleyra-token"
  api_key = "fuzz-kaleyra-key"
  sid = "HXSID1"
  [[motion.account]]
  id = "AC1"
  provider = "twilio"
  auth_token = "fuzz-twilio-token"
  account_sid = "ACSID1"
  [[motion.account]]
  id = "m1"
  provider = "meta"
  app = "main"
  phone_number_id = "111"
  waba_id = "W1"
  access_token = "fuzz-meta-token"
  [[motion.account]]
  id = "m2"
  provider = "meta"
  app = "main"
  phone_number_id = "222"
  waba_id = "W1"

[[motion]]
name = "globex"
url = "http://127.0.0.1:9001"
outbound_token = "fuzz-globex-outbound"
signing_secret = "fuzz-globex-signing"
  [[motion.account]]
  id = "7"
  provider = "sinch"
  webhook_secret = "fuzz-sinch-secret"
  key_id = "fuzz-key-id"
  key_secret = "fuzz-key-secret"
  project_id = "PROJ1"
  [[motion.account]]
  id = "g1"
  provider = "meta"
  app = "main"
  phone_number_id = "333"
  waba_id = "W2"
  [[motion.account]]
  id = "x.y"
  provider = "generic"
  hmac_header = "X-Sig"
  hmac_secret = "fuzz-generic-secret"
  api_base = "https://api.example.com/base"
  outbound_paths = ["POST /v1/**", "GET,DELETE /v*/media/*.json"]
"#;

/// The routing table of [`CONFIG`], built once.
pub(super) fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let config = crate::config::parse(std::path::Path::new("fuzz.toml"), CONFIG).expect("the fuzz config is valid");
        RouteTable::build(&config, &crate::upstream::Upstream::new()).expect("no ca_file to read")
    })
}

/// Where each account's held credentials confine its sends: (motion, account, index of the
/// decoded path segment, the id it must be).
const CONFINED: [(&str, &str, usize, &str); 4] =
    [("acme", "12", 1, "HXSID1"), ("acme", "AC1", 2, "ACSID1"), ("acme", "m1", 1, "111"), ("globex", "7", 2, "PROJ1")];

/// The input is a request head: `METHOD /path?query` (the method may be left out), headers
/// (`Host`, `X-Forwarded-For`, ...), and nothing else is read.
pub fn routing(data: &[u8]) {
    let req = if data.windows(2).any(|w| w == b"\n\n") {
        Request::parse(data)
    } else {
        Request::parse(&[data, b"\n\n"].concat())
    };
    let (method, target) = match req.first.split_once(' ') {
        Some((m, t)) => (Method::from_bytes(m.as_bytes()).unwrap_or(Method::POST), t),
        None => (Method::POST, req.first.as_str()),
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let host = req.headers.get(http::header::HOST).and_then(|v| v.to_str().ok());

    proxied_client(&req.headers);

    let Some(route) = table().lookup(host, path) else { return };
    match route {
        // Segments decode once, so `/%68ealthz` is `/healthz`; one trailing slash is allowed.
        Route::Health => assert_eq!(decoded(path), Some(vec!["healthz".to_string()]), "{path:?}"),
        Route::MetaApp { app } => assert_eq!(decoded(path), Some(vec!["meta".to_string(), app]), "{path:?}"),
        Route::Inbound { motion, account, forward_at, by_host } => {
            owns(motion, account);
            assert!(path.is_char_boundary(forward_at), "{path:?} cut at {forward_at}");
            let (before, forwarded) = path.split_at(forward_at);
            if by_host {
                let h = host_without_port(host.expect("a route by host has a host"));
                assert!(
                    motion.motion.hosts.iter().any(|m| *m == *h),
                    "{h} is not one of {}'s hosts",
                    motion.motion.name
                );
                assert_eq!(before, "");
            } else {
                let name = before.strip_prefix('/').and_then(decode_segment);
                assert_eq!(name.as_deref(), Some(motion.motion.name.as_str()), "{path:?}");
            }
            let segs = safe_segments(forwarded).unwrap_or_else(|| panic!("{path:?} routed with an unsafe segment"));
            assert!(segs.len() >= 4, "{path:?}");
            assert_eq!(segs[..3], ["api", "whatsapp", "accounts"], "{path:?}");
            assert_eq!(segs[3], account.id, "{path:?}");
        }
        Route::Outbound { motion, account, rest_at } => {
            owns(motion, account);
            assert!(path.is_char_boundary(rest_at), "{path:?} cut at {rest_at}");
            let (before, rest) = path.split_at(rest_at);
            let segs = safe_segments(before).unwrap_or_else(|| panic!("{path:?} routed with an unsafe segment"));
            let owner = [motion.motion.name.as_str(), "outbound", account.id.as_str()];
            // On the Motion's own host its name is not in the path.
            assert!(segs == owner || segs == owner[1..], "{path:?} routed to {owner:?}");
            outbound(motion.motion.name.as_str(), account, &method, rest, target);
        }
    }
}

/// An account routed under a Motion is that Motion's own.
fn owns(motion: &crate::routing::MotionRoute, account: &Arc<crate::config::Account>) {
    let own = motion.account(&account.id).expect("the account is the Motion's");
    assert!(Arc::ptr_eq(own, account), "account {} of another Motion", account.id);
}

/// A send the allow-list lets through stays below the account's API base, with the id its
/// held credentials are for.
fn outbound(motion: &str, account: &crate::config::Account, method: &Method, rest: &str, target: &str) {
    if !account.outbound.paths.allows(method, rest) {
        return;
    }
    let segs = decoded(rest).unwrap_or_else(|| panic!("{rest:?} allowed with an unsafe segment"));
    assert!(segs.iter().all(|s| !s.is_empty()), "{rest:?} allowed with an empty segment");
    if let Some((.., at, id)) = CONFINED.iter().find(|(m, a, ..)| *m == motion && *a == account.id) {
        assert_eq!(segs.get(*at).map(String::as_str), Some(*id), "{motion}/{}: {rest:?} escapes its id", account.id);
    }
    // The provider URL as the outbound pipeline builds it: never another host.
    let base = account.outbound.api_base(account.provider).expect("every fuzzed account has an API base");
    let url = match target.split_once('?') {
        Some((_, q)) => format!("{base}{rest}?{q}"),
        None => format!("{base}{rest}"),
    };
    let (Ok(built), Ok(base)) = (url.parse::<http::Uri>(), base.parse::<http::Uri>()) else { return };
    assert_eq!(built.authority(), base.authority(), "{url:?} leaves {base}");
    assert_eq!(built.scheme(), base.scheme(), "{url:?}");
    assert!(built.path().starts_with(base.path().trim_end_matches('/')), "{url:?} leaves {base}");
}

/// The decoded segments of a path below its first '/', None when one does not decode safely
/// (an empty segment decodes to "").
fn safe_segments(path: &str) -> Option<Vec<String>> {
    let Some(rest) = path.strip_prefix('/') else { return Some(Vec::new()).filter(|_| path.is_empty()) };
    rest.split('/')
        .map(|s| if s.is_empty() { Some(String::new()) } else { decode_segment(s).map(|d| d.into_owned()) })
        .map(|s| s.filter(|d| d != "." && d != ".." && !d.contains(['/', '\\', '\0'])))
        .collect()
}

/// The decoded segments of a path without one trailing slash.
fn decoded(path: &str) -> Option<Vec<String>> {
    safe_segments(path.strip_suffix('/').unwrap_or(path))
}

/// The client address behind trusted proxies is the peer or one the headers named.
fn proxied_client(headers: &http::HeaderMap) {
    let trusted: [ipnet::IpNet; 2] = ["10.0.0.0/8".parse().unwrap(), "::ffff:10.0.0.0/104".parse().unwrap()];
    let peer: IpAddr = [10, 0, 0, 5].into();
    let ip = client_ip(peer, headers, &trusted);
    if ip == peer {
        return;
    }
    let named = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
    let hop = |h: &str| h.trim().parse::<IpAddr>().ok().or_else(|| h.trim().parse::<SocketAddr>().ok().map(|s| s.ip()));
    assert!(named.filter_map(hop).any(|h| h.to_canonical() == ip), "{ip} was not in X-Forwarded-For");
}
