//! [`PostgresStore`]: the queue and window interfaces on one PostgreSQL database that any number
//! of relays share (`[storage] backend = "postgres"`).
//!
//! Owns: the tables (`schema`), connections and TLS (`connect`), conversation leases, LISTEN and
//! the health probe (`lease`), the relays' shared ACME state (`acme`), and a small tokio runtime of its own: the store interfaces block
//! (callers run them on the blocking pool or the group-commit writer thread), so each call is
//! handed to that runtime and waited for.
//!
//! Durability: every synced method commits with `synchronous_commit = on` (set on each
//! connection), so COMMIT returns once the WAL is flushed (and, with a synchronous standby, on
//! it too). `progress`, `window_touch` and the prunes commit with `synchronous_commit = off`, the
//! embedded store's cheap commits: a crash may forget them, never an event.
//!
//! Order across relays: sequence numbers come from one counter row, taken last in each append
//! transaction and held until COMMIT, so commit order is seq order cluster-wide and a reader
//! that has seen seq N committed has seen everything below it (`pending_after`).
//!
//! The database unreachable: a write waits for it up to [`WAIT`] from the call, retrying on a new
//! connection, then fails (the webhook gets 503); once it has been down longer than that, writes
//! fail after one try, so appends queued behind a failing one do not wait twice.
//!
//! Must never: return from a synced method before COMMIT has returned, log bodies, numbers or
//! the URL (it holds the password), or write to a local file instead.

mod acme;
mod connect;
mod lease;
pub mod schema;

use super::{
    Appended, DeadInfo, DeadLetter, Event, EventMeta, Leases, MAX_ANSWER, NewEvent, QueueStore, StoreError, WindowStore,
};
use crate::config::PostgresStorage;
use connect::Connector;
use deadpool_postgres::Pool;
use lease::PgLeases;
pub use lease::partition;
use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a write waits for an unreachable database before failing (then 503): a failover of
/// a few seconds must not cost Twilio's webhooks, which are not retried after a 5xx.
pub const WAIT: Duration = Duration::from_secs(5);

pub struct PostgresStore {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
}

struct Inner {
    pool: Pool,
    /// For connections outside the pool (the ACME ordering lock holds one).
    connector: Connector,
    leases: Arc<PgLeases>,
    /// When the last health probe succeeded (None: it failed).
    healthy: Arc<Mutex<Option<Instant>>>,
    /// Since when writes have been failing for want of the database (None: they work).
    down_since: Mutex<Option<Instant>>,
    leaving: Arc<AtomicBool>,
}

