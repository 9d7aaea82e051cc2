//! [`GroupCommit`]: shares one synced commit (one fsync) among every append that arrives while
//! the previous one is being written, so throughput grows with concurrency instead of being
//! capped at one request per fsync.
//!
//! Owns the writer thread (a plain `std::thread`: the store blocks on disk I/O and must not
//! hold a tokio worker), the sync thread that makes each written group durable, runs the hook
//! and answers while the writer writes the next group ([`QueueStore::append_unsynced`]), a
//! thread for the store's background work ([`QueueStore::maintain`]: the embedded store folds
//! its journal in there), and the grouping policy: take everything waiting, up to
//! [`MAX_GROUP_EVENTS`] events or [`MAX_GROUP_BYTES`], in arrival order.
//!
//! Must never: answer a submitter before the group's `append` has returned, answer one with
//! another's results, reorder submissions (seq order is acceptance order, which per-
//! conversation FIFO relies on), or block the async runtime.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Appended, NewEvent, QueueStore, StoreError, Unsynced};

/// Bounds on one group, so one commit (and the latency of everyone in it) stays bounded.
pub const MAX_GROUP_EVENTS: usize = 1024;
pub const MAX_GROUP_BYTES: usize = 8 << 20;
/// Submissions that may wait for the writer before `append` itself waits (backpressure).
const QUEUE: usize = 4096;

type Reply = oneshot::Sender<Result<Vec<Appended>, StoreError>>;

struct Job {
    batch: Vec<NewEvent>,
    /// A dead letter the batch replaces ([`QueueStore::append_replacing_dead`]): such a job is
    /// committed alone, in its place in the submission order.
    replaces_dead: Option<u64>,
    reply: Reply,
}

pub struct GroupCommit {
    /// `None` once closed: new appends get [`StoreError::Closed`].
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Option<JoinHandle<()>>,
    /// Runs the store's background work ([`QueueStore::maintain`]) until `stop`.
    maintainer: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

/// How long the maintenance thread waits for work before it looks at `stop` again: bounds how
/// long dropping a [`GroupCommit`] waits for it.
const MAINTAIN_WAIT: Duration = Duration::from_millis(50);

/// Runs on the writer thread after each successful commit, with the group's events in commit
/// (sequence) order and their results, before any submitter hears back. Whatever must follow
/// an append in sequence order, and must happen even if a submitter has gone away, goes here.
pub type OnCommit = Box<dyn Fn(Vec<NewEvent>, &[Appended]) + Send>;

impl GroupCommit {
    pub fn new(store: Arc<dyn QueueStore>) -> GroupCommit {
        Self::with_hook(store, Box::new(|_, _| {}))
    }

    /// Like [`GroupCommit::new`], calling `on_commit` after every successful commit.
    pub fn with_hook(store: Arc<dyn QueueStore>, on_commit: OnCommit) -> GroupCommit {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let (kept, halt) = (store.clone(), stop.clone());
        let maintainer = std::thread::Builder::new()
            .name("store-maintain".into())
            .spawn(move || while !halt.load(Ordering::Acquire) && kept.maintain(MAINTAIN_WAIT) {})
            .expect("spawn the store maintenance thread");
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(&*store, rx, on_commit))
            .expect("spawn the store writer thread");
        GroupCommit { tx: Mutex::new(Some(tx)), writer: Some(writer), maintainer: Some(maintainer), stop }
    }

    /// Stores `batch` atomically and synced (together with whatever else is waiting), returning
    /// one result per event, in order.
    pub async fn append(&self, batch: Vec<NewEvent>) -> Result<Vec<Appended>, StoreError> {
        self.submit(batch, None).await
    }

    /// Stores `batch` and deletes dead letter `dead_seq` in one synced transaction, in order
    /// with the other appends; an empty answer means that dead letter is gone and nothing was
    /// written (see [`QueueStore::append_replacing_dead`]).
    pub async fn append_replacing_dead(
        &self,
        batch: Vec<NewEvent>,
        dead_seq: u64,
    ) -> Result<Vec<Appended>, StoreError> {
        self.submit(batch, Some(dead_seq)).await
    }

