//! [`EmbeddedStore`]: the default [`Store`] backend, one redb file (`queue.redb`) under
//! `[storage] path`, with a journal in front of it (`queue.journal`; the hot path, in `hot`):
//! accepted events and deliveries go to the journal and are folded into the file at
//! checkpoints.
//!
//! Owns the on-disk layout (tables below), the choice of durability per operation, and
//! recovery: repair after an unclean shutdown (redb does it inside `open`) and re-opening the
//! file after an I/O error (redb refuses every later write on a handle that saw one).
//!
//! Must never: return from a synced method before redb's `Immediate` commit has returned,
//! change the encoding of stored records without a migration (the file outlives releases), or
//! let a cheap (unsynced) commit stand in for a synced one.
//!
//! Durability choices:
//! - `append`: the journal, synced (fdatasync) before it returns; `progress`: the journal, not
//!   synced (see `hot`).
//! - `append_dead`, `kill`, `revive`, `purge_dead`, `sync`, checkpoints: `Durability::Immediate`
//!   (fdatasync before `commit` returns): the provider's 2xx and the admin's answer rely on it.
//! - `window_touch`, `prune_*`: `Durability::None`, which only
//!   makes the change visible; the next `Immediate` commit (any of the above, `sync()`, or the
//!   one redb makes when the handle is dropped) persists it along with its own data. Losing
//!   one in a crash means a redelivery (at-least-once) or a stale counter, never a lost event.
//!   Not `Eventual`: on Linux redb implements it with the same fdatasync as `Immediate`.
//!   redb frees pages only at durable commits (a cheap commit held ~64 KiB of file here), so
//!   every [`CHEAP_COMMITS_PER_SYNC`]-th cheap commit is made `Immediate`, which bounds file
//!   growth while a backlog drains with no appends arriving.
//! - Two-phase commit and quick-repair: both off (redb's default). Measured here on 1 KiB
//!   commits: single-phase ~0.3 ms, two-phase ~0.45 ms, quick-repair (which implies
//!   two-phase and also writes the allocator state) ~2.5 ms: 8x the cost on the path that sets
//!   the provider's acknowledgement latency. What they buy is not needed here: two-phase
//!   commit defends against a theoretical attack that needs control of crashes and of page
//!   flush order; quick-repair only shortens the full repair after a crash, which walks the
//!   file at about 1 GB/s (2 s for a 2 GB file here), and this file is a queue, pruned as
//!   Motion takes events. Clean shutdowns (drop) store the allocator state: no repair at all.
//! - New files are created in redb's v3 file format, the only one redb 3 opens, so a later
//!   upgrade of the dependency needs no migration.
//!
//! Layout (redb orders u64 keys numerically, so iterating a seq table is seq order):
//! - `events`:  seq -> postcard(NewEvent), the waiting events;
//! - `waiting`: seq -> postcard(EventMeta), their small part, so `pending()` at start-up and
//!   `progress` never read or rewrite bodies;
//! - `dead`:    seq -> postcard(DeadInfo) ++ postcard(NewEvent), so `kill` copies the stored
//!   event bytes without decoding them;
//! - `dedup`:   key -> expiry (unix ms); `window`: key -> last inbound (unix ms);
//! - `meta`:    "next_seq" -> the next sequence number (seqs start at 1, never reused);
//!   "format" -> the version of the record encodings above (`FORMAT`); "journal_generation"
//!   -> the generation of the first journal the file has not folded in; "store_id" -> a random
//!   id that this store's journals carry in their headers.
//!
//! Record formats: 1 stored a dead letter's reason and an unowned event's origin as text; 2
//! stores them typed ([`DeadReason`], [`Unowned`]), and a waiting event's weight in bytes. A format-1 file is migrated at open, in
//! one transaction (a crash midway leaves it format 1, migrated again at the next open).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redb::{
    Database, Durability, ReadTransaction, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

mod hot;

use hot::Hot;

use super::journal::{self, RecordRef};
use super::marker::Marker;
use super::preflight::{self, Found};
use super::unfolded::Unfolded;
use super::{
    Appended, Backup, BackupSummary, DeadInfo, DeadLetter, DeadReason, Event, EventMeta, MAX_ANSWER, NewEvent,
    QueueStore, StoreError, Unowned, WindowStore, WrittenAppend,
};

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const WAITING: TableDefinition<u64, &[u8]> = TableDefinition::new("waiting");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
const DEDUP: TableDefinition<[u8; 32], u64> = TableDefinition::new("dedup");
const WINDOW: TableDefinition<&str, u64> = TableDefinition::new("window");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_SEQ: &str = "next_seq";
/// The generation of the journal whose records the file does not have yet (see `journal`).
const JOURNAL_GENERATION: &str = "journal_generation";
/// A random id of this store file, written in its journals' headers.
const STORE_ID: &str = "store_id";
/// Postcard is not self-describing: a change to a stored type (even a new field) changes the
/// encoding. Bump this with such a change, and teach `open` to migrate older files.
const FORMAT_KEY: &str = "format";
const FORMAT: u64 = 2;

pub const FILE_NAME: &str = "queue.redb";
/// See the module doc: bounds the pages that cheap commits keep from being reused.
pub const CHEAP_COMMITS_PER_SYNC: u32 = 32;
/// redb's page cache. Its default (1 GiB) suits a database that is read back; this queue reads
/// each event about once, and the relay may run on a small machine.
const CACHE_BYTES: usize = 64 << 20;
/// After an I/O error, how often a re-open of the file is tried (by `writable()` or any call).
const REOPEN_EVERY: Duration = Duration::from_secs(1);
/// A journal this long is folded into the file. It bounds the start-up replay (a few tenths of
/// a second) and the checkpoint's pause, and spreads the dedup keys' B-tree writes over
/// thousands of events instead of one commit each.
const FOLD_AT: u64 = 32 << 20;

type DbResult<T> = Result<T, Fail>;

/// Why an operation failed inside a transaction. Not `redb::Error` itself: at 160 bytes it
/// would bloat every `Result` on the hot path.
struct Fail {
    /// An I/O error: the handle refuses writes from now on and must be re-opened.
    io: bool,
    message: String,
}

impl<E: Into<redb::Error>> From<E> for Fail {
    fn from(e: E) -> Fail {
        let e = e.into();
        Fail { io: matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo), message: e.to_string() }
    }
}

#[derive(Clone, Copy)]
enum Commit {
    Synced,
    Cheap,
}

pub struct EmbeddedStore {
    file: PathBuf,
    /// `None` only while a failed handle is being replaced: redb refuses to open a file that
    /// another handle (even in this process) still holds, so the old one is dropped first.
    db: RwLock<Option<Database>>,
    /// A write hit an I/O error: redb now fails every write on this handle until it is re-opened.
    broken: AtomicBool,
    last_reopen: Mutex<Option<Instant>>,
    cheap_commits: AtomicU32,
    /// How the file is reached (directly, or in tests through a disk that fails on demand).
    disk: Disk,
    /// Whether the last open found the file not cleanly closed and repaired it.
    repaired: AtomicBool,
    /// Where the next `prune_dedup` resumes its sweep of the dedup table (`None`: the start).
    prune_from: Mutex<Option<[u8; 32]>>,
    /// Keys one `prune_dedup` looks at ([`PRUNE_SLICE`]; tests make it small).
    prune_slice: usize,
    /// Whether the marker beside the file says it has held data (see `marker`): written before
    /// the first event is stored.
    marked: AtomicBool,
    /// The journal and what it holds that the file does not yet. `None` only while opening.
    hot: Arc<Mutex<Option<Hot>>>,
    /// Journal length that triggers a checkpoint ([`FOLD_AT`]; tests make it small).
    fold_at: u64,
    /// Signalled when a journal is set aside for the maintenance thread to fold in.
    folds: Condvar,
    /// Held while a set-aside journal is folded in (one at a time).
    folding_lock: Mutex<()>,
    /// Held by an append from its write through its fdatasync (which runs without `hot`, so
    /// deliveries are noted meanwhile) and by a checkpoint, which must not fold records in
    /// whose sync may still fail. Taken before `hot`.
    syncing: Mutex<()>,
    /// Appends written and not yet synced (see [`QueueStore::append_unsynced`]): a checkpoint
    /// waits for none to be left.
    in_flight: Arc<hot::InFlight>,
}

/// Dedup keys one `prune_dedup` call looks at: the sweep holds the writer, so it goes in slices
/// (a few milliseconds each) instead of one pass over millions of keys that stalls every
/// acknowledgement meanwhile.
const PRUNE_SLICE: usize = 50_000;

