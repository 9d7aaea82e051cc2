//! The operator's queue tools, as the admin API exposes them: stats, the waiting list, dead
//! letters, replay and purge. Types here are the admin API's JSON (the CLI reads them back).
//! Store calls block, so every operation runs on the blocking pool.

use super::Queue;
use crate::metrics::MotionLabels;
use crate::store::{NewEvent, QueueStore, StoreError, UnownedKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Serialize, Deserialize)]
pub struct Stats {
    pub motions: Vec<MotionStats>,
    pub dead_letters: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MotionStats {
    pub motion: String,
    pub depth: u64,
    pub oldest_age_seconds: u64,
    pub accounts: Vec<AccountStats>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AccountStats {
    pub account: String,
    pub depth: u64,
    pub oldest_age_seconds: u64,
}

/// A waiting event (no body, no customer number: the list is for counting and finding, not reading).
#[derive(Debug, Serialize, Deserialize)]
pub struct Waiting {
    /// Its delivery id (`X-Relay-Delivery`), which every log line about it carries.
    pub id: String,
    pub motion: String,
    pub account: String,
    pub attempts: u32,
    pub age_seconds: u64,
    /// Why its last attempt failed, when it did.
    #[serde(default)]
    pub last_error: Option<String>,
    /// When it is tried next (Unix ms), when its last attempt failed.
    #[serde(default)]
    pub next_attempt_unix_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Dead {
    /// The event's `X-Relay-Delivery` id.
    pub id: String,
    pub motion: String,
    /// Empty when no account owns the event (see `note`).
    pub account: String,
    /// For events without an account, e.g. `phone_number_id=123`.
    pub note: String,
    pub reason: String,
    pub status: Option<u16>,
    /// Motion's last answer (lossy UTF-8, at most 64 KiB).
    pub answer: String,
    pub attempts: u32,
    pub age_seconds: u64,
}

/// How many dead letters an operation touched.
#[derive(Debug, Serialize, Deserialize)]
pub struct Count {
    pub count: usize,
}

fn age(now_ms: u64, then_ms: u64) -> u64 {
    now_ms.saturating_sub(then_ms) / 1000
}

impl Queue {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn QueueStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref())).await.map_err(|e| StoreError::Read(e.to_string()))?
    }

    pub async fn stats(&self) -> Result<Stats, StoreError> {
        let (pending, dead) = self.blocking(|s| Ok((s.pending()?, s.dead_letters()?.len()))).await?;
        let now = self.ctx.clock.now_unix_ms();
        let mut by: BTreeMap<String, BTreeMap<String, (u64, u64)>> = BTreeMap::new();
        for m in &pending {
            let e = by.entry(m.motion.clone()).or_default().entry(m.account.clone()).or_insert((0, u64::MAX));
            e.0 += 1;
            e.1 = e.1.min(m.received_unix_ms);
        }
        let motions = by
            .into_iter()
            .map(|(motion, accounts)| {
                let accounts: Vec<AccountStats> = accounts
                    .into_iter()
                    .map(|(account, (depth, oldest))| AccountStats {
                        account,
                        depth,
                        oldest_age_seconds: age(now, oldest),
                    })
                    .collect();
                MotionStats {
                    motion,
                    depth: accounts.iter().map(|a| a.depth).sum(),
                    oldest_age_seconds: accounts.iter().map(|a| a.oldest_age_seconds).max().unwrap_or(0),
                    accounts,
                }
            })
            .collect();
        Ok(Stats { motions, dead_letters: dead })
    }

    pub async fn list(&self, limit: usize) -> Result<Vec<Waiting>, StoreError> {
        let pending = self.blocking(|s| s.pending()).await?;
        let now = self.ctx.clock.now_unix_ms();
        let motions = self.motions.load();
        Ok(pending
            .into_iter()
            .take(limit)
            .map(|m| {
                let retrying = motions.get(&m.motion).and_then(|q| q.health().retrying(&m.delivery_id));
                Waiting {
                    attempts: retrying.as_ref().map_or(m.attempts, |r| r.attempts.max(m.attempts)),
                    last_error: retrying.as_ref().map(|r| r.error.clone()),
                    next_attempt_unix_ms: retrying.map(|r| r.next_attempt_unix_ms),
                    id: m.delivery_id,
                    motion: m.motion,
                    account: m.account,
                    age_seconds: age(now, m.received_unix_ms),
                }
            })
            .collect())
    }

