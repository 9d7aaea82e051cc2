//! [`FaultyStore`]: a store wrapper for tests that makes every write fail on demand (a failing
//! disk: tests run as root, so a read-only directory cannot simulate one), makes appends and
//! prunes slow on demand (a slow fsync, a hanging disk), and counts the underlying `append` and
//! `progress` calls (how many commits a [`super::GroupCommit`] made, how many writes the
//! schedulers made). `append_replacing_dead` (a rare operator replay) can
//! fail like any write but is neither slowed nor counted.
//!
//! [`DiskFault`] sits lower, between redb and the file: a disk that fills up on demand, so a
//! durable commit fails after cheap (unsynced) ones that redb kept in memory, and which it
//! forgets when the file is re-opened.
//!
//! Must never: alter what passes through while no fault is set, or be built into the shipped
//! binary (it exists under the `test-support` feature, which the tests and benchmarks enable).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::{Appended, DeadInfo, DeadLetter, Event, EventMeta, NewEvent, QueueStore, StoreError, WindowStore};

/// A disk that is full on demand (every write, resize and sync fails with `ENOSPC`), for an
/// [`super::EmbeddedStore`] opened with `open_on_faulty_disk`. redb's cheap commits stay in its
/// memory and go through meanwhile; its durable ones fail.
#[derive(Debug, Default)]
pub struct DiskFault {
    full: AtomicBool,
    /// redb's syncs report `EIO` after the data did reach the file.
    syncs_fail: AtomicBool,
    refused: AtomicU64,
}

impl DiskFault {
    /// While set, the disk is full.
    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::SeqCst);
    }

    /// While set, each sync of the store file syncs and then reports `EIO`: a failure that
    /// leaves it unknown whether the commit is on disk (here, it is).
    pub fn set_syncs_fail(&self, fail: bool) {
        self.syncs_fail.store(fail, Ordering::SeqCst);
    }

    /// How many writes, resizes and syncs the full disk refused.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    pub(super) fn check(&self) -> Result<(), std::io::Error> {
        if self.full.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
        Ok(())
    }

    pub(super) fn backend(self: &Arc<Self>, file: redb::backends::FileBackend) -> FaultyDisk {
        FaultyDisk { file, fault: self.clone() }
    }
}

/// redb's file backend with a [`DiskFault`] in front of its syncs.
#[derive(Debug)]
pub struct FaultyDisk {
    file: redb::backends::FileBackend,
    fault: Arc<DiskFault>,
}

impl redb::StorageBackend for FaultyDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.file.len()
    }
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, std::io::Error> {
        self.file.read(offset, len)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.fault.check()?;
        self.file.set_len(len)
    }
    fn sync_data(&self, eventual: bool) -> Result<(), std::io::Error> {
        self.fault.check()?;
        self.file.sync_data(eventual)?;
        if self.fault.syncs_fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(5)); // EIO
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.fault.check()?;
        self.file.write(offset, data)
    }
}

pub struct FaultyStore {
    inner: Arc<dyn QueueStore>,
    window: Arc<dyn WindowStore>,
    fail_writes: AtomicBool,
    append_calls: AtomicU64,
    append_delay_ms: AtomicU64,
    progress_calls: AtomicU64,
    progress_delay_ms: AtomicU64,
    load_delay_ms: AtomicU64,
    loaded: std::sync::Mutex<Vec<u64>>,
    fail_load_of: AtomicU64,
}

impl FaultyStore {
    pub fn new<S: QueueStore + WindowStore>(inner: Arc<S>) -> FaultyStore {
        FaultyStore {
            inner: inner.clone(),
            window: inner,
            fail_writes: AtomicBool::new(false),
            append_calls: AtomicU64::new(0),
            append_delay_ms: AtomicU64::new(0),
            progress_calls: AtomicU64::new(0),
            progress_delay_ms: AtomicU64::new(0),
            load_delay_ms: AtomicU64::new(0),
            loaded: Default::default(),
            fail_load_of: AtomicU64::new(0),
        }
    }

