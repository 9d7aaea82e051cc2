//! Which relay delivers which conversations: conversations hash into [`PARTITIONS`]
//! partitions, each held by one relay at a time through a lease row that expires unless renewed.
//!
//! Timing, from `takeover` (T): leases last 2T/3 and are renewed every T/6; a relay whose
//! heartbeat is older than 2T/3 is dead, its partitions go to the live ones (spread by a fixed
//! rule over the live relays' ids, so every relay computes the same plan) once its leases have
//! expired: within 2T/3 + T/6 < T of its death. Fencing: a relay that has not renewed for T/2
//! (measured on its own monotonic clock from the start of its last successful renewal, which is
//! no later than the database's `now()` its lease expiry counts from) stops starting attempts,
//! well before another relay may take its leases (2T/3). A partition a relay should hand over
//! (a relay joined) is dropped locally at once and released in the database one renewal later,
//! which leaves attempts in flight that time to finish.
//!
//! Also here: LISTEN for other relays' appends (NOTIFY carries the appending relay's id), and the
//! health probe behind `/readyz`.
//!
//! Must never: report a partition held once its local validity has passed, or let the database
//! clock and the local clock be compared (expiry is the database's `now()`, fencing local time).

use super::connect::Connector;
use super::schema::PARTITIONS;
use crate::store::{Leases, News};
use deadpool_postgres::Pool;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The NOTIFY channel appends announce themselves on.
pub const CHANNEL: &str = "relay_events";

/// The partition of a conversation (stable across releases: stored with every event).
pub fn partition(motion: &str, conversation: &str) -> u32 {
    let mut h = Sha256::new();
    h.update((motion.len() as u64).to_le_bytes());
    h.update(motion.as_bytes());
    h.update(conversation.as_bytes());
    let d = h.finalize();
    (u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) % PARTITIONS as u64) as u32
}

#[derive(Clone, Copy)]
struct Held {
    mask: u64,
    valid_until: Option<Instant>,
    /// Moves with every change of `mask` or validity (under the same lock: a reader that sees
    /// a new grant sees its epoch).
    epoch: u64,
}

pub struct PgLeases {
    pub me: String,
    takeover: Duration,
    held: Mutex<Held>,
    news: watch::Sender<News>,
    /// Set by `release` (shutdown): the renewal loop stops taking leases.
    leaving: AtomicBool,
    fenced: AtomicBool,
    pool: Pool,
    runtime: tokio::runtime::Handle,
    /// What the last renewal saw of the cluster (for the board).
    cluster: Mutex<Option<crate::store::Cluster>>,
}