impl EmbeddedStore {
    /// Opens (creating if needed) `dir/queue.redb`, repairing it first if the last run did not
    /// shut down cleanly (SIGKILL, power loss): redb rolls back to the last durable commit.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_on(dir, Disk::default())
    }

    /// Like [`open`](Self::open), on a disk whose syncs fail on demand (see [`DiskFault`]).
    #[cfg(any(test, feature = "test-support"))]
    pub fn open_on_faulty_disk(dir: &Path, fault: std::sync::Arc<super::fault::DiskFault>) -> Result<Self, StoreError> {
        Self::open_on(dir, Disk { fault: Some(fault) })
    }

    fn open_on(dir: &Path, disk: Disk) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| open_error(dir, e))?;
        let file = dir.join(FILE_NAME);
        let (db, repaired) = open_db(&file, &disk)?;
        let store = EmbeddedStore {
            db: RwLock::new(Some(db)),
            file,
            broken: AtomicBool::new(false),
            last_reopen: Mutex::new(None),
            cheap_commits: AtomicU32::new(0),
            disk,
            repaired: AtomicBool::new(repaired),
            prune_from: Mutex::new(None),
            prune_slice: PRUNE_SLICE,
            marked: AtomicBool::new(false),
            hot: Arc::new(Mutex::new(None)),
            in_flight: Arc::new(hot::InFlight::default()),
            syncing: Mutex::new(()),
            fold_at: FOLD_AT,
            folds: Condvar::new(),
            folding_lock: Mutex::new(()),
        };
        let format = store.write(Commit::Synced, |txn| {
            let format = txn.open_table(META)?.get(FORMAT_KEY)?.map(|g| g.value());
            match format {
                Some(1) => {
                    migrate_from_1(txn)?;
                    txn.open_table(META)?.insert(FORMAT_KEY, FORMAT)?;
                }
                Some(format) if format != FORMAT => return Ok(format), // touch nothing
                Some(_) => {}
                None => {
                    txn.open_table(META)?.insert(FORMAT_KEY, FORMAT)?;
                }
            }
            let mut meta = txn.open_table(META)?;
            if meta.get(STORE_ID)?.is_none() {
                meta.insert(STORE_ID, rand::random::<u64>())?;
            }
            drop(meta);
            // Create every table now, so read transactions never meet a missing one.
            txn.open_table(EVENTS)?;
            txn.open_table(WAITING)?;
            txn.open_table(DEAD)?;
            txn.open_table(DEDUP)?;
            txn.open_table(WINDOW)?;
            Ok(FORMAT)
        })?;
        if format != FORMAT {
            let e = format!("record format {format}, but this build reads format {FORMAT}");
            return Err(open_error(&store.file, std::io::Error::other(e)));
        }
        // A file that holds data from before markers existed (or restored onto a new machine)
        // is marked now.
        if store.read(|txn| Ok(txn.open_table(META)?.get(NEXT_SEQ)?.is_some()))? {
            store.mark()?;
        }
        let hot = store.open_journal()?;
        *store.hot.lock().unwrap_or_else(PoisonError::into_inner) = Some(hot);
        Ok(store)
    }

    fn dir(&self) -> &Path {
        self.file.parent().unwrap_or(Path::new("."))
    }

    /// Writes the marker once, before the first event is stored: from then on a lost or
    /// damaged file stops the start instead of being replaced by an empty one.
    fn mark(&self) -> Result<(), StoreError> {
        if self.marked.load(Ordering::Acquire) {
            return Ok(());
        }
        let marker = Marker::of(&self.file);
        if !marker.present() {
            marker.write().map_err(|e| {
                StoreError::Write(format!("cannot write the store marker {}: {e}", marker.path().display()))
            })?;
            tracing::info!(marker = %marker.path().display(), "store marker written: a lost store file now stops the start");
        }
        self.marked.store(true, Ordering::Release);
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.file
    }

    /// Whether the last open had to repair the file (the previous run did not shut down
    /// cleanly): worth a metric, and what the crash test checks.
    pub fn repaired(&self) -> bool {
        self.repaired.load(Ordering::Relaxed)
    }

    /// A write transaction. A cheap commit's changes (window touches, dedup prunes) are lost
    /// if an I/O error has the file re-opened before the next synced one: a stale timestamp or
    /// a key pruned again later. Deliveries are not among them: they go to the journal.
    fn write<T>(&self, commit: Commit, f: impl FnOnce(&WriteTransaction) -> DbResult<T>) -> Result<T, StoreError> {
        self.heal();
        let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let db = guard.as_ref().ok_or_else(|| StoreError::Write("the store file is not open".into()))?;
        let durability = match commit {
            Commit::Synced => Durability::Immediate,
            Commit::Cheap if self.cheap_commits.fetch_add(1, Ordering::Relaxed) + 1 >= CHEAP_COMMITS_PER_SYNC => {
                Durability::Immediate
            }
            Commit::Cheap => Durability::None,
        };
        let run = || -> DbResult<T> {
            let mut txn = db.begin_write()?;
            txn.set_durability(durability);
            let out = f(&txn)?;
            txn.commit()?;
            Ok(out)
        };
        match run() {
            Ok(out) => {
                if matches!(durability, Durability::Immediate) {
                    // This commit also persisted every cheap commit before it.
                    self.cheap_commits.store(0, Ordering::Relaxed);
                }
                Ok(out)
            }
            Err(e) => Err(StoreError::Write(self.failed(e))),
        }
    }

    fn read<T>(&self, f: impl FnOnce(&ReadTransaction) -> DbResult<T>) -> Result<T, StoreError> {
        self.heal();
        let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let db = guard.as_ref().ok_or_else(|| StoreError::Read("the store file is not open".into()))?;
        let run = || f(&db.begin_read()?);
        run().map_err(|e| StoreError::Read(self.failed(e)))
    }

    /// Notes an I/O failure (the handle is then unusable for writes) and describes the error.
    fn failed(&self, e: Fail) -> String {
        if e.io && !self.broken.swap(true, Ordering::AcqRel) {
            tracing::error!(file = %self.file.display(), error = %e.message, "store I/O failed; will re-open it");
        }
        e.message
    }

    /// Re-opens the file after an I/O error (e.g. the disk was full and no longer is), at most
    /// once per [`REOPEN_EVERY`]. Returns whether the store is usable.
    fn heal(&self) -> bool {
        if !self.broken.load(Ordering::Acquire) {
            return true;
        }
        {
            let mut last = self.last_reopen.lock().unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
                return false;
            }
            *last = Some(Instant::now());
        }
        let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if !self.broken.load(Ordering::Acquire) {
            return true; // another thread re-opened it while this one waited
        }
        *db = None;
        match open_db(&self.file, &self.disk) {
            Ok((fresh, repaired)) => {
                *db = Some(fresh);
                self.repaired.store(repaired, Ordering::Relaxed);
                self.cheap_commits.store(0, Ordering::Relaxed);
                self.broken.store(false, Ordering::Release);
                tracing::info!(file = %self.file.display(), "store re-opened");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "store re-open failed");
                false
            }
        }
    }
}

impl EmbeddedStore {
    /// `revive` in the file (see `cold`).
    fn revive_in_file(&self, seq: u64, now_unix_ms: u64) -> Result<Option<EventMeta>, StoreError> {
        self.write(Commit::Synced, |txn| {
            let mut dead = txn.open_table(DEAD)?;
            let Some(bytes) = dead.remove(seq)? else {
                return Ok(None);
            };
            let (_, raw) = postcard::take_from_bytes::<DeadInfo>(bytes.value()).map_err(codec)?;
            let mut ev: NewEvent = decode(raw)?;
            ev.received_unix_ms = now_unix_ms;
            let seq = take_seq(&mut txn.open_table(META)?)?;
            let meta = EventMeta::of(seq, 0, &ev);
            insert_event(&mut txn.open_table(EVENTS)?, seq, &[], &ev)?;
            txn.open_table(WAITING)?.insert(seq, encode(&meta)?.as_slice())?;
            Ok(Some(meta))
        })
    }
}

/// Sets a waiting event's attempt count (no-op if it is not waiting or already has it).
fn set_attempts(waiting: &mut Table<u64, &[u8]>, seq: u64, attempts: u32) -> DbResult<()> {
    let meta = waiting.get(seq)?.map(|m| decode(m.value())).transpose()?;
    if let Some(mut meta) = meta.filter(|m: &EventMeta| m.attempts != attempts) {
        meta.attempts = attempts;
        waiting.insert(seq, encode(&meta)?.as_slice())?;
    }
    Ok(())
}

/// How the store reaches its file. Tests may put a [`DiskFault`](super::fault::DiskFault)
/// between redb and the file.
#[derive(Clone, Default)]
pub struct Disk {
    #[cfg(any(test, feature = "test-support"))]
    fault: Option<std::sync::Arc<super::fault::DiskFault>>,
}

impl Disk {
    /// Fails as the disk would (in tests, a full one); passes otherwise.
    pub(super) fn check(&self) -> std::io::Result<()> {
        #[cfg(any(test, feature = "test-support"))]
        if let Some(fault) = &self.fault {
            return fault.check();
        }
        Ok(())
    }

    fn create(&self, builder: &redb::Builder, file: &Path) -> Result<Database, redb::DatabaseError> {
        #[cfg(any(test, feature = "test-support"))]
        if let Some(fault) = &self.fault {
            let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(file)?;
            return builder.create_with_backend(fault.backend(redb::backends::FileBackend::new(f)?));
        }
        builder.create(file)
    }
}

fn open_error(path: &Path, e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Open { path: path.to_path_buf(), source: std::sync::Arc::new(e) }
}

/// Opens the file, repairing it if needed; also says whether it did.
fn open_db(file: &Path, disk: &Disk) -> Result<(Database, bool), StoreError> {
    let started = Instant::now();
    // A file that held data and is gone or damaged stops here, before redb would replace it
    // with an empty one or trip over it. redb runs its repair pass while laying out a brand-new
    // v3 file: that is no unclean shutdown, so it is not reported as one.
    let existed = preflight::examine(file)? == Found::Whole;
    let repaired = std::sync::Arc::new(AtomicBool::new(false));
    let flag = repaired.clone();
    let opened = preflight::contain(|| {
        let mut builder = Database::builder();
        builder.set_cache_size(CACHE_BYTES).create_with_file_format_v3(true).set_repair_callback(move |session| {
            if !flag.swap(true, Ordering::Relaxed) && existed {
                tracing::warn!("store was not shut down cleanly; repairing it");
            }
            tracing::debug!(progress = session.progress(), "store repair");
        });
        disk.create(&builder, file)
    });
    let db = match opened {
        Ok(Ok(db)) => db,
        Ok(Err(
            e @ (redb::DatabaseError::DatabaseAlreadyOpen | redb::DatabaseError::Storage(redb::StorageError::Io(_))),
        )) => {
            return Err(open_error(file, e));
        }
        Ok(Err(e)) => return Err(preflight::damaged(file, &format!("cannot be read ({e})"), &Marker::of(file))),
        Err(panic) => return Err(preflight::damaged(file, &format!("cannot be read ({panic})"), &Marker::of(file))),
    };
    let repaired = repaired.load(Ordering::Relaxed) && existed;
    if repaired {
        tracing::warn!(elapsed_ms = started.elapsed().as_millis() as u64, "store repaired");
    }
    Ok((db, repaired))
}

fn codec(e: postcard::Error) -> Fail {
    Fail { io: false, message: format!("undecodable record: {e}") }
}

fn encode<T: Serialize>(v: &T) -> DbResult<Vec<u8>> {
    postcard::to_allocvec(v).map_err(codec)
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> DbResult<T> {
    postcard::from_bytes(bytes).map_err(codec)
}

fn value_len(len: usize) -> DbResult<u32> {
    u32::try_from(len).map_err(|_| redb::Error::ValueTooLarge(len).into())
}

/// Inserts `prefix ++ postcard(ev)`, serialized straight into the reserved value so the body
/// is copied once (into the page) rather than first into a buffer.
fn insert_event(table: &mut Table<u64, &[u8]>, seq: u64, prefix: &[u8], ev: &NewEvent) -> DbResult<()> {
    let len = prefix.len() + postcard::experimental::serialized_size(ev).map_err(codec)?;
    let mut slot = table.insert_reserve(seq, value_len(len)?)?;
    let (head, tail) = slot.as_mut().split_at_mut(prefix.len());
    head.copy_from_slice(prefix);
    postcard::to_slice(ev, tail).map_err(codec)?;
    Ok(())
}

/// `dead` value: postcard(DeadInfo) ++ postcard(NewEvent).
fn decode_dead(seq: u64, bytes: &[u8]) -> DbResult<DeadLetter> {
    let (info, rest) = postcard::take_from_bytes::<DeadInfo>(bytes).map_err(codec)?;
    Ok(DeadLetter { seq, ev: decode(rest)?, info })
}

/// A dead letter's delivery id, read in place: Motion's answer and the event's body are
/// skipped, not copied (the id is the event's first field).
fn dead_delivery_id(bytes: &[u8]) -> DbResult<&str> {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)] // read only to skip past it
    struct InfoRef<'a> {
        reason: DeadReason,
        status: Option<u16>,
        answer: &'a [u8],
        attempts: u32,
        died_unix_ms: u64,
    }
    // InfoRef mirrors DeadInfo field for field, in order: this stops compiling when DeadInfo
    // changes, so the two cannot drift apart silently.
    let _mirror = |d: DeadInfo| {
        let DeadInfo { reason: _, status: _, answer: _, attempts: _, died_unix_ms: _ } = d;
    };
    let (_, ev) = postcard::take_from_bytes::<InfoRef<'_>>(bytes).map_err(codec)?;
    let (id, _) = postcard::take_from_bytes::<&str>(ev).map_err(codec)?;
    Ok(id)
}

fn encode_info(mut info: DeadInfo) -> DbResult<Vec<u8>> {
    info.answer.truncate(MAX_ANSWER);
    encode(&info)
}

