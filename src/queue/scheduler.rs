//! One Motion's delivery scheduler: a single task that owns all of that Motion's waiting events
//! (no locks), keeps them per conversation in acceptance order, and runs deliveries: at most
//! one in flight per conversation (that is what keeps order), at most `delivery.concurrency`
//! per Motion. A conversation whose head is failing waits out its backoff alone; the others go on.
//!
//! With several relays on one store, the scheduler attempts only the conversations the store's
//! [`Leases`] grant this relay at that moment; when the grant changes it drops what it no longer
//! holds (an attempt in flight finishes first) and is handed what it gained. Events it was handed
//! twice (from its own commit and from a look at the store) are kept once: it knows every seq it
//! holds, delivered ones included until their removal from the store is written.

use super::DeliveryContext;
use super::retry::{Verdict, backoff, classify};
use crate::deliver::{self, Attempt, AttemptError};
use crate::metrics::{DeadLabels, DeliveryOutcome, MotionLabels, OutcomeLabels};
use crate::store::{DeadInfo, DeadReason, Event, EventMeta, Leases, MAX_ANSWER, NewEvent, QueueStore};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::BodyExt;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A waiting event: its metadata, and its contents while they are still in memory (fresh
/// events; resumed ones are read back from the store when their turn comes).
struct Entry {
    meta: EventMeta,
    cached: Option<Arc<NewEvent>>,
    /// `auto` mode: the webhook's request handler waiting for the first attempt's answer.
    waiter: Option<Waiter>,
    /// Already marked to be read back ahead of its turn (see [`Scheduler::read_ahead`]): each
    /// event is read ahead at most once, whatever came of it (a failed or discarded read is not
    /// tried again; its attempt reads it).
    read_ahead: bool,
}

/// Motion's answer to a first attempt, handed to a request waiting in `auto` mode.
pub struct DirectAnswer {
    pub status: http::StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub type Waiter = tokio::sync::oneshot::Sender<DirectAnswer>;

enum Msg {
    Enqueue(Entry),
    Done {
        conv: Arc<str>,
        outcome: Outcome,
    },
    /// Stop delivering; answer on the channel once delivered events are pruned from the store.
    Stop(std::sync::mpsc::Sender<()>),
    /// The conversations this relay holds changed: drop those it lost, resume those parked.
    LeasesChanged,
    /// Every waiting event with a seq up to this one (of the conversations held) has been
    /// handed over, in this lease epoch: later ones may go.
    Seen {
        seq: u64,
        epoch: u64,
    },
    /// Contents read back ahead of their turn: conversation, seq, and the event (None when it
    /// could not be read: its attempt reads it then, and handles what went wrong).
    Loaded(Vec<(Arc<str>, u64, Option<Arc<NewEvent>>)>),
}

enum Outcome {
    Delivered,
    Retry {
        at_least: Option<Duration>,
        loaded: Option<Arc<NewEvent>>,
        /// What went wrong, for the log line and the board: never a body or a number.
        why: String,
    },
    Dead(DeadInfo),
    /// The event is no longer in the store (purged meanwhile): drop it.
    Gone,
}

#[derive(Default)]
struct Conv {
    queue: VecDeque<Entry>,
    busy: bool,
    waiting: bool,
    /// Ready, but not held by this relay when its turn came: resumed when the leases change.
    parked: bool,
    /// No longer held: dropped once its attempt in flight ends.
    lost: bool,
}

/// What one Motion has waiting: events and their bytes, read on the request path for
/// `max_queued` and `max_queued_bytes` (atomics, no lock).
#[derive(Default)]
pub struct Depth {
    events: AtomicU64,
    bytes: AtomicU64,
}

impl Depth {
    fn add(&self, meta: &EventMeta) {
        self.events.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(meta.bytes, Ordering::Relaxed);
    }

    fn remove(&self, meta: &EventMeta) {
        self.events.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(meta.bytes, Ordering::Relaxed);
    }

    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Whether a Motion is taking its deliveries, for the log, the board and `queue list`: since
/// when it fails, its last errors, and the events waiting out a retry. Touched only when an
/// attempt fails or the first one after failures succeeds, never on the request path.
#[derive(Default)]
pub struct Health {
    state: std::sync::Mutex<HealthState>,
}

#[derive(Default)]
struct HealthState {
    failing_since_unix_ms: Option<u64>,
    last_errors: VecDeque<LastError>,
    retrying: HashMap<String, Retrying>,
    /// Per account: events waiting and the oldest one's acceptance (Unix ms), refreshed by the
    /// scheduler's housekeeping.
    accounts: Vec<(String, u64, u64)>,
}

/// Waiting events beyond which housekeeping stops counting them per account (the board then
/// shows the Motion's totals only): the count walks every waiting event.
const ACCOUNTS_UP_TO: u64 = 100_000;

/// One failed attempt (or dead letter), as the board shows it: no body, no number.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LastError {
    pub delivery_id: String,
    pub reason: String,
    pub at_unix_ms: u64,
}

/// An event waiting out a retry: its last error and when it is tried next.
#[derive(Clone, Debug)]
pub struct Retrying {
    pub error: String,
    pub next_attempt_unix_ms: u64,
    pub attempts: u32,
}

/// Last errors kept per Motion.
const LAST_ERRORS: usize = 5;

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An attempt failed (`next`: when it is retried; None: it became a dead letter). The first
    /// failure after a success is logged at warn, the next ones are not. A refusal (Motion
    /// answered, and said no) is a last error but does not make the Motion failing.
    fn failed(&self, motion: &str, delivery_id: &str, reason: String, now: u64, next: Option<u64>, attempts: u32) {
        self.record(motion, delivery_id, reason, now, next, attempts, true)
    }

    /// A refusal: kept among the last errors only.
    fn refused(&self, motion: &str, delivery_id: &str, reason: String, now: u64, attempts: u32) {
        self.record(motion, delivery_id, reason, now, None, attempts, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        motion: &str,
        delivery_id: &str,
        reason: String,
        now: u64,
        next: Option<u64>,
        attempts: u32,
        failing: bool,
    ) {
        let mut s = self.lock();
        if failing && s.failing_since_unix_ms.is_none() {
            s.failing_since_unix_ms = Some(now);
            tracing::warn!(motion, delivery = delivery_id, "Motion is failing; its deliveries are retried: {reason}");
        }
        if let Some(next_attempt_unix_ms) = next {
            let r = Retrying { error: reason.clone(), next_attempt_unix_ms, attempts };
            s.retrying.insert(delivery_id.to_string(), r);
        }
        if s.last_errors.len() == LAST_ERRORS {
            s.last_errors.pop_front();
        }
        s.last_errors.push_back(LastError { delivery_id: delivery_id.to_string(), reason, at_unix_ms: now });
    }

    /// An attempt went through: a failing Motion has recovered (logged at info, with what waits)
    /// once none of its events is waiting out a retry; one poisoned conversation among good
    /// ones keeps it failing instead of flapping.
    fn delivered(&self, motion: &str, delivery_id: &str, waiting: u64) {
        let mut s = self.lock();
        s.retrying.remove(delivery_id);
        if s.retrying.is_empty() && s.failing_since_unix_ms.take().is_some() {
            tracing::info!(motion, delivery = delivery_id, waiting, "Motion recovered; delivering what waits");
        }
    }

    fn forget(&self, delivery_id: &str) {
        self.lock().retrying.remove(delivery_id);
    }

    /// Since when the Motion fails (None: its last attempt went through).
    pub fn failing_since(&self) -> Option<u64> {
        self.lock().failing_since_unix_ms
    }

    /// The last errors, oldest first.
    pub fn last_errors(&self) -> Vec<LastError> {
        self.lock().last_errors.iter().cloned().collect()
    }

    /// Per account: `(account, events waiting, oldest acceptance in Unix ms)`.
    pub fn accounts(&self) -> Vec<(String, u64, u64)> {
        self.lock().accounts.clone()
    }

    /// The retry state of a waiting event, if its last attempt failed.
    pub fn retrying(&self, delivery_id: &str) -> Option<Retrying> {
        self.lock().retrying.get(delivery_id).cloned()
    }
}

/// The handle the rest of the relay holds.
#[derive(Clone)]
pub struct MotionQueue {
    tx: mpsc::UnboundedSender<Msg>,
    depth: Arc<Depth>,
    health: Arc<Health>,
    /// False once the scheduler has ended by itself; see [`MotionQueue::enqueue`].
    alive: Arc<std::sync::Mutex<bool>>,
}

/// An event a scheduler that had ended did not take, given back whole.
pub struct Refused {
    pub meta: EventMeta,
    pub cached: Option<Arc<NewEvent>>,
    pub waiter: Option<Waiter>,
}

impl MotionQueue {
    /// Starts the scheduler task on `runtime` (the main one: schedulers must outlive any
    /// serving thread, and may be created from threads that have no runtime, such as reload's).
    pub fn spawn(
        runtime: &tokio::runtime::Handle,
        name: String,
        ctx: Arc<DeliveryContext>,
        store: Arc<dyn QueueStore>,
        leases: Arc<dyn Leases>,
        (seen, seen_epoch): (u64, u64),
    ) -> MotionQueue {
        let (tx, rx) = mpsc::unbounded_channel();
        let depth = Arc::new(Depth::default());
        let health = Arc::new(Health::default());
        let alive = Arc::new(std::sync::Mutex::new(true));
        let s = Scheduler {
            alive: alive.clone(),
            ticks: 0,
            name: name.into(),
            ctx,
            store,
            leases,
            known: HashSet::new(),
            seen,
            seen_epoch,
            parked: Vec::new(),
            tx: tx.clone(),
            depth: depth.clone(),
            health: health.clone(),
            convs: HashMap::new(),
            ready: VecDeque::new(),
            timers: BinaryHeap::new(),
            in_flight: 0,
            delivered: Vec::new(),
            attempts: Vec::new(),
            prune_failures: 0,
            prune_after: None,
            cached_bytes: 0,
            to_read: Vec::new(),
            read_in_flight: false,
        };
        runtime.spawn(s.run(rx));
        MotionQueue { tx, depth, health, alive }
    }

    pub fn depth(&self) -> &Depth {
        &self.depth
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// False once the scheduler ended (stopped, or its Motion left the config and it held
    /// nothing): a new one takes its place on the next event.
    pub fn running(&self) -> bool {
        *self.alive.lock().unwrap_or_else(|e| e.into_inner()) && !self.tx.is_closed()
    }

    /// Hands an event to the scheduler; `Err` gives it back when the scheduler has ended (the
    /// caller starts a new one). Under the `alive` lock, so an event is never sent to a
    /// scheduler that is ending: it ends only under that lock, with nothing left to receive.
    pub fn enqueue(
        &self,
        meta: EventMeta,
        cached: Option<Arc<NewEvent>>,
        waiter: Option<Waiter>,
    ) -> Result<(), Box<Refused>> {
        let alive = self.alive.lock().unwrap_or_else(|e| e.into_inner());
        if !*alive {
            return Err(Box::new(Refused { meta, cached, waiter }));
        }
        self.depth.add(&meta);
        let _ = self.tx.send(Msg::Enqueue(Entry { meta, cached, waiter, read_ahead: false }));
        Ok(())
    }

    /// Tells the scheduler that the conversations this relay holds changed.
    pub fn leases_changed(&self) {
        let _ = self.tx.send(Msg::LeasesChanged);
    }

    /// Tells the scheduler that every waiting event up to `seq` has been handed to it.
    pub fn seen(&self, seq: u64, epoch: u64) {
        let _ = self.tx.send(Msg::Seen { seq, epoch });
    }

    /// Asks the scheduler to stop; the receiver hears once it has pruned what it delivered.
    pub fn stop(&self) -> std::sync::mpsc::Receiver<()> {
        let (done, heard) = std::sync::mpsc::channel();
        let _ = self.tx.send(Msg::Stop(done));
        heard
    }
}

struct Scheduler {
    alive: Arc<std::sync::Mutex<bool>>,
    /// Housekeeping ticks so far.
    ticks: u32,
    name: Arc<str>,
    ctx: Arc<DeliveryContext>,
    store: Arc<dyn QueueStore>,
    leases: Arc<dyn Leases>,
    /// Events up to this seq have all been handed over (u64::MAX when no other relay shares
    /// the store). One with a higher seq waits: an event another relay stored just before it,
    /// for the same conversation, may not have been handed over yet.
    seen: u64,
    /// The lease epoch of the last look at the store: a conversation granted in a later epoch
    /// (just gained) waits for a look in its epoch.
    seen_epoch: u64,
    /// Conversations that could not go when their turn came (not held, or not yet `seen`).
    parked: Vec<Arc<str>>,
    /// Every seq this scheduler holds: waiting, in flight, or delivered and not yet removed
    /// from the store (an event handed over again meanwhile must not be sent again).
    known: HashSet<u64>,
    tx: mpsc::UnboundedSender<Msg>,
    depth: Arc<Depth>,
    health: Arc<Health>,
    convs: HashMap<Arc<str>, Conv>,
    /// Conversations whose head may be attempted now (each at most once).
    ready: VecDeque<Arc<str>>,
    /// Conversations waiting out a backoff, by when.
    timers: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    in_flight: usize,
    /// Delivered seqs not yet removed from the store, and attempt counts not yet recorded
    /// (written together, in batches, off the group commit's path).
    delivered: Vec<u64>,
    attempts: Vec<(u64, u32)>,
    /// Failed prunes in a row, and when the next may be tried (see [`prune_backoff`]).
    prune_failures: u32,
    prune_after: Option<Instant>,
    /// What the bodies kept in memory for waiting events weigh (see [`CACHE_BUDGET`]).
    cached_bytes: usize,
    /// Waiting events to read back from the store before their turn, and whether a read is
    /// under way (one at a time).
    to_read: Vec<(Arc<str>, u64)>,
    read_in_flight: bool,
}

/// How long to wait before pruning again after `failures` failed prunes in a row: from 200 ms,
/// doubling, up to 10 s (a full disk is usually freed within minutes; the retry must not flood
/// the disk or the log meanwhile).
fn prune_backoff(failures: u32) -> Duration {
    Duration::from_millis(200).saturating_mul(1 << failures.min(6)).min(Duration::from_secs(10))
}

/// Bodies kept in memory per Motion, in arrival order: any beyond this budget are read back from
/// the store when their turn comes. A Motion down for hours must not hold its whole backlog in
/// memory; one that keeps up (or a short burst) is delivered without reading anything back.
///
/// The events next in line are read back ahead of their turn, in batches, while the attempts
/// before them are in flight (see [`Scheduler::read_ahead`]). Reading each event back only at
/// its turn put a trip to the store (and a blocking thread's wake-up) between every two attempts
/// of a conversation. Events read ahead count against the budget, which they may pass by at most
/// [`READ_AHEAD_ROOM`] (past the budget is where they are needed).
const CACHE_BUDGET: usize = 16 << 20;

/// How far events read ahead may take the bodies in memory past [`CACHE_BUDGET`]. Bounded even
/// while Motion is down: the events read ahead of conversations waiting out a backoff keep their
/// bodies until they go, and once this is full, nothing more is read ahead.
const READ_AHEAD_ROOM: usize = 4 << 20;

/// Conversations waiting for a delivery slot whose next events are read ahead: enough for the
/// slots that free up while one read is under way.
const READ_AHEAD_READY: usize = 8;

/// Events read back from the store in one blocking call at most.
const READ_AHEAD_BATCH: usize = 256;

/// `ev` if [`CACHE_BUDGET`] has room for it (then counted in `used`), else `None`: the event is
/// read back from the store when its turn comes.
fn keep_cached(used: &mut usize, ev: Option<Arc<NewEvent>>) -> Option<Arc<NewEvent>> {
    keep_within(used, CACHE_BUDGET, ev)
}

/// `ev` if the bodies in memory (`used`) stay within `limit` with it (then counted), else `None`.
fn keep_within(used: &mut usize, limit: usize, ev: Option<Arc<NewEvent>>) -> Option<Arc<NewEvent>> {
    let ev = ev?;
    let w = ev.weight();
    (*used + w <= limit).then(|| {
        *used += w;
        ev
    })
}

/// Marks `e` (of conversation `key`) to be read back ahead of its turn, unless its contents are
/// in memory, it was marked before, or the bodies in memory (`cached_bytes`) leave no room for
/// what is read ahead (see [`READ_AHEAD_ROOM`]).
fn mark_to_read(e: &mut Entry, key: &Arc<str>, to_read: &mut Vec<(Arc<str>, u64)>, cached_bytes: usize) {
    if e.cached.is_none() && !e.read_ahead && cached_bytes < CACHE_BUDGET + READ_AHEAD_ROOM {
        e.read_ahead = true;
        to_read.push((key.clone(), e.meta.seq));
    }
}

/// What an entry's kept body counts against [`CACHE_BUDGET`].
fn cached_weight(e: &Entry) -> usize {
    e.cached.as_deref().map_or(0, NewEvent::weight)
}

impl Scheduler {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_timer = self.timers.peek().map(|Reverse((at, _))| *at);
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Enqueue(e)) => self.enqueue(e),
                    Some(Msg::Done { conv, outcome }) => {
                        self.done(conv.clone(), outcome).await;
                        self.drop_if_lost(&conv);
                    }
                    Some(Msg::LeasesChanged) => self.leases_changed(),
                    Some(Msg::Loaded(loaded)) => self.loaded(loaded),
                    Some(Msg::Seen { seq, epoch }) => {
                        self.seen = self.seen.max(seq);
                        self.seen_epoch = self.seen_epoch.max(epoch);
                        self.unpark();
                    }
                    Some(Msg::Stop(done)) => {
                        self.flush_when(true).await;
                        let _ = done.send(());
                        return;
                    }
                    None => break,
                },
                _ = sleep_until(next_timer) => self.fire_timers(),
                _ = tick.tick() => {
                    if self.housekeeping().await == Continue::End {
                        // Ends only if nothing was sent meanwhile; senders check `alive` under
                        // the same lock, so nothing can be sent after this.
                        let mut alive = self.alive.lock().unwrap_or_else(|e| e.into_inner());
                        if rx.is_empty() {
                            *alive = false;
                            drop(alive);
                            self.ctx.metrics.queue_depth.remove(&MotionLabels { motion: self.name.to_string() });
                            self.ctx.metrics.queue_oldest_seconds.remove(&MotionLabels { motion: self.name.to_string() });
                            tracing::debug!(motion = %self.name, "scheduler ended: its motion left the configuration");
                            return;
                        }
                    }
                }
            }
            self.dispatch();
        }
        self.flush().await;
    }

    fn enqueue(&mut self, mut e: Entry) {
        if !self.known.insert(e.meta.seq) {
            // Handed over twice (its commit, then a look at the store): kept once.
            self.depth.remove(&e.meta);
            return;
        }
        let key: Arc<str> = e.meta.conversation.as_str().into();
        let conv = self.convs.entry(key.clone()).or_default();
        if !conv.queue.is_empty() {
            // Events of this conversation are waiting: an `auto` request must not overtake them,
            // so it is acknowledged now (dropping the waiter tells it) and delivered in turn.
            e.waiter = None;
        }
        e.cached = keep_cached(&mut self.cached_bytes, e.cached.take());
        // Seq order within the conversation: events stored by other relays may be handed over
        // after later ones (never before the head in flight).
        let from = usize::from(conv.busy);
        let at = conv.queue.range(from..).position(|x| x.meta.seq > e.meta.seq).map_or(conv.queue.len(), |i| i + from);
        conv.queue.insert(at, e);
        if conv.busy && at == 1 {
            // Next in line after the attempt in flight: read back meanwhile.
            mark_to_read(&mut conv.queue[1], &key, &mut self.to_read, self.cached_bytes);
        }
        if conv.queue.len() == 1 && !conv.busy && !conv.waiting {
            self.ready.push_back(key);
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Reverse((_, key)) = self.timers.pop().expect("peeked");
            if let Some(c) = self.convs.get_mut(&key) {
                c.waiting = false;
                if !c.busy && !c.queue.is_empty() {
                    self.ready.push_back(key);
                }
            }
        }
    }

    fn dispatch(&mut self) {
        let limit = self.ctx.snapshots.load().config.delivery.concurrency as usize;
        while self.in_flight < limit {
            let Some(key) = self.ready.pop_front() else { break };
            let Some(conv) = self.convs.get_mut(&key) else { continue };
            if conv.busy || conv.queue.is_empty() {
                continue;
            }
            let unseen = conv.queue.front().is_some_and(|h| h.meta.seq > self.seen);
            if unseen || self.leases.grant(&self.name, &key) != Some(self.seen_epoch) {
                // Another relay's (or no one's while the leases cannot be renewed), or events
                // stored before it elsewhere may still be on their way here: wait.
                if !std::mem::replace(&mut conv.parked, true) {
                    self.parked.push(key);
                }
                continue;
            }
            // The event after this one is read back while this one is in flight.
            if let Some(next) = conv.queue.get_mut(1) {
                mark_to_read(next, &key, &mut self.to_read, self.cached_bytes);
            }
            let Some(head) = conv.queue.front_mut() else { continue };
            conv.busy = true;
            self.in_flight += 1;
            let job = Job {
                ctx: self.ctx.clone(),
                store: self.store.clone(),
                motion: self.name.clone(),
                meta: head.meta.clone(),
                cached: head.cached.clone(),
                waiter: head.waiter.take(),
            };
            let tx = self.tx.clone();
            let motion = self.name.clone();
            tokio::spawn(async move {
                use futures_util::FutureExt;
                // A panic in an attempt (a bug) must not leave its conversation in flight for
                // good: it counts as a failed attempt, retried later like any other.
                let outcome = std::panic::AssertUnwindSafe(job.attempt()).catch_unwind().await.unwrap_or_else(|_| {
                    tracing::error!(%motion, "a delivery attempt panicked; it will be retried");
                    Outcome::Retry {
                        at_least: Some(Duration::from_secs(30)),
                        loaded: None,
                        why: "internal error".into(),
                    }
                });
                let _ = tx.send(Msg::Done { conv: key, outcome });
            });
        }
        // Conversations waiting for a slot: their heads are read back meanwhile.
        for key in self.ready.iter().take(READ_AHEAD_READY) {
            if let Some(head) = self.convs.get_mut(key).and_then(|c| c.queue.front_mut()) {
                mark_to_read(head, key, &mut self.to_read, self.cached_bytes);
            }
        }
        self.read_ahead();
    }

    /// Reads back, in one blocking call, the contents of the events marked to be read (up to
    /// [`READ_AHEAD_BATCH`]); they come back as [`Msg::Loaded`]. One read at a time: what is
    /// marked meanwhile goes in the next.
    fn read_ahead(&mut self) {
        if self.read_in_flight || self.to_read.is_empty() {
            return;
        }
        let batch: Vec<_> = self.to_read.drain(..self.to_read.len().min(READ_AHEAD_BATCH)).collect();
        self.read_in_flight = true;
        let (store, tx) = (self.store.clone(), self.tx.clone());
        tokio::task::spawn_blocking(move || {
            let read = |(key, seq): (Arc<str>, u64)| {
                let ev = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.load(seq))) {
                    Ok(Ok(Some(Event { ev, .. }))) => Some(Arc::new(ev)),
                    _ => None,
                };
                (key, seq, ev)
            };
            let _ = tx.send(Msg::Loaded(batch.into_iter().map(read).collect()));
        });
    }

    /// Keeps what [`Scheduler::read_ahead`] read with the events still waiting for it.
    fn loaded(&mut self, loaded: Vec<(Arc<str>, u64, Option<Arc<NewEvent>>)>) {
        self.read_in_flight = false;
        for (key, seq, ev) in loaded {
            let (Some(conv), Some(ev)) = (self.convs.get_mut(&key), ev) else { continue };
            // Marked as the head or the one after it. Events another relay stored may have been
            // inserted before it since (in seq order), so a few more places are looked at; one
            // moved further is left to its attempt.
            let Some(e) = conv.queue.iter_mut().take(4).find(|e| e.meta.seq == seq) else { continue };
            if e.cached.is_none() {
                e.cached = keep_within(&mut self.cached_bytes, CACHE_BUDGET + READ_AHEAD_ROOM, Some(ev));
            }
        }
    }

    async fn done(&mut self, key: Arc<str>, outcome: Outcome) {
        self.in_flight -= 1;
        let ctx = self.ctx.clone();
        let metric = |outcome: DeliveryOutcome| {
            let labels = OutcomeLabels { motion: self.name.to_string(), outcome };
            ctx.metrics.deliveries.get_or_create(&labels).inc();
        };
        let Some(conv) = self.convs.get_mut(&key) else { return };
        conv.busy = false;
        match outcome {
            Outcome::Delivered | Outcome::Gone => {
                // Gone (purged or moved meanwhile) was not delivered: no attempt was made.
                if matches!(outcome, Outcome::Delivered) {
                    metric(DeliveryOutcome::Delivered);
                }
                if let Some(e) = conv.queue.pop_front() {
                    self.cached_bytes -= cached_weight(&e);
                    self.delivered.push(e.meta.seq);
                    self.depth.remove(&e.meta);
                    if matches!(outcome, Outcome::Delivered) {
                        self.health.delivered(&self.name, &e.meta.delivery_id, self.depth.events());
                    } else {
                        self.health.forget(&e.meta.delivery_id);
                    }
                }
                if self.delivered.len() >= 256 {
                    self.flush().await;
                }
            }
            Outcome::Retry { at_least, loaded, why } => {
                metric(DeliveryOutcome::Retry);
                ctx.metrics.retries.get_or_create(&MotionLabels { motion: self.name.to_string() }).inc();
                let Some(conv) = self.convs.get_mut(&key) else { return };
                let head = conv.queue.front_mut().expect("a conversation in flight has a head");
                head.meta.attempts += 1;
                if head.cached.is_none() {
                    // Kept for the next attempt while the budget allows.
                    head.cached = keep_cached(&mut self.cached_bytes, loaded);
                }
                let (seq, attempts) = (head.meta.seq, head.meta.attempts);
                // The count is informational (X-Relay-Attempt after a restart): recorded with
                // the next batch of delivered events, not synced.
                self.attempts.push((seq, attempts));
                let d = &ctx.snapshots.load().config.delivery;
                let (wait, cap) = (backoff(d.retry_initial, d.retry_max, attempts), d.retry_max);
                // Motion's Retry-After is honoured up to retry_max: a huge value must neither
                // overflow the clock nor hold the conversation past give_up_after.
                let wait = at_least.map_or(wait, |a| a.min(cap).max(wait));
                let now = ctx.clock.now_unix_ms();
                let next = now + wait.as_millis() as u64;
                self.health.failed(&self.name, &head.meta.delivery_id, why, now, Some(next), attempts);
                conv.waiting = true;
                self.timers.push(Reverse((Instant::now() + wait, key.clone())));
                return;
            }
            Outcome::Dead(info) => {
                let Some(conv) = self.convs.get_mut(&key) else { return };
                let seq = conv.queue.front().map(|e| e.meta.seq).expect("head");
                let store = self.store.clone();
                let reason = info.reason.clone();
                match tokio::task::spawn_blocking(move || store.kill(seq, info)).await {
                    Ok(Ok(())) => {
                        metric(DeliveryOutcome::Dead);
                        let labels = DeadLabels { motion: self.name.to_string(), reason: reason.label() };
                        ctx.metrics.dead_letters.get_or_create(&labels).inc();
                        if let Some(e) = conv.queue.pop_front() {
                            tracing::warn!(motion = %self.name, delivery = %e.meta.delivery_id, "event moved to the dead letters: {reason}");
                            self.cached_bytes -= cached_weight(&e);
                            self.depth.remove(&e.meta);
                            let now = ctx.clock.now_unix_ms();
                            let (id, attempts) = (&e.meta.delivery_id, e.meta.attempts + 1);
                            if matches!(reason, DeadReason::Refused { .. }) {
                                self.health.refused(&self.name, id, reason.to_string(), now, attempts);
                            } else {
                                self.health.failed(&self.name, id, reason.to_string(), now, None, attempts);
                            }
                            self.health.forget(id);
                            self.known.remove(&e.meta.seq);
                        }
                    }
                    _ => {
                        // The store refused: keep the event at the head and try again later.
                        conv.waiting = true;
                        self.timers.push(Reverse((Instant::now() + Duration::from_secs(5), key.clone())));
                        return;
                    }
                }
            }
        }
        let conv = self.convs.get_mut(&key).expect("present");
        if conv.queue.is_empty() {
            self.convs.remove(&key);
        } else {
            self.ready.push_back(key);
        }
    }

    /// Removes delivered events from the store and records attempt counts, in one write. After
    /// a failure it waits out [`prune_backoff`] (unless `now`, at shutdown) and tries again,
    /// until the store takes it: a delivered event left in the store is sent again after a
    /// restart, and holds disk space. It no longer counts as waiting meanwhile (the depth
    /// dropped at delivery).
    async fn flush(&mut self) {
        self.flush_when(false).await
    }

    async fn flush_when(&mut self, now: bool) {
        if self.delivered.is_empty() && self.attempts.is_empty() {
            return;
        }
        if !now && self.prune_after.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let (seqs, attempts) = (std::mem::take(&mut self.delivered), std::mem::take(&mut self.attempts));
        let store = self.store.clone();
        let done = seqs.clone();
        match tokio::task::spawn_blocking(move || store.progress(&seqs, &attempts)).await {
            Ok(Ok(())) => {
                for seq in done {
                    self.known.remove(&seq);
                }
                if std::mem::take(&mut self.prune_failures) > 0 {
                    tracing::info!(motion = %self.name, "delivered events pruned from the store again");
                }
                self.prune_after = None;
            }
            failed => {
                // Tried again after a backoff: until then a look at the store still finds them
                // and must not send them again. Logged at the first failure, then quietly.
                self.prune_failures += 1;
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "the write did not finish".to_string(),
                };
                let wait = prune_backoff(self.prune_failures);
                if self.prune_failures == 1 {
                    tracing::warn!(motion = %self.name, events = done.len(), "could not prune delivered events, retrying until it works: {why}");
                } else {
                    tracing::debug!(motion = %self.name, failures = self.prune_failures, "could not prune delivered events: {why}");
                }
                self.prune_after = Some(Instant::now() + wait);
                // Attempt counts are informational: the next ones recorded replace them.
                self.delivered.extend(done);
            }
        }
    }

    /// The leases changed: conversations no longer held are dropped (after their attempt in
    /// flight), parked ones that are held again become ready.
    fn leases_changed(&mut self) {
        let keys: Vec<Arc<str>> = self.convs.keys().cloned().collect();
        for key in keys {
            let held = self.leases.holds(&self.name, &key);
            let Some(conv) = self.convs.get_mut(&key) else { continue };
            if held {
                conv.lost = false;
            } else {
                conv.lost = true;
                self.drop_if_lost(&key);
            }
        }
        self.unpark();
    }

    /// Parked conversations become ready again (dispatch parks those that still cannot go).
    fn unpark(&mut self) {
        for key in std::mem::take(&mut self.parked) {
            let Some(conv) = self.convs.get_mut(&key) else { continue };
            if std::mem::take(&mut conv.parked) && !conv.busy && !conv.waiting && !conv.queue.is_empty() {
                self.ready.push_back(key);
            }
        }
    }

    /// Forgets a conversation this relay no longer holds, keeping only an attempt in flight
    /// (dropped when it ends); its holder delivers the rest.
    fn drop_if_lost(&mut self, key: &Arc<str>) {
        let Some(conv) = self.convs.get_mut(key) else { return };
        if !conv.lost {
            return;
        }
        let keep = usize::from(conv.busy);
        for e in conv.queue.drain(keep..) {
            self.known.remove(&e.meta.seq);
            self.cached_bytes -= cached_weight(&e);
            self.depth.remove(&e.meta);
        }
        if keep == 0 {
            self.convs.remove(key);
        }
    }

    async fn housekeeping(&mut self) -> Continue {
        self.flush().await;
        let snap = self.ctx.snapshots.load();
        let labels = MotionLabels { motion: self.name.to_string() };
        if snap.table.motion(&self.name).is_none() && self.convs.is_empty() && self.in_flight == 0 {
            // Its Motion left the config and nothing of it waits: a reload that brings it back,
            // or an event for it, starts a new scheduler.
            return Continue::End;
        }
        self.ctx.metrics.queue_depth.get_or_create(&labels).set(self.depth.events() as i64);
        let oldest = self.convs.values().filter_map(|c| c.queue.front()).map(|e| e.meta.received_unix_ms).min();
        let age = oldest.map_or(0, |t| self.ctx.clock.now_unix_ms().saturating_sub(t) / 1000);
        self.ctx.metrics.queue_oldest_seconds.get_or_create(&labels).set(age as i64);
        // Per account once a second (every fifth tick): the count walks every waiting event.
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks % 5 == 0 {
            let accounts = if self.depth.events() <= ACCOUNTS_UP_TO {
                let mut by: HashMap<&str, (u64, u64)> = HashMap::new();
                for e in self.convs.values().flat_map(|c| c.queue.iter()) {
                    let a = by.entry(e.meta.account.as_str()).or_insert((0, u64::MAX));
                    a.0 += 1;
                    a.1 = a.1.min(e.meta.received_unix_ms);
                }
                by.into_iter().map(|(a, (n, oldest))| (a.to_string(), n, oldest)).collect()
            } else {
                Vec::new()
            };
            self.health.lock().accounts = accounts;
        }
        Continue::Yes
    }
}