    pub async fn dead(&self) -> Result<Vec<Dead>, StoreError> {
        let dead = self.blocking(|s| s.dead_letters()).await?;
        let now = self.ctx.clock.now_unix_ms();
        Ok(dead
            .into_iter()
            .map(|d| Dead {
                id: d.ev.delivery_id,
                motion: d.ev.motion,
                account: d.ev.account,
                note: d.ev.unowned.map(|u| u.to_string()).unwrap_or_default(),
                reason: d.info.reason.to_string(),
                status: d.info.status,
                answer: String::from_utf8_lossy(&d.info.answer).into_owned(),
                attempts: d.info.attempts,
                age_seconds: age(now, d.info.died_unix_ms),
            })
            .collect())
    }

    /// Sends dead letters again: the one with delivery id `id`, or all. Each goes to the back of
    /// its conversation under its old delivery id. A dead letter no account owned (a Meta app's
    /// change for an unknown number) goes to the account that claims the number now, if any;
    /// otherwise it stays and is not counted.
    pub async fn replay(&self, id: Option<String>) -> Result<usize, StoreError> {
        // By id, only that dead letter is read whole, not every one.
        let dead = self
            .blocking(move |s| match id {
                None => s.dead_letters(),
                Some(id) => s.dead_seqs_of(&id)?.into_iter().filter_map(|seq| s.dead_letter(seq).transpose()).collect(),
            })
            .await?;
        let mut n = 0;
        for d in dead {
            if d.ev.unowned.is_some() {
                n += self.reroute(d).await? as usize;
                continue;
            }
            let (seq, now) = (d.seq, self.ctx.clock.now_unix_ms());
            if let Some(meta) = self.blocking(move |s| s.revive(seq, now)).await? {
                self.ctx.metrics.replays.get_or_create(&MotionLabels { motion: meta.motion.clone() }).inc();
                tracing::info!(motion = %meta.motion, delivery = %meta.delivery_id, "dead letter replayed");
                self.schedule(meta);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Queues an unowned dead letter for the accounts that claim its number now (by the routing
    /// snapshot), then deletes it. `false` when still no account claims it.
    async fn reroute(&self, d: crate::store::DeadLetter) -> Result<bool, StoreError> {
        let snap = self.ctx.snapshots.load_full();
        let Some(unowned) = &d.ev.unowned else { return Ok(false) };
        let Some(app) = snap.table.app(&unowned.app) else { return Ok(false) };
        let targets: Vec<_> = match &unowned.key {
            UnownedKey::PhoneNumberId(id) => app.by_phone(id).into_iter().cloned().collect(),
            UnownedKey::WabaId(id) => app.by_waba(id).to_vec(),
        };
        if targets.is_empty() {
            return Ok(false);
        }
        let mut headers = http::HeaderMap::new();
        for (k, v) in &d.ev.headers {
            if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k.as_bytes()), http::HeaderValue::from_bytes(v)) {
                headers.append(k, v);
            }
        }
        let now = self.ctx.clock.now_unix_ms();
        let payload = app.app.provider.payload(Some("application/json"), &d.ev.body);
        let dedup_window = snap.config.delivery.dedup_window;
        let events = targets
            .iter()
            .map(|t| {
                let ev = crate::event::app_part(
                    t,
                    app.app.provider,
                    &headers,
                    d.ev.body.clone(),
                    &payload,
                    dedup_window,
                    now,
                );
                // A replay is deliberate: it must not be taken for a provider's redelivery.
                NewEvent { dedup_key: None, ..ev }
            })
            .collect();
        // One transaction: a crash cannot leave the dead letter behind its replay (sent twice
        // by a second replay), and a concurrent replay or purge that got there first wins.
        if self.commit.append_replacing_dead(events, d.seq).await?.is_empty() {
            return Ok(false);
        }
        for t in &targets {
            self.ctx.metrics.replays.get_or_create(&MotionLabels { motion: t.motion.motion.name.clone() }).inc();
        }
        tracing::info!(delivery = %d.ev.delivery_id, "unowned dead letter replayed to the account that claims it now");
        Ok(true)
    }

    /// Deletes dead letters: the one with delivery id `id`, or all.
    pub async fn purge(&self, id: Option<String>) -> Result<usize, StoreError> {
        self.blocking(move |s| match id {
            None => s.purge_dead(None),
            Some(id) => {
                let mut n = 0;
                for seq in s.dead_seqs_of(&id)? {
                    n += s.purge_dead(Some(seq))?;
                }
                Ok(n)
            }
        })
        .await
    }
}