/// The records as format 1 wrote them (see the module doc): only the dead letter's reason and
/// the unowned event's note were text; the provider and method strings encode as their types do.
mod format1 {
    use bytes::Bytes;
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub struct NewEvent {
        pub delivery_id: String,
        pub motion: String,
        pub account: String,
        pub conversation: String,
        pub provider: crate::provider::ProviderKind,
        #[serde(with = "super::super::types::method")]
        pub method: http::Method,
        pub path_and_query: String,
        pub headers: Vec<(String, Vec<u8>)>,
        #[serde(with = "super::super::body_bytes")]
        pub body: Bytes,
        pub received_unix_ms: u64,
        pub dedup_key: Option<[u8; 32]>,
        pub dedup_expires_unix_ms: u64,
        pub note: String,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)] // read whole, used in part
    pub struct EventMeta {
        pub seq: u64,
        pub delivery_id: String,
        pub motion: String,
        pub account: String,
        pub conversation: String,
        pub received_unix_ms: u64,
        pub attempts: u32,
    }

    #[derive(Deserialize)]
    pub struct DeadInfo {
        pub reason: String,
        pub status: Option<u16>,
        pub answer: Vec<u8>,
        pub attempts: u32,
        pub died_unix_ms: u64,
    }
}

impl From<format1::NewEvent> for NewEvent {
    fn from(e: format1::NewEvent) -> NewEvent {
        NewEvent {
            delivery_id: e.delivery_id,
            motion: e.motion,
            account: e.account,
            conversation: e.conversation,
            provider: e.provider,
            method: e.method,
            path_and_query: e.path_and_query,
            headers: e.headers,
            body: e.body,
            received_unix_ms: e.received_unix_ms,
            dedup_key: e.dedup_key,
            dedup_expires_unix_ms: e.dedup_expires_unix_ms,
            unowned: Unowned::from_note(&e.note),
        }
    }
}

/// Rewrites every waiting event and dead letter of a format-1 file in the new encoding, inside
/// the caller's transaction (which also records the new format).
fn migrate_from_1(txn: &WriteTransaction) -> DbResult<()> {
    // Keys first, then one row at a time: a backlog of gigabytes is never held in memory.
    let mut events = txn.open_table(EVENTS)?;
    let mut waiting = txn.open_table(WAITING)?;
    let seqs: Vec<u64> = events.iter()?.map(|r| r.map(|(k, _)| k.value())).collect::<Result<_, _>>()?;
    for seq in seqs {
        let Some(bytes) = events.get(seq)?.map(|v| v.value().to_vec()) else { continue };
        let ev: NewEvent = decode::<format1::NewEvent>(&bytes)?.into();
        drop(bytes);
        insert_event(&mut events, seq, &[], &ev)?;
        let attempts = match waiting.get(seq)? {
            Some(m) => decode::<format1::EventMeta>(m.value())?.attempts,
            None => 0,
        };
        waiting.insert(seq, encode(&EventMeta::of(seq, attempts, &ev))?.as_slice())?;
    }
    // A waiting row without its event (never written so, but it would stop every later open):
    // nothing to deliver, so it goes.
    let orphans: Vec<u64> = waiting
        .iter()?
        .map(|r| r.map(|(k, _)| k.value()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|seq| events.get(*seq).map(|e| e.is_none()).unwrap_or(false))
        .collect();
    for seq in orphans {
        waiting.remove(seq)?;
    }
    let mut dead = txn.open_table(DEAD)?;
    let seqs: Vec<u64> = dead.iter()?.map(|r| r.map(|(k, _)| k.value())).collect::<Result<_, _>>()?;
    for seq in seqs {
        let Some(bytes) = dead.get(seq)?.map(|v| v.value().to_vec()) else { continue };
        let (info, rest) = postcard::take_from_bytes::<format1::DeadInfo>(&bytes).map_err(codec)?;
        let ev: NewEvent = decode::<format1::NewEvent>(rest)?.into();
        let info = DeadInfo {
            reason: DeadReason::from_text(info.reason),
            status: info.status,
            answer: info.answer,
            attempts: info.attempts,
            died_unix_ms: info.died_unix_ms,
        };
        insert_event(&mut dead, seq, &encode_info(info)?, &ev)?;
    }
    tracing::info!(events = events.len()?, dead_letters = dead.len()?, "store migrated from record format 1 to 2");
    Ok(())
}

/// Raises the file's next seq to at least `at_least` (the journal gives seqs out ahead of it).
fn raise_next_seq(meta: &mut Table<&str, u64>, at_least: u64) -> DbResult<()> {
    let stored = meta.get(NEXT_SEQ)?.map_or(1, |g| g.value());
    meta.insert(NEXT_SEQ, stored.max(at_least))?;
    Ok(())
}

fn take_seq(meta: &mut Table<&str, u64>) -> DbResult<u64> {
    let seq = meta.get(NEXT_SEQ)?.map_or(1, |g| g.value());
    meta.insert(NEXT_SEQ, seq + 1)?;
    Ok(seq)
}

/// The events of one append, inside the caller's transaction.
fn append_in(txn: &WriteTransaction, batch: &[NewEvent]) -> DbResult<Vec<Appended>> {
    let mut events = txn.open_table(EVENTS)?;
    let mut waiting = txn.open_table(WAITING)?;
    let mut dedup = txn.open_table(DEDUP)?;
    let mut meta = txn.open_table(META)?;
    let mut out = Vec::with_capacity(batch.len());
    for ev in batch {
        if !admit(&mut dedup, ev)? {
            out.push(Appended::Duplicate);
            continue;
        }
        let seq = take_seq(&mut meta)?;
        insert_event(&mut events, seq, &[], ev)?;
        waiting.insert(seq, encode(&EventMeta::of(seq, 0, ev))?.as_slice())?;
        out.push(Appended::Stored(seq));
    }
    Ok(out)
}

/// Checks the event's dedup key and records it: false if it is a redelivery.
fn admit(dedup: &mut Table<[u8; 32], u64>, ev: &NewEvent) -> DbResult<bool> {
    let Some(key) = &ev.dedup_key else {
        return Ok(true);
    };
    if dedup.get(key)?.is_some_and(|expiry| expiry.value() > ev.received_unix_ms) {
        return Ok(false);
    }
    dedup.insert(key, ev.dedup_expires_unix_ms)?;
    Ok(true)
}

impl QueueStore for EmbeddedStore {
    fn append(&self, batch: &[NewEvent]) -> Result<Vec<Appended>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (out, unsynced) = self.append_unsynced(batch)?;
        match unsynced {
            Some(unsynced) => unsynced.sync().map(|()| out),
            None => Ok(out),
        }
    }

    fn append_unsynced(&self, batch: &[NewEvent]) -> Result<WrittenAppend, StoreError> {
        if batch.is_empty() {
            return Ok((Vec::new(), None));
        }
        self.mark()?;
        self.append_hot(batch)
    }

    fn append_replacing_dead(&self, batch: &[NewEvent], dead_seq: u64) -> Result<Vec<Appended>, StoreError> {
        // An operator's replay: rare, so it goes to the file directly, after a checkpoint (its
        // seqs and dedup keys come from the file).
        self.cold(|| {
            self.write(Commit::Synced, |txn| {
                if txn.open_table(DEAD)?.remove(dead_seq)?.is_none() {
                    return Ok(Vec::new());
                }
                append_in(txn, batch)
            })
        })
    }

    fn append_dead(&self, ev: &NewEvent, info: DeadInfo) -> Result<Appended, StoreError> {
        self.mark()?;
        // A dedup key of an append not yet synced proves nothing: its sync may still fail. With
        // `syncing` held no append starts, and once those in flight are settled every key the
        // journals hold is durable. (Rare: events no account owns, stored as dead letters.)
        let _syncing = self.syncing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.in_flight.wait_none();
        self.with_hot(|hot| {
            let unknown: Vec<_> = ev.dedup_key.filter(|_| !hot.duplicate(ev)).into_iter().collect();
            if hot.is_duplicate(ev, &self.dedup_in_file(&unknown)?, None) {
                return Ok(Appended::Duplicate);
            }
            let seq = hot.next_seq;
            hot.next_seq += 1;
            self.write(Commit::Synced, |txn| {
                if let Some(key) = &ev.dedup_key {
                    txn.open_table(DEDUP)?.insert(key, ev.dedup_expires_unix_ms)?;
                }
                raise_next_seq(&mut txn.open_table(META)?, seq + 1)?;
                insert_event(&mut txn.open_table(DEAD)?, seq, &encode_info(info)?, ev)?;
                Ok(Appended::Stored(seq))
            })
        })
    }

    fn pending(&self) -> Result<Vec<EventMeta>, StoreError> {
        self.with_hot(|hot| {
            let in_file = self.read(|txn| {
                let waiting = txn.open_table(WAITING)?;
                let mut out = Vec::with_capacity(waiting.len()? as usize);
                for row in waiting.iter()? {
                    out.push(decode(row?.1.value())?);
                }
                Ok(out)
            })?;
            hot.pending(in_file)
        })
    }

    fn load(&self, seq: u64) -> Result<Option<Event>, StoreError> {
        self.with_hot(|hot| {
            if let Some((ev, attempts)) = hot.load(seq)? {
                return Ok(Some(Event { seq, attempts, ev }));
            }
            if hot.delivered(seq) {
                return Ok(None);
            }
            let attempts = hot.attempts_of(seq);
            self.read(|txn| {
                let Some(ev) = txn.open_table(EVENTS)?.get(seq)? else {
                    return Ok(None);
                };
                let attempts = match (attempts, txn.open_table(WAITING)?.get(seq)?) {
                    (Some(n), _) => n,
                    (None, Some(m)) => decode::<EventMeta>(m.value())?.attempts,
                    (None, None) => 0,
                };
                Ok(Some(Event { seq, attempts, ev: decode(ev.value())? }))
            })
        })
    }

    fn progress(&self, delivered: &[u64], attempts: &[(u64, u32)]) -> Result<(), StoreError> {
        if delivered.is_empty() && attempts.is_empty() {
            return Ok(());
        }
        self.with_hot(|hot| {
            if !delivered.is_empty() {
                hot.note(&RecordRef::Delivered(delivered))?;
                hot.unfolded.deliver(delivered);
            }
            if !attempts.is_empty() {
                hot.note(&RecordRef::Attempts(attempts))?;
                hot.unfolded.attempt(attempts);
            }
            Ok(())
        })
    }

    fn kill(&self, seq: u64, info: DeadInfo) -> Result<(), StoreError> {
        let in_journal = self.with_hot(|hot| {
            let Some((ev, _)) = hot.load(seq)? else { return Ok(false) };
            // Into the dead letters (synced), then noted as gone from the queue; a crash
            // between the two leaves both, and the checkpoint skips events that are dead. A
            // fold of a set-aside journal may already have put it in the file (its layer goes
            // only after that commit): it leaves the file's queue in the same commit, or the
            // loss of the note would leave it both waiting and dead.
            self.write(Commit::Synced, |txn| {
                insert_event(&mut txn.open_table(DEAD)?, seq, &encode_info(info.clone())?, &ev)?;
                txn.open_table(EVENTS)?.remove(seq)?;
                txn.open_table(WAITING)?.remove(seq)?;
                Ok(())
            })?;
            hot.unfolded.deliver(&[seq]);
            if let Err(e) = hot.note(&RecordRef::Delivered(&[seq])) {
                tracing::debug!(error = %e, "could not note a dead letter in the store journal");
            }
            Ok(true)
        })?;
        if in_journal {
            return Ok(());
        }
        self.write(Commit::Synced, |txn| {
            let mut events = txn.open_table(EVENTS)?;
            let Some(ev) = events.remove(seq)? else {
                return Ok(());
            };
            txn.open_table(WAITING)?.remove(seq)?;
            let (info, ev) = (encode_info(info)?, ev.value());
            let mut dead = txn.open_table(DEAD)?;
            let mut slot = dead.insert_reserve(seq, value_len(info.len() + ev.len())?)?;
            let (head, tail) = slot.as_mut().split_at_mut(info.len());
            head.copy_from_slice(&info);
            tail.copy_from_slice(ev);
            Ok(())
        })
    }

    fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.read(|txn| {
            let dead = txn.open_table(DEAD)?;
            let mut out = Vec::with_capacity(dead.len()? as usize);
            for row in dead.iter()? {
                let (seq, bytes) = row?;
                out.push(decode_dead(seq.value(), bytes.value())?);
            }
            Ok(out)
        })
    }

    fn dead_letter(&self, seq: u64) -> Result<Option<DeadLetter>, StoreError> {
        self.read(|txn| {
            let dead = txn.open_table(DEAD)?;
            let row = dead.get(seq)?;
            row.map(|bytes| decode_dead(seq, bytes.value())).transpose()
        })
    }

    fn dead_seqs_of(&self, delivery_id: &str) -> Result<Vec<u64>, StoreError> {
        self.read(|txn| {
            let mut out = Vec::new();
            for row in txn.open_table(DEAD)?.iter()? {
                let (seq, bytes) = row?;
                if dead_delivery_id(bytes.value())? == delivery_id {
                    out.push(seq.value());
                }
            }
            Ok(out)
        })
    }

    fn revive(&self, seq: u64, now_unix_ms: u64) -> Result<Option<EventMeta>, StoreError> {
        self.cold(|| self.revive_in_file(seq, now_unix_ms))
    }

    fn purge_dead(&self, seq: Option<u64>) -> Result<usize, StoreError> {
        self.write(Commit::Synced, |txn| {
            let mut dead = txn.open_table(DEAD)?;
            Ok(match seq {
                Some(seq) => usize::from(dead.remove(seq)?.is_some()),
                None => {
                    let mut n = 0;
                    dead.retain(|_, _| {
                        n += 1;
                        false
                    })?;
                    n
                }
            })
        })
    }
    fn prune_dedup(&self, now_unix_ms: u64) -> Result<usize, StoreError> {
        // The journal's dedup keys are swept once they are in the file. Called every minute,
        // this is also the checkpoint of a quiet relay, whose journal never reaches FOLD_AT;
        // folded here, on the caller's thread, without holding appends up.
        self.fold_aside()?;
        let mut from = self.prune_from.lock().unwrap_or_else(PoisonError::into_inner);
        let start = *from;
        let (pruned, next) = self.write(Commit::Cheap, |txn| {
            let mut dedup = txn.open_table(DEDUP)?;
            let mut expired = Vec::new();
            let (mut last, mut seen) = (None, 0);
            {
                let rows = match &start {
                    Some(k) => dedup.range::<&[u8; 32]>((std::ops::Bound::Excluded(k), std::ops::Bound::Unbounded))?,
                    None => dedup.range::<&[u8; 32]>(..)?,
                };
                for row in rows.take(self.prune_slice) {
                    let (key, expiry) = row?;
                    let key = key.value();
                    if expiry.value() < now_unix_ms {
                        expired.push(key);
                    }
                    last = Some(key);
                    seen += 1;
                }
            }
            for key in &expired {
                dedup.remove(key)?;
            }
            // A short slice reached the end: the next call starts the sweep over.
            let next = if seen < self.prune_slice { None } else { last };
            Ok((expired.len(), next))
        })?;
        *from = next;
        Ok(pruned)
    }

    fn backup(&self) -> Result<Backup, StoreError> {
        // Beside the store: the one folder the service may write (ProtectSystem=strict), and
        // the same file system, so it costs no more than the live data. Removed as soon as it
        // is open: whatever happens to the caller, no copy is left behind to be mistaken for
        // the store.
        let dir = self.file.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".backup-{}.redb", uuid::Uuid::new_v4()));
        // The copy is of the file, so the journal is folded into it first: the copy holds every
        // event acknowledged before the backup began.
        let result = self.checkpoint().and_then(|()| self.read(|txn| copy_into(txn, &tmp))).and_then(|summary| {
            let file = std::fs::File::open(&tmp).map_err(|e| StoreError::Read(format!("backup file: {e}")))?;
            Ok(Backup { file, summary })
        });
        let _ = std::fs::remove_file(&tmp);
        result
    }

    fn maintain(&self, wait: Duration) -> bool {
        self.maintain_for(wait);
        true
    }

    fn writable(&self) -> bool {
        self.heal() && self.with_hot(|hot| Ok(!hot.broken)).unwrap_or(false)
    }

    fn size_bytes(&self) -> Option<u64> {
        let journal = std::fs::metadata(self.dir().join(journal::FILE_NAME)).map_or(0, |m| m.len());
        std::fs::metadata(&self.file).ok().map(|m| m.len() + journal)
    }

    fn backend(&self) -> &'static str {
        "embedded"
    }

    /// Folds the journal in (at shutdown: the next start has nothing to replay) and makes
    /// every cheap commit durable.
    fn sync(&self) -> Result<(), StoreError> {
        self.checkpoint()?;
        self.write(Commit::Synced, |_| Ok(()))
    }
}

