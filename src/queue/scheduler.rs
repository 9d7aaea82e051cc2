//! One Motion's delivery scheduler: a single task that owns all of that Motion's waiting events
//! (no locks), keeps them per conversation in acceptance order, and runs deliveries: at most
//! one in flight per conversation (that is what keeps order), at most `delivery.concurrency`
//! per Motion. A conversation whose head is failing waits out its backoff alone; the others go on.

use super::retry::{Verdict, backoff, classify};
use crate::deliver::{self, Attempt, AttemptError};
use crate::metrics::{MotionLabels, OutcomeLabels};
use crate::relay::Relay;
use crate::store::{DeadInfo, Event, EventMeta, MAX_ANSWER, NewEvent, Store};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use http_body_util::BodyExt;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A waiting event: its metadata, and its contents while they are still in memory (fresh
/// events; resumed ones are read back from the store when their turn comes).
struct Entry {
    meta: EventMeta,
    cached: Option<Arc<NewEvent>>,
    /// `auto` mode: the webhook's request handler waiting for the first attempt's answer.
    waiter: Option<Waiter>,
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
}

enum Outcome {
    Delivered,
    Retry {
        at_least: Option<Duration>,
        loaded: Option<Arc<NewEvent>>,
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
}

/// The handle the rest of the relay holds.
#[derive(Clone)]
pub struct MotionQueue {
    tx: mpsc::UnboundedSender<Msg>,
    depth: Arc<AtomicU64>,
}

impl MotionQueue {
    /// Starts the scheduler task on `runtime` (the main one: schedulers must outlive any
    /// serving thread, and may be created from threads that have no runtime, such as reload's).
    pub fn spawn(
        runtime: &tokio::runtime::Handle,
        name: String,
        relay: Weak<Relay>,
        store: Arc<dyn Store>,
    ) -> MotionQueue {
        let (tx, rx) = mpsc::unbounded_channel();
        let depth = Arc::new(AtomicU64::new(0));
        let s = Scheduler {
            name: name.into(),
            relay,
            store,
            tx: tx.clone(),
            depth: depth.clone(),
            convs: HashMap::new(),
            ready: VecDeque::new(),
            timers: BinaryHeap::new(),
            in_flight: 0,
            delivered: Vec::new(),
            cached_bytes: 0,
        };
        runtime.spawn(s.run(rx));
        MotionQueue { tx, depth }
    }

    pub fn depth(&self) -> u64 {
        self.depth.load(Ordering::Relaxed)
    }

    pub fn enqueue(&self, meta: EventMeta, cached: Option<Arc<NewEvent>>, waiter: Option<Waiter>) {
        self.depth.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(Msg::Enqueue(Entry { meta, cached, waiter }));
    }

    /// Asks the scheduler to stop; the receiver hears once it has pruned what it delivered.
    pub fn stop(&self) -> std::sync::mpsc::Receiver<()> {
        let (done, heard) = std::sync::mpsc::channel();
        let _ = self.tx.send(Msg::Stop(done));
        heard
    }
}

struct Scheduler {
    name: Arc<str>,
    relay: Weak<Relay>,
    store: Arc<dyn Store>,
    tx: mpsc::UnboundedSender<Msg>,
    depth: Arc<AtomicU64>,
    convs: HashMap<Arc<str>, Conv>,
    /// Conversations whose head may be attempted now (each at most once).
    ready: VecDeque<Arc<str>>,
    /// Conversations waiting out a backoff, by when.
    timers: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    in_flight: usize,
    /// Delivered seqs not yet removed from the store (removed in batches).
    delivered: Vec<u64>,
    /// What the bodies kept in memory for waiting events weigh (see [`CACHE_BUDGET`]).
    cached_bytes: usize,
}

/// Bodies kept in memory per Motion, for the heads of its conversations only: events behind a
/// head, and any beyond this budget, are read back from the store when their turn comes. A
/// Motion down for hours must not hold its whole backlog in memory.
const CACHE_BUDGET: usize = 64 << 20;

fn weight(ev: &NewEvent) -> usize {
    ev.body.len() + ev.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
}

/// `ev` if [`CACHE_BUDGET`] has room for it (then counted in `used`), else `None`: the event is
/// read back from the store when its turn comes.
fn keep_cached(used: &mut usize, ev: Option<Arc<NewEvent>>) -> Option<Arc<NewEvent>> {
    let ev = ev?;
    let w = weight(&ev);
    (*used + w <= CACHE_BUDGET).then(|| {
        *used += w;
        ev
    })
}

/// What an entry's kept body counts against [`CACHE_BUDGET`].
fn cached_weight(e: &Entry) -> usize {
    e.cached.as_deref().map_or(0, weight)
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
                    Some(Msg::Done { conv, outcome }) => self.done(conv, outcome).await,
                    Some(Msg::Stop(done)) => {
                        self.flush_delivered().await;
                        let _ = done.send(());
                        return;
                    }
                    None => break,
                },
                _ = sleep_until(next_timer) => self.fire_timers(),
                _ = tick.tick() => self.housekeeping().await,
            }
            self.dispatch();
        }
        self.flush_delivered().await;
    }

    fn enqueue(&mut self, mut e: Entry) {
        let key: Arc<str> = e.meta.conversation.as_str().into();
        let conv = self.convs.entry(key.clone()).or_default();
        if !conv.queue.is_empty() {
            // Events of this conversation are waiting: an `auto` request must not overtake them,
            // so it is acknowledged now (dropping the waiter tells it) and delivered in turn.
            e.waiter = None;
            // Its body is read back from the store when its turn comes.
            e.cached = None;
        }
        e.cached = keep_cached(&mut self.cached_bytes, e.cached.take());
        conv.queue.push_back(e);
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
        let Some(relay) = self.relay.upgrade() else { return };
        let limit = relay.snapshot().config.delivery.concurrency as usize;
        while self.in_flight < limit {
            let Some(key) = self.ready.pop_front() else { break };
            let Some(conv) = self.convs.get_mut(&key) else { continue };
            let Some(head) = conv.queue.front_mut() else { continue };
            conv.busy = true;
            self.in_flight += 1;
            let job = Job {
                relay: relay.clone(),
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
                    Outcome::Retry { at_least: Some(Duration::from_secs(30)), loaded: None }
                });
                let _ = tx.send(Msg::Done { conv: key, outcome });
            });
        }
    }

    async fn done(&mut self, key: Arc<str>, outcome: Outcome) {
        self.in_flight -= 1;
        let relay = self.relay.upgrade();
        let metric = |outcome: &str| {
            if let Some(r) = &relay {
                let labels = OutcomeLabels { motion: self.name.to_string(), outcome: outcome.to_string() };
                r.metrics.deliveries.get_or_create(&labels).inc();
            }
        };
        let Some(conv) = self.convs.get_mut(&key) else { return };
        conv.busy = false;
        match outcome {
            Outcome::Delivered | Outcome::Gone => {
                metric("delivered");
                if let Some(e) = conv.queue.pop_front() {
                    self.cached_bytes -= cached_weight(&e);
                    self.delivered.push(e.meta.seq);
                    self.depth.fetch_sub(1, Ordering::Relaxed);
                }
                if self.delivered.len() >= 256 {
                    self.flush_delivered().await;
                }
            }
            Outcome::Retry { at_least, loaded } => {
                metric("retry");
                if let Some(r) = &relay {
                    r.metrics.retries.get_or_create(&MotionLabels { motion: self.name.to_string() }).inc();
                }
                let Some(conv) = self.convs.get_mut(&key) else { return };
                let head = conv.queue.front_mut().expect("a conversation in flight has a head");
                head.meta.attempts += 1;
                if head.cached.is_none() {
                    // Kept for the next attempt while the budget allows.
                    head.cached = keep_cached(&mut self.cached_bytes, loaded);
                }
                let (seq, attempts) = (head.meta.seq, head.meta.attempts);
                let store = self.store.clone();
                // The count is informational (X-Relay-Attempt after a restart): not synced.
                tokio::task::spawn_blocking(move || store.set_attempts(seq, attempts));
                let d = relay.as_ref().map(|r| r.snapshot().config.delivery.clone());
                let (wait, cap) = d.map_or((Duration::from_secs(1), Duration::from_secs(300)), |d| {
                    (backoff(d.retry_initial, d.retry_max, attempts), d.retry_max)
                });
                // Motion's Retry-After is honoured up to retry_max: a huge value must neither
                // overflow the clock nor hold the conversation past give_up_after.
                let wait = at_least.map_or(wait, |a| a.min(cap).max(wait));
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
                        metric("dead");
                        if let Some(r) = &relay {
                            let labels =
                                OutcomeLabels { motion: self.name.to_string(), outcome: reason_label(&reason) };
                            r.metrics.dead_letters.get_or_create(&labels).inc();
                        }
                        tracing::warn!(motion = %self.name, seq, "event moved to the dead letters: {reason}");
                        if let Some(e) = conv.queue.pop_front() {
                            self.cached_bytes -= cached_weight(&e);
                        }
                        self.depth.fetch_sub(1, Ordering::Relaxed);
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

    async fn flush_delivered(&mut self) {
        if self.delivered.is_empty() {
            return;
        }
        let seqs = std::mem::take(&mut self.delivered);
        let store = self.store.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.delivered(&seqs)).await {
            // Not fatal: the events are redelivered after a restart (at-least-once).
            tracing::warn!(motion = %self.name, "could not prune delivered events: {e}");
        }
    }

    async fn housekeeping(&mut self) {
        self.flush_delivered().await;
        let Some(relay) = self.relay.upgrade() else { return };
        let labels = MotionLabels { motion: self.name.to_string() };
        relay.metrics.queue_depth.get_or_create(&labels).set(self.depth.load(Ordering::Relaxed) as i64);
        let oldest = self.convs.values().filter_map(|c| c.queue.front()).map(|e| e.meta.received_unix_ms).min();
        let age = oldest.map_or(0, |t| now_ms().saturating_sub(t) / 1000);
        relay.metrics.queue_oldest_seconds.get_or_create(&labels).set(age as i64);
    }
}

/// Dead-letter reasons as metric labels (bounded set).
fn reason_label(reason: &str) -> String {
    if reason.starts_with("gave up") { "gave_up" } else { "refused" }.to_string()
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Motion's answer body, up to [`MAX_ANSWER`] bytes (read to its end when shorter, which lets
/// the connection go back to the pool; a longer one is cut and its connection dropped).
async fn read_answer(mut body: hyper::body::Incoming) -> Result<Bytes, hyper::Error> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            let room = MAX_ANSWER - out.len();
            out.extend_from_slice(&data[..data.len().min(room)]);
            if out.len() == MAX_ANSWER {
                break;
            }
        }
    }
    Ok(out.freeze())
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One delivery attempt, run as its own task.
struct Job {
    relay: Arc<Relay>,
    store: Arc<dyn Store>,
    motion: Arc<str>,
    meta: EventMeta,
    cached: Option<Arc<NewEvent>>,
    waiter: Option<Waiter>,
}