impl PostgresStore {
    /// Connects, migrates the schema (once across relays starting together), takes this
    /// relay's first leases and starts renewing them. Fails if the database cannot be reached
    /// within a few seconds: a relay never starts on nothing.
    pub fn open(settings: &PostgresStorage) -> Result<PostgresStore, StoreError> {
        let open_err =
            |m: String| StoreError::Unreachable(format!("{m} (check [storage] url and that PostgreSQL runs)"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("postgres")
            .enable_all()
            .build()
            .map_err(|e| open_err(format!("cannot start the database runtime: {e}")))?;
        let connector = Connector::new(&settings.url).map_err(open_err)?;
        let pool = connector.pool(settings.pool as usize, Duration::from_secs(3)).map_err(open_err)?;
        let leases = {
            let _enter = runtime.enter();
            PgLeases::new(settings.takeover, pool.clone(), runtime.handle().clone())
        };
        let first = {
            let (connector, leases) = (connector.clone(), leases.clone());
            runtime.block_on(async move {
                let mut client = connector.connect(None).await.map_err(|e| format!("cannot connect: {e}"))?;
                schema::migrate(&mut client).await?;
                // The first leases before anything is served, so the queue resumes what it holds.
                tokio::spawn(leases.clone().run());
                leases.first_grant(Duration::from_secs(5)).await;
                Ok::<_, String>(())
            })
        };
        first.map_err(open_err)?;
        let leaving = Arc::new(AtomicBool::new(false));
        let healthy = Arc::new(Mutex::new(Some(Instant::now())));
        runtime.spawn(lease::listen(connector.clone(), leases.clone()));
        runtime.spawn(lease::probe(pool.clone(), healthy.clone(), leaving.clone()));
        let inner = Arc::new(Inner { pool, connector, leases, healthy, down_since: Mutex::new(None), leaving });
        tracing::info!(relay = %inner.leases.me, "postgres store open");
        Ok(PostgresStore { inner, runtime: Some(runtime) })
    }

    /// This relay's id among the relays sharing the database.
    pub fn relay_id(&self) -> &str {
        &self.inner.leases.me
    }

    /// Runs `f` on the store's runtime and waits for it (callers are blocking threads).
    fn block<T: Send + 'static, F>(&self, f: impl FnOnce(Arc<Inner>) -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let runtime = self.runtime.as_ref().ok_or(StoreError::Closed)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let fut = f(self.inner.clone());
        runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    /// A write, retried on a new connection while the database is unreachable, up to [`WAIT`].
    fn write<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(Arc<Inner>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, PgError>> + Send + 'static,
    {
        self.block(move |inner| async move {
            let deadline = Instant::now() + WAIT;
            let give_up_at_once =
                inner.down_since.lock().unwrap_or_else(PoisonError::into_inner).is_some_and(|t| t.elapsed() >= WAIT);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let result = match tokio::time::timeout(left.max(Duration::from_millis(100)), op(inner.clone())).await {
                    Ok(r) => r,
                    Err(_) => Err(PgError::Unreachable("the database did not answer in time".into())),
                };
                match result {
                    Ok(v) => {
                        *inner.down_since.lock().unwrap_or_else(PoisonError::into_inner) = None;
                        return Ok(v);
                    }
                    Err(PgError::Retry(_)) if Instant::now() < deadline => {}
                    Err(PgError::Unreachable(e)) => {
                        inner
                            .down_since
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_or_insert_with(Instant::now);
                        if give_up_at_once || Instant::now() >= deadline {
                            return Err(StoreError::Unreachable(e));
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(PgError::Retry(e)) | Err(PgError::Other(e)) => return Err(StoreError::Write(e)),
                }
            }
        })
    }

    /// A read: one try.
    fn read<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: Future<Output = Result<T, PgError>> + Send + 'static,
    {
        self.block(move |inner| {
            let fut = op(inner);
            async move {
                match tokio::time::timeout(WAIT, fut).await {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(e)) => Err(StoreError::Read(e.to_string())),
                    Err(_) => Err(StoreError::Unreachable("the database did not answer in time".into())),
                }
            }
        })
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.inner.leaving.store(true, std::sync::atomic::Ordering::Release);
        if let Some(rt) = self.runtime.take() {
            // May be dropped inside another runtime, where a blocking shutdown would panic.
            rt.shutdown_background();
        }
    }
}

/// Why a database operation failed: the database could not be reached (wait and retry), a
/// conflict worth one more try (deadlock, serialization), or anything else.
#[derive(Debug)]
enum PgError {
    Unreachable(String),
    Retry(String),
    Other(String),
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PgError::Unreachable(e) | PgError::Retry(e) | PgError::Other(e) => f.write_str(e),
        }
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> PgError {
        let text = match e.as_db_error() {
            Some(db) => format!("postgresql: {} ({})", db.message(), db.code().code()),
            None => format!("postgresql: {e}"),
        };
        match e.code().map(|c| c.code()) {
            // No answer from the server, or it is going away / not yet up (57P01-03), or a
            // connection exception (class 08).
            None => PgError::Unreachable(text),
            Some(c) if c.starts_with("08") || c.starts_with("57P") => PgError::Unreachable(text),
            Some("40001") | Some("40P01") => PgError::Retry(text),
            Some(_) => PgError::Other(text),
        }
    }
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(e: deadpool_postgres::PoolError) -> PgError {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => PgError::Unreachable(format!("postgresql: no connection: {other}")),
        }
    }
}

fn codec(e: postcard::Error) -> PgError {
    PgError::Other(format!("undecodable record: {e}"))
}

fn seq_of(v: i64) -> u64 {
    v as u64
}

fn db_seq(v: u64) -> i64 {
    v as i64
}

/// Inserts the events of one append inside `tx` (dedup keys first, then the seq counter, held
/// until COMMIT), announcing them to the other relays.
async fn append_in(
    tx: &deadpool_postgres::Transaction<'_>,
    batch: &[NewEvent],
    me: &str,
) -> Result<Vec<Appended>, PgError> {
    // Dedup: the first event of the batch with a key is checked and recorded; later ones with
    // the same key are duplicates of it. Keys go in sorted order, so two relays inserting
    // overlapping batches cannot deadlock.
    let mut first_with: std::collections::HashMap<[u8; 32], usize> = Default::default();
    for (i, ev) in batch.iter().enumerate() {
        if let Some(k) = ev.dedup_key {
            first_with.entry(k).or_insert(i);
        }
    }
    let mut keyed: Vec<(&[u8; 32], usize)> = first_with.iter().map(|(k, i)| (k, *i)).collect();
    keyed.sort();
    let mut admitted = std::collections::HashSet::new();
    if !keyed.is_empty() {
        let keys: Vec<&[u8]> = keyed.iter().map(|(k, _)| &k[..]).collect();
        let expires: Vec<i64> = keyed.iter().map(|(_, i)| batch[*i].dedup_expires_unix_ms as i64).collect();
        let seen: Vec<i64> = keyed.iter().map(|(_, i)| batch[*i].received_unix_ms as i64).collect();
        let rows = tx
            .query(
                "INSERT INTO relay_dedup (key, expires_ms, seen_ms) \
                 SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int8[]) \
                 ON CONFLICT (key) DO UPDATE SET expires_ms = EXCLUDED.expires_ms, seen_ms = EXCLUDED.seen_ms \
                 WHERE relay_dedup.expires_ms <= EXCLUDED.seen_ms RETURNING key",
                &[&keys, &expires, &seen],
            )
            .await?;
        for r in rows {
            let k: &[u8] = r.get(0);
            admitted.insert(<[u8; 32]>::try_from(k).map_err(|_| PgError::Other("bad dedup key".into()))?);
        }
    }
    let stored: Vec<usize> = batch
        .iter()
        .enumerate()
        .filter(|(i, ev)| match ev.dedup_key {
            None => true,
            Some(k) => first_with.get(&k) == Some(i) && admitted.contains(&k),
        })
        .map(|(i, _)| i)
        .collect();
    let mut out = vec![Appended::Duplicate; batch.len()];
    if stored.is_empty() {
        return Ok(out);
    }
    let first = take_seqs(tx, stored.len()).await?;
    let mut cols = Columns::default();
    for (n, &i) in stored.iter().enumerate() {
        let seq = first + n as u64;
        cols.push(seq, &batch[i])?;
        out[i] = Appended::Stored(seq);
    }
    cols.insert(tx).await?;
    tx.execute("SELECT pg_notify($1, $2)", &[&lease::CHANNEL, &me]).await?;
    Ok(out)
}

/// Takes `n` sequence numbers from the counter row (locked until COMMIT: see the module doc).
async fn take_seqs(tx: &deadpool_postgres::Transaction<'_>, n: usize) -> Result<u64, PgError> {
    let n = n as i64;
    let row = tx
        .query_one("UPDATE relay_counter SET next_seq = next_seq + $1 WHERE id = 1 RETURNING next_seq - $1", &[&n])
        .await?;
    Ok(seq_of(row.get(0)))
}

/// Events as column arrays, inserted with one statement.
#[derive(Default)]
struct Columns {
    seq: Vec<i64>,
    part: Vec<i32>,
    motion: Vec<String>,
    account: Vec<String>,
    conversation: Vec<String>,
    delivery_id: Vec<String>,
    received: Vec<i64>,
    bytes: Vec<i64>,
    event: Vec<Vec<u8>>,
}

impl Columns {
    fn push(&mut self, seq: u64, ev: &NewEvent) -> Result<(), PgError> {
        self.seq.push(db_seq(seq));
        self.part.push(partition(&ev.motion, &ev.conversation) as i32);
        self.motion.push(ev.motion.clone());
        self.account.push(ev.account.clone());
        self.conversation.push(ev.conversation.clone());
        self.delivery_id.push(ev.delivery_id.clone());
        self.received.push(ev.received_unix_ms as i64);
        self.bytes.push(ev.weight() as i64);
        self.event.push(postcard::to_allocvec(ev).map_err(codec)?);
        Ok(())
    }

