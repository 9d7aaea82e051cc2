//! [`Unfolded`]: what the embedded store's journal holds that `queue.redb` does not have yet,
//! kept in memory until the next checkpoint folds it in: the events stored since (where their
//! records are in the journal, not the events themselves), their dedup keys, and what happened
//! since to events that `queue.redb` holds (delivered, attempted).
//!
//! Must never: forget a dedup key before it is folded (a redelivery would be stored twice), or
//! let a delivered event count as waiting.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::NewEvent;
use super::journal::Record;

/// An event stored in the journal and still waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// Where its record's payload starts in the journal, and its length.
    pub at: u64,
    pub len: u32,
    pub attempts: u32,
}

#[derive(Default)]
pub struct Unfolded {
    /// Events stored in the journal and still waiting, in seq order.
    pub stored: BTreeMap<u64, Held>,
    /// Events of `queue.redb` delivered since the last checkpoint.
    pub delivered: HashSet<u64>,
    /// Attempt counts of events of `queue.redb`, changed since.
    pub attempts: HashMap<u64, u32>,
    /// Dedup keys of the events stored since: key -> expiry (unix ms).
    pub dedup: HashMap<[u8; 32], u64>,
    /// The highest seq the journal gave out.
    pub last_seq: u64,
}

impl Unfolded {
    /// Whether a checkpoint would have nothing to write.
    pub fn is_empty(&self) -> bool {
        self.stored.is_empty() && self.delivered.is_empty() && self.attempts.is_empty() && self.dedup.is_empty()
    }

    /// Whether the event with this dedup key is a redelivery of one stored since the last
    /// checkpoint; `None` when this journal has not seen the key.
    pub fn duplicate(&self, ev: &NewEvent) -> Option<bool> {
        let key = ev.dedup_key.as_ref()?;
        self.dedup.get(key).map(|&expiry| expiry > ev.received_unix_ms)
    }

    /// `ev`, stored as `seq` in the record at `at` (`len` bytes).
    pub fn store(&mut self, seq: u64, ev: &NewEvent, at: u64, len: u32) {
        if let Some(key) = ev.dedup_key {
            self.dedup.insert(key, ev.dedup_expires_unix_ms);
        }
        self.stored.insert(seq, Held { at, len, attempts: 0 });
        self.last_seq = self.last_seq.max(seq);
    }

    pub fn deliver(&mut self, seqs: &[u64]) {
        for &seq in seqs {
            if self.stored.remove(&seq).is_none() {
                self.attempts.remove(&seq);
                self.delivered.insert(seq);
            }
        }
    }

    pub fn attempt(&mut self, counts: &[(u64, u32)]) {
        for &(seq, n) in counts {
            match self.stored.get_mut(&seq) {
                Some(held) => held.attempts = n,
                None if !self.delivered.contains(&seq) => {
                    self.attempts.insert(seq, n);
                }
                None => {}
            }
        }
    }

    /// What a journal's records (each with where its payload starts and its length) add up to.
    pub fn replayed(records: &[(u64, u32, Record)]) -> Unfolded {
        let mut unfolded = Unfolded::default();
        for (at, len, record) in records {
            unfolded.replay(record, *at, *len);
        }
        unfolded
    }

    /// Replays one record read back from the journal (`at`: where its payload started).
    fn replay(&mut self, record: &Record, at: u64, len: u32) {
        match record {
            Record::Stored { seq, ev } => self.store(*seq, ev, at, len),
            Record::Delivered(seqs) => self.deliver(seqs),
            Record::Attempts(counts) => self.attempt(counts),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::ev;

    #[test]
    fn delivery_and_attempts_go_to_the_journals_events_or_to_the_files() {
        let mut u = Unfolded::default();
        u.store(5, &ev("a", "c", b"x"), 100, 10);
        u.attempt(&[(5, 2), (3, 1)]);
        assert_eq!(u.stored[&5].attempts, 2);
        assert_eq!(u.attempts.get(&3), Some(&1));
        u.deliver(&[5, 3]);
        assert!(u.stored.is_empty());
        assert!(u.delivered.contains(&3) && !u.delivered.contains(&5));
        assert!(u.attempts.is_empty(), "a delivered event's count is not folded in");
        u.attempt(&[(3, 4)]);
        assert!(u.attempts.is_empty(), "nor one recorded after its delivery");
        assert_eq!(u.last_seq, 5);
    }

    #[test]
    fn dedup_keys_stay_after_delivery_until_folded() {
        let mut u = Unfolded::default();
        let mut e = ev("a", "c", b"x");
        e.dedup_key = Some([7; 32]);
        e.dedup_expires_unix_ms = 5_000;
        assert_eq!(u.duplicate(&e), None);
        u.store(1, &e, 16, 10);
        u.deliver(&[1]);
        assert_eq!(u.duplicate(&e), Some(true));
        e.received_unix_ms = 6_000;
        assert_eq!(u.duplicate(&e), Some(false), "expired");
        assert!(!u.is_empty());
    }
}
