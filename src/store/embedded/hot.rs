//! The embedded store's hot path: its journal (see `store::journal`) in front of `queue.redb`.
//! Appends and deliveries are written to the journal (one sequential write, and one fdatasync
//! per group of appends); what the journal holds that the file does not yet ([`Unfolded`]) is
//! folded into the file at checkpoints.
//!
//! A checkpoint does not stall acknowledgements: the full journal is set aside
//! (`queue.journal.folding`), a new generation takes the appends at once, and the set-aside one
//! is written into the file by the store's maintenance thread. Until then both journals are
//! layers over the file: the newest says first where an event is, whether a dedup key was seen,
//! and what its attempt count is.
//!
//! Owns: start-up replay (which journals belong to this file and in which order), the layers,
//! checkpoints, and what an append undoes when its write or sync fails.
//!
//! Must never: answer an append before its records are synced, fold records whose sync may
//! still fail, delete a set-aside journal before the file holds it, or start on a journal that
//! may hold acknowledged events but belongs to another file (or is gone).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use redb::ReadableTable;

use super::super::journal::{self, Journal, Record, RecordRef};
use super::super::unfolded::{Held, Unfolded};
use super::super::{Appended, EventMeta, NewEvent, StoreError, Unsynced, WrittenAppend};
use super::{
    Commit, DEAD, DEDUP, EVENTS, EmbeddedStore, JOURNAL_GENERATION, META, NEXT_SEQ, STORE_ID, WAITING, encode,
    insert_event, open_error, raise_next_seq, set_attempts,
};

/// The set-aside journal's name while it is folded in.
pub const FOLDING_NAME: &str = "queue.journal.folding";
/// After a failed checkpoint, the next is not tried sooner than this.
const FOLD_RETRY: Duration = Duration::from_secs(1);

/// The journal and what it holds that the file does not yet.
pub(super) struct Hot {
    pub journal: Journal,
    pub unfolded: Unfolded,
    /// The previous journal, set aside and being folded into the file.
    pub folding: Option<Arc<Folding>>,
    /// The next seq to give out (the file's `next_seq` is brought up to it at checkpoints).
    pub next_seq: u64,
    /// Reused for encoding records.
    buf: Vec<u8>,
    /// A sync failed (or a new generation could not be started): the journal may hold records
    /// that were refused, so it is replaced (after a checkpoint) before the next append.
    pub broken: bool,
    fold_failed: Option<Instant>,
    /// Failed journal syncs so far (see [`Written::failures_seen`]).
    sync_failures: u64,
}

/// A journal set aside for folding, with what it holds.
pub(super) struct Folding {
    unfolded: Unfolded,
    journal: Journal,
}

/// An append written to the journal and not yet synced: what to undo if the sync fails.
pub(super) struct Written {
    added: Vec<u64>,
    /// Each dedup key it recorded, with the expiry the journal had for it before.
    keys: Vec<([u8; 32], Option<u64>)>,
    syncer: journal::Syncer,
    /// [`Hot::sync_failures`] when it was written: a sync that failed since may have lost its
    /// pages too (Linux reports a write-back error to one fdatasync only), so it counts as
    /// refused even if its own sync succeeds.
    failures_seen: u64,
}

/// How many appends are written and not yet synced.
#[derive(Default)]
pub(super) struct InFlight {
    count: Mutex<usize>,
    none: Condvar,
}

impl InFlight {
    fn add(&self) {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
    }

    fn done(&self) {
        let mut n = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.none.notify_all();
        }
    }

    /// Waits until every append written is synced (or refused). Called holding `syncing`,
    /// so no new one starts meanwhile.
    pub(super) fn wait_none(&self) {
        let n = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        drop(self.none.wait_while(n, |n| *n > 0).unwrap_or_else(PoisonError::into_inner));
    }
}

/// An append written to the journal, on its way to the sync (see `append_unsynced`).
struct PendingSync {
    written: Written,
    hot: Arc<Mutex<Option<Hot>>>,
    in_flight: Arc<InFlight>,
    /// Synced or refused: dropping it unsynced (its sync thread gone) refuses it.
    settled: bool,
}

