//! The routing table: an immutable snapshot built from a [`Config`], read on every request
//! without locks (the server holds it in an `ArcSwap` and a reload swaps in a new one whole).
//!
//! It maps `(Host, path)` to what the request is for. Paths are matched segment by segment after
//! percent-decoding each segment once; a segment that decodes to `.`, `..`, or contains a slash,
//! backslash or NUL is refused, so no spelling of a path can leave an account's subtree.
//! Lookups are hash-map probes: the cost does not grow with the number of accounts.

use crate::config::{Account, Config, MetaApp, Motion};
use crate::request::{decode_segment, host_without_port};
use crate::upstream::{Client, Upstream, UpstreamError};
use arc_swap::ArcSwap;
use governor::clock::{Clock as _, DefaultClock};
use governor::{Quota, RateLimiter};
use std::borrow::{Borrow, Cow};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// A config and the routing table built from it: what one request sees from start to end.
pub struct Snapshot {
    pub config: Config,
    pub table: RouteTable,
}

impl Snapshot {
    pub fn build(config: Config, upstream: &Upstream) -> Result<Snapshot, UpstreamError> {
        let table = RouteTable::build(&config, upstream)?;
        Ok(Snapshot { config, table })
    }
}

/// The current snapshot: loaded on every request without locks, replaced whole by a reload
/// (requests in flight keep the one they started with).
pub type Snapshots = ArcSwap<Snapshot>;

/// One Motion server and its accounts, as routes see them.
pub struct MotionRoute {
    pub motion: Arc<Motion>,
    /// The pooled client of a Motion with its own `ca_file`; others use the thread's own.
    ca_client: Option<Client>,
    upstream: Upstream,
    accounts: HashSet<ById>,
    /// `rate_limit`: the webhooks accepted for this Motion (a reload starts it full again).
    limiter: Option<Limiter>,
}

/// An account in its Motion's set, found by its id (the set holds no second copy of the id).
struct ById(Arc<Account>);

impl Borrow<str> for ById {
    fn borrow(&self) -> &str {
        &self.0.id
    }
}

impl std::hash::Hash for ById {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.id.as_str().hash(state)
    }
}

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for ById {}

type Limiter = RateLimiter<governor::state::NotKeyed, governor::state::InMemoryState, DefaultClock>;

fn limiter(limit: &crate::config::RateLimit) -> Limiter {
    let period = (limit.per / limit.count).max(std::time::Duration::from_nanos(1));
    let burst = std::num::NonZeroU32::new(limit.burst).unwrap_or(std::num::NonZeroU32::MIN);
    let quota = Quota::with_period(period).expect("a period of at least 1 ns").allow_burst(burst);
    RateLimiter::direct_with_clock(quota, DefaultClock::default())
}

impl std::fmt::Debug for MotionRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MotionRoute")
            .field("motion", &self.motion.name)
            .field("accounts", &self.accounts.len())
            .finish()
    }
}

impl MotionRoute {
    /// The pooled client to reach this Motion with, from the calling thread.
    pub fn client(&self) -> Client {
        self.ca_client.clone().unwrap_or_else(|| self.upstream.client())
    }

    pub fn account(&self, id: &str) -> Option<&Arc<Account>> {
        self.accounts.get(id).map(|a| &a.0)
    }

    /// Takes one webhook from this Motion's `rate_limit`: `Err` says how long until the next
    /// one would be allowed.
    pub fn admit(&self) -> Result<(), std::time::Duration> {
        let Some(l) = &self.limiter else { return Ok(()) };
        l.check().map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// What a request is for.
#[derive(Debug)]
pub enum Route<'a> {
    /// `GET /healthz` on a public listener.
    Health,
    /// A webhook for an account's subtree: forwarded to `motion.url` + `path[forward_at..]`.
    Inbound {
        motion: &'a Arc<MotionRoute>,
        account: &'a Arc<Account>,
        /// Byte offset in the request path where the part Motion is asked for starts.
        forward_at: usize,
        /// True when matched by the Host header rather than the `/{motion}` prefix.
        by_host: bool,
    },
    /// `/{motion}/outbound/{account}/{rest}`: `path[rest_at..]` goes after the provider API base.
    Outbound { motion: &'a Arc<MotionRoute>, account: &'a Arc<Account>, rest_at: usize },
    /// `/meta/{app}`.
    MetaApp { app: String },
}

/// An account as a Meta app's batch routes to it.
#[derive(Debug, Clone)]
pub struct AppTarget {
    pub motion: Arc<MotionRoute>,
    pub account: Arc<Account>,
}

/// One `[[meta_app]]`: its settings and the second index, by phone number id (and WABA id).
#[derive(Debug)]
pub struct AppRoute {
    pub app: Arc<MetaApp>,
    by_phone: HashMap<String, AppTarget>,
    /// Accounts declaring a WABA id, at most one per Motion (account-level changes go once per Motion).
    by_waba: HashMap<String, Vec<AppTarget>>,
}

impl AppRoute {
    pub fn by_phone(&self, phone_number_id: &str) -> Option<&AppTarget> {
        self.by_phone.get(phone_number_id)
    }

