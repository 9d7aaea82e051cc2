//! The durable store: two interfaces, [`QueueStore`] (every accepted webhook until Motion has
//! it, the dead letters and the dedup keys) and [`WindowStore`] (the 24-hour customer service
//! window), plus the types that cross them.
//!
//! Owns: what "stored" means (synced to disk before an acknowledgement), sequence numbers,
//! dead letters, dedup keys and the window table, and which conversations this relay may
//! deliver ([`Leases`]). Backends implement both interfaces: [`EmbeddedStore`] (redb, the
//! default: one relay, which holds every conversation) and [`PostgresStore`] (several relays on
//! one database, conversations held by lease); nothing outside this module may depend on redb
//! or on PostgreSQL, or know which backend runs.
//! [`GroupCommit`] shares one fsync among concurrent appends; `FaultyStore` (feature
//! `test-support`) is the fault-injection seam for tests. A shared backend also keeps the
//! relays' one ACME account and certificate ([`AcmeStore`]).
//!
//! Must never: acknowledge (return `Ok` from a synced method) before the data is durable, lose
//! an acknowledged event, or log message bodies or phone numbers.
//!
//! Every method blocks (disk I/O); async code calls them through `spawn_blocking` or, for
//! appends, through [`GroupCommit`].

pub mod acme;
pub mod embedded;
#[cfg(any(test, feature = "test-support"))]
pub mod fault;
pub mod group_commit;
pub mod journal;
pub mod marker;
pub mod postgres;
pub mod preflight;
mod types;
mod unfolded;

pub use acme::{AcmeLock, AcmeStore, StoredCert, StoredChallenge, StoredKey};
pub use embedded::EmbeddedStore;
#[cfg(any(test, feature = "test-support"))]
pub use fault::{DiskFault, FaultyStore};
pub use group_commit::GroupCommit;
pub use postgres::PostgresStore;
pub use types::{DeadReason, Unowned, UnownedKey};

use std::path::PathBuf;
use std::sync::Arc;

use crate::provider::ProviderKind;
use bytes::Bytes;
use http::Method;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Motion's answer kept with a dead letter is cut to this many bytes.
pub const MAX_ANSWER: usize = 64 * 1024;

/// Cloneable so that [`GroupCommit`] can hand one failed commit's error to every submitter.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage at {}: {source}", path.display())]
    Open { path: PathBuf, source: Arc<dyn std::error::Error + Send + Sync> },
    /// The store file is missing, empty, truncated or unreadable: the message names the file and
    /// the recovery steps (see `preflight`).
    #[error("{0}")]
    Damaged(String),
    #[error("storage write failed: {0}")]
    Write(String),
    #[error("storage read failed: {0}")]
    Read(String),
    #[error("storage is shutting down")]
    Closed,
    /// The shared database could not be reached in time (PostgreSQL down, failing over, or
    /// the network cut): nothing was written.
    #[error("storage unreachable: {0}")]
    Unreachable(String),
}

/// What [`QueueStore::append_unsynced`] answers: the results, and what makes them durable.
pub type WrittenAppend = (Vec<Appended>, Option<Box<dyn Unsynced>>);

/// Appends written and not yet durable (see [`QueueStore::append_unsynced`]).
pub trait Unsynced: Send {
    /// Makes them durable; on `Err` they were not stored.
    fn sync(self: Box<Self>) -> Result<(), StoreError>;
}

/// Which conversations this relay may deliver now, as the backend grants them. The embedded
/// store holds everything ([`HoldAll`]); a shared store holds conversations by lease, and one
/// relay at a time holds each.
pub trait Leases: Send + Sync + 'static {
    /// Whether this relay may start a delivery attempt for this conversation now. Cheap (no
    /// I/O): called before every attempt.
    fn holds(&self, motion: &str, conversation: &str) -> bool {
        self.grant(motion, conversation).is_some()
    }
    /// Like `holds`, with the lease epoch (`News::epoch`) the grant belongs to, read together:
    /// a conversation just gained may only go once the queue was looked at in that epoch.
    fn grant(&self, motion: &str, conversation: &str) -> Option<u64>;
    /// News from the other relays: None when no other relay shares the store (nothing
    /// changes behind this relay's back).
    fn news(&self) -> Option<tokio::sync::watch::Receiver<News>>;
    /// Gives every lease up at once (clean shutdown, after the last attempt ended), so the
    /// others take over without waiting for the leases to expire.
    fn release(&self) {}
    /// The relays sharing the store and what each holds, as of the last renewal (None: this
    /// relay is alone, and holds every conversation).
    fn cluster(&self) -> Option<Cluster> {
        None
    }
}