/// Rows copied per write transaction of a backup: bounds the memory a copy of a long backlog
/// takes, since redb keeps a transaction's dirty pages until it commits.
const BACKUP_ROWS_PER_COMMIT: usize = 20_000;

/// Copies every table as `src` sees it (one read transaction: one committed state) into a new
/// store file at `dest`, synced and closed cleanly, so it opens without a repair.
fn copy_into(src: &ReadTransaction, dest: &Path) -> DbResult<BackupSummary> {
    // Errors of the copy are not the live store's: never `io`, which would have the live
    // handle re-opened.
    let theirs = |e: redb::Error| Fail { io: false, message: format!("backup file {}: {e}", dest.display()) };
    let out = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create_with_file_format_v3(true)
        .create(dest)
        .map_err(|e| theirs(e.into()))?;
    let mut summary = BackupSummary {
        waiting: copy_table(src, &out, EVENTS, &theirs)?,
        dead_letters: copy_table(src, &out, DEAD, &theirs)?,
        dedup_keys: copy_table(src, &out, DEDUP, &theirs)?,
        format: src.open_table(META)?.get(FORMAT_KEY)?.map_or(0, |g| g.value()),
        bytes: 0,
    };
    copy_table(src, &out, WAITING, &theirs)?;
    copy_table(src, &out, WINDOW, &theirs)?;
    copy_table(src, &out, META, &theirs)?;
    // The last commit is synced; dropping the handle then closes the file cleanly. The copy
    // has every event the journal held (folded in before it was made) and no journal: it
    // starts its own, so it names none.
    let mut txn = out.begin_write().map_err(|e| theirs(e.into()))?;
    txn.set_durability(Durability::Immediate);
    {
        let mut meta = txn.open_table(META).map_err(|e| theirs(e.into()))?;
        meta.remove(JOURNAL_GENERATION).map_err(|e| theirs(e.into()))?;
        meta.remove(STORE_ID).map_err(|e| theirs(e.into()))?;
    }
    txn.commit().map_err(|e| theirs(e.into()))?;
    drop(out);
    summary.bytes = std::fs::metadata(dest).map_err(|e| theirs(e.into()))?.len();
    Ok(summary)
}

fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    src: &ReadTransaction,
    out: &Database,
    def: TableDefinition<K, V>,
    theirs: &dyn Fn(redb::Error) -> Fail,
) -> DbResult<u64> {
    let table = src.open_table(def)?;
    let mut rows = table.iter()?.peekable();
    let mut n = 0;
    loop {
        let mut txn = out.begin_write().map_err(|e| theirs(e.into()))?;
        txn.set_durability(Durability::None);
        {
            let mut table = txn.open_table(def).map_err(|e| theirs(e.into()))?;
            for row in rows.by_ref().take(BACKUP_ROWS_PER_COMMIT) {
                let (k, v) = row?;
                table.insert(k.value(), v.value()).map_err(|e| theirs(e.into()))?;
                n += 1;
            }
        }
        txn.commit().map_err(|e| theirs(e.into()))?;
        if rows.peek().is_none() {
            return Ok(n);
        }
    }
}

/// Opens a store file read-only-minded, as `store backup` checks its copy and a restore would
/// meet it: the file must open without a repair (it was closed cleanly), be of the record format
/// this build reads, and hold what it says. Also copies a store no relay has open
/// (`store backup` with the relay stopped): redb's lock refuses a file a running relay holds.
pub fn inspect(file: &Path) -> Result<BackupSummary, StoreError> {
    let repaired = std::sync::Arc::new(AtomicBool::new(false));
    let flag = repaired.clone();
    let db = open_existing(file, move |_| flag.store(true, Ordering::Relaxed))?;
    if repaired.load(Ordering::Relaxed) {
        return Err(open_error(file, std::io::Error::other("the file was not closed cleanly (it needed a repair)")));
    }
    let read = || -> DbResult<BackupSummary> {
        let txn = db.begin_read()?;
        Ok(BackupSummary {
            waiting: txn.open_table(EVENTS)?.len()?,
            dead_letters: txn.open_table(DEAD)?.len()?,
            dedup_keys: txn.open_table(DEDUP)?.len()?,
            format: txn.open_table(META)?.get(FORMAT_KEY)?.map_or(0, |g| g.value()),
            bytes: std::fs::metadata(file).map(|m| m.len()).unwrap_or(0),
        })
    };
    let summary = read().map_err(|e| StoreError::Read(format!("{}: {}", file.display(), e.message)))?;
    if summary.format != FORMAT {
        let e = format!("record format {}, but this build reads format {FORMAT}", summary.format);
        return Err(open_error(file, std::io::Error::other(e)));
    }
    Ok(summary)
}

/// Opens a store file that must exist (no marker involved: a copy, or `store check`), with a
/// damaged one reported as such rather than as a panic inside redb.
fn open_existing(
    file: &Path,
    on_repair: impl Fn(&mut redb::RepairSession) + Send + Sync + 'static,
) -> Result<Database, StoreError> {
    if preflight::examine(file)? == Found::New {
        return Err(preflight::damaged(file, "is missing or empty", &Marker::of(file)));
    }
    let opened = preflight::contain(|| {
        Database::builder().set_cache_size(CACHE_BYTES).set_repair_callback(on_repair).open(file)
    });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e @ redb::DatabaseError::DatabaseAlreadyOpen)) => Err(StoreError::Open {
            path: file.to_path_buf(),
            source: std::sync::Arc::new(std::io::Error::other(format!(
                "{e}: a relay is running on it (stop it first, or check a `store backup` copy instead)"
            ))),
        }),
        Ok(Err(e @ redb::DatabaseError::Storage(redb::StorageError::Io(_)))) => Err(open_error(file, e)),
        Ok(Err(e)) => Err(preflight::damaged(file, &format!("cannot be read ({e})"), &Marker::of(file))),
        Err(panic) => Err(preflight::damaged(file, &format!("cannot be read ({panic})"), &Marker::of(file))),
    }
}

/// What `store check` found in a sound store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checked {
    pub file: PathBuf,
    /// False when there is no store yet (a first start creates it): nothing else is set.
    pub exists: bool,
    pub waiting: u64,
    pub dead_letters: u64,
    pub dedup_keys: u64,
    pub window_entries: u64,
    pub bytes: u64,
    /// Whether its last run had not shut down cleanly (then opening it repaired it, as the
    /// relay's start would have).
    pub repaired: bool,
    pub marked: bool,
}