    async fn insert(&self, tx: &deadpool_postgres::Transaction<'_>) -> Result<(), PgError> {
        tx.execute(
            "INSERT INTO relay_events (seq, part, motion, account, conversation, delivery_id, received_ms, bytes, event) \
             SELECT * FROM unnest($1::int8[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int8[], \
             $8::int8[], $9::bytea[])",
            &[
                &self.seq,
                &self.part,
                &self.motion,
                &self.account,
                &self.conversation,
                &self.delivery_id,
                &self.received,
                &self.bytes,
                &self.event,
            ],
        )
        .await?;
        Ok(())
    }
}

fn meta_of(r: &tokio_postgres::Row) -> EventMeta {
    EventMeta {
        seq: seq_of(r.get(0)),
        delivery_id: r.get(1),
        motion: r.get(2),
        account: r.get(3),
        conversation: r.get(4),
        received_unix_ms: r.get::<_, i64>(5) as u64,
        attempts: r.get::<_, i32>(6) as u32,
        bytes: r.get::<_, i64>(7) as u64,
    }
}

const META_COLUMNS: &str = "seq, delivery_id, motion, account, conversation, received_ms, attempts, bytes";

fn dead_of(r: &tokio_postgres::Row) -> Result<DeadLetter, PgError> {
    Ok(DeadLetter {
        seq: seq_of(r.get(0)),
        info: postcard::from_bytes(r.get::<_, &[u8]>(1)).map_err(codec)?,
        ev: postcard::from_bytes(r.get::<_, &[u8]>(2)).map_err(codec)?,
    })
}

fn encode_info(mut info: DeadInfo) -> Result<Vec<u8>, PgError> {
    info.answer.truncate(MAX_ANSWER);
    postcard::to_allocvec(&info).map_err(codec)
}

/// A cheap (unsynced) commit's first statement.
const CHEAP: &str = "SET LOCAL synchronous_commit = off";

impl QueueStore for PostgresStore {
    fn append(&self, batch: &[NewEvent]) -> Result<Vec<Appended>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let batch: Arc<[NewEvent]> = batch.into();
        self.write(move |inner| {
            let batch = batch.clone();
            async move {
                let mut client = inner.pool.get().await?;
                let tx = client.transaction().await?;
                let out = append_in(&tx, &batch, &inner.leases.me).await?;
                tx.commit().await?;
                Ok(out)
            }
        })
    }