/// The relays sharing one store, as the board shows them.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Cluster {
    /// This relay's id.
    pub me: String,
    /// Conversations are hashed into this many partitions, each held by one relay at a time.
    pub partitions: u32,
    /// Every live relay, with the partitions it holds now.
    pub relays: Vec<(String, u32)>,
}

/// What changed in a shared store: `epoch` moves when the conversations this relay holds
/// change (gained, lost, or fenced off because leases could not be renewed), `appended` when
/// another relay stored events (the highest seq announced).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct News {
    pub epoch: u64,
    pub appended: u64,
}

/// The embedded store's leases: one relay, every conversation.
pub struct HoldAll;

impl Leases for HoldAll {
    fn grant(&self, _: &str, _: &str) -> Option<u64> {
        Some(0)
    }
    fn news(&self) -> Option<tokio::sync::watch::Receiver<News>> {
        None
    }
}

/// A copy of the store made by [`QueueStore::backup`]: the open file and what it holds.
pub struct Backup {
    pub file: std::fs::File,
    pub summary: BackupSummary,
}

/// What a store file holds (a backup, checked by whoever reads it back).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSummary {
    /// Events waiting for delivery.
    pub waiting: u64,
    pub dead_letters: u64,
    pub dedup_keys: u64,
    /// Its record format (see `embedded`).
    pub format: u64,
    pub bytes: u64,
}

/// An event to store, as accepted from a provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    /// Stable id (X-Relay-Delivery), assigned by the caller.
    pub delivery_id: String,
    pub motion: String,
    /// May be "" (no account: unknown Meta number).
    pub account: String,
    /// Ordering key (already includes the account).
    pub conversation: String,
    pub provider: ProviderKind,
    #[serde(with = "types::method")]
    pub method: Method,
    /// What to request on the Motion (below the relay's prefix).
    pub path_and_query: String,
    /// Headers to forward.
    pub headers: Vec<(String, Vec<u8>)>,
    #[serde(with = "body_bytes")]
    pub body: Bytes,
    /// When it entered the queue: received, or replayed from the dead letters (`give_up_after`
    /// counts from here).
    pub received_unix_ms: u64,
    /// If Some and present and unexpired (at `received_unix_ms`) in the dedup table, the event
    /// is not stored: see [`dedup_key`].
    pub dedup_key: Option<[u8; 32]>,
    pub dedup_expires_unix_ms: u64,
    /// For an event no account owns (a Meta app's change for an unknown number): where it came
    /// from, so a replay can find the account that claims it by then.
    pub unowned: Option<Unowned>,
}

impl NewEvent {
    /// Its body and headers in bytes: what `max_queued_bytes` and the memory budget count.
    pub fn weight(&self) -> usize {
        self.body.len() + self.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }
}

/// What the scheduler keeps in memory for each waiting event (no body, no headers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMeta {
    pub seq: u64,
    pub delivery_id: String,
    pub motion: String,
    pub account: String,
    pub conversation: String,
    pub received_unix_ms: u64,
    pub attempts: u32,
    /// What the event weighs on disk: its body and headers ([`NewEvent::weight`]).
    pub bytes: u64,
}

impl EventMeta {
    pub fn of(seq: u64, attempts: u32, ev: &NewEvent) -> EventMeta {
        EventMeta {
            bytes: ev.weight() as u64,
            seq,
            delivery_id: ev.delivery_id.clone(),
            motion: ev.motion.clone(),
            account: ev.account.clone(),
            conversation: ev.conversation.clone(),
            received_unix_ms: ev.received_unix_ms,
            attempts,
        }
    }
}