/// `store check`: verifies `dir`'s store with no relay running. Every waiting event, its
/// metadata and every dead letter is read back and decoded; `Err` says what is wrong and what
/// to do. Opening a file that was not closed cleanly repairs it, as the relay's start would.
pub fn check(dir: &Path) -> Result<Checked, StoreError> {
    let file = dir.join(FILE_NAME);
    let marked = Marker::of(&file).present();
    if preflight::examine(&file)? == Found::New {
        return Ok(Checked { file, marked, ..Checked::default() });
    }
    let repaired = std::sync::Arc::new(AtomicBool::new(false));
    let flag = repaired.clone();
    let db = open_existing(&file, move |_| flag.store(true, Ordering::Relaxed))?;
    let read = || -> DbResult<Checked> {
        let txn = db.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        let waiting = txn.open_table(WAITING)?;
        for row in waiting.iter()? {
            let (seq, meta) = row?;
            let meta: EventMeta = decode(meta.value())?;
            let Some(ev) = events.get(seq.value())? else {
                return Err(Fail { io: false, message: format!("waiting event {} has no body", meta.seq) });
            };
            decode::<NewEvent>(ev.value())?;
        }
        let dead = txn.open_table(DEAD)?;
        for row in dead.iter()? {
            let (seq, bytes) = row?;
            decode_dead(seq.value(), bytes.value())?;
        }
        let format = txn.open_table(META)?.get(FORMAT_KEY)?.map_or(0, |g| g.value());
        if format != FORMAT {
            let message = format!("record format {format}, but this build reads format {FORMAT}");
            return Err(Fail { io: false, message });
        }
        Ok(Checked {
            file: file.clone(),
            exists: true,
            waiting: waiting.len()?,
            dead_letters: dead.len()?,
            dedup_keys: txn.open_table(DEDUP)?.len()?,
            window_entries: txn.open_table(WINDOW)?.len()?,
            bytes: std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0),
            repaired: repaired.load(Ordering::Relaxed),
            marked,
        })
    };
    let mut checked = match preflight::contain(read) {
        Ok(Ok(checked)) => checked,
        Ok(Err(e)) => {
            return Err(preflight::damaged(&file, &format!("is damaged ({})", e.message), &Marker::of(&file)));
        }
        Err(panic) => return Err(preflight::damaged(&file, &format!("is damaged ({panic})"), &Marker::of(&file))),
    };
    // What a start would replay: the waiting events are the file's with each journal's
    // layer applied over them, oldest first.
    let layers = read_journal(&db, dir)?;
    if !layers.is_empty() {
        let mut waiting: std::collections::BTreeSet<u64> = (|| -> DbResult<_> {
            let txn = db.begin_read()?;
            let rows = txn.open_table(WAITING)?;
            let mut seqs = std::collections::BTreeSet::new();
            for row in rows.iter()? {
                seqs.insert(row?.0.value());
            }
            Ok(seqs)
        })()
        .map_err(|e| StoreError::Read(e.message))?;
        for layer in &layers {
            waiting.retain(|seq| !layer.delivered.contains(seq));
            waiting.extend(layer.stored.keys());
        }
        checked.waiting = waiting.len() as u64;
    }
    for name in [journal::FILE_NAME, hot::FOLDING_NAME] {
        checked.bytes += std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    }
    Ok(checked)
}

/// With no relay running: what the journals in `dir` hold that the file `db` does not have
/// yet, oldest first (as the next start would replay them); refused as damaged as a start
/// would refuse them.
fn read_journal(db: &Database, dir: &Path) -> Result<Vec<Unfolded>, StoreError> {
    let (generation, store_id) = (|| -> DbResult<(Option<u64>, Option<u64>)> {
        let meta = db.begin_read()?.open_table(META)?;
        Ok((meta.get(JOURNAL_GENERATION)?.map(|g| g.value()), meta.get(STORE_ID)?.map(|g| g.value())))
    })()
    .map_err(|e| StoreError::Read(e.message))?;
    // A file without an id has never had a journal: any journal beside it is another's.
    let layers = hot::to_replay(dir, generation, store_id.unwrap_or(0))?;
    Ok(layers.iter().map(|(_, c)| Unfolded::replayed(&c.records)).collect())
}

/// `store backup` with no relay running: copies `dir`'s store file to `dest` directly. Fails
/// (redb's lock) while a relay holds the file.
pub fn backup_offline(dir: &Path, dest: &Path) -> Result<BackupSummary, StoreError> {
    let file = dir.join(FILE_NAME);
    let db = open_existing(&file, |_| {})?;
    if read_journal(&db, dir)?.iter().any(|layer| !layer.is_empty()) {
        return Err(StoreError::Read(format!(
            "the store journal {} holds events not yet in {} (the relay did not stop cleanly): start the relay and stop it again (a clean stop folds the journal in), or take the backup while it runs",
            dir.join(journal::FILE_NAME).display(),
            file.display()
        )));
    }
    let txn = db.begin_read().map_err(|e| StoreError::Read(e.to_string()))?;
    copy_into(&txn, dest).map_err(|e| StoreError::Read(e.message))
}

impl WindowStore for EmbeddedStore {
    fn window_touch(&self, entries: &[(String, u64)]) -> Result<(), StoreError> {
        self.write(Commit::Cheap, |txn| {
            let mut window = txn.open_table(WINDOW)?;
            for (key, unix_ms) in entries {
                let last = window.get(key.as_str())?.map(|g| g.value());
                if last.is_none_or(|last| last < *unix_ms) {
                    window.insert(key.as_str(), *unix_ms)?;
                }
            }
            Ok(())
        })
    }

    fn window_last(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.read(|txn| Ok(txn.open_table(WINDOW)?.get(key)?.map(|g| g.value())))
    }

    fn prune_window(&self, before_unix_ms: u64) -> Result<usize, StoreError> {
        self.write(Commit::Cheap, |txn| {
            let mut n = 0;
            txn.open_table(WINDOW)?.retain(|_, last| {
                n += usize::from(last < before_unix_ms);
                last >= before_unix_ms
            })?;
            Ok(n)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::ev;
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    fn open(dir: &tempfile::TempDir) -> EmbeddedStore {
        EmbeddedStore::open(dir.path()).unwrap()
    }

    fn journal_len(dir: &tempfile::TempDir) -> u64 {
        std::fs::metadata(dir.path().join(journal::FILE_NAME)).unwrap().len()
    }

    fn generation(store: &EmbeddedStore) -> Option<u64> {
        store.read(|txn| Ok(txn.open_table(META)?.get(JOURNAL_GENERATION)?.map(|g| g.value()))).unwrap()
    }

    #[test]
    fn the_journals_events_outlive_a_crash_and_are_folded_in_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        assert_eq!(
            stored(&store.append(&[ev("a", "c", b"1"), ev("b", "c", b"2"), ev("c", "d", b"3")]).unwrap()),
            [1, 2, 3]
        );
        store.progress(&[1], &[(3, 2)]).unwrap();
        assert_eq!(seqs(&store), [2, 3]);
        assert!(journal_len(&dir) > journal::HEADER_LEN);
        // The file has none of it yet: a crash now leaves it all in the journal.
        drop(store);
        assert_eq!(check(dir.path()).unwrap().waiting, 2, "check counts what the journal holds");
        let store = open(&dir);
        assert_eq!(journal_len(&dir), journal::HEADER_LEN, "replayed and folded in at open");
        let pending = store.pending().unwrap();
        assert_eq!(pending.iter().map(|m| (m.seq, m.attempts)).collect::<Vec<_>>(), [(2, 0), (3, 2)]);
        assert_eq!(store.load(3).unwrap().unwrap().ev.body, &b"3"[..]);
        assert_eq!(store.load(1).unwrap(), None);
        assert_eq!(stored(&store.append(&[ev("e", "c", b"")]).unwrap()), [4], "seqs go on");
    }

    #[test]
    fn a_full_journal_is_set_aside_folded_in_by_maintenance_and_read_through_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        store.fold_at = 1;
        let first = generation(&store).unwrap();
        let folding = dir.path().join(hot::FOLDING_NAME);
        store.append(&[deduped("a", 1, 100, 1_000), ev("b", "c", b"x")]).unwrap();
        assert!(!folding.exists(), "set aside by the next append, before it writes");
        // Set aside, not yet in the file: a new journal takes appends; reads see both.
        assert_eq!(store.append(&[deduped("a-again", 1, 500, 1_000)]).unwrap(), [Appended::Duplicate]);
        assert!(folding.exists());
        assert_eq!(journal_len(&dir), journal::HEADER_LEN);
        assert_eq!(generation(&store), Some(first));
        assert!(store.read(|txn| Ok(txn.open_table(EVENTS)?.get(2)?.is_none())).unwrap());
        store.progress(&[1], &[(2, 4)]).unwrap();
        assert_eq!(store.pending().unwrap().iter().map(|m| (m.seq, m.attempts)).collect::<Vec<_>>(), [(2, 4)]);
        assert_eq!(store.load(2).unwrap().unwrap().attempts, 4);
        assert_eq!(store.load(1).unwrap(), None);
        // The maintenance thread's turn: folded in, and the set-aside file gone.
        assert!(store.maintain(Duration::ZERO));
        assert!(!folding.exists());
        assert_eq!(generation(&store), Some(first + 1));
        assert!(store.read(|txn| Ok(txn.open_table(EVENTS)?.get(2)?.is_some())).unwrap());
        assert_eq!(
            store.append(&[deduped("a-third", 1, 600, 1_000)]).unwrap(),
            [Appended::Duplicate],
            "the key is in the file"
        );
        assert_eq!(store.pending().unwrap().iter().map(|m| (m.seq, m.attempts)).collect::<Vec<_>>(), [(2, 4)]);
        store.sync().unwrap();
        assert!(store.read(|txn| Ok(txn.open_table(EVENTS)?.get(1)?.is_none())).unwrap());
        assert_eq!(store.pending().unwrap().iter().map(|m| (m.seq, m.attempts)).collect::<Vec<_>>(), [(2, 4)]);
    }

    #[test]
    fn a_crash_while_a_journal_is_set_aside_replays_both_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        store.fold_at = 1;
        store.append(&[ev("a", "c", b"1"), ev("b", "c", b"2")]).unwrap();
        store.append(&[ev("c", "c", b"3")]).unwrap(); // sets the first journal aside, then writes
        store.fold_at = FOLD_AT;
        store.progress(&[1], &[(2, 3)]).unwrap(); // noted in the new journal, about the old one's events
        assert!(dir.path().join(hot::FOLDING_NAME).exists());
        drop(store); // as a crash: neither is in the file
        assert_eq!(check(dir.path()).unwrap().waiting, 2);
        let store = open(&dir);
        assert!(!dir.path().join(hot::FOLDING_NAME).exists());
        assert_eq!(journal_len(&dir), journal::HEADER_LEN);
        assert_eq!(store.pending().unwrap().iter().map(|m| (m.seq, m.attempts)).collect::<Vec<_>>(), [(2, 3), (3, 0)]);
        assert_eq!(stored(&store.append(&[ev("d", "c", b"")]).unwrap()), [4]);

        // A crash between setting a journal aside and creating the next: only the set-aside one.
        drop(store);
        let store = open(&dir);
        store.append(&[ev("e", "c", b"5")]).unwrap();
        drop(store);
        std::fs::rename(dir.path().join(journal::FILE_NAME), dir.path().join(hot::FOLDING_NAME)).unwrap();
        let store = open(&dir);
        assert_eq!(seqs(&store), [2, 3, 4, 5]);
        // The same with an empty set-aside journal: a new one takes its place, under its name.
        drop(store);
        std::fs::rename(dir.path().join(journal::FILE_NAME), dir.path().join(hot::FOLDING_NAME)).unwrap();
        let store = open(&dir);
        assert!(!dir.path().join(hot::FOLDING_NAME).exists());
        store.append(&[ev("f", "c", b"6")]).unwrap();
        drop(store);
        assert!(journal_len(&dir) > journal::HEADER_LEN, "appends go to queue.journal");
        assert_eq!(seqs(&open(&dir)), [2, 3, 4, 5, 6]);
    }