    async fn submit(&self, batch: Vec<NewEvent>, replaces_dead: Option<u64>) -> Result<Vec<Appended>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let tx = self.sender().ok_or(StoreError::Closed)?;
        let (reply, answer) = oneshot::channel();
        tx.send(Job { batch, replaces_dead, reply }).await.map_err(|_| StoreError::Closed)?;
        drop(tx); // holds no reference to the channel while waiting: close() can end the writer
        // The writer dropping the reply unanswered means it died (a panic in the store).
        answer.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Stops accepting appends; those already submitted are still written and answered.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(PoisonError::into_inner).take();
    }

    fn sender(&self) -> Option<mpsc::Sender<Job>> {
        self.tx.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Drop for GroupCommit {
    /// Closes and waits for the writer to finish what was already submitted.
    fn drop(&mut self) {
        self.close();
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!("the store writer thread panicked");
            }
        }
        self.stop.store(true, Ordering::Release);
        if let Some(maintainer) = self.maintainer.take() {
            if maintainer.join().is_err() {
                tracing::error!("the store maintenance thread panicked");
            }
        }
    }
}

/// A group written by the writer thread, for the sync thread to make durable and answer.
struct Sealed {
    events: Vec<NewEvent>,
    /// The store's answer so far; its sync still to come if `unsynced` is set.
    results: Result<Vec<Appended>, StoreError>,
    unsynced: Option<Box<dyn Unsynced>>,
    /// Whether the commit hook runs for it (a replay that found its dead letter gone does not).
    hook: bool,
    replies: Vec<(usize, Reply)>,
}

/// Writes groups in submission order and hands each to the sync thread, which syncs them,
/// runs the hook and answers, in the same order. The next group is written while the previous
/// one syncs: a fixed fsync cost no longer adds to the writing of every group.
fn write_loop(store: &dyn QueueStore, mut rx: mpsc::Receiver<Job>, on_commit: OnCommit) {
    // At most one group waits while another syncs: the writer stays a group ahead, no more.
    let (to_sync, sealed) = std::sync::mpsc::sync_channel::<Sealed>(1);
    let syncer = std::thread::Builder::new()
        .name("store-sync".into())
        .spawn(move || {
            for group in sealed {
                answer(group, &on_commit);
            }
        })
        .expect("spawn the store sync thread");
    // A job that did not fit in the previous group opens the next one.
    let mut carried: Option<Job> = None;
    loop {
        let Some(first) = carried.take().or_else(|| rx.blocking_recv()) else {
            break; // closed and drained
        };
        if let Some(dead_seq) = first.replaces_dead {
            let results = match store.append_replacing_dead(&first.batch, dead_seq) {
                Ok(r) if r.is_empty() || r.len() == first.batch.len() => Ok(r),
                Ok(r) => Err(mismatch(r.len(), first.batch.len())),
                Err(e) => Err(e),
            };
            let hook = results.as_ref().is_ok_and(|r| !r.is_empty());
            let replies = vec![(first.batch.len(), first.reply)];
            let group = Sealed { events: first.batch, results, unsynced: None, hook, replies };
            if to_sync.send(group).is_err() {
                break;
            }
            continue;
        }
        let (mut count, mut bytes) = (first.batch.len(), weight(&first.batch));
        let mut jobs = vec![first];
        while let Ok(job) = rx.try_recv() {
            let w = weight(&job.batch);
            if job.replaces_dead.is_some() || count + job.batch.len() > MAX_GROUP_EVENTS || bytes + w > MAX_GROUP_BYTES
            {
                carried = Some(job);
                break;
            }
            (count, bytes) = (count + job.batch.len(), bytes + w);
            jobs.push(job);
        }
        let mut events = Vec::with_capacity(count);
        let mut replies = Vec::with_capacity(jobs.len());
        for job in jobs {
            replies.push((job.batch.len(), job.reply));
            events.extend(job.batch); // moves: bodies are refcounted `Bytes`, not copied
        }
        let (results, unsynced) = match store.append_unsynced(&events) {
            Ok((r, unsynced)) if r.len() == events.len() => (Ok(r), unsynced),
            Ok((r, unsynced)) => {
                // Not answered as stored, but whatever was written is synced (or refused).
                if let Some(u) = unsynced {
                    let _ = u.sync();
                }
                (Err(mismatch(r.len(), events.len())), None)
            }
            Err(e) => (Err(e), None),
        };
        let group = Sealed { events, results, unsynced, hook: true, replies };
        if to_sync.send(group).is_err() {
            break;
        }
    }
    drop(to_sync);
    if syncer.join().is_err() {
        tracing::error!("the store sync thread panicked");
    }
}