/// A stored event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub attempts: u32,
    pub ev: NewEvent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    Stored(u64),
    /// Seen within the dedup window: acknowledge, but it was not stored again.
    Duplicate,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadInfo {
    pub reason: DeadReason,
    pub status: Option<u16>,
    /// Motion's last answer body, cut to [`MAX_ANSWER`] by the store.
    pub answer: Vec<u8>,
    pub attempts: u32,
    pub died_unix_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    pub seq: u64,
    pub ev: NewEvent,
    pub info: DeadInfo,
}

/// Both interfaces of one backend, as the relay is started with them.
#[derive(Clone)]
pub struct Stores {
    pub queue: Arc<dyn QueueStore>,
    pub window: Arc<dyn WindowStore>,
    /// ACME state shared with other relays: only a shared backend has it.
    pub acme: Option<Arc<dyn AcmeStore>>,
}

impl Stores {
    pub fn of<S: QueueStore + WindowStore>(backend: Arc<S>) -> Stores {
        Stores { queue: backend.clone(), window: backend, acme: None }
    }

    /// Like [`Stores::of`], for a backend the relays share, which keeps their ACME state too.
    pub fn shared<S: QueueStore + WindowStore + AcmeStore>(backend: Arc<S>) -> Stores {
        Stores { acme: Some(backend.clone()), ..Stores::of(backend) }
    }
}

/// Waiting events and their bytes, by Motion name.
pub type WaitingByMotion = std::collections::HashMap<String, (u64, u64)>;