impl PendingSync {
    /// Not stored: forgotten, and the journal (which may hold their records, and deliveries
    /// noted since) is replaced before the next append, after a checkpoint of what is known.
    /// Seqs are not given out again: a gap is harmless.
    fn refuse(&mut self, why: &str) -> StoreError {
        let mut guard = self.hot.lock().unwrap_or_else(PoisonError::into_inner);
        let path = match guard.as_mut() {
            Some(hot) => {
                self.written.undo(&mut hot.unfolded);
                hot.broken = true;
                hot.sync_failures += 1;
                hot.journal.path().display().to_string()
            }
            None => String::new(),
        };
        drop(guard);
        self.settled = true;
        self.in_flight.done();
        StoreError::Write(format!("store journal {path}: {why}"))
    }
}

impl Unsynced for PendingSync {
    fn sync(mut self: Box<Self>) -> Result<(), StoreError> {
        if let Err(e) = self.written.syncer.sync() {
            return Err(self.refuse(&e.to_string()));
        }
        let failed_since = {
            let guard = self.hot.lock().unwrap_or_else(PoisonError::into_inner);
            guard.as_ref().is_some_and(|hot| hot.sync_failures != self.written.failures_seen)
        };
        if failed_since {
            return Err(self.refuse("an earlier sync of the journal failed after this was written"));
        }
        self.settled = true;
        self.in_flight.done();
        Ok(())
    }
}

impl Drop for PendingSync {
    fn drop(&mut self) {
        if !self.settled {
            self.refuse("the write was never synced");
        }
    }
}

/// Where the layers say an event is.
enum Found<'a> {
    /// In this journal, still waiting.
    Held(Held, &'a Journal),
    Delivered,
    /// Not in any journal: the file has it if anything does.
    InFile,
}

impl Hot {
    fn new(journal: Journal, next_seq: u64) -> Hot {
        Hot {
            journal,
            unfolded: Unfolded::default(),
            folding: None,
            next_seq,
            buf: Vec::new(),
            broken: false,
            fold_failed: None,
            sync_failures: 0,
        }
    }

    /// The journals' layers, newest first.
    fn layers(&self) -> impl Iterator<Item = (&Unfolded, &Journal)> {
        std::iter::once((&self.unfolded, &self.journal))
            .chain(self.folding.as_deref().map(|f| (&f.unfolded, &f.journal)))
    }

    /// Whether a journal holds a live dedup key of `ev` (a redelivery). A key a journal holds
    /// expired is no answer: the file may hold a later one (a dead letter stored since, say),
    /// so the file is asked unless this is true.
    pub fn duplicate(&self, ev: &NewEvent) -> bool {
        self.layers().any(|(u, _)| u.duplicate(ev) == Some(true))
    }