    fn append_replacing_dead(&self, batch: &[NewEvent], dead_seq: u64) -> Result<Vec<Appended>, StoreError> {
        let batch: Arc<[NewEvent]> = batch.into();
        self.write(move |inner| {
            let batch = batch.clone();
            async move {
                let mut client = inner.pool.get().await?;
                let tx = client.transaction().await?;
                if tx.execute("DELETE FROM relay_dead WHERE seq = $1", &[&db_seq(dead_seq)]).await? == 0 {
                    return Ok(Vec::new());
                }
                let out = append_in(&tx, &batch, &inner.leases.me).await?;
                tx.commit().await?;
                Ok(out)
            }
        })
    }

    fn append_dead(&self, ev: &NewEvent, info: DeadInfo) -> Result<Appended, StoreError> {
        let (ev, info) =
            (Arc::new(ev.clone()), Arc::new(encode_info(info).map_err(|e| StoreError::Write(e.to_string()))?));
        self.write(move |inner| {
            let (ev, info) = (ev.clone(), info.clone());
            async move {
                let mut client = inner.pool.get().await?;
                let tx = client.transaction().await?;
                if let Some(k) = ev.dedup_key {
                    let admitted = tx
                        .query(
                            "INSERT INTO relay_dedup (key, expires_ms, seen_ms) VALUES ($1, $2, $3) \
                             ON CONFLICT (key) DO UPDATE SET expires_ms = EXCLUDED.expires_ms, seen_ms = EXCLUDED.seen_ms \
                             WHERE relay_dedup.expires_ms <= EXCLUDED.seen_ms RETURNING key",
                            &[&&k[..], &(ev.dedup_expires_unix_ms as i64), &(ev.received_unix_ms as i64)],
                        )
                        .await?;
                    if admitted.is_empty() {
                        return Ok(Appended::Duplicate);
                    }
                }
                let seq = take_seqs(&tx, 1).await?;
                let event = postcard::to_allocvec(&*ev).map_err(codec)?;
                tx.execute(
                    "INSERT INTO relay_dead (seq, delivery_id, info, event) VALUES ($1, $2, $3, $4)",
                    &[&db_seq(seq), &ev.delivery_id, &info.as_slice(), &event],
                )
                .await?;
                tx.commit().await?;
                Ok(Appended::Stored(seq))
            }
        })
    }

