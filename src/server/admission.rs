//! Caps on open connections: `max_connections` per listener and `max_connections_per_ip` per
//! source address (an IPv6 source counted by its /64, which one host usually holds whole;
//! trusted proxies excepted, since every client behind them shares their address). A
//! connection past a cap is closed right after `accept`: refusing there is cheap and keeps
//! the backlog moving, where not accepting would leave the excess (and the honest clients
//! queued behind it) waiting in the kernel.

use crate::metrics::{ListenerLabels, Metrics, RefusedLabels, RefusedReason};
use ipnet::IpNet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One listener's count of open connections, shared by its serving threads.
pub(super) struct Admission {
    /// The listener's name in logs.
    what: &'static str,
    max: usize,
    per_source: usize,
    trusted: Vec<IpNet>,
    /// The count itself, exported as `connections_open{listener}`.
    open: Gauge,
    by_source: Mutex<HashMap<Source, usize>>,
    refused: [Counter; 2],
    refusals: Throttled,
    accept_errors: Counter,
    accept_errors_log: Throttled,
}

/// What a source address is counted as.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Source {
    V4(u32),
    /// The upper 64 bits: the network of one site or host.
    V6(u64),
}

impl Source {
    fn of(ip: IpAddr) -> Source {
        // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source::V4(v4.into()),
            IpAddr::V6(v6) => Source::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

/// Why a connection was refused.
pub(super) type Refused = RefusedReason;

/// A connection's place in the counts, given back when it is dropped.
pub(super) struct Ticket {
    admission: Arc<Admission>,
    source: Option<Source>,
}

impl Admission {
    pub fn new(
        what: &'static str,
        max: usize,
        per_source: usize,
        trusted: Vec<IpNet>,
        metrics: &Metrics,
    ) -> Arc<Admission> {
        let refused =
            |reason| metrics.connections_refused.get_or_create(&RefusedLabels { listener: what, reason }).clone();
        let listener = ListenerLabels { listener: what };
        Arc::new(Admission {
            what,
            max,
            per_source,
            trusted,
            open: metrics.connections_open.get_or_create(&listener).clone(),
            by_source: Mutex::new(HashMap::new()),
            refused: [refused(Refused::Listener), refused(Refused::Source)],
            refusals: Throttled::new(),
            accept_errors: metrics.accept_errors.get_or_create(&listener).clone(),
            accept_errors_log: Throttled::new(),
        })
    }

    /// Counts a connection from `peer` in, or says which cap it is past.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Ticket, Refused> {
        if self.open.inc() >= self.max as i64 {
            self.open.dec();
            return Err(Refused::Listener);
        }
        // From here on the ticket gives the listener's place back, whatever happens.
        let mut ticket = Ticket { admission: self.clone(), source: None };
        if self.trusted.iter().any(|net| net.contains(&peer.to_canonical())) {
            return Ok(ticket);
        }
        let source = Source::of(peer);
        let mut by_source = self.by_source.lock().unwrap_or_else(|e| e.into_inner());
        let count = by_source.entry(source).or_insert(0);
        if *count >= self.per_source {
            return Err(Refused::Source);
        }
        *count += 1;
        ticket.source = Some(source);
        Ok(ticket)
    }

    /// Counts a failed `accept` (out of file descriptors and the like) and logs it, at most
    /// once every few seconds with how many there were.
    pub fn accept_failed(&self, e: &std::io::Error) {
        self.accept_errors.inc();
        if let Some(count) = self.accept_errors_log.tick() {
            tracing::warn!("{} listener: accept failed {count} time(s): {e}", self.what);
        }
    }

    /// Counts a refusal and logs it, at most once every few seconds with how many there were.
    pub fn refused(&self, why: Refused) {
        // Indexed by the enum's order: Listener, Source (as built in `new`).
        self.refused[why as usize].inc();
        let what = self.what;
        if let Some(count) = self.refusals.tick() {
            let cap = match why {
                Refused::Listener => format!("max_connections ({})", self.max),
                Refused::Source => format!("max_connections_per_ip ({}) for one source", self.per_source),
            };
            tracing::warn!("{what} listener: refused {count} connection(s) past {cap}");
        }
    }

    #[cfg(test)]
    fn open(&self) -> i64 {
        self.open.get()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let a = &self.admission;
        if let Some(source) = self.source {
            let mut by_source = a.by_source.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(count) = by_source.get_mut(&source) {
                *count -= 1;
                if *count == 0 {
                    by_source.remove(&source);
                }
            }
        }
        a.open.dec();
    }
}

/// A count of events that is reported at most once per [`Throttled::EVERY`]: a flood of
/// refusals or accept errors becomes a line every few seconds, not thousands.
pub(super) struct Throttled {
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttled {
    const EVERY: Duration = Duration::from_secs(10);

    pub fn new() -> Throttled {
        Throttled { state: Mutex::new((None, 0)) }
    }

    /// Counts one event; returns the count to report when a report is due.
    pub fn tick(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1 += 1;
        let now = Instant::now();
        if state.0.is_some_and(|last| now.duration_since(last) < Self::EVERY) {
            return None;
        }
        let count = std::mem::take(&mut state.1);
        state.0 = Some(now);
        Some(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max: usize, per_source: usize, trusted: Vec<IpNet>) -> Arc<Admission> {
        Admission::new("test", max, per_source, trusted, &Metrics::new())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_per_listener_and_per_source() {
        let a = admission(3, 2, vec![]);
        let t1 = a.admit(ip("192.0.2.1")).unwrap();
        let _t2 = a.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(a.admit(ip("192.0.2.1")).err(), Some(Refused::Source));
        let _t3 = a.admit(ip("192.0.2.2")).unwrap();
        assert_eq!(a.admit(ip("192.0.2.3")).err(), Some(Refused::Listener));
        assert_eq!(a.open(), 3, "refusals give their place back");
        drop(t1);
        let _t4 = a.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(a.open(), 3);
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        let a = admission(100, 1, vec![]);
        let _t = a.admit(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(a.admit(ip("2001:db8:1:2:ffff::9")).err(), Some(Refused::Source), "same /64");
        let _u = a.admit(ip("2001:db8:1:3::1")).unwrap();
        let _v = a.admit(ip("198.51.100.7")).unwrap();
        assert_eq!(a.admit(ip("::ffff:198.51.100.7")).err(), Some(Refused::Source));
    }

    #[test]
    fn trusted_proxies_are_not_capped_per_source_but_count_for_the_listener() {
        let a = admission(3, 1, vec!["10.0.0.0/8".parse().unwrap()]);
        let _t: Vec<_> = (0..3).map(|_| a.admit(ip("10.1.2.3")).unwrap()).collect();
        assert_eq!(a.admit(ip("10.1.2.3")).err(), Some(Refused::Listener));
    }

    #[test]
    fn throttled_reports_the_first_then_waits() {
        let t = Throttled::new();
        assert_eq!(t.tick(), Some(1));
        assert_eq!(t.tick(), None);
        assert_eq!(t.tick(), None);
    }
}