impl Job {
    async fn attempt(self) -> Outcome {
        let snap = self.relay.snapshot();
        let Some(route) = snap.table.motion(&self.motion) else {
            // The Motion left the config (a reload): keep the event until it comes back, but no
            // longer than give_up_after, like any event Motion does not take.
            let age = Duration::from_millis(now_ms().saturating_sub(self.meta.received_unix_ms));
            if age >= snap.config.delivery.give_up_after {
                return Outcome::Dead(DeadInfo {
                    reason: format!("gave up: motion {} is no longer configured", self.motion),
                    status: None,
                    answer: Vec::new(),
                    attempts: self.meta.attempts,
                    died_unix_ms: now_ms(),
                });
            }
            return Outcome::Retry { at_least: Some(Duration::from_secs(30)), loaded: None };
        };
        let ev = match self.cached {
            Some(ev) => ev,
            None => {
                let store = self.store.clone();
                let seq = self.meta.seq;
                match tokio::task::spawn_blocking(move || store.load(seq)).await {
                    Ok(Ok(Some(Event { ev, .. }))) => Arc::new(ev),
                    Ok(Ok(None)) => return Outcome::Gone,
                    _ => return Outcome::Retry { at_least: Some(Duration::from_secs(5)), loaded: None },
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
        let provider = crate::provider::ProviderKind::parse(&ev.provider).map_or("unknown", |p| p.as_str());
        // `timeout` bounds the whole attempt, the answer's body included: a Motion that sends its
        // headers and then stalls must not hold the conversation (and a delivery slot) forever.
        let deadline = tokio::time::Instant::now() + route.motion.timeout;
        let result = deliver::send(Attempt {
            motion: &route.motion,
            client: &route.client(),
            method: Method::from_bytes(ev.method.as_bytes()).unwrap_or(Method::POST),
            path_and_query: &ev.path_and_query,
            headers,
            body: ev.body.clone(),
            delivery_id: &ev.delivery_id,
            attempt: attempt_no,
            provider,
            timeout: route.motion.timeout,
        })
        .await;
        let (status, retry_after, answer, error, mut answer_headers) = match result {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_after =
                    resp.headers().get(http::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(String::from);
                let (mut parts, body) = resp.into_parts();
                // The status decides; the answer is kept for a dead letter (its first 64 KiB).
                let answer = match tokio::time::timeout_at(deadline, read_answer(body)).await {
                    Ok(Ok(answer)) => answer,
                    Ok(Err(_)) => Bytes::from_static(b"(the answer broke off)"),
                    Err(_) => Bytes::from_static(b"(the answer's body did not arrive within the delivery timeout)"),
                };
                crate::http_util::strip_hop_by_hop(&mut parts.headers);
                (Some(status), retry_after, answer, None, Some(parts.headers))
            }
            Err(e @ (AttemptError::Unreachable(_) | AttemptError::Timeout(_))) => {
                (None, None, Bytes::new(), Some(e.to_string()), None)
            }
        };
        let verdict = classify(status, retry_after.as_deref());
        // `auto` mode: Motion's answer goes back to the waiting request when it took the event.
        // A refusal is not passed back: the event becomes a dead letter and the provider gets
        // the acknowledgement, so a provider's redelivery (deduplicated) cannot lose it.
        if let (Some(waiter), Some(code), Verdict::Delivered) = (self.waiter, status, &verdict) {
            let direct = DirectAnswer {
                status: http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::BAD_GATEWAY),
                headers: answer_headers.take().unwrap_or_default(),
                body: answer.clone(),
            };
            let _ = waiter.send(direct);
        }
        let dead = |reason: String| {
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
            Verdict::Dead => dead(format!("Motion refused the event with HTTP {}", status.unwrap_or(0))),
            Verdict::Retry { at_least } => {
                let age = Duration::from_millis(now_ms().saturating_sub(ev.received_unix_ms));
                if age >= snap.config.delivery.give_up_after {
                    let last = error.unwrap_or_else(|| format!("HTTP {}", status.unwrap_or(0)));
                    return dead(format!(
                        "gave up after {} attempts over {:?} (last: {last})",
                        attempt_no, snap.config.delivery.give_up_after
                    ));
                }
                tracing::debug!(motion = %self.motion, delivery = %ev.delivery_id, attempt = attempt_no, "delivery failed, will retry: {}", error.as_deref().unwrap_or("error status"));
                Outcome::Retry { at_least, loaded: Some(ev) }
            }
        }
    }
}