    /// A folded journal is kept as the spare and becomes a later generation: after a crash only
    /// that generation's records are replayed, not the earlier ones left behind them.
    #[test]
    fn a_recycled_journal_replays_only_its_own_records_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let spare = dir.path().join(journal::SPARE_NAME);
        let mut store = open(&dir);
        store.fold_at = 1;
        let big = vec![b'x'; 4096];
        store.append(&[ev("a", "c", &big), ev("b", "c", &big)]).unwrap();
        store.append(&[ev("c", "c", b"3")]).unwrap(); // sets the first journal aside
        assert!(store.maintain(Duration::ZERO));
        assert!(spare.exists(), "the folded journal is kept");
        let recycled = std::fs::metadata(&spare).unwrap().len();
        store.progress(&[1], &[]).unwrap();
        store.append(&[ev("d", "c", b"4")]).unwrap(); // the next generation takes the spare
        assert!(!spare.exists());
        assert!(journal_len(&dir) >= recycled, "queue.journal is the recycled file");
        drop(store); // as a crash
        let store = open(&dir);
        assert_eq!(seqs(&store), [2, 3, 4]);
        assert_eq!(store.load(4).unwrap().unwrap().ev.body.as_ref(), b"4");
        assert_eq!(store.load(2).unwrap().unwrap().ev.body.len(), big.len());
    }

    #[test]
    fn an_event_killed_after_its_journal_was_folded_in_and_before_the_layer_went_is_only_dead_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        store.fold_at = 1;
        store.append(&[ev("a", "c", b"1")]).unwrap();
        store.append(&[ev("b", "c", b"2")]).unwrap(); // sets the first journal aside
        // The maintenance thread's fold has committed; its layer is still there.
        let (folding, next_seq) =
            store.with_hot(|hot| Ok((hot.folding.clone().expect("set aside"), hot.next_seq))).unwrap();
        store.fold_layer(&folding, next_seq).unwrap();
        let before_kill = std::fs::read(dir.path().join(journal::FILE_NAME)).unwrap();
        store.kill(1, info(Vec::new())).unwrap();
        drop(store);
        // The power loss takes the journal's unsynced note of the kill.
        std::fs::write(dir.path().join(journal::FILE_NAME), before_kill).unwrap();
        let store = open(&dir);
        assert_eq!(seqs(&store), [2], "the dead letter is not waiting again");
        assert_eq!(store.dead_letters().unwrap().iter().map(|d| d.seq).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn a_crash_after_folding_a_set_aside_journal_and_before_its_successor_exists_starts() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, folding) = (dir.path().join(journal::FILE_NAME), dir.path().join(hot::FOLDING_NAME));
        let store = open(&dir);
        store.append(&[ev("a", "c", b"1")]).unwrap();
        drop(store); // as a crash: the event is in the journal only
        let saved = std::fs::read(&journal).unwrap();
        std::fs::rename(&journal, &folding).unwrap();
        drop(open(&dir)); // replays the set-aside journal and folds it in
        // The crash came after the fold's commit and before the new journal was in place.
        std::fs::remove_file(&journal).unwrap();
        std::fs::write(&folding, &saved).unwrap();
        let store = open(&dir);
        assert_eq!(seqs(&store), [1]);
        assert!(!folding.exists() && journal.exists());
    }

    #[test]
    fn a_group_written_before_a_failed_sync_is_refused_even_if_its_own_sync_works() {
        let dir = tempfile::tempdir().unwrap();
        let (store, disk) = on_faulty_disk(&dir);
        let (first, a) = store.append_unsynced(&[ev("a", "c", b"1")]).unwrap();
        let (second, b) = store.append_unsynced(&[ev("b", "c", b"2")]).unwrap();
        assert_eq!((stored(&first), stored(&second)), (vec![1], vec![2]));
        disk.set_full(true);
        assert!(a.unwrap().sync().is_err());
        disk.set_full(false);
        // Its pages may have gone with the first one's write-back error.
        assert!(b.unwrap().sync().is_err());
        assert!(seqs(&store).is_empty());
        assert_eq!(stored(&store.append(&[ev("c", "c", b"3")]).unwrap()), [3]);
        drop(store);
        assert_eq!(seqs(&open(&dir)), [3]);
    }

    #[test]
    fn a_redelivery_answered_while_its_first_copy_syncs_is_refused_if_that_sync_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (store, disk) = on_faulty_disk(&dir);
        let e = deduped("a", 7, 1_000, u64::MAX);
        let (first, a) = store.append_unsynced(std::slice::from_ref(&e)).unwrap();
        // The provider's retry, written while the first copy's sync is under way.
        let (again, retry) = store.append_unsynced(std::slice::from_ref(&e)).unwrap();
        assert_eq!((stored(&first), again.as_slice()), (vec![1], &[Appended::Duplicate][..]));
        let retry = retry.expect("a duplicate of an unsynced append waits for a sync");
        disk.set_full(true);
        assert!(a.unwrap().sync().is_err());
        disk.set_full(false);
        assert!(retry.sync().is_err(), "acknowledged as a duplicate of an event that was not stored");
        // The provider retries again: now it is stored.
        assert_eq!(stored(&store.append(std::slice::from_ref(&e)).unwrap()), [2]);
        drop(store);
        assert_eq!(seqs(&open(&dir)), [2]);
    }

    #[test]
    fn after_a_checkpoint_that_failed_but_reached_the_file_appends_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (store, disk) = on_faulty_disk(&dir);
        assert_eq!(stored(&store.append(&[ev("a", "c", b"1")]).unwrap()), [1]);
        disk.set_syncs_fail(true);
        assert!(store.sync().is_err(), "the checkpoint's commit reports the failed sync");
        disk.set_syncs_fail(false);
        // Acknowledged after the failed checkpoint, whose commit did reach the file.
        assert_eq!(stored(&store.append(&[ev("b", "c", b"2")]).unwrap()), [2]);
        drop(store); // as a crash
        assert_eq!(seqs(&open(&dir)), [1, 2]);
    }

    #[test]
    fn a_dead_letter_waits_for_the_append_whose_key_it_repeats_and_is_stored_if_that_fails() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(open(&dir));
        let e = deduped("a", 7, 1_000, u64::MAX);
        let (first, pending) = store.append_unsynced(std::slice::from_ref(&e)).unwrap();
        assert_eq!(stored(&first), [1]);
        let dead = std::thread::spawn({
            let (store, e) = (store.clone(), e.clone());
            move || store.append_dead(&e, info(vec![]))
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!dead.is_finished(), "answered before the append it repeats was synced");
        drop(pending); // never synced: refused
        assert_eq!(dead.join().unwrap().unwrap(), Appended::Stored(2));
        assert_eq!(store.dead_letter(2).unwrap().unwrap().ev.delivery_id, "a");
    }

    #[test]
    fn an_append_never_synced_is_refused_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let (_, pending) = store.append_unsynced(&[ev("a", "c", b"1")]).unwrap();
        drop(pending);
        assert!(seqs(&store).is_empty());
        store.sync().unwrap(); // a checkpoint does not wait for it forever
        assert_eq!(stored(&store.append(&[ev("b", "c", b"2")]).unwrap()), [2]);
    }

    #[test]
    fn a_journal_event_that_dies_goes_to_the_dead_letters_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.append(&[ev("a", "c", b"1"), ev("b", "c", b"2")]).unwrap();
        store.kill(1, info(b"no".to_vec())).unwrap();
        assert_eq!(seqs(&store), [2]);
        assert_eq!(store.dead_letter(1).unwrap().unwrap().ev.delivery_id, "a");
        drop(store);
        let store = open(&dir);
        assert_eq!(seqs(&store), [2]);
        assert_eq!(store.dead_letters().unwrap().len(), 1);
    }

    #[test]
    fn a_store_without_a_journal_opens_with_its_events_and_starts_one() {
        // The previous version's layout: events in the file, no journal, no generation.
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.append(&[ev("a", "c", b"1"), ev("b", "c", b"2")]).unwrap();
        store.progress(&[1], &[]).unwrap();
        store.sync().unwrap();
        drop(store);
        std::fs::remove_file(dir.path().join(journal::FILE_NAME)).unwrap();
        {
            let db = Database::open(dir.path().join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().remove(JOURNAL_GENERATION).unwrap();
            txn.commit().unwrap();
        }
        let store = open(&dir);
        assert_eq!(seqs(&store), [2]);
        assert_eq!(generation(&store), Some(1));
        assert_eq!(stored(&store.append(&[ev("c", "c", b"")]).unwrap()), [3]);
    }

    #[test]
    fn a_lost_journal_or_one_of_another_store_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.append(&[ev("a", "c", b"1")]).unwrap();
        drop(store);
        let journal = dir.path().join(journal::FILE_NAME);
        let kept = std::fs::read(&journal).unwrap();
        std::fs::remove_file(&journal).unwrap();
        let Err(StoreError::Damaged(why)) = EmbeddedStore::open(dir.path()) else { panic!("opened") };
        assert!(why.contains("queue.journal") && why.contains("missing"), "{why}");
        assert!(check(dir.path()).is_err());
        // Another store's journal with records in it.
        let other = tempfile::tempdir().unwrap();
        let mut s = open(&other);
        s.fold_at = 1;
        s.append(&[ev("x", "c", b"")]).unwrap();
        s.append(&[ev("y", "c", b"")]).unwrap();
        drop(s);
        std::fs::write(other.path().join(journal::FILE_NAME), &kept).unwrap();
        let Err(StoreError::Damaged(why)) = EmbeddedStore::open(other.path()) else { panic!("opened") };
        assert!(why.contains("generation"), "{why}");
        // A journal with no header.
        std::fs::write(&journal, b"garbage").unwrap();
        let Err(StoreError::Damaged(why)) = EmbeddedStore::open(dir.path()) else { panic!("opened") };
        assert!(why.contains("not a journal"), "{why}");
    }

    #[test]
    fn an_offline_backup_waits_for_a_journal_to_be_folded_in() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.append(&[ev("a", "c", b"1")]).unwrap();
        drop(store); // as a crash: the journal holds the event
        let dest = dir.path().join("copy.redb");
        let e = backup_offline(dir.path(), &dest).unwrap_err();
        assert!(e.to_string().contains("start the relay and stop it again"), "{e}");
        let store = open(&dir); // folds it in
        drop(store);
        assert_eq!(backup_offline(dir.path(), &dest).unwrap().waiting, 1);
    }

    #[test]
    fn a_failed_journal_write_stores_nothing_and_the_next_one_works() {
        let dir = tempfile::tempdir().unwrap();
        let (store, disk) = on_faulty_disk(&dir);
        store.append(&[deduped("a", 1, 100, 9_000)]).unwrap();
        disk.set_full(true);
        assert!(store.append(&[deduped("b", 2, 100, 9_000), ev("c", "c", b"")]).is_err());
        disk.set_full(false);
        assert_eq!(seqs(&store), [1]);
        // Key 2 was not recorded: its event is stored now, not taken for a redelivery.
        let r = store.append(&[deduped("b", 2, 200, 9_000)]).unwrap();
        assert!(matches!(r[..], [Appended::Stored(_)]), "{r:?}");
        drop(store);
        let store = open(&dir);
        assert_eq!(store.pending().unwrap().iter().map(|m| m.delivery_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    }

    fn stored(results: &[Appended]) -> Vec<u64> {
        results
            .iter()
            .filter_map(|r| match r {
                Appended::Stored(seq) => Some(*seq),
                Appended::Duplicate => None,
            })
            .collect()
    }

    /// A store whose disk fails on demand.
    fn on_faulty_disk(dir: &tempfile::TempDir) -> (EmbeddedStore, std::sync::Arc<super::super::DiskFault>) {
        let disk = std::sync::Arc::new(super::super::DiskFault::default());
        (EmbeddedStore::open_on_faulty_disk(dir.path(), disk.clone()).unwrap(), disk)
    }

    fn seqs(store: &EmbeddedStore) -> Vec<u64> {
        store.pending().unwrap().iter().map(|m| m.seq).collect()
    }

    fn info(answer: Vec<u8>) -> DeadInfo {
        DeadInfo {
            reason: DeadReason::Refused { status: 400 },
            status: Some(400),
            answer,
            attempts: 3,
            died_unix_ms: 5_000,
        }
    }

    fn deduped(id: &str, key: u8, received: u64, expires: u64) -> NewEvent {
        NewEvent {
            dedup_key: Some([key; 32]),
            received_unix_ms: received,
            dedup_expires_unix_ms: expires,
            ..ev(id, "c", b"")
        }
    }

    #[test]
    fn append_then_pending_in_seq_order_and_load_returns_everything() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let first = stored(&store.append(&[ev("a", "c1", b"1"), ev("b", "c2", b"2")]).unwrap());
        let second = stored(&store.append(&[ev("c", "c1", &[9; 5000])]).unwrap());
        assert_eq!(first, [1, 2]);
        assert_eq!(second, [3]);

        let pending = store.pending().unwrap();
        let ids: Vec<_> = pending.iter().map(|m| m.delivery_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(pending[1], EventMeta::of(2, 0, &ev("b", "c2", b"2")));

        let loaded = store.load(3).unwrap().unwrap();
        assert_eq!((loaded.seq, loaded.attempts), (3, 0));
        assert_eq!(loaded.ev, ev("c", "c1", &[9; 5000]));
        assert!(store.load(4).unwrap().is_none());
        assert!(store.append(&[]).unwrap().is_empty());
    }

    #[test]
    fn seqs_keep_increasing_across_reopen_even_when_all_were_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let first = stored(&store.append(&[ev("a", "c", b""), ev("b", "c", b"")]).unwrap());
        store.progress(&first, &[]).unwrap();
        drop(store);
        let store = open(&dir);
        assert!(!store.repaired(), "a dropped store needs no repair");
        assert!(store.pending().unwrap().is_empty());
        assert_eq!(stored(&store.append(&[ev("c", "c", b"")]).unwrap()), [3]);
    }

    #[test]
    fn prune_sweeps_the_dedup_table_in_slices_and_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        store.prune_slice = 4;
        // Ten keys: the odd ones expire at 1,000, the even ones never.
        let batch: Vec<NewEvent> =
            (0..10).map(|i| deduped(&format!("e{i}"), i, 0, if i % 2 == 1 { 1_000 } else { u64::MAX })).collect();
        store.append(&batch).unwrap();
        let pruned: Vec<usize> = (0..4).map(|_| store.prune_dedup(2_000).unwrap()).collect();
        // Slices of 4, 4 and 2 keys cover the table; the fourth call starts over and finds none.
        assert_eq!(pruned.iter().sum::<usize>(), 5, "{pruned:?}");
        assert!(pruned.iter().all(|&n| n <= 4), "{pruned:?}");
        assert_eq!(pruned[3], 0, "{pruned:?}");
        // The unexpired keys still deduplicate.
        assert_eq!(store.append(&[deduped("again", 2, 3_000, u64::MAX)]).unwrap(), [Appended::Duplicate]);
    }

    #[test]
    fn dedup_within_a_batch_across_calls_and_after_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let r = store
            .append(&[
                deduped("a", 1, 100, 1_000),
                deduped("a-again", 1, 100, 1_000),
                deduped("b", 2, 100, 500),
                ev("no-key", "c", b""),
            ])
            .unwrap();
        assert_eq!(r, [Appended::Stored(1), Appended::Duplicate, Appended::Stored(2), Appended::Stored(3)]);
        // Across calls, while unexpired; expiry is judged at the redelivery's receipt time.
        assert_eq!(store.append(&[deduped("a", 1, 999, 2_000)]).unwrap(), [Appended::Duplicate]);
        assert_eq!(store.append(&[deduped("b", 2, 500, 9_000)]).unwrap(), [Appended::Stored(4)]);
        // A duplicate does not extend the window: key 1 still expires at 1_000.
        assert_eq!(store.prune_dedup(1_001).unwrap(), 1);
        assert_eq!(store.prune_dedup(1_001).unwrap(), 0);
        assert_eq!(store.append(&[deduped("a", 1, 999, 2_000)]).unwrap(), [Appended::Stored(5)]);
        assert_eq!(seqs(&store), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn delivered_removes_and_survives_reopen_after_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.append(&[ev("a", "c", b"1"), ev("b", "c", b"2"), ev("c", "c", b"3")]).unwrap();
        store.progress(&[1, 3, 99], &[]).unwrap();
        assert_eq!(seqs(&store), [2]);
        assert!(store.load(1).unwrap().is_none());
        store.sync().unwrap();
        drop(store);
        assert_eq!(seqs(&open(&dir)), [2]);
    }

    #[test]
    fn attempt_counts_show_in_pending_and_load_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.append(&[ev("a", "c", b"1")]).unwrap();
        store.progress(&[], &[(1, 4), (42, 4)]).unwrap(); // 42 is not waiting: ignored
        assert_eq!(store.pending().unwrap()[0].attempts, 4);
        store.sync().unwrap();
        drop(store);
        let store = open(&dir);
        assert_eq!(store.load(1).unwrap().unwrap().attempts, 4);
        assert_eq!(store.pending().unwrap()[0].attempts, 4);
    }

    #[test]
    fn kill_keeps_the_reason_and_the_answer_cut_to_64_kib() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.append(&[ev("a", "c", b"body"), ev("b", "c", b"")]).unwrap();
        store.kill(1, info(vec![b'x'; 100_000])).unwrap();
        store.kill(1, info(vec![])).unwrap(); // no longer waiting: ignored
        assert_eq!(seqs(&store), [2]);
        assert!(store.load(1).unwrap().is_none());

        let dead = store.dead_letters().unwrap();
        assert_eq!(dead.len(), 1);
        let d = &dead[0];
        assert_eq!((d.seq, d.ev.body.as_ref()), (1, &b"body"[..]));
        assert_eq!(d.ev, ev("a", "c", b"body"));
        assert_eq!(d.info.answer, vec![b'x'; MAX_ANSWER]);
        assert_eq!((d.info.status, d.info.attempts), (Some(400), 3));
        assert_eq!(d.info.reason, DeadReason::Refused { status: 400 });
        assert_eq!(store.dead_letter(1).unwrap().as_ref(), Some(d));
        assert!(store.dead_letter(2).unwrap().is_none());
    }

    #[test]
    fn an_expired_key_in_the_journal_does_not_hide_a_later_one_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        // The journal holds key 7 until 1,000; a dead letter stored at 2,000 holds it until 5,000.
        assert_eq!(store.append(&[deduped("a", 7, 100, 1_000)]).unwrap(), [Appended::Stored(1)]);
        assert_eq!(store.append_dead(&deduped("b", 7, 2_000, 5_000), info(vec![])).unwrap(), Appended::Stored(2));
        assert_eq!(store.append(&[deduped("c", 7, 3_000, 6_000)]).unwrap(), [Appended::Duplicate]);
        // Folded in, the journal's earlier expiry does not replace the file's.
        store.sync().unwrap();
        assert_eq!(store.append(&[deduped("d", 7, 4_000, 7_000)]).unwrap(), [Appended::Duplicate]);
        assert_eq!(store.append(&[deduped("e", 7, 5_000, 8_000)]).unwrap(), [Appended::Stored(3)], "expired");
    }

    #[test]
    fn append_dead_stores_an_event_of_no_account_straight_in_the_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut e = deduped("m", 5, 100, 1_000);
        e.account = String::new();
        e.unowned = Some(Unowned { app: "main".into(), key: super::super::UnownedKey::PhoneNumberId("123".into()) });
        assert_eq!(store.append_dead(&e, info(vec![0; 70_000])).unwrap(), Appended::Stored(1));
        assert_eq!(store.append_dead(&e, info(vec![])).unwrap(), Appended::Duplicate);
        assert!(store.pending().unwrap().is_empty());
        let d = store.dead_letter(1).unwrap().unwrap();
        assert_eq!(d.ev, e);
        assert_eq!(d.info.answer.len(), MAX_ANSWER);
        assert_eq!(stored(&store.append(&[ev("x", "c", b"")]).unwrap()), [2]);
    }

    #[test]
    fn append_replacing_dead_swaps_a_dead_letter_for_new_events_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut unowned = ev("u", "c", b"change");
        unowned.account = String::new();
        assert_eq!(store.append_dead(&unowned, info(vec![])).unwrap(), Appended::Stored(1));

        let replay = [ev("r1", "a1", b"change"), ev("r2", "a2", b"change")];
        assert_eq!(stored(&store.append_replacing_dead(&replay, 1).unwrap()), [2, 3]);
        assert!(store.dead_letters().unwrap().is_empty());
        assert_eq!(seqs(&store), [2, 3]);
        // A second replay of the same dead letter finds it gone and writes nothing.
        assert!(store.append_replacing_dead(&[ev("r3", "a1", b"change")], 1).unwrap().is_empty());
        assert_eq!(seqs(&store), [2, 3]);
        drop(store);
        let store = open(&dir);
        assert_eq!(seqs(&store), [2, 3]);
        assert!(store.dead_letters().unwrap().is_empty());
    }

    #[test]
    fn revive_gives_a_new_higher_seq_and_keeps_the_delivery_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.append(&[ev("a", "c", b"body"), ev("b", "c", b"")]).unwrap();
        store.progress(&[], &[(1, 7)]).unwrap();
        store.kill(1, info(vec![])).unwrap();
        store.append(&[ev("c", "c", b"")]).unwrap();

        let meta = store.revive(1, 123_456).unwrap().unwrap();
        assert_eq!((meta.seq, meta.delivery_id.as_str(), meta.attempts), (4, "a", 0));
        assert!(store.dead_letters().unwrap().is_empty());
        assert_eq!(seqs(&store), [2, 3, 4]);
        assert_eq!(store.pending().unwrap()[2], meta);
        // Back in the queue now: give_up_after counts from the replay, not the first receipt.
        assert_eq!(meta.received_unix_ms, 123_456);
        let revived = ev("a", "c", b"body");
        assert_eq!(store.load(4).unwrap().unwrap().ev, NewEvent { received_unix_ms: 123_456, ..revived });
        assert!(store.revive(1, 123_456).unwrap().is_none());
        drop(store);
        assert_eq!(seqs(&open(&dir)), [2, 3, 4]);
    }

    #[test]
    fn dead_seqs_of_finds_dead_letters_by_delivery_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.append(&[ev("a", "c", &[7; 10_000]), ev("b", "c", b""), ev("a", "d", b"x")]).unwrap();
        for seq in [1, 3] {
            store.kill(seq, info(vec![1; 5000])).unwrap();
        }
        assert_eq!(store.dead_seqs_of("a").unwrap(), [1, 3]);
        assert!(store.dead_seqs_of("b").unwrap().is_empty(), "b is waiting, not dead");
        store.kill(2, info(vec![])).unwrap();
        assert_eq!(store.dead_seqs_of("b").unwrap(), [2]);
        assert!(store.dead_seqs_of("nope").unwrap().is_empty());
        // Written straight as a dead letter (no account), with an answer and a status.
        let mut unowned = ev("u", "c", &[1; 300]);
        unowned.account = String::new();
        let mut with_status = info(vec![2; 70_000]);
        with_status.status = Some(503);
        assert_eq!(store.append_dead(&unowned, with_status).unwrap(), Appended::Stored(4));
        assert_eq!(store.dead_seqs_of("u").unwrap(), [4]);
    }

    #[test]
    fn purge_one_then_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.append(&[ev("a", "c", b""), ev("b", "c", b""), ev("c", "c", b"")]).unwrap();
        for seq in 1..=3 {
            store.kill(seq, info(vec![])).unwrap();
        }
        assert_eq!(store.purge_dead(Some(2)).unwrap(), 1);
        assert_eq!(store.purge_dead(Some(2)).unwrap(), 0);
        let left: Vec<_> = store.dead_letters().unwrap().iter().map(|d| d.seq).collect();
        assert_eq!(left, [1, 3]);
        assert_eq!(store.purge_dead(None).unwrap(), 2);
        assert!(store.dead_letters().unwrap().is_empty());
        assert_eq!(store.purge_dead(None).unwrap(), 0);
    }

    #[test]
    fn window_keeps_the_latest_touch_across_reopen_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        assert_eq!(store.window_last("12:+39").unwrap(), None);
        store.window_touch(&[("12:+39".into(), 2_000), ("12:+44".into(), 500)]).unwrap();
        store.window_touch(&[("12:+39".into(), 1_000)]).unwrap(); // older: ignored
        assert_eq!(store.window_last("12:+39").unwrap(), Some(2_000));
        drop(store);
        let store = open(&dir);
        assert_eq!(store.window_last("12:+39").unwrap(), Some(2_000));
        assert_eq!(store.prune_window(1_000).unwrap(), 1);
        assert_eq!(store.window_last("12:+44").unwrap(), None);
        assert_eq!(store.window_last("12:+39").unwrap(), Some(2_000));
    }

    #[test]
    fn cheap_commits_are_made_durable_periodically_so_the_file_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.append(&[ev("a", "c", &[1; 100_000])]).unwrap();
        for i in 0..CHEAP_COMMITS_PER_SYNC * 8 {
            store.progress(&[], &[(1, i + 1)]).unwrap();
            assert!(store.cheap_commits.load(Ordering::Relaxed) < CHEAP_COMMITS_PER_SYNC);
        }
        let len = std::fs::metadata(store.path()).unwrap().len();
        assert!(len < 8 << 20, "file grew to {len} bytes");
    }

    #[test]
    fn reopens_itself_after_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.append(&[ev("a", "c", b"")]).unwrap();
        store.broken.store(true, Ordering::SeqCst); // as `failed` does on an I/O error
        assert!(store.writable());
        assert!(!store.broken.load(Ordering::SeqCst));
        assert_eq!(seqs(&store), [1]);
        assert_eq!(stored(&store.append(&[ev("b", "c", b"")]).unwrap()), [2]);
    }

    /// A full disk fails the durable commit after cheap ones: redb forgets the cheap deletes of
    /// delivered events when the file is re-opened, though `progress` returned `Ok`. The
    /// re-open deletes them again: they are not left waiting (and delivered again) forever.
    #[test]
    fn deliveries_noted_before_a_full_disk_stay_noted_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, disk) = on_faulty_disk(&dir);
        store.append(&[ev("a", "c", b"1"), ev("b", "c", b"2"), ev("c", "c", b"3")]).unwrap();
        store.progress(&[1, 2], &[(3, 1)]).unwrap(); // noted in the journal, not synced
        assert_eq!(seqs(&store), [3]);

        disk.set_full(true);
        assert!(store.append(&[ev("d", "c", b"4")]).is_err(), "the disk is full");
        assert!(disk.refused() > 0);
        disk.set_full(false);
        *store.last_reopen.lock().unwrap() = None; // re-open now, not in a second
        assert!(store.writable());
        // (The refused append may have reached the disk all the same: it was not acknowledged,
        // so the provider sends it again, and keeping it costs a duplicate at most.)
        let left = seqs(&store);
        assert!(!left.contains(&1) && !left.contains(&2), "the delivered events stay deleted: {left:?}");
        drop(store);
        let left = seqs(&open(&dir));
        assert!(left.contains(&3) && !left.contains(&1) && !left.contains(&2), "and are deleted on disk: {left:?}");
    }

    #[test]
    fn refuses_a_file_of_another_record_format() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store
            .write(Commit::Synced, |txn| {
                txn.open_table(META)?.insert(FORMAT_KEY, FORMAT + 1)?;
                Ok(())
            })
            .unwrap();
        drop(store);
        let err = EmbeddedStore::open(dir.path()).err().unwrap();
        assert!(matches!(err, StoreError::Open { .. }), "{err}");
    }

    /// A file written by the relay before record format 2 (tests/fixtures/store-format-1: three
    /// waiting events, one with 3 attempts; two dead letters of account events, refused and
    /// given up; two unowned Meta changes, by number and by WABA; dedup keys; a window entry).
    #[test]
    fn a_format_1_file_is_migrated_at_open_and_keeps_everything() {
        use super::super::UnownedKey;
        let dir = tempfile::tempdir().unwrap();
        let gz = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/store-format-1/queue.redb.gz");
        let out = Command::new("gzip")
            .args(["-dc", gz])
            .output()
            .expect("gzip (Debian's gzip package) decompresses the fixture");
        assert!(out.status.success());
        std::fs::write(dir.path().join(FILE_NAME), out.stdout).unwrap();

        let store = open(&dir);
        let pending = store.pending().unwrap();
        assert_eq!(pending.iter().map(|m| (m.seq, m.attempts)).collect::<Vec<_>>(), [(1, 3), (2, 0), (5, 0)]);
        let first = store.load(1).unwrap().unwrap().ev;
        assert_eq!(first.delivery_id, "0190d000-0000-7000-8000-000000000001");
        assert_eq!((first.provider, first.method.clone()), (crate::provider::twilio::KIND, http::Method::POST));
        assert_eq!(&first.body[..], b"Body=hello+0190d000-0000-7000-8000-000000000001&From=whatsapp%3A%2B16505551234");
        assert_eq!(first.headers[1], ("x-relay-test".to_string(), b"v1".to_vec()));
        assert_eq!(first.unowned, None);
        assert_eq!(store.load(5).unwrap().unwrap().ev.provider, crate::provider::dialog360::KIND);

        let dead = store.dead_letters().unwrap();
        let reasons: Vec<_> = dead.iter().map(|d| (d.seq, d.info.reason.clone())).collect();
        assert_eq!(reasons[0], (3, DeadReason::Refused { status: 400 }));
        assert_eq!(
            reasons[1],
            (4, DeadReason::Recorded("gave up after 7 attempts over 86400s (last: HTTP 503)".into()))
        );
        assert_eq!(reasons[2], (6, DeadReason::NoAccount));
        assert_eq!(dead[0].info.answer, b"{\"motion\":\"says no\"}");
        let app = |key| Some(Unowned { app: "shared".into(), key });
        assert_eq!(dead[2].ev.unowned, app(UnownedKey::PhoneNumberId("999".into())));
        assert_eq!(dead[3].ev.unowned, app(UnownedKey::WabaId("555".into())));
        assert_eq!(store.dead_seqs_of("0190d000-0000-7000-8000-000000000004").unwrap(), [4]);
        assert_eq!(store.window_last("acme\u{1f}12\u{1f}16505551234").unwrap(), Some(1_700_000_000_000));
        // Dedup keys carried over: a redelivery of the first event is still a duplicate.
        let again = NewEvent { dedup_key: Some([1; 32]), received_unix_ms: 1_700_000_000_500, ..ev("x", "c", b"") };
        assert_eq!(store.append(&[again]).unwrap(), [Appended::Duplicate]);
        // Seqs go on after the old ones; the file is format 2 now and opens as such.
        assert_eq!(stored(&store.append(&[ev("y", "c", b"")]).unwrap()), [8]);
        drop(store);
        let store = open(&dir);
        assert_eq!(store.dead_letters().unwrap().len(), 4);
        assert_eq!(store.pending().unwrap().len(), 4);
    }

    const CRASH_DIR: &str = "WHATSAPP_RELAY_STORE_CRASH_DIR";

    /// The child of `sigkill_loses_nothing_acknowledged`: appends until killed, printing
    /// "acked SEQ" once `append` returned and "delivered SEQ" before marking one delivered.
    #[test]
    #[ignore = "run as a child process by sigkill_loses_nothing_acknowledged"]
    fn crash_child() {
        use std::io::Write;
        let Ok(dir) = std::env::var(CRASH_DIR) else {
            return;
        };
        let store = EmbeddedStore::open(Path::new(&dir)).unwrap();
        let mut out = std::io::stdout().lock();
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in 0.. {
            assert!(Instant::now() < deadline, "never killed");
            let batch: Vec<_> = (0..4).map(|j| ev(&format!("{i}-{j}"), &format!("c{j}"), &[j as u8; 1024])).collect();
            let seqs = stored(&store.append(&batch).unwrap());
            for seq in &seqs {
                writeln!(out, "acked {seq}").unwrap();
            }
            out.flush().unwrap();
            // Cheap commits between the synced ones, so a kill may land in either.
            writeln!(out, "delivered {}", seqs[0]).unwrap();
            out.flush().unwrap();
            store.progress(&seqs[..1], &[(seqs[1], 1)]).unwrap();
        }
    }

    #[test]
    fn sigkill_loses_nothing_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (mut acked, mut delivered) = (Vec::new(), Vec::new());
        // Several kills on the same file: each child opens (and repairs) what the last left.
        for round in 0..3 {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args(["--ignored", "--exact", "store::embedded::tests::crash_child"])
                .args(["--nocapture", "--test-threads=1"])
                .env(CRASH_DIR, dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let target = acked.len() + 100 + round * 17;
            while acked.len() < target {
                let line = lines.next().expect("child ended before being killed").unwrap();
                if let Some(seq) = line.strip_prefix("acked ") {
                    acked.push(seq.parse::<u64>().unwrap());
                } else if let Some(seq) = line.strip_prefix("delivered ") {
                    delivered.push(seq.parse::<u64>().unwrap());
                }
            }
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            // What it printed before dying: it may have marked the one delivered already.
            for line in lines.map(Result::unwrap) {
                if let Some(seq) = line.strip_prefix("delivered ") {
                    delivered.push(seq.parse::<u64>().unwrap());
                }
            }
        }

        let store = open(&dir);
        assert!(store.repaired(), "the kill left the file needing repair");
        let pending = seqs(&store);
        for seq in &acked {
            assert!(delivered.contains(seq) || pending.contains(seq), "acknowledged event {seq} was lost");
        }
        let max = *acked.iter().max().unwrap();
        let next = stored(&store.append(&[ev("after", "c", b"")]).unwrap());
        assert!(next[0] > max, "seq {} reused after a crash", next[0]);
        for seq in pending {
            assert_eq!(store.load(seq).unwrap().unwrap().seq, seq);
        }
    }
}