    fn find(&self, seq: u64) -> Found<'_> {
        for (u, j) in self.layers() {
            if let Some(held) = u.stored.get(&seq) {
                return Found::Held(*held, j);
            }
            if u.delivered.contains(&seq) {
                return Found::Delivered;
            }
        }
        Found::InFile
    }

    /// Whether `ev` is a redelivery: a live key in the journals, in `aside` (a layer folded in
    /// since the file was asked), or in `in_file`, the file's expiries for the keys the
    /// journals held no live key for. Keys only ever get later expiries (pruning removes
    /// expired ones), so a live key anywhere is the answer.
    pub fn is_duplicate(&self, ev: &NewEvent, in_file: &HashMap<[u8; 32], u64>, aside: Option<&Folding>) -> bool {
        self.duplicate(ev)
            || aside.is_some_and(|f| f.unfolded.duplicate(ev) == Some(true))
            || ev.dedup_key.and_then(|k| in_file.get(&k)).is_some_and(|&expiry| expiry > ev.received_unix_ms)
    }

    /// An attempt count recorded since the event was folded into the file, if any.
    pub fn attempts_of(&self, seq: u64) -> Option<u32> {
        self.layers().find_map(|(u, _)| u.attempts.get(&seq).copied())
    }

    /// Whether the journals say `seq` was delivered (so the file's copy, if any, is stale).
    pub fn delivered(&self, seq: u64) -> bool {
        matches!(self.find(seq), Found::Delivered)
    }

    /// The event `seq` and its attempt count, if a journal holds it.
    pub fn load(&self, seq: u64) -> Result<Option<(NewEvent, u32)>, StoreError> {
        let Found::Held(held, journal) = self.find(seq) else { return Ok(None) };
        let attempts = self.attempts_of(seq).unwrap_or(held.attempts);
        Ok(Some((read_event(journal, seq, held)?, attempts)))
    }

    /// The waiting events, given the file's: the layers applied over them, oldest first.
    pub fn pending(&self, in_file: Vec<EventMeta>) -> Result<Vec<EventMeta>, StoreError> {
        let mut all: BTreeMap<u64, EventMeta> = in_file.into_iter().map(|m| (m.seq, m)).collect();
        let layers: Vec<_> = self.layers().collect();
        for (u, j) in layers.into_iter().rev() {
            for seq in &u.delivered {
                all.remove(seq);
            }
            for (seq, &n) in &u.attempts {
                if let Some(m) = all.get_mut(seq) {
                    m.attempts = n;
                }
            }
            for (&seq, held) in &u.stored {
                let ev = read_event(j, seq, *held)?;
                all.insert(seq, EventMeta::of(seq, held.attempts, &ev));
            }
        }
        Ok(all.into_values().collect())
    }

    /// Writes records (not synced): deliveries and attempt counts, which a crash may lose at
    /// the cost of a redelivery, as with the file's cheap commits.
    pub fn note(&mut self, record: &RecordRef) -> Result<(), StoreError> {
        self.buf.clear();
        journal::encode(&mut self.buf, self.journal.framing(), record).map_err(StoreError::Write)?;
        let written = self.journal.write(&mut self.buf);
        written.map_err(|e| StoreError::Write(format!("store journal: {e}")))
    }

    /// Writes `batch` to the journal (not synced: the caller syncs it without holding the
    /// journal). `in_file`: the dedup keys the file has, with their expiry.
    fn write_batch(
        &mut self,
        batch: &[NewEvent],
        in_file: &HashMap<[u8; 32], u64>,
        aside: Option<&Folding>,
    ) -> Result<(Vec<Appended>, Option<Written>), StoreError> {
        let base = self.journal.len();
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut out = Vec::with_capacity(batch.len());
        let (mut added, mut keys) = (Vec::new(), Vec::new());
        let framing = self.journal.framing();
        for ev in batch {
            if self.is_duplicate(ev, in_file, aside) {
                out.push(Appended::Duplicate);
                continue;
            }
            let seq = self.next_seq;
            let start = buf.len();
            journal::encode(&mut buf, framing, &RecordRef::Stored { seq, ev }).map_err(StoreError::Write)?;
            self.next_seq += 1;
            if let Some(key) = ev.dedup_key {
                keys.push((key, self.unfolded.dedup.get(&key).copied()));
            }
            let len = (buf.len() - start - 8) as u32;
            self.unfolded.store(seq, ev, base + start as u64 + 8, len);
            added.push(seq);
            out.push(Appended::Stored(seq));
        }
        let written = Written { added, keys, syncer: self.journal.syncer(), failures_seen: self.sync_failures };
        if written.added.is_empty() {
            // Every event was a redelivery. A key found among appends not yet synced is only as
            // good as their sync, which may still fail: the answer waits for a sync after theirs
            // and is refused if one failed meanwhile (`failures_seen`), as a written group is.
            // Else the provider would hold a 2xx for an event stored nowhere.
            self.buf = buf;
            return Ok((out, Some(written)));
        }
        let result = self.journal.write(&mut buf);
        self.buf = buf;
        if let Err(e) = result {
            // Nothing was added to the journal (see `Journal::write`): only forgotten here.
            written.undo(&mut self.unfolded);
            return Err(StoreError::Write(format!("store journal {}: {e}", self.journal.path().display())));
        }
        Ok((out, Some(written)))
    }
}