    fn pending(&self) -> Result<Vec<EventMeta>, StoreError> {
        Ok(self.pending_after(0)?.1)
    }

    fn pending_after(&self, after: u64) -> Result<(u64, Vec<EventMeta>), StoreError> {
        self.read(move |inner| async move {
            let client = inner.pool.get().await?;
            // The counter first: every seq below it is committed (commit order is seq order),
            // so it is visible to the next statement.
            let top = seq_of(client.query_one("SELECT next_seq - 1 FROM relay_counter", &[]).await?.get(0));
            let rows = client
                .query(
                    &format!("SELECT {META_COLUMNS} FROM relay_events WHERE seq > $1 AND seq <= $2 ORDER BY seq"),
                    &[&db_seq(after), &db_seq(top)],
                )
                .await?;
            Ok((top.max(after), rows.iter().map(meta_of).collect()))
        })
    }

    fn waiting_by_motion(&self) -> Result<Option<crate::store::WaitingByMotion>, StoreError> {
        self.read(|inner| async move {
            let client = inner.pool.get().await?;
            let rows = client
                .query(
                    "SELECT motion, count(*), coalesce(sum(bytes), 0)::bigint FROM relay_events GROUP BY motion",
                    &[],
                )
                .await?;
            let count = |v: i64| u64::try_from(v).unwrap_or(0);
            Ok(Some(rows.iter().map(|r| (r.get(0), (count(r.get(1)), count(r.get(2))))).collect()))
        })
    }

    fn leases(&self) -> Arc<dyn Leases> {
        self.inner.leases.clone()
    }

    fn load(&self, seq: u64) -> Result<Option<Event>, StoreError> {
        self.read(move |inner| async move {
            let client = inner.pool.get().await?;
            let row =
                client.query_opt("SELECT attempts, event FROM relay_events WHERE seq = $1", &[&db_seq(seq)]).await?;
            row.map(|r| {
                Ok(Event {
                    seq,
                    attempts: r.get::<_, i32>(0) as u32,
                    ev: postcard::from_bytes(r.get::<_, &[u8]>(1)).map_err(codec)?,
                })
            })
            .transpose()
        })
    }

