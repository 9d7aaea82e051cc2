//! The durable queue: what `queue` mode does after verification. An accepted event is appended
//! through group commit (synced before the provider is acknowledged) and handed to its Motion's
//! scheduler, which delivers per-conversation in order and retries until Motion takes it.
//!
//! Owns: one scheduler per Motion, created at start (from what the store still holds) and on
//! reload; the per-Motion depth read on the request path for `max_queued` (an atomic, no lock).

pub mod retry;
mod scheduler;

use crate::relay::Relay;
use crate::store::{Appended, EventMeta, GroupCommit, NewEvent, Store, StoreError};
use arc_swap::ArcSwap;
use scheduler::MotionQueue;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

pub struct Queue {
    store: Arc<dyn Store>,
    commit: GroupCommit,
    motions: ArcSwap<HashMap<String, MotionQueue>>,
    // Serialises creation of schedulers only (start, reload, first event of a new Motion).
    create: Mutex<()>,
    relay: Weak<Relay>,
}

impl Queue {
    /// Opens the queue over `store` and resumes every event it still holds, in order.
    pub fn start(relay: &Arc<Relay>, store: Arc<dyn Store>) -> Result<Arc<Queue>, StoreError> {
        let queue = Arc::new(Queue {
            commit: GroupCommit::new(store.clone()),
            store,
            motions: ArcSwap::from_pointee(HashMap::new()),
            create: Mutex::new(()),
            relay: Arc::downgrade(relay),
        });
        let pending = queue.store.pending()?;
        let resumed = pending.len();
        for meta in pending {
            queue.motion(&meta.motion).enqueue(meta, None);
        }
        for m in relay.snapshot().table.motions() {
            queue.motion(&m.motion.name);
        }
        if resumed > 0 {
            tracing::info!(events = resumed, "resuming undelivered events from the store");
        }
        Ok(queue)
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The scheduler of a Motion, created on first use.
    fn motion(&self, name: &str) -> MotionQueue {
        if let Some(m) = self.motions.load().get(name) {
            return m.clone();
        }
        let _guard = self.create.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.motions.load_full();
        if let Some(m) = current.get(name) {
            return m.clone();
        }
        let m = MotionQueue::spawn(name.to_string(), self.relay.clone(), self.store.clone());
        let mut next = (*current).clone();
        next.insert(name.to_string(), m.clone());
        self.motions.store(Arc::new(next));
        m
    }

    /// Events waiting for a Motion.
    pub fn depth(&self, motion: &str) -> u64 {
        self.motions.load().get(motion).map_or(0, |m| m.depth())
    }

    /// Durably appends `events` (one atomic write) and schedules the stored ones.
    pub async fn accept(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>, StoreError> {
        let copies = events.clone();
        let results = self.commit.append(events).await?;
        for (ev, r) in copies.into_iter().zip(&results) {
            if let Appended::Stored(seq) = r {
                let meta = EventMeta::of(*seq, 0, &ev);
                self.motion(&ev.motion).enqueue(meta, Some(Arc::new(ev)));
            }
        }
        Ok(results)
    }

    /// Schedules an event that is already stored (a replayed dead letter).
    pub fn schedule(&self, meta: EventMeta) {
        self.motion(&meta.motion).enqueue(meta, None);
    }

    /// Creates schedulers for Motions added by a reload.
    pub fn sync_motions(&self, names: impl Iterator<Item = String>) {
        for n in names {
            self.motion(&n);
        }
    }

    /// Stops the schedulers and makes everything durable. Events not delivered stay stored.
    pub fn shutdown(&self) {
        for m in self.motions.load().values() {
            m.stop();
        }
        self.commit.close();
        if let Err(e) = self.store.sync() {
            tracing::error!("final store sync failed: {e}");
        }
    }
}