impl Written {
    fn undo(&self, unfolded: &mut Unfolded) {
        for seq in &self.added {
            unfolded.stored.remove(seq);
        }
        for (key, previous) in self.keys.iter().rev() {
            match previous {
                Some(expiry) => unfolded.dedup.insert(*key, *expiry),
                None => unfolded.dedup.remove(key),
            };
        }
    }
}

fn read_event(journal: &Journal, seq: u64, held: Held) -> Result<NewEvent, StoreError> {
    match journal.load(held.at, held.len) {
        Ok(Record::Stored { seq: s, ev }) if s == seq => Ok(*ev),
        Ok(_) => Err(StoreError::Read(format!("the journal record of event {seq} holds another record"))),
        Err(e) => Err(StoreError::Read(format!("store journal {}: {e}", journal.path().display()))),
    }
}

fn journal_damaged(path: &Path, why: &str) -> StoreError {
    StoreError::Damaged(format!(
        "the store journal {} cannot be used: {why}. The relay will not start on it, since acknowledged events may be in it. To recover: restore the store folder from a `whatsapp-relay store backup` copy (queue.redb and its marker), or, to accept losing what the journal held, move it away and start again.",
        path.display()
    ))
}

/// The journals in `dir` that hold what the file does not have yet, oldest first, read back:
/// the set-aside one (generation g, the file's `generation`), then the current one (g + 1).
/// Refused as damaged: a journal that may hold acknowledged events but belongs to another file,
/// or none where the file expects one.
pub(super) fn to_replay(
    dir: &Path,
    generation: Option<u64>,
    store_id: u64,
) -> Result<Vec<(std::path::PathBuf, journal::Contents)>, StoreError> {
    let (path, folding_path) = (dir.join(journal::FILE_NAME), dir.join(FOLDING_NAME));
    let mut expected = generation;
    let mut layers = Vec::new();
    // A journal of this store one generation before the file's: folded in, and the crash came
    // before its successor was created (it was set aside, or its replacement was cut short).
    let mut predecessor = false;
    for p in [folding_path, path.clone()] {
        let Some(c) = journal::read(&p).map_err(|why| journal_damaged(&p, &why))? else { continue };
        predecessor |= c.store_id == store_id && generation == Some(c.generation + 1);
        if let Verdict::Replay(c) = judge(&p, c, store_id, expected)? {
            expected = Some(c.generation + 1);
            layers.push((p, c));
        }
    }
    if let (true, false, false, Some(g)) = (layers.is_empty(), path.exists(), predecessor, generation) {
        let why = format!("it is missing, and the store file says journal {g} may hold acknowledged events");
        return Err(journal_damaged(&path, &why));
    }
    Ok(layers)
}

/// A journal file read at start-up, and whether it belongs to the file and is not folded in.
enum Verdict {
    /// To replay: the file expects it.
    Replay(journal::Contents),
    /// Folded in already, or empty: to remove.
    Stale,
}

fn judge(path: &Path, c: journal::Contents, store_id: u64, expected: Option<u64>) -> Result<Verdict, StoreError> {
    let ours = c.store_id == store_id;
    match expected {
        Some(g) if ours && c.generation == g => Ok(Verdict::Replay(c)),
        // A checkpoint folded it in, and the crash came before it was removed.
        Some(g) if ours && c.generation < g => Ok(Verdict::Stale),
        // An empty journal of another file (a restored backup after a clean stop).
        _ if c.records.is_empty() => Ok(Verdict::Stale),
        _ => Err(journal_damaged(
            path,
            &format!(
                "it is generation {} of store {:016x} with {} records, but the store file is store {store_id:016x} and expects generation {}; if queue.redb was restored from a backup, move this journal away first (its events are not in the backup)",
                c.generation,
                c.store_id,
                c.records.len(),
                expected.map_or("none".to_string(), |g| g.to_string()),
            ),
        )),
    }
}