impl PgLeases {
    pub fn new(takeover: Duration, pool: Pool, runtime: tokio::runtime::Handle) -> Arc<PgLeases> {
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        let me = format!(
            "{}-{}-{}",
            if host.is_empty() { "relay" } else { &host },
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        Arc::new(PgLeases {
            me,
            takeover,
            held: Mutex::new(Held { mask: 0, valid_until: None, epoch: 0 }),
            news: watch::channel(News::default()).0,
            leaving: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            pool,
            runtime,
            cluster: Mutex::new(None),
        })
    }

    fn lease_len(&self) -> Duration {
        self.takeover * 2 / 3
    }

    fn tick(&self) -> Duration {
        self.takeover / 6
    }

    fn held(&self) -> Held {
        *self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits (at most `limit`) for the first renewal, so a starting relay resumes the
    /// conversations it holds at once.
    pub async fn first_grant(&self, limit: Duration) {
        let until = Instant::now() + limit;
        while self.held().valid_until.is_none() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs until `release`: renews, takes and hands over leases every T/6.
    pub async fn run(self: Arc<Self>) {
        let mut draining: Vec<i32> = Vec::new();
        let mut failing = false;
        loop {
            if self.leaving.load(Ordering::Acquire) {
                return;
            }
            let started = Instant::now();
            match tokio::time::timeout(self.tick(), self.renew(&draining)).await {
                Ok(Ok((mask, next_draining))) => {
                    if failing {
                        tracing::info!("leases renewed again; delivering");
                        failing = false;
                    }
                    draining = next_draining;
                    self.granted(mask, started + self.takeover / 2);
                }
                outcome => {
                    let why = match outcome {
                        Ok(Err(e)) => e,
                        _ => "the database did not answer in time".to_string(),
                    };
                    if !failing {
                        tracing::warn!("cannot renew conversation leases: {why}; retrying");
                        failing = true;
                    }
                    self.check_fence();
                }
            }
            tokio::time::sleep_until((started + self.tick()).into()).await;
            self.check_fence();
        }
    }

    /// One renewal, in one transaction: heartbeat, forget dead relays, plan the spread,
    /// release what was handed over, renew and take the partitions this relay should hold.
    /// Returns the partitions held and those to release next time.
    async fn renew(&self, draining: &[i32]) -> Result<(u64, Vec<i32>), String> {
        let err = |e: tokio_postgres::Error| e.to_string();
        let mut client = self.pool.get().await.map_err(|e| e.to_string())?;
        let tx = client.transaction().await.map_err(err)?;
        let lease = self.lease_len().as_secs_f64();
        tx.execute(
            "INSERT INTO relay_nodes (id, seen, started) VALUES ($1, now(), now()) \
             ON CONFLICT (id) DO UPDATE SET seen = now()",
            &[&self.me],
        )
        .await
        .map_err(err)?;
        tx.execute("DELETE FROM relay_nodes WHERE seen < now() - make_interval(secs => $1)", &[&lease])
            .await
            .map_err(err)?;
        let live: Vec<String> = tx
            .query("SELECT id FROM relay_nodes ORDER BY id", &[])
            .await
            .map_err(err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let index = live.iter().position(|id| *id == self.me).unwrap_or(0);
        let target: Vec<i32> =
            (0..PARTITIONS as usize).filter(|p| p % live.len().max(1) == index).map(|p| p as i32).collect();
        tx.execute(
            "UPDATE relay_leases SET holder = NULL, expires = '-infinity' \
             WHERE holder = $1 AND part = ANY($2) AND NOT (part = ANY($3))",
            &[&self.me, &draining, &target],
        )
        .await
        .map_err(err)?;
        let rows = tx
            .query(
                "UPDATE relay_leases SET holder = $1, expires = now() + make_interval(secs => $2) \
                 WHERE part = ANY($3) AND (holder = $1 OR holder IS NULL OR expires < now()) RETURNING part",
                &[&self.me, &lease, &target],
            )
            .await
            .map_err(err)?;
        let still: Vec<i32> = tx
            .query("SELECT part FROM relay_leases WHERE holder = $1 AND NOT (part = ANY($2))", &[&self.me, &target])
            .await
            .map_err(err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let holders: Vec<(String, i64)> = tx
            .query(
                "SELECT holder, count(*) FROM relay_leases WHERE holder IS NOT NULL AND expires > now() GROUP BY holder",
                &[],
            )
            .await
            .map_err(err)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        tx.commit().await.map_err(err)?;
        let relays = live
            .iter()
            .map(|id| (id.clone(), holders.iter().find(|(h, _)| h == id).map_or(0, |(_, n)| *n as u32)))
            .collect();
        let view = crate::store::Cluster { me: self.me.clone(), partitions: PARTITIONS, relays };
        *self.cluster.lock().unwrap_or_else(PoisonError::into_inner) = Some(view);
        let mask = rows.iter().fold(0u64, |m, r| m | 1 << r.get::<_, i32>(0));
        Ok((mask, still))
    }

    fn granted(&self, mask: u64, valid_until: Instant) {
        let was_fenced = self.fenced.swap(false, Ordering::AcqRel);
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let changed = held.mask != mask || was_fenced || held.valid_until.is_none();
        held.mask = mask;
        held.valid_until = Some(valid_until);
        if changed {
            self.raise(held);
            tracing::info!(partitions = mask.count_ones(), of = PARTITIONS, "conversation leases changed");
        }
    }

    /// A new epoch: what this relay holds (or may know of it) changed.
    fn bump(&self) {
        self.raise(self.held.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Starts the next epoch and announces it, after letting `held` go.
    fn raise(&self, mut held: std::sync::MutexGuard<'_, Held>) {
        held.epoch += 1;
        let epoch = held.epoch;
        drop(held);
        self.announce(epoch);
    }

    /// Tells the queue about epoch `epoch`, unless a later one was told already. `granted` and
    /// `bump` run on different tasks and announce after releasing the lock, so they may
    /// announce out of order: a late, lower epoch must not replace a higher one, or the queue
    /// would look at the store in an epoch no grant belongs to and park every conversation
    /// until the next lease change.
    fn announce(&self, epoch: u64) {
        self.news.send_modify(|n| n.epoch = n.epoch.max(epoch));
    }

    /// Past the validity of the last renewal: stop delivering (once), and say so.
    fn check_fence(&self) {
        let held = self.held();
        let expired = held.valid_until.is_some_and(|v| Instant::now() >= v);
        if expired && held.mask != 0 && !self.fenced.swap(true, Ordering::AcqRel) {
            tracing::error!(
                "conversation leases not renewed for half of [storage] takeover: delivering nothing until \
                 the database answers again (another relay may take these conversations over)"
            );
            self.bump();
        }
    }

    /// Announces another relay's append (a notification with another relay's id).
    pub fn appended_elsewhere(&self) {
        self.news.send_modify(|n| n.appended += 1);
    }

    /// Announces something that calls for a full look at the queue (e.g. LISTEN reconnected:
    /// notifications may have been missed).
    pub fn resync(&self) {
        self.bump();
    }
}

impl Leases for PgLeases {
    fn grant(&self, motion: &str, conversation: &str) -> Option<u64> {
        let held = self.held();
        let valid = held.valid_until.is_some_and(|v| Instant::now() < v);
        (valid && held.mask & (1 << partition(motion, conversation)) != 0).then_some(held.epoch)
    }

    fn news(&self) -> Option<watch::Receiver<News>> {
        Some(self.news.subscribe())
    }

    fn cluster(&self) -> Option<crate::store::Cluster> {
        self.cluster.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn release(&self) {
        self.leaving.store(true, Ordering::Release);
        {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            (held.mask, held.valid_until) = (0, None);
        }
        let (pool, me) = (self.pool.clone(), self.me.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let done = tokio::time::timeout(Duration::from_secs(3), async {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                client
                    .execute("UPDATE relay_leases SET holder = NULL, expires = '-infinity' WHERE holder = $1", &[&me])
                    .await
                    .map_err(|e| e.to_string())?;
                client.execute("DELETE FROM relay_nodes WHERE id = $1", &[&me]).await.map_err(|e| e.to_string())
            })
            .await;
            let _ = tx.send(done);
        });
        match rx.recv_timeout(Duration::from_secs(4)) {
            Ok(Ok(Ok(_))) => tracing::info!("conversation leases released"),
            _ => tracing::warn!("could not release the conversation leases: the others take over when they expire"),
        }
    }
}

/// Listens for other relays' appends, reconnecting with a backoff of at most 5 s.
pub async fn listen(connector: Connector, leases: Arc<PgLeases>) {
    let mut backoff = Duration::from_millis(250);
    let mut first = true;
    loop {
        if leases.leaving.load(Ordering::Acquire) {
            return;
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        match connector.connect(Some(tx)).await {
            Ok(client) => match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                Ok(()) => {
                    backoff = Duration::from_millis(250);
                    if !first {
                        // Notifications sent while it was down are lost: look at the queue.
                        leases.resync();
                    }
                    first = false;
                    while let Some(n) = rx.recv().await {
                        if n.payload() != leases.me {
                            leases.appended_elsewhere();
                        }
                    }
                    tracing::warn!("the LISTEN connection to the database broke; reconnecting");
                }
                Err(e) => tracing::warn!("LISTEN failed: {e}"),
            },
            Err(e) => tracing::debug!("cannot open the LISTEN connection: {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The store's health for `/readyz`: a trivial query every second.
pub async fn probe(pool: Pool, healthy: Arc<Mutex<Option<Instant>>>, leaving: Arc<AtomicBool>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if leaving.load(Ordering::Acquire) {
            return;
        }
        let ok = tokio::time::timeout(Duration::from_secs(2), async {
            let client = pool.get().await.ok()?;
            client.simple_query("SELECT 1").await.ok()
        })
        .await;
        let mut last = healthy.lock().unwrap_or_else(PoisonError::into_inner);
        match ok {
            Ok(Some(_)) => *last = Some(Instant::now()),
            _ => *last = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Leases over a pool that never connects: what is tested here makes no query.
    fn leases() -> Arc<PgLeases> {
        let manager = deadpool_postgres::Manager::from_config(
            tokio_postgres::Config::new(),
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig::default(),
        );
        let pool = Pool::builder(manager).max_size(1).build().expect("a pool that connects lazily");
        PgLeases::new(Duration::from_secs(15), pool, tokio::runtime::Handle::current())
    }

    /// `granted` (a renewal) and `bump` (LISTEN reconnected) raise the epoch under the lock and
    /// announce it after, from different tasks: whichever announcement lands last, the queue
    /// is told the epoch the grants belong to.
    #[tokio::test]
    async fn a_late_announcement_of_an_earlier_epoch_does_not_replace_a_later_one() {
        let l = leases();
        let news = l.news().expect("a shared store has news");
        l.granted(0b1, Instant::now() + Duration::from_secs(10));
        l.bump();
        assert_eq!((l.held().epoch, news.borrow().epoch), (2, 2));
        l.announce(1); // the renewal's announcement, landing after the reconnect's
        assert_eq!(news.borrow().epoch, l.held().epoch);
    }
}