/// The queue's storage. Methods marked "synced" return only once the change is durable.
pub trait QueueStore: Send + Sync + 'static {
    /// Appends all events in ONE atomic transaction, synced to disk before returning.
    /// Dedup keys are checked and inserted in the same transaction (also among events of the
    /// same call). Sequence numbers are strictly increasing across calls and restarts.
    fn append(&self, batch: &[NewEvent]) -> Result<Vec<Appended>, StoreError>;
    /// [`append`](Self::append) in two steps, so the next group can be written while this one
    /// is being synced: the results, and what makes them durable (`None`: they already are).
    /// A result counts only once that returns `Ok`: until then nothing may be acknowledged.
    fn append_unsynced(&self, batch: &[NewEvent]) -> Result<WrittenAppend, StoreError> {
        self.append(batch).map(|r| (r, None))
    }
    /// Like `append`, deleting dead letter `dead_seq` in the same transaction: a dead letter
    /// replayed as new events (an unowned one, rerouted) can neither be lost nor sent twice by a
    /// crash in between. Writes nothing and returns an empty list when that dead letter is gone
    /// (already replayed or purged). Synced.
    fn append_replacing_dead(&self, batch: &[NewEvent], dead_seq: u64) -> Result<Vec<Appended>, StoreError>;
    /// Stores an event directly as a dead letter, atomically and synced, with the same dedup
    /// rule as `append` (e.g. a Meta change for a number no account claims: it must be on disk
    /// before the 2xx, and must never be waiting for delivery, not even between two commits).
    fn append_dead(&self, ev: &NewEvent, info: DeadInfo) -> Result<Appended, StoreError>;
    /// Every waiting (not delivered, not dead) event, in seq order, without bodies.
    fn pending(&self) -> Result<Vec<EventMeta>, StoreError>;
    /// The waiting events with a seq above `after`, in seq order, and a seq up to which
    /// everything committed was seen (the `after` of the next call): a shared store's events
    /// stored by other relays.
    fn pending_after(&self, after: u64) -> Result<(u64, Vec<EventMeta>), StoreError> {
        let all = self.pending()?;
        let top = all.last().map_or(after, |m| m.seq.max(after));
        Ok((top, all.into_iter().filter(|m| m.seq > after).collect()))
    }
    /// A shared store's waiting events and their bytes per Motion, counted across every relay
    /// (None: this relay's own count is the whole, as with the embedded store).
    fn waiting_by_motion(&self) -> Result<Option<WaitingByMotion>, StoreError> {
        Ok(None)
    }
    /// The conversations this relay may deliver (see [`Leases`]).
    fn leases(&self) -> Arc<dyn Leases> {
        Arc::new(HoldAll)
    }
    fn load(&self, seq: u64) -> Result<Option<Event>, StoreError>;
    /// Removes delivered events and records attempt counts (`(seq, attempts)`; informational:
    /// `X-Relay-Attempt` after a restart), in one transaction. Not synced (a crash may
    /// redeliver: at-least-once), but durable at the next synced commit or `sync()`. An attempt
    /// count for an event that is no longer waiting is ignored.
    fn progress(&self, delivered: &[u64], attempts: &[(u64, u32)]) -> Result<(), StoreError>;
    /// Moves a waiting event to the dead letters (synced). No-op if it is no longer waiting.
    fn kill(&self, seq: u64, info: DeadInfo) -> Result<(), StoreError>;
    /// All dead letters, in seq order.
    fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError>;
    fn dead_letter(&self, seq: u64) -> Result<Option<DeadLetter>, StoreError>;
    /// The seqs of the dead letters with this delivery id (normally one), in seq order. A store
    /// should find them without decoding every body; this default does not.
    fn dead_seqs_of(&self, delivery_id: &str) -> Result<Vec<u64>, StoreError> {
        Ok(self.dead_letters()?.into_iter().filter(|d| d.ev.delivery_id == delivery_id).map(|d| d.seq).collect())
    }
    /// Moves a dead letter back to the waiting events under a NEW seq (so it orders after what
    /// is waiting now), keeping its delivery_id, with attempts reset to 0 and its queue time set
    /// to `now_unix_ms` (a replay gets a whole `give_up_after` again); returns its new meta.
    /// None if there is no such dead letter. Synced.
    fn revive(&self, seq: u64, now_unix_ms: u64) -> Result<Option<EventMeta>, StoreError>;
    /// Deletes one dead letter (Some) or all (None); returns how many were deleted. Synced.
    fn purge_dead(&self, seq: Option<u64>) -> Result<usize, StoreError>;
    /// Deletes dedup entries that expired before `now_unix_ms`, returning how many. May look at
    /// a bounded slice of the table per call, resuming where the last call stopped, so that no
    /// call holds the writer long; called periodically, it sweeps the whole table.
    fn prune_dedup(&self, now_unix_ms: u64) -> Result<usize, StoreError>;
    /// Cheap check that the store can still be written (for /readyz).
    /// A consistent copy of the whole store as it stood at one commit (later writes are not in
    /// it, earlier ones all are), for `store backup`: an open file holding it, already removed
    /// from the folder, and what it holds. A backend without a file of its own says how else
    /// to back it up.
    fn backup(&self) -> Result<Backup, StoreError> {
        Err(StoreError::Read("this storage backend has no file copy; back up its database with its own tools".into()))
    }
    /// Background work the backend wants done off the append path (the embedded store folds
    /// its journal into its file): waits up to `wait` for some and does it. [`GroupCommit`]
    /// calls it in a loop on a thread of its own; `false` means there is never any.
    fn maintain(&self, _wait: std::time::Duration) -> bool {
        false
    }
    fn writable(&self) -> bool;
    /// What the store takes on disk, where the backend can tell cheaply.
    fn size_bytes(&self) -> Option<u64> {
        None
    }
    /// The backend's name, as the board and logs show it.
    fn backend(&self) -> &'static str;
    /// Makes everything durable (shutdown).
    fn sync(&self) -> Result<(), StoreError>;
}

/// The window's storage.
pub trait WindowStore: Send + Sync + 'static {
    /// The 24-hour customer-service window: last inbound time per key (account+customer).
    /// Keeps the latest time seen for each key. One transaction for the whole batch. Not synced.
    fn window_touch(&self, entries: &[(String, u64)]) -> Result<(), StoreError>;
    fn window_last(&self, key: &str) -> Result<Option<u64>, StoreError>;
    /// Deletes window entries last touched before `before_unix_ms` (one entry per customer
    /// ever seen would otherwise grow forever). Returns how many.
    fn prune_window(&self, before_unix_ms: u64) -> Result<usize, StoreError>;
    /// Whether other relays write this store too (then what one relay remembers may be stale).
    fn shared(&self) -> bool {
        false
    }
}