    /// While set, every write method fails with `Write("injected fault")` and `writable()` is
    /// false. Reads keep working, as they would on a disk that refuses writes.
    pub fn set_fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::SeqCst);
    }

    /// Makes every `append` take at least this long (a slow disk).
    pub fn set_append_delay(&self, delay: Duration) {
        self.append_delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Makes every `progress` (pruning delivered events) take at least this long (a disk that
    /// hangs).
    pub fn set_progress_delay(&self, delay: Duration) {
        self.progress_delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Makes every `load` (reading an event back for its attempt) take at least this long.
    pub fn set_load_delay(&self, delay: Duration) {
        self.load_delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Makes every `load` of event `seq` fail with `Read("injected fault")` (0: none).
    pub fn set_fail_load_of(&self, seq: u64) {
        self.fail_load_of.store(seq, Ordering::SeqCst);
    }

    /// The seqs `load` was asked for so far, in order.
    pub fn loaded(&self) -> Vec<u64> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many times `progress` was called (failed calls included).
    pub fn progress_calls(&self) -> u64 {
        self.progress_calls.load(Ordering::SeqCst)
    }

    /// How many times `append` was called (failed calls included).
    pub fn append_calls(&self) -> u64 {
        self.append_calls.load(Ordering::SeqCst)
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Write("injected fault".into()));
        }
        Ok(())
    }
}

impl QueueStore for FaultyStore {
    fn append(&self, batch: &[NewEvent]) -> Result<Vec<Appended>, StoreError> {
        self.append_calls.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        let delay = self.append_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        self.inner.append(batch)
    }
    fn append_replacing_dead(&self, batch: &[NewEvent], dead_seq: u64) -> Result<Vec<Appended>, StoreError> {
        self.check()?;
        self.inner.append_replacing_dead(batch, dead_seq)
    }
    fn append_dead(&self, ev: &NewEvent, info: DeadInfo) -> Result<Appended, StoreError> {
        self.check()?;
        self.inner.append_dead(ev, info)
    }
    fn pending(&self) -> Result<Vec<EventMeta>, StoreError> {
        self.inner.pending()
    }
    fn pending_after(&self, after: u64) -> Result<(u64, Vec<EventMeta>), StoreError> {
        self.inner.pending_after(after)
    }
    fn leases(&self) -> Arc<dyn super::Leases> {
        self.inner.leases()
    }
    fn load(&self, seq: u64) -> Result<Option<Event>, StoreError> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner()).push(seq);
        if seq != 0 && self.fail_load_of.load(Ordering::SeqCst) == seq {
            return Err(StoreError::Read("injected fault".into()));
        }
        let delay = self.load_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        self.inner.load(seq)
    }
    fn progress(&self, delivered: &[u64], attempts: &[(u64, u32)]) -> Result<(), StoreError> {
        self.progress_calls.fetch_add(1, Ordering::SeqCst);
        let delay = self.progress_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        self.check()?;
        self.inner.progress(delivered, attempts)
    }
    fn kill(&self, seq: u64, info: DeadInfo) -> Result<(), StoreError> {
        self.check()?;
        self.inner.kill(seq, info)
    }
    fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.inner.dead_letters()
    }
    fn dead_seqs_of(&self, delivery_id: &str) -> Result<Vec<u64>, StoreError> {
        self.inner.dead_seqs_of(delivery_id)
    }
    fn dead_letter(&self, seq: u64) -> Result<Option<DeadLetter>, StoreError> {
        self.inner.dead_letter(seq)
    }
    fn revive(&self, seq: u64, now_unix_ms: u64) -> Result<Option<EventMeta>, StoreError> {
        self.check()?;
        self.inner.revive(seq, now_unix_ms)
    }
    fn purge_dead(&self, seq: Option<u64>) -> Result<usize, StoreError> {
        self.check()?;
        self.inner.purge_dead(seq)
    }
    fn prune_dedup(&self, now_unix_ms: u64) -> Result<usize, StoreError> {
        self.check()?;
        self.inner.prune_dedup(now_unix_ms)
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn size_bytes(&self) -> Option<u64> {
        self.inner.size_bytes()
    }
    fn backup(&self) -> Result<super::Backup, StoreError> {
        self.inner.backup()
    }
    fn maintain(&self, wait: Duration) -> bool {
        self.inner.maintain(wait)
    }
    fn writable(&self) -> bool {
        !self.fail_writes.load(Ordering::SeqCst) && self.inner.writable()
    }
    fn sync(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.sync()
    }
}

impl WindowStore for FaultyStore {
    fn window_touch(&self, entries: &[(String, u64)]) -> Result<(), StoreError> {
        self.check()?;
        self.window.window_touch(entries)
    }
    fn window_last(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.window.window_last(key)
    }
    fn prune_window(&self, before_unix_ms: u64) -> Result<usize, StoreError> {
        self.check()?;
        self.window.prune_window(before_unix_ms)
    }
    fn shared(&self) -> bool {
        self.window.shared()
    }
}

#[cfg(test)]
mod tests {
    use super::super::EmbeddedStore;
    use super::super::tests::ev;
    use super::*;

    #[test]
    fn injected_faults_fail_every_write_and_nothing_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = FaultyStore::new(Arc::new(EmbeddedStore::open(dir.path()).unwrap()));
        let seq = match store.append(&[ev("a", "c", b"")]).unwrap()[..] {
            [Appended::Stored(seq)] => seq,
            ref other => panic!("{other:?}"),
        };
        assert!(store.writable());

        store.set_fail_writes(true);
        assert!(!store.writable());
        let info = DeadInfo {
            reason: super::super::DeadReason::NoAccount,
            status: None,
            answer: vec![],
            attempts: 1,
            died_unix_ms: 0,
        };
        let is_fault = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Write(m)) if m == "injected fault");
        assert!(is_fault(store.append(&[ev("b", "c", b"")]).map(drop)));
        assert!(is_fault(store.append_dead(&ev("b", "c", b""), info.clone()).map(drop)));
        assert!(is_fault(store.progress(&[], &[(seq, 2)])));
        assert!(is_fault(store.progress(&[seq], &[])));
        assert!(is_fault(store.kill(seq, info)));
        assert!(is_fault(store.revive(seq, 0).map(drop)));
        assert!(is_fault(store.purge_dead(None).map(drop)));
        assert!(is_fault(store.prune_dedup(0).map(drop)));
        assert!(is_fault(store.prune_window(0).map(drop)));
        assert!(is_fault(store.window_touch(&[("k".into(), 1)])));
        assert!(is_fault(store.sync()));
        // Reads still work and show nothing changed.
        let pending = store.pending().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].attempts, 0);
        assert!(store.dead_letters().unwrap().is_empty());

        store.set_fail_writes(false);
        assert!(store.writable());
        store.progress(&[seq], &[]).unwrap();
        assert!(store.pending().unwrap().is_empty());
        assert_eq!(store.append_calls(), 2);
    }
}