    pub fn by_waba(&self, waba_id: &str) -> &[AppTarget] {
        self.by_waba.get(waba_id).map_or(&[], Vec::as_slice)
    }
}

/// The immutable snapshot.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_name: HashMap<String, Arc<MotionRoute>>,
    by_host: HashMap<String, Arc<MotionRoute>>,
    apps: HashMap<String, AppRoute>,
}

impl RouteTable {
    pub fn build(config: &Config, upstream: &Upstream) -> Result<RouteTable, UpstreamError> {
        let mut t = RouteTable::default();
        for m in &config.motions {
            let route = Arc::new(MotionRoute {
                motion: m.clone(),
                ca_client: upstream.client_for(m.ca_file.as_deref())?,
                upstream: upstream.clone(),
                accounts: m.accounts.iter().map(|a| ById(a.clone())).collect(),
                limiter: m.rate_limit.as_ref().map(limiter),
            });
            for h in &m.hosts {
                t.by_host.insert(h.clone(), route.clone());
            }
            t.by_name.insert(m.name.clone(), route);
        }
        for app in &config.meta_apps {
            let mut r = AppRoute { app: app.clone(), by_phone: HashMap::new(), by_waba: HashMap::new() };
            for motion in config.motions.iter().filter_map(|m| t.by_name.get(&m.name)) {
                for account in motion.motion.accounts.iter().filter(|a| a.app.as_deref() == Some(app.name.as_str())) {
                    let target = AppTarget { motion: motion.clone(), account: account.clone() };
                    if let Some(p) = &account.phone_number_id {
                        r.by_phone.insert(p.clone(), target.clone());
                    }
                    if let Some(w) = &account.waba_id {
                        let list = r.by_waba.entry(w.clone()).or_default();
                        if !list.iter().any(|x| Arc::ptr_eq(&x.motion, &target.motion)) {
                            list.push(target);
                        }
                    }
                }
            }
            t.apps.insert(app.name.clone(), r);
        }
        Ok(t)
    }

    pub fn app(&self, name: &str) -> Option<&AppRoute> {
        self.apps.get(name)
    }

    pub fn motion(&self, name: &str) -> Option<&Arc<MotionRoute>> {
        self.by_name.get(name)
    }

    pub fn motions(&self) -> impl Iterator<Item = &Arc<MotionRoute>> {
        self.by_name.values()
    }

    /// Finds the route of a request. `host` is the Host header (or HTTP/2 authority), `path` the raw
    /// request path without the query. `None` means 404.
    pub fn lookup(&self, host: Option<&str>, path: &str) -> Option<Route<'_>> {
        let mut segs = Segments::new(path)?;
        if let Some(motion) = host.and_then(|h| self.by_host.get(host_without_port(h).as_ref())) {
            return Self::under_motion(motion, &mut segs, true);
        }
        let first = segs.next()?;
        match first.as_ref() {
            "healthz" if segs.at_end() => Some(Route::Health),
            "meta" => {
                let app = segs.next()?.into_owned();
                segs.at_end().then_some(Route::MetaApp { app })
            }
            name => {
                let motion = self.by_name.get(name)?;
                Self::under_motion(motion, &mut segs, false)
            }
        }
    }

    /// The part of a path after `/{motion}` (or all of it on a Motion's own host).
    fn under_motion<'a>(motion: &'a Arc<MotionRoute>, segs: &mut Segments<'_>, by_host: bool) -> Option<Route<'a>> {
        let start = segs.offset();
        match segs.next()?.as_ref() {
            "api" => {
                if segs.next()? != "whatsapp" || segs.next()? != "accounts" {
                    return None;
                }
                let account = motion.account(segs.next()?.as_ref())?;
                segs.validate_rest()?;
                Some(Route::Inbound { motion, account, forward_at: start, by_host })
            }
            "outbound" => {
                let account = motion.account(segs.next()?.as_ref())?;
                let rest_at = segs.offset();
                segs.validate_rest()?;
                Some(Route::Outbound { motion, account, rest_at })
            }
            _ => None,
        }
    }
}

/// Iterates the decoded segments of an absolute path, refusing traversal.
struct Segments<'a> {
    path: &'a str,
    pos: usize,
}

impl<'a> Segments<'a> {
    fn new(path: &'a str) -> Option<Self> {
        path.starts_with('/').then_some(Segments { path, pos: 1 })
    }

    /// Byte offset of the `/` before the next segment.
    fn offset(&self) -> usize {
        self.pos - 1
    }

    fn at_end(&self) -> bool {
        self.pos >= self.path.len()
    }

    /// The next segment, decoded once; `None` at the end, for an empty segment or one that does
    /// not decode safely.
    fn next(&mut self) -> Option<Cow<'a, str>> {
        if self.pos > self.path.len() {
            return None;
        }
        let rest = &self.path[self.pos..];
        let end = rest.find('/').unwrap_or(rest.len());
        self.pos += end + 1;
        let seg = &rest[..end];
        if seg.is_empty() { None } else { decode_segment(seg) }
    }

    /// Every remaining segment must decode safely (empty segments are allowed: `a//b`, trailing `/`).
    fn validate_rest(&mut self) -> Option<()> {
        if self.pos > self.path.len() {
            return Some(());
        }
        self.path[self.pos..].split('/').all(|s| s.is_empty() || decode_segment(s).is_some()).then_some(())
    }
}

#[cfg(test)]
mod tests;