/// The dedup key of an event: the Motion and account (account ids are unique only within one
/// Motion: two tenants may both have an account "1") plus the provider's event id where the
/// payload has one, else the SHA-256 of the request (`request`: method, path and query, then the
/// body), so callbacks that carry their data in the query (GET, empty body) do not all look
/// alike. Domain-separated so an id can never equal a body hash.
pub fn dedup_key(motion: &str, account: &str, provider_event_id: Option<&str>, request: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [motion, account] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    match provider_event_id {
        Some(id) => {
            h.update(b"id\0");
            h.update(id.as_bytes());
        }
        None => {
            h.update(b"body\0");
            let mut inner = Sha256::new();
            for part in request {
                inner.update((part.len() as u64).to_le_bytes());
                inner.update(part);
            }
            h.update(inner.finalize());
        }
    }
    h.finalize().into()
}

/// Serializes the body as one byte string (not a sequence of u8s) and deserializes it with a
/// single copy out of the storage page; `bytes` is used without its `serde` feature.
pub(crate) mod body_bytes {
    use bytes::Bytes;
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::ser::Serializer;
    use std::fmt;

    pub fn serialize<S: Serializer>(body: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(body)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes::copy_from_slice(v))
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes::from(v))
            }
            // Self-describing formats (JSON) may hand bytes over as a sequence.
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(b) = seq.next_element()? {
                    v.push(b);
                }
                Ok(Bytes::from(v))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small event for tests in this module's files.
    pub(crate) fn ev(id: &str, conversation: &str, body: &[u8]) -> NewEvent {
        NewEvent {
            delivery_id: id.into(),
            motion: "acme".into(),
            account: "12".into(),
            conversation: conversation.into(),
            provider: crate::provider::twilio::KIND,
            method: Method::POST,
            path_and_query: "/api/whatsapp/accounts/12/notify?x=1".into(),
            headers: vec![("x-twilio-signature".into(), b"sig".to_vec())],
            body: Bytes::copy_from_slice(body),
            received_unix_ms: 1_000,
            dedup_key: None,
            dedup_expires_unix_ms: 0,
            unowned: None,
        }
    }

    #[test]
    fn postcard_round_trip_keeps_every_field() {
        let mut e = ev("d1", "12:+39", b"\x00\xffbody");
        e.dedup_key = Some([7; 32]);
        e.unowned = Some(Unowned { app: "main".into(), key: UnownedKey::PhoneNumberId("123".into()) });
        let bytes = postcard::to_allocvec(&e).unwrap();
        // The body is one length-prefixed byte string, not one element per byte.
        assert!(bytes.windows(6).any(|w| w == b"\x00\xffbody"));
        assert_eq!(postcard::from_bytes::<NewEvent>(&bytes).unwrap(), e);
    }

    #[test]
    fn dedup_key_separates_accounts_ids_and_bodies() {
        let k = dedup_key("m", "12", Some("SM1"), &[b"x"]);
        assert_eq!(k, dedup_key("m", "12", Some("SM1"), &[b"other body"]));
        assert_ne!(k, dedup_key("m", "13", Some("SM1"), &[b"x"]));
        assert_ne!(k, dedup_key("m", "1", Some("2SM1"), &[b"x"]));
        // The same account id under another Motion is another tenant's account.
        assert_ne!(k, dedup_key("n", "12", Some("SM1"), &[b"x"]));
        assert_ne!(dedup_key("m1", "2", None, &[b"x"]), dedup_key("m", "12", None, &[b"x"]));
        assert_eq!(dedup_key("m", "12", None, &[b"x"]), dedup_key("m", "12", None, &[b"x"]));
        assert_ne!(dedup_key("m", "12", None, &[b"x"]), dedup_key("m", "12", None, &[b"y"]));
        assert_ne!(
            dedup_key("m", "12", None, &[b"GET", b"/n?a=1", b""]),
            dedup_key("m", "12", None, &[b"GET", b"/n?a=2", b""])
        );
    }
}