    fn progress(&self, delivered: &[u64], attempts: &[(u64, u32)]) -> Result<(), StoreError> {
        if delivered.is_empty() && attempts.is_empty() {
            return Ok(());
        }
        let delivered: Arc<Vec<i64>> = Arc::new(delivered.iter().map(|&s| db_seq(s)).collect());
        let (seqs, counts): (Vec<i64>, Vec<i32>) = attempts.iter().map(|&(s, a)| (db_seq(s), a as i32)).unzip();
        let (seqs, counts) = (Arc::new(seqs), Arc::new(counts));
        self.write(move |inner| {
            let (delivered, seqs, counts) = (delivered.clone(), seqs.clone(), counts.clone());
            async move {
                let mut client = inner.pool.get().await?;
                let tx = client.transaction().await?;
                tx.batch_execute(CHEAP).await?;
                if !delivered.is_empty() {
                    tx.execute("DELETE FROM relay_events WHERE seq = ANY($1)", &[&*delivered]).await?;
                }
                if !seqs.is_empty() {
                    tx.execute(
                        "UPDATE relay_events SET attempts = t.a FROM unnest($1::int8[], $2::int4[]) AS t(s, a) \
                         WHERE seq = t.s",
                        &[&*seqs, &*counts],
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }
        })
    }

    fn kill(&self, seq: u64, info: DeadInfo) -> Result<(), StoreError> {
        let info = Arc::new(encode_info(info).map_err(|e| StoreError::Write(e.to_string()))?);
        self.write(move |inner| {
            let info = info.clone();
            async move {
                let client = inner.pool.get().await?;
                client
                    .execute(
                        "WITH e AS (DELETE FROM relay_events WHERE seq = $1 RETURNING seq, delivery_id, event) \
                         INSERT INTO relay_dead (seq, delivery_id, info, event) SELECT seq, delivery_id, $2, event FROM e",
                        &[&db_seq(seq), &info.as_slice()],
                    )
                    .await?;
                Ok(())
            }
        })
    }

    fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.read(|inner| async move {
            let client = inner.pool.get().await?;
            let rows = client.query("SELECT seq, info, event FROM relay_dead ORDER BY seq", &[]).await?;
            rows.iter().map(dead_of).collect()
        })
    }

    fn dead_letter(&self, seq: u64) -> Result<Option<DeadLetter>, StoreError> {
        self.read(move |inner| async move {
            let client = inner.pool.get().await?;
            let row =
                client.query_opt("SELECT seq, info, event FROM relay_dead WHERE seq = $1", &[&db_seq(seq)]).await?;
            row.as_ref().map(dead_of).transpose()
        })
    }

    fn dead_seqs_of(&self, delivery_id: &str) -> Result<Vec<u64>, StoreError> {
        let id = delivery_id.to_string();
        self.read(move |inner| async move {
            let client = inner.pool.get().await?;
            let rows = client.query("SELECT seq FROM relay_dead WHERE delivery_id = $1 ORDER BY seq", &[&id]).await?;
            Ok(rows.iter().map(|r| seq_of(r.get(0))).collect())
        })
    }

    fn revive(&self, seq: u64, now_unix_ms: u64) -> Result<Option<EventMeta>, StoreError> {
        self.write(move |inner| async move {
            let mut client = inner.pool.get().await?;
            let tx = client.transaction().await?;
            let Some(row) =
                tx.query_opt("DELETE FROM relay_dead WHERE seq = $1 RETURNING event", &[&db_seq(seq)]).await?
            else {
                return Ok(None);
            };
            let mut ev: NewEvent = postcard::from_bytes(row.get::<_, &[u8]>(0)).map_err(codec)?;
            ev.received_unix_ms = now_unix_ms;
            let new_seq = take_seqs(&tx, 1).await?;
            let mut cols = Columns::default();
            cols.push(new_seq, &ev)?;
            cols.insert(&tx).await?;
            tx.execute("SELECT pg_notify($1, $2)", &[&lease::CHANNEL, &inner.leases.me]).await?;
            tx.commit().await?;
            Ok(Some(EventMeta::of(new_seq, 0, &ev)))
        })
    }

    fn purge_dead(&self, seq: Option<u64>) -> Result<usize, StoreError> {
        self.write(move |inner| async move {
            let client = inner.pool.get().await?;
            let n = match seq {
                Some(seq) => client.execute("DELETE FROM relay_dead WHERE seq = $1", &[&db_seq(seq)]).await?,
                None => client.execute("DELETE FROM relay_dead", &[]).await?,
            };
            Ok(n as usize)
        })
    }

    fn prune_dedup(&self, now_unix_ms: u64) -> Result<usize, StoreError> {
        self.write(move |inner| async move {
            let mut client = inner.pool.get().await?;
            let tx = client.transaction().await?;
            tx.batch_execute(CHEAP).await?;
            // A slice at a time (see the trait): every relay prunes, none holds locks long.
            let n = tx
                .execute(
                    "DELETE FROM relay_dedup WHERE key IN \
                     (SELECT key FROM relay_dedup WHERE expires_ms < $1 LIMIT 50000 FOR UPDATE SKIP LOCKED)",
                    &[&(now_unix_ms as i64)],
                )
                .await?;
            tx.commit().await?;
            Ok(n as usize)
        })
    }

    fn writable(&self) -> bool {
        let probe = self
            .inner
            .healthy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(3));
        let writes = self.inner.down_since.lock().unwrap_or_else(PoisonError::into_inner).is_none();
        probe && writes
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn sync(&self) -> Result<(), StoreError> {
        // A synced commit flushes the WAL up to it, and so every cheap commit before it.
        self.write(|inner| async move {
            let client = inner.pool.get().await?;
            client.execute("UPDATE relay_nodes SET seen = now() WHERE id = $1", &[&inner.leases.me]).await?;
            Ok(())
        })
    }
}

impl WindowStore for PostgresStore {
    fn shared(&self) -> bool {
        true
    }