fn replayed(path: &Path, c: &journal::Contents) -> Unfolded {
    if c.cut > 0 {
        tracing::warn!(journal = %path.display(), bytes = c.cut, "the store journal ended in an unfinished write (never acknowledged); it was dropped");
    }
    if !c.records.is_empty() {
        tracing::info!(journal = %path.display(), records = c.records.len(), "store journal replayed");
    }
    Unfolded::replayed(&c.records)
}

impl EmbeddedStore {
    /// Opens the journals, replays what they hold that the file does not have and folds it in,
    /// so every start begins with one empty journal.
    pub(super) fn open_journal(&self) -> Result<Hot, StoreError> {
        let dir = self.dir().to_path_buf();
        let (path, folding_path) = (dir.join(journal::FILE_NAME), dir.join(FOLDING_NAME));

        // (The store id is written when the file is opened, with its format.)
        let (generation, next_seq, store_id) = self.read(|txn| {
            let meta = txn.open_table(META)?;
            let value = |key| Ok::<_, super::Fail>(meta.get(key)?.map(|g| g.value()));
            Ok((value(JOURNAL_GENERATION)?, value(NEXT_SEQ)?.unwrap_or(1), value(STORE_ID)?.unwrap_or(0)))
        })?;
        let io = |p: &Path, e: std::io::Error| open_error(p, e);
        let layers = to_replay(&dir, generation, store_id)?;
        let open = |p: &Path, c: &journal::Contents| -> Result<(Unfolded, Journal), StoreError> {
            Ok((replayed(p, c), Journal::reopen(p, c, self.disk.clone()).map_err(|e| io(p, e))?))
        };
        let mut hot = match layers.as_slice() {
            [] => {
                // Nothing to replay: a new store, a first start with a journal, a restored
                // backup, or a journal already folded in.
                // The journal first: one the file does not expect yet is empty, so a crash
                // before the file names it leaves a journal the next start replaces.
                let g = generation.unwrap_or(1);
                let journal = Journal::create(&dir, g, store_id, self.disk.clone()).map_err(|e| io(&path, e))?;
                self.write(Commit::Synced, |txn| {
                    txn.open_table(META)?.insert(JOURNAL_GENERATION, g)?;
                    Ok(())
                })?;
                Hot::new(journal, next_seq)
            }
            // One journal (the current one, or a set-aside one whose successor was never
            // created): the checkpoint below starts the next generation under the usual name.
            [(p, c)] => {
                let (unfolded, journal) = open(p, c)?;
                let mut hot = Hot::new(journal, next_seq.max(unfolded.last_seq + 1));
                hot.unfolded = unfolded;
                // The set-aside name is removed below: even an empty one is replaced.
                hot.broken = *p == folding_path;
                hot
            }
            [(fp, fc), (p, c), ..] => {
                let (older, older_journal) = open(fp, fc)?;
                let (unfolded, journal) = open(p, c)?;
                let mut hot = Hot::new(journal, next_seq.max(older.last_seq + 1).max(unfolded.last_seq + 1));
                hot.unfolded = unfolded;
                hot.folding = Some(Arc::new(Folding { unfolded: older, journal: older_journal }));
                hot
            }
        };
        // A set-aside journal whose successor was never created: the replayed one is the
        // current layer; a checkpoint now starts the next generation under the usual name.
        if let Some(folding) = hot.folding.take() {
            self.fold_layer(&folding, hot.next_seq)?;
        }
        self.fold_now(&mut hot)?;
        Journal::recycle(&folding_path, &dir); // a missing one is nothing to do
        Ok(hot)
    }

