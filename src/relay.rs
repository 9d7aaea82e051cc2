//! The relay's shared state and the request dispatcher: one [`Relay`] per process, holding the
//! routing snapshot (swapped whole on reload), the upstream client and the metrics. `handle`
//! routes a request to the pipeline that owns it and writes the access line.

use crate::clock::{Clock, SystemClock};
use crate::config::{self, Config, ConfigError};
use crate::http_util::{Body, ErrorCode, error, text};
use crate::metrics::{Metrics, MotionLabels, RequestLabels};
use crate::queue::Queue;
use crate::routing::{Route, RouteTable};
use crate::store::{Store, StoreError};
use crate::upstream::{Upstream, UpstreamError};
use arc_swap::ArcSwap;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A config and the routing table built from it: what one request sees from start to end.
pub struct Snapshot {
    pub config: Config,
    pub table: RouteTable,
}

/// Where a request came in.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    pub peer: SocketAddr,
    /// `http` or `https`: the listener's scheme.
    pub proto: &'static str,
}

/// What the access line reports about a request.
/// Borrowed from the request's snapshot where it can be: nothing is copied for the log line.
#[derive(Default)]
pub struct AccessInfo<'a> {
    pub motion: Option<&'a str>,
    pub account: Option<std::borrow::Cow<'a, str>>,
    pub provider: &'static str,
    pub delivery_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

pub struct Relay {
    snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    pub upstream: Upstream,
    config_path: PathBuf,
    /// The durable queue; set once at start, after the store is open.
    queue: OnceLock<Arc<Queue>>,
    /// The 24-hour customer service window (recorded inbound, checked outbound).
    pub window: crate::window::Window,
    /// Sinch OAuth2 tokens for outbound sends, kept across reloads.
    pub sinch_tokens: crate::outbound::sinch_token::SinchTokens,
    /// The bound https port, for `redirect_http`; set once at start.
    https_port: OnceLock<u16>,
    /// Reloads one at a time (SIGHUP and the admin API may race): the last file read is the one
    /// that stays.
    reload_lock: Mutex<()>,
}

/// A reload that took: the snapshots before and after, and how long building the new one took.
pub struct Reloaded {
    pub old: Arc<Snapshot>,
    pub new: Arc<Snapshot>,
    pub took: Duration,
}

impl Relay {
    pub fn new(config: Config) -> Result<Arc<Relay>, ReloadError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// Like [`Relay::new`] with another notion of "now" (tests move it; see `clock`).
    pub fn with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Arc<Relay>, ReloadError> {
        let upstream = Upstream::new();
        let table = RouteTable::build(&config, &upstream)?;
        Ok(Arc::new(Relay {
            config_path: config.path.clone(),
            snapshot: ArcSwap::from_pointee(Snapshot { config, table }),
            metrics: Arc::new(Metrics::new()),
            upstream,
            queue: OnceLock::new(),
            window: crate::window::Window::new(clock),
            sinch_tokens: Default::default(),
            https_port: OnceLock::new(),
            reload_lock: Mutex::new(()),
        }))
    }

    /// Opens the queue over `store`, resuming what it holds. Called once, at start.
    pub fn start_queue(self: &Arc<Self>, store: Arc<dyn Store>) -> Result<(), StoreError> {
        self.window.attach(store.clone());
        let q = Queue::start(self, store)?;
        let _ = self.queue.set(q);
        Ok(())
    }

    /// The durable store, once started.
    pub fn store(&self) -> Option<&Arc<dyn Store>> {
        self.queue().map(|q| q.store())
    }