/// Syncs a group, runs the hook if it was stored, and answers its submitters.
fn answer(group: Sealed, on_commit: &OnCommit) {
    let Sealed { events, results, unsynced, hook, replies } = group;
    let results = match (results, unsynced) {
        (Ok(r), Some(u)) => u.sync().map(|()| r),
        (results, _) => results,
    };
    let mut results = match results {
        Ok(r) => {
            if hook {
                on_commit(events, &r);
            }
            Ok(r.into_iter())
        }
        Err(e) => Err(e),
    };
    for (n, reply) in replies {
        // A submitter that stopped waiting (request cancelled) is no reason to stop.
        let _ = reply.send(match &mut results {
            Ok(it) => Ok(it.by_ref().take(n).collect()),
            Err(e) => Err(e.clone()),
        });
    }
}

fn mismatch(results: usize, events: usize) -> StoreError {
    StoreError::Write(format!("store answered {results} results for {events} events"))
}

/// Roughly what an event costs to write.
fn weight(batch: &[NewEvent]) -> usize {
    batch.iter().map(|e| e.body.len() + e.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()).sum()
}

#[cfg(test)]
mod tests {
    use super::super::tests::ev;
    use super::super::{EmbeddedStore, FaultyStore};
    use super::*;

    fn setup() -> (tempfile::TempDir, Arc<FaultyStore>, Arc<GroupCommit>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FaultyStore::new(Arc::new(EmbeddedStore::open(dir.path()).unwrap())));
        let gc = Arc::new(GroupCommit::new(store.clone()));
        (dir, store, gc)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_share_commits() {
        let (_dir, store, gc) = setup();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let gc = gc.clone();
                tokio::spawn(
                    async move { gc.append(vec![ev(&format!("d{i}"), &format!("c{i}"), b"x")]).await.unwrap() },
                )
            })
            .collect();
        let mut seqs = Vec::new();
        for t in tasks {
            match t.await.unwrap()[..] {
                [Appended::Stored(seq)] => seqs.push(seq),
                ref other => panic!("unexpected {other:?}"),
            }
        }
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), 200);
        let calls = store.append_calls();
        assert!(calls < 50, "{calls} commits for 200 appends");
        assert_eq!(store.pending().unwrap().len(), 200);
    }

    #[tokio::test]
    async fn each_submitter_gets_its_own_results_in_order() {
        let (_dir, _store, gc) = setup();
        let mut a = vec![ev("a1", "c", b"1"), ev("a2", "c", b"2")];
        a[1].dedup_key = Some([1; 32]);
        a[1].dedup_expires_unix_ms = u64::MAX;
        let (ra, rb) = tokio::join!(gc.append(a.clone()), gc.append(vec![a[1].clone()]));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra.len(), 2);
        assert_eq!(rb.len(), 1);
        // Exactly one of the two copies of the deduplicated event was stored.
        let stored = [ra[1], rb[0]].iter().filter(|r| matches!(r, Appended::Stored(_))).count();
        assert_eq!(stored, 1);
    }

    #[tokio::test]
    async fn a_dead_letter_replacement_commits_alone_in_submission_order() {
        let (_dir, store, gc) = setup();
        let mut unowned = ev("u", "c", b"");
        unowned.account = String::new();
        let info = crate::store::DeadInfo {
            reason: super::super::DeadReason::NoAccount,
            status: None,
            answer: Vec::new(),
            attempts: 0,
            died_unix_ms: 0,
        };
        assert_eq!(store.append_dead(&unowned, info).unwrap(), Appended::Stored(1));
        let calls = store.append_calls();
        let (a, r, b, again) = tokio::join!(
            gc.append(vec![ev("a", "c", b"")]),
            gc.append_replacing_dead(vec![ev("r", "c", b"")], 1),
            gc.append(vec![ev("b", "c", b"")]),
            gc.append_replacing_dead(vec![ev("r2", "c", b"")], 1),
        );
        assert_eq!(a.unwrap(), [Appended::Stored(2)]);
        assert_eq!(r.unwrap(), [Appended::Stored(3)]);
        assert_eq!(b.unwrap(), [Appended::Stored(4)]);
        assert!(again.unwrap().is_empty(), "the dead letter was already replaced");
        assert!(store.dead_letters().unwrap().is_empty());
        let ids: Vec<String> = store.pending().unwrap().into_iter().map(|m| m.delivery_id).collect();
        assert_eq!(ids, ["a", "r", "b"]);
        // The replacement is not counted as a plain append.
        assert_eq!(store.append_calls() - calls, 2);

        // A failing store fails the replacement and leaves the dead letter where it was.
        let info = crate::store::DeadInfo {
            reason: super::super::DeadReason::NoAccount,
            status: None,
            answer: Vec::new(),
            attempts: 0,
            died_unix_ms: 0,
        };
        assert_eq!(store.append_dead(&unowned, info).unwrap(), Appended::Stored(5));
        store.set_fail_writes(true);
        assert!(matches!(gc.append_replacing_dead(vec![ev("r3", "c", b"")], 5).await, Err(StoreError::Write(_))));
        store.set_fail_writes(false);
        assert_eq!(store.dead_letters().unwrap().len(), 1);
        assert_eq!(gc.append_replacing_dead(vec![ev("r3", "c", b"")], 5).await.unwrap(), [Appended::Stored(6)]);
    }

    #[tokio::test]
    async fn a_failed_group_fails_every_submitter_then_recovers() {
        let (_dir, store, gc) = setup();
        store.set_fail_writes(true);
        let (a, b) = tokio::join!(gc.append(vec![ev("a", "c", b"")]), gc.append(vec![ev("b", "c", b"")]));
        assert!(matches!(a, Err(StoreError::Write(_))));
        assert!(matches!(b, Err(StoreError::Write(_))));
        store.set_fail_writes(false);
        let r = gc.append(vec![ev("c", "c", b"")]).await.unwrap();
        assert!(matches!(r[..], [Appended::Stored(_)]));
        assert_eq!(store.pending().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn groups_are_bounded() {
        let (_dir, store, gc) = setup();
        let batch: Vec<_> = (0..MAX_GROUP_EVENTS + 10).map(|i| ev(&i.to_string(), "c", b"")).collect();
        let (a, b) = tokio::join!(gc.append(batch.clone()), gc.append(batch));
        assert_eq!(a.unwrap().len() + b.unwrap().len(), 2 * (MAX_GROUP_EVENTS + 10));
        // One submission larger than the bound is still committed whole, never split.
        assert_eq!(store.append_calls(), 2);
    }

    #[tokio::test]
    async fn closed_refuses_new_appends() {
        let (_dir, _store, gc) = setup();
        gc.append(vec![ev("a", "c", b"")]).await.unwrap();
        gc.close();
        assert!(matches!(gc.append(vec![ev("b", "c", b"")]).await, Err(StoreError::Closed)));
    }
}