    /// Runs `f` on the journal.
    pub(super) fn with_hot<T>(&self, f: impl FnOnce(&mut Hot) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut guard = self.hot.lock().unwrap_or_else(PoisonError::into_inner);
        let hot = guard.as_mut().ok_or_else(|| StoreError::Write("the store journal is not open".into()))?;
        f(hot)
    }

    /// Folds every journal into the file now: before an operation that works on the file alone
    /// (a backup, an operator's replay), at shutdown, and every minute. Waits for a fold in
    /// progress.
    pub(super) fn checkpoint(&self) -> Result<(), StoreError> {
        let syncing = self.syncing.lock().unwrap_or_else(PoisonError::into_inner);
        self.checkpoint_holding(&syncing)
    }

    pub(super) fn checkpoint_holding(&self, _syncing: &MutexGuard<()>) -> Result<(), StoreError> {
        self.in_flight.wait_none();
        self.finish_folding()?;
        self.with_hot(|hot| self.fold_now(hot))
    }

    /// Runs a rare operation on the file directly: folds the journals in first, so the file
    /// has every event, dedup key and the next seq, and takes the next seq back after.
    pub(super) fn cold<T>(&self, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let syncing = self.syncing.lock().unwrap_or_else(PoisonError::into_inner);
        self.checkpoint_holding(&syncing)?;
        self.with_hot(|hot| {
            let out = f()?;
            hot.next_seq = self.read(|txn| Ok(txn.open_table(META)?.get(NEXT_SEQ)?.map_or(1, |g| g.value())))?;
            Ok(out)
        })
    }