    pub fn queue(&self) -> Option<&Arc<Queue>> {
        self.queue.get()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Validates the file again and swaps in a new snapshot; requests in flight keep the old one.
    pub fn reload(&self) -> Result<(), ReloadError> {
        self.reload_config().map(|_| ())
    }

    /// Like [`Relay::reload`], returning both snapshots so the caller can tell what changed.
    /// Blocking (reads and validates the file, builds the table): call it off the runtime's
    /// workers (`spawn_blocking`) when the config is large.
    pub fn reload_config(&self) -> Result<Reloaded, ReloadError> {
        let _one_at_a_time = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let start = Instant::now();
        let config = config::load(&self.config_path)?;
        let table = RouteTable::build(&config, &self.upstream)?;
        let names: Vec<String> = config.motions.iter().map(|m| m.name.clone()).collect();
        let new = Arc::new(Snapshot { config, table });
        let old = self.snapshot.swap(new.clone());
        if let Some(q) = self.queue() {
            q.sync_motions(names.into_iter());
        }
        Ok(Reloaded { old, new, took: start.elapsed() })
    }

    /// Records the https listener's bound port (for `redirect_http`).
    pub fn set_https_port(&self, port: u16) {
        let _ = self.https_port.set(port);
    }

    /// Serves one request on a public listener.
    pub async fn handle(self: &Arc<Self>, req: Request<Incoming>, conn: Conn) -> Response<Body> {
        let start = Instant::now();
        let snap = self.snapshot();
        let mut info = AccessInfo::default();
        let resp = self.dispatch(&snap, req, conn, &mut info).await;
        let status = resp.status().as_u16();
        let motion = info.motion.unwrap_or("");
        let elapsed = start.elapsed();
        self.metrics.requests.get_or_create(&RequestLabels { motion: motion.to_string(), status }).inc();
        self.metrics.latency.get_or_create(&MotionLabels { motion: motion.to_string() }).observe(elapsed.as_secs_f64());
        tracing::info!(
            target: "access",
            motion,
            account = info.account.as_deref().unwrap_or(""),
            provider = info.provider,
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            delivery = info.delivery_id.as_deref().unwrap_or(""),
            peer = %conn.peer,
        );
        resp
    }

    async fn dispatch<'s>(
        &self,
        snap: &'s Snapshot,
        req: Request<Incoming>,
        conn: Conn,
        info: &mut AccessInfo<'s>,
    ) -> Response<Body> {
        // A message framed both ways (Content-Length and Transfer-Encoding) never gets here as
        // such: hyper reads it as chunked, drops Content-Length and closes the connection after
        // it (RFC 9112 6.1), so nothing can be smuggled behind it. HTTP/2 has no such framing.
        let h = req.headers();
        let host = req.uri().host().or_else(|| h.get(http::header::HOST).and_then(|v| v.to_str().ok()));
        let Some(route) = snap.table.lookup(host, req.uri().path()) else {
            return error(ErrorCode::NotFound, "no route for this path");
        };
        if conn.proto == "http" && snap.config.server.redirect_http && !matches!(route, Route::Health) {
            return self.redirect_to_https(snap, &req);
        }
        match route {
            Route::Health => {
                if req.method() == Method::GET || req.method() == Method::HEAD {
                    text(StatusCode::OK, "text/plain", "ok\n")
                } else {
                    error(ErrorCode::MethodNotAllowed, "use GET /healthz")
                }
            }
            Route::Inbound { motion, account, forward_at, by_host } => {
                info.motion = Some(&motion.motion.name);
                info.account = Some(account.id.as_str().into());
                info.provider = account.provider.as_str();
                let target = crate::inbound::Target { motion, account, forward_at, by_host };
                crate::inbound::handle(self, snap, target, req, conn, info).await
            }
            Route::Outbound { motion, account, rest_at } => {
                info.motion = Some(&motion.motion.name);
                info.account = Some(account.id.as_str().into());
                info.provider = account.provider.as_str();
                let target = crate::outbound::Target { motion, account, rest_at };
                crate::outbound::handle(self, snap, target, req, conn, info).await
            }
            Route::MetaApp { app } => crate::meta_app::handle(self, snap, &app, req, conn, info).await,
        }
    }
}

impl Relay {
    /// `redirect_http`: 308 (method and body kept, so a provider's POST is re-sent as a POST) to
    /// the same host, path and query on the https listener.
    fn redirect_to_https(&self, snap: &Snapshot, req: &Request<Incoming>) -> Response<Body> {
        let public = snap.config.server.public_url.as_deref().and_then(|u| u.parse::<http::Uri>().ok());
        let host = req
            .uri()
            .host()
            .map(str::to_string)
            .or_else(|| req.headers().get(http::header::HOST).and_then(|v| v.to_str().ok()).map(host_only))
            .or_else(|| public.as_ref().and_then(|u| u.host().map(str::to_string)));
        let Some(host) = host else {
            return error(ErrorCode::BadRequest, "this listener redirects to https and needs a Host header");
        };
        let port = match self.https_port.get() {
            Some(443) | None => String::new(),
            Some(p) => format!(":{p}"),
        };
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let location = format!("https://{host}{port}{path}");
        let mut resp = text(StatusCode::PERMANENT_REDIRECT, "text/plain", "use https\n");
        match http::HeaderValue::from_str(&location) {
            Ok(v) => {
                resp.headers_mut().insert(http::header::LOCATION, v);
                resp
            }
            Err(_) => error(ErrorCode::BadRequest, "cannot build the https URL for this request"),
        }
    }
}

/// `Host` without its port (`[::1]:80` → `[::1]`).
fn host_only(host: &str) -> String {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => host[..i].to_string(),
        _ => host.to_string(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_only_strips_the_port() {
        assert_eq!(host_only("chat.example.com:8080"), "chat.example.com");
        assert_eq!(host_only("chat.example.com"), "chat.example.com");
        assert_eq!(host_only("[::1]:80"), "[::1]");
        assert_eq!(host_only("[::1]"), "[::1]");
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