    fn window_touch(&self, entries: &[(String, u64)]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        // One row per key (ON CONFLICT cannot touch a row twice in one statement): the latest.
        let mut latest: std::collections::HashMap<&str, u64> = Default::default();
        for (k, t) in entries {
            let e = latest.entry(k).or_insert(*t);
            *e = (*e).max(*t);
        }
        let (keys, times): (Vec<String>, Vec<i64>) = latest.into_iter().map(|(k, t)| (k.to_string(), t as i64)).unzip();
        let (keys, times) = (Arc::new(keys), Arc::new(times));
        self.write(move |inner| {
            let (keys, times) = (keys.clone(), times.clone());
            async move {
                let mut client = inner.pool.get().await?;
                let tx = client.transaction().await?;
                tx.batch_execute(CHEAP).await?;
                tx.execute(
                    "INSERT INTO relay_window (key, last_ms) SELECT * FROM unnest($1::text[], $2::int8[]) \
                     ON CONFLICT (key) DO UPDATE SET last_ms = GREATEST(relay_window.last_ms, EXCLUDED.last_ms)",
                    &[&*keys, &*times],
                )
                .await?;
                tx.commit().await?;
                Ok(())
            }
        })
    }

    fn window_last(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let key = key.to_string();
        self.read(move |inner| async move {
            let client = inner.pool.get().await?;
            let row = client.query_opt("SELECT last_ms FROM relay_window WHERE key = $1", &[&key]).await?;
            Ok(row.map(|r| r.get::<_, i64>(0) as u64))
        })
    }

    fn prune_window(&self, before_unix_ms: u64) -> Result<usize, StoreError> {
        self.write(move |inner| async move {
            let client = inner.pool.get().await?;
            let n = client.execute("DELETE FROM relay_window WHERE last_ms < $1", &[&(before_unix_ms as i64)]).await?;
            Ok(n as usize)
        })
    }
}