#[derive(PartialEq, Eq)]
enum Continue {
    Yes,
    End,
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Motion's answer body, up to [`MAX_ANSWER`] bytes, and whether that is all of it (read to
/// its end when shorter, which lets the connection go back to the pool; a longer one is cut and
/// its connection dropped).
async fn read_answer(mut body: hyper::body::Incoming) -> Result<(Bytes, bool), hyper::Error> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            let room = MAX_ANSWER - out.len();
            if data.len() > room {
                out.extend_from_slice(&data[..room]);
                return Ok((out.freeze(), false));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok((out.freeze(), true))
}

/// One delivery attempt, run as its own task.
struct Job {
    ctx: Arc<DeliveryContext>,
    store: Arc<dyn QueueStore>,
    motion: Arc<str>,
    meta: EventMeta,
    cached: Option<Arc<NewEvent>>,
    waiter: Option<Waiter>,
}

impl Job {
    async fn attempt(self) -> Outcome {
        let snap = self.ctx.snapshots.load_full();
        let now_ms = || self.ctx.clock.now_unix_ms();
        let Some(route) = snap.table.motion(&self.motion) else {
            // The Motion left the config (a reload): keep the event until it comes back, but no
            // longer than give_up_after, like any event Motion does not take.
            let age = Duration::from_millis(now_ms().saturating_sub(self.meta.received_unix_ms));
            if age >= snap.config.delivery.give_up_after {
                return Outcome::Dead(DeadInfo {
                    reason: DeadReason::MotionRemoved { motion: self.motion.to_string() },
                    status: None,
                    answer: Vec::new(),
                    attempts: self.meta.attempts,
                    died_unix_ms: now_ms(),
                });
            }
            return Outcome::Retry {
                at_least: Some(Duration::from_secs(30)),
                loaded: None,
                why: format!("motion {} is not in the configuration", self.motion),
            };
        };
        let ev = match self.cached {
            Some(ev) => ev,
            None => {
                let store = self.store.clone();
                let seq = self.meta.seq;
                match tokio::task::spawn_blocking(move || store.load(seq)).await {
                    Ok(Ok(Some(Event { ev, .. }))) => Arc::new(ev),
                    Ok(Ok(None)) => return Outcome::Gone,
                    _ => {
                        let why = "the store could not read the event".to_string();
                        return Outcome::Retry { at_least: Some(Duration::from_secs(5)), loaded: None, why };
                    }
                }
            }
        };
        let attempt_no = self.meta.attempts + 1;
        let mut headers = HeaderMap::with_capacity(ev.headers.len() + 4);
        for (k, v) in &ev.headers {
            if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_bytes(v)) {
                headers.append(k, v);
            }
        }
        // `timeout` bounds the whole attempt, the answer's body included: a Motion that sends its
        // headers and then stalls must not hold the conversation (and a delivery slot) forever.
        let deadline = tokio::time::Instant::now() + route.motion.timeout;
        let result = deliver::send(Attempt {
            motion: &route.motion,
            client: &route.client(),
            method: ev.method.clone(),
            path_and_query: &ev.path_and_query,
            headers,
            body: ev.body.clone(),
            delivery_id: &ev.delivery_id,
            attempt: attempt_no,
            provider: ev.provider,
            timeout: route.motion.timeout,
            now_unix: now_ms() / 1000,
        })
        .await;
        let (status, retry_after, answer, error, answer_headers) = match result {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_after =
                    resp.headers().get(http::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(String::from);
                let (mut parts, body) = resp.into_parts();
                // The status decides; the answer is kept for a dead letter (its first 64 KiB).
                let (answer, whole) = match tokio::time::timeout_at(deadline, read_answer(body)).await {
                    Ok(Ok(answer)) => answer,
                    Ok(Err(_)) => (Bytes::from_static(b"(the answer broke off)"), false),
                    Err(_) => {
                        (Bytes::from_static(b"(the answer's body did not arrive within the delivery timeout)"), false)
                    }
                };
                crate::http_util::strip_hop_by_hop(&mut parts.headers);
                // Only an answer read whole can be passed back (`auto`), and with its own length.
                parts.headers.remove(http::header::CONTENT_LENGTH);
                (Some(status), retry_after, answer, None, whole.then_some(parts.headers))
            }
            Err(e @ (AttemptError::Unreachable(_) | AttemptError::Timeout(_))) => {
                (None, None, Bytes::new(), Some(e.to_string()), None)
            }
        };
        let verdict = classify(status, retry_after.as_deref());
        // `auto` mode: Motion's answer goes back to the waiting request when it took the event
        // and its answer was read whole (a cut one is not Motion's answer; the provider gets
        // the acknowledgement instead). A refusal is not passed back: the event becomes a dead
        // letter and the provider gets the acknowledgement, so a provider's redelivery
        // (deduplicated) cannot lose it.
        if let (Some(waiter), Some(code), Verdict::Delivered, Some(headers)) =
            (self.waiter, status, &verdict, answer_headers)
        {
            let direct = DirectAnswer {
                status: http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::BAD_GATEWAY),
                headers,
                body: answer.clone(),
            };
            let _ = waiter.send(direct);
        }
        let dead = |reason: DeadReason| {
            Outcome::Dead(DeadInfo {
                reason,
                status,
                answer: answer.to_vec(),
                attempts: attempt_no,
                died_unix_ms: now_ms(),
            })
        };
        match verdict {
            Verdict::Delivered => Outcome::Delivered,
            Verdict::Dead => dead(DeadReason::Refused { status: status.unwrap_or(0) }),
            Verdict::Retry { at_least } => {
                let age = Duration::from_millis(now_ms().saturating_sub(ev.received_unix_ms));
                if age >= snap.config.delivery.give_up_after {
                    let last = error.unwrap_or_else(|| format!("HTTP {}", status.unwrap_or(0)));
                    let after_secs = snap.config.delivery.give_up_after.as_secs();
                    return dead(DeadReason::GaveUp { attempts: attempt_no, after_secs, last });
                }
                let why = error.unwrap_or_else(|| format!("Motion answered HTTP {}", status.unwrap_or(0)));
                tracing::debug!(motion = %self.motion, delivery = %ev.delivery_id, attempt = attempt_no, "delivery failed, will retry: {why}");
                Outcome::Retry { at_least, loaded: Some(ev), why }
            }
        }
    }
}