    /// The expiry the file holds for each of `keys` it has, in one read.
    pub(super) fn dedup_in_file(&self, keys: &[[u8; 32]]) -> Result<HashMap<[u8; 32], u64>, StoreError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        self.read(|txn| {
            let dedup = txn.open_table(DEDUP)?;
            let mut found = HashMap::new();
            for key in keys {
                if let Some(expiry) = dedup.get(key)? {
                    found.insert(*key, expiry.value());
                }
            }
            Ok(found)
        })
    }

    /// Writes `batch` to the journal and hands back what syncs it: the hot path of every
    /// accepted webhook. The sync runs without the journal (deliveries are noted meanwhile) and
    /// may overlap the writing of the next group; checkpoints wait for it.
    pub(super) fn append_hot(&self, batch: &[NewEvent]) -> Result<WrittenAppend, StoreError> {
        let syncing = self.syncing.lock().unwrap_or_else(PoisonError::into_inner);
        let (broken, due) = self.with_hot(|hot| {
            let due = !hot.journal.is_empty()
                && hot.journal.len() >= self.fold_at
                && hot.fold_failed.is_none_or(|t| t.elapsed() >= FOLD_RETRY);
            Ok((hot.broken, due))
        })?;
        if broken {
            self.checkpoint_holding(&syncing)?;
        } else if due {
            // What is already acknowledged is durable in the journal: a failure is only logged.
            if let Err(e) = self.set_aside(&syncing) {
                tracing::warn!(error = %e, "could not fold the store journal into the store file; will try again");
            }
        }
        // Dedup keys the journals have not seen are looked up in the file, in one read.
        // The set-aside layer is kept: if it is folded in before the batch is written, the keys
        // it answered for were not looked up in the file, and it still answers for them.
        let (unknown, aside) = self.with_hot(|hot| {
            let unknown =
                batch.iter().filter(|ev| !hot.duplicate(ev)).filter_map(|ev| ev.dedup_key).collect::<Vec<_>>();
            Ok((unknown, hot.folding.clone()))
        })?;
        let in_file = self.dedup_in_file(&unknown)?;
        let (out, written) = self.with_hot(|hot| hot.write_batch(batch, &in_file, aside.as_deref()))?;
        let Some(written) = written else { return Ok((out, None)) };
        self.in_flight.add();
        let pending = PendingSync { written, hot: self.hot.clone(), in_flight: self.in_flight.clone(), settled: false };
        Ok((out, Some(Box::new(pending))))
    }

    /// A checkpoint that does not stall appends: the journal (if it holds anything) is set
    /// aside, then folded in on the calling thread.
    pub(super) fn fold_aside(&self) -> Result<(), StoreError> {
        {
            let syncing = self.syncing.lock().unwrap_or_else(PoisonError::into_inner);
            let idle = self.with_hot(|hot| Ok(hot.journal.is_empty() && hot.unfolded.is_empty()))?;
            if !idle {
                self.set_aside(&syncing)?;
            }
        }
        self.finish_folding()
    }

    /// Starts a checkpoint without stalling appends: the journal is set aside and a new one
    /// takes over; the maintenance thread folds the old one in (or the next checkpoint, if
    /// none runs). A fold still in progress is finished first.
    fn set_aside(&self, _syncing: &MutexGuard<()>) -> Result<(), StoreError> {
        // Only synced records are set aside: a refused one must not reach the file.
        self.in_flight.wait_none();
        if let Err(e) = self.finish_folding() {
            // Not tried again by every append while the disk is full: see FOLD_RETRY.
            self.with_hot(|hot| {
                hot.fold_failed = Some(Instant::now());
                Ok(())
            })?;
            return Err(e);
        }
        let dir = self.dir().to_path_buf();
        let folding_path = dir.join(FOLDING_NAME);
        self.with_hot(|hot| {
            let failed = |hot: &mut Hot, e: std::io::Error| {
                hot.fold_failed = Some(Instant::now());
                StoreError::Write(format!("cannot set the store journal aside: {e}"))
            };
            if let Err(e) = std::fs::rename(hot.journal.path(), &folding_path) {
                return Err(failed(hot, e));
            }
            let (generation, id) = (hot.journal.generation() + 1, hot.journal.store_id());
            let next = match Journal::create(&dir, generation, id, self.disk.clone()) {
                Ok(next) => next,
                Err(e) => {
                    let _ = std::fs::rename(&folding_path, hot.journal.path());
                    return Err(failed(hot, e));
                }
            };
            let mut old = std::mem::replace(&mut hot.journal, next);
            old.moved_to(&folding_path);
            let unfolded = std::mem::take(&mut hot.unfolded);
            hot.folding = Some(Arc::new(Folding { unfolded, journal: old }));
            hot.fold_failed = None;
            Ok(())
        })?;
        self.folds.notify_one();
        Ok(())
    }

    /// Folds the set-aside journal into the file, if there is one: on the maintenance thread,
    /// or in the way of the next checkpoint. The set-aside layer stays (and is tried again) if
    /// this fails.
    pub(super) fn finish_folding(&self) -> Result<(), StoreError> {
        let _one = self.folding_lock.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((folding, next_seq)) = self.with_hot(|hot| Ok(hot.folding.clone().map(|f| (f, hot.next_seq))))? else {
            return Ok(());
        };
        self.fold_layer(&folding, next_seq)?;
        self.with_hot(|hot| {
            hot.folding = None;
            Ok(())
        })?;
        Journal::recycle(&self.dir().join(FOLDING_NAME), self.dir());
        Ok(())
    }

    /// Waits up to `wait` for a set-aside journal and folds it in (see
    /// [`QueueStore::maintain`](super::super::QueueStore::maintain)).
    pub(super) fn maintain_for(&self, wait: Duration) {
        {
            let guard = self.hot.lock().unwrap_or_else(PoisonError::into_inner);
            let pending = |g: &Option<Hot>| g.as_ref().is_some_and(|h| h.folding.is_some());
            if !pending(&guard) {
                let (guard, _) = self.folds.wait_timeout(guard, wait).unwrap_or_else(PoisonError::into_inner);
                if !pending(&guard) {
                    return;
                }
            }
        }
        if let Err(e) = self.finish_folding() {
            tracing::warn!(error = %e, "could not fold the store journal into the store file; will try again");
            std::thread::sleep(FOLD_RETRY);
        }
    }

    /// Writes one layer into the file in one synced commit: its waiting events, deliveries,
    /// attempt counts, dedup keys, the next seq, and the generation of the journal after it.
    pub(super) fn fold_layer(&self, folding: &Folding, next_seq: u64) -> Result<(), StoreError> {
        self.fold_into_file(&folding.unfolded, &folding.journal, next_seq, folding.journal.generation() + 1)
    }

    /// A synchronous checkpoint of the current journal (no layer set aside): folds it into
    /// the file, then starts its next generation, empty.
    fn fold_now(&self, hot: &mut Hot) -> Result<(), StoreError> {
        debug_assert!(hot.folding.is_none());
        if hot.unfolded.is_empty() && hot.journal.is_empty() && !hot.broken {
            return Ok(());
        }
        let generation = hot.journal.generation() + 1;
        if let Err(e) = self.fold_into_file(&hot.unfolded, &hot.journal, hot.next_seq, generation) {
            hot.fold_failed = Some(Instant::now());
            // A commit that failed may still have reached the file (a sync that reports an error
            // after the pages were written): the file would then expect the next generation, and
            // a start would drop this journal as folded in, with whatever was appended to it
            // since. So nothing more is appended to it: `broken` has the next append fold again
            // (the same writes, so harmless if the first landed) and start the next journal.
            hot.broken = true;
            return Err(e);
        }
        hot.unfolded = Unfolded::default();
        hot.fold_failed = None;
        // Everything is in the file now: the old journal may go even if its successor cannot
        // be made yet; until it is, `broken` has the next append try again first.
        hot.broken = true;
        hot.journal = Journal::create(self.dir(), generation, hot.journal.store_id(), self.disk.clone())
            .map_err(|e| StoreError::Write(format!("cannot start the store journal: {e}")))?;
        hot.broken = false;
        Ok(())
    }

    fn fold_into_file(
        &self,
        unfolded: &Unfolded,
        journal: &Journal,
        next_seq: u64,
        generation: u64,
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        let mut events = Vec::with_capacity(unfolded.stored.len());
        for (&seq, held) in &unfolded.stored {
            events.push((seq, held.attempts, read_event(journal, seq, *held)?));
        }
        // In key order: each leaf of the dedup table is then written once, in one pass.
        let mut keys: Vec<_> = unfolded.dedup.iter().collect();
        keys.sort_unstable();
        self.write(Commit::Synced, |txn| {
            let mut table = txn.open_table(EVENTS)?;
            let mut waiting = txn.open_table(WAITING)?;
            let dead = txn.open_table(DEAD)?;
            for (seq, attempts, ev) in &events {
                // Killed while in the journal, and the crash lost the journal's note of it.
                if dead.get(*seq)?.is_some() {
                    continue;
                }
                insert_event(&mut table, *seq, &[], ev)?;
                waiting.insert(*seq, encode(&EventMeta::of(*seq, *attempts, ev))?.as_slice())?;
            }
            for &seq in &unfolded.delivered {
                table.remove(seq)?;
                waiting.remove(seq)?;
            }
            for (&seq, &attempts) in &unfolded.attempts {
                set_attempts(&mut waiting, seq, attempts)?;
            }
            let mut dedup = txn.open_table(DEDUP)?;
            for (key, &expiry) in keys {
                // The file may hold a later expiry of its own (a dead letter stored while the
                // journal's key had expired): the later one stays.
                let later = dedup.insert(key, expiry)?.map(|g| g.value()).filter(|&kept| kept > expiry);
                if let Some(kept) = later {
                    dedup.insert(key, kept)?;
                }
            }
            let mut meta = txn.open_table(META)?;
            raise_next_seq(&mut meta, next_seq)?;
            meta.insert(JOURNAL_GENERATION, generation)?;
            Ok(())
        })?;
        tracing::debug!(
            events = events.len(),
            delivered = unfolded.delivered.len(),
            dedup_keys = unfolded.dedup.len(),
            journal_bytes = journal.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "store journal folded into the store file"
        );
        Ok(())
    }
}
