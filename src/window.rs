//! The 24-hour customer service window. WhatsApp lets a business send free-form messages only
//! within 24 hours of the customer's last message; outside it only approved templates go
//! through (Meta error 131047, Twilio 63016). The relay sees every inbound message, so it
//! records the last one per account and customer, and an outbound send can be checked before
//! the provider refuses it.
//!
//! Reads and writes go through a small in-memory map in front of the durable store, so the
//! request path never waits on disk: an inbound message updates the map at once and is written
//! to the store by a background task (coalesced, not synced: it becomes durable with the store's
//! next synced commit or at shutdown; a crash may forget the last seconds of touches, which can
//! only make the window look closed, never open). A lookup the map cannot answer reads the store
//! once through `spawn_blocking` and remembers the answer. A pruning task drops what is older
//! than the window from memory and, with a margin, from the store.
//!
//! Key: Motion name, account id and the customer's number reduced to its digits (`whatsapp:` and
//! `+` and any formatting dropped), so Twilio's `whatsapp:+39…` and Meta's `39…` meet. The Motion
//! is part of the key because account ids are unique only within their Motion.
//!
//! Never logs a phone number or a body.

use crate::clock::Clock;
use crate::provider::{Outgoing, ProviderKind};
use crate::store::WindowStore;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

/// How long after the customer's last message free-form messages are allowed.
pub const WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Store entries are kept this long (beyond `WINDOW`, so a clock step or a late prune never
/// closes a window early).
const KEEP: Duration = Duration::from_secs(48 * 3600);
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Touches waiting for the writer; beyond it they are kept in memory only (and logged).
const WRITE_QUEUE: usize = 65_536;

/// What the relay knows of a customer's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Open,
    /// The customer wrote more than 24 hours ago, or never (as far as the relay has seen).
    Closed,
    /// The store could not be read: nothing is claimed.
    Unknown,
}

type Recent = Arc<Mutex<HashMap<String, u64>>>;

pub struct Window {
    clock: Arc<dyn Clock>,
    /// Last inbound time per key (0: looked up, nothing recorded).
    recent: Recent,
    store: Arc<dyn WindowStore>,
    writer: mpsc::Sender<(String, u64)>,
}

impl Window {
    /// The window over `store`, with its writer and pruning tasks started on the current
    /// runtime (they end when the window is dropped).
    pub fn start(clock: Arc<dyn Clock>, store: Arc<dyn WindowStore>) -> Window {
        let (writer, rx) = mpsc::channel(WRITE_QUEUE);
        let recent: Recent = Default::default();
        tokio::spawn(write_loop(rx, store.clone()));
        tokio::spawn(prune_loop(Arc::downgrade(&recent), store.clone(), clock.clone()));
        Window { clock, recent, store, writer }
    }

    pub fn now_unix_ms(&self) -> u64 {
        self.clock.now_unix_ms()
    }

    /// Records that `senders` (the customers who wrote in a verified inbound payload, see
    /// [`crate::provider::Payload`]) wrote now, to this Motion's account. Every delivery mode.
    pub fn record_inbound(&self, motion: &str, account: &str, senders: &[String]) {
        if senders.is_empty() {
            return;
        }
        let now = self.now_unix_ms();
        for s in senders {
            if let Some(k) = key(motion, account, s) {
                self.touch(k, now);
            }
        }
    }

    fn touch(&self, key: String, at_ms: u64) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            let e = recent.entry(key.clone()).or_insert(0);
            *e = (*e).max(at_ms);
        }
        if self.writer.try_send((key, at_ms)).is_err() {
            tracing::warn!("window writes are backed up; this touch is kept in memory only");
        }
    }

    /// The last inbound time recorded for `key`, if any.
    async fn last(&self, key: &str) -> Result<Option<u64>, crate::store::StoreError> {
        if let Some(&t) = self.recent.lock().unwrap_or_else(|e| e.into_inner()).get(key) {
            // Another relay sharing the store may have seen the customer since: only an open
            // window is taken from memory then.
            let open = t > 0 && self.now_unix_ms().saturating_sub(t) < WINDOW.as_millis() as u64;
            if open || !self.store.shared() {
                return Ok((t > 0).then_some(t));
            }
        }
        let store = self.store.clone();
        let k = key.to_string();
        let found = tokio::task::spawn_blocking(move || store.window_last(&k))
            .await
            .map_err(|e| crate::store::StoreError::Read(e.to_string()))??;
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        // A touch may have landed while the store was read: keep the later time.
        let e = recent.entry(key.to_string()).or_insert(0);
        *e = (*e).max(found.unwrap_or(0));
        Ok((*e > 0).then_some(*e))
    }

    /// Customers whose window is open now, by Motion and account (what the board shows).
    pub fn open_counts(&self) -> HashMap<(String, String), u64> {
        let since = self.now_unix_ms().saturating_sub(WINDOW.as_millis() as u64);
        let mut out: HashMap<(String, String), u64> = HashMap::new();
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        for key in recent.iter().filter(|(_, t)| **t > since).map(|(k, _)| k) {
            let mut parts = key.splitn(3, '\u{1f}');
            if let (Some(m), Some(a)) = (parts.next(), parts.next()) {
                *out.entry((m.to_string(), a.to_string())).or_default() += 1;
            }
        }
        out
    }

    /// Whether a free-form message to `customer` (as the outbound body spells it) of this
    /// account may go out now.
    pub async fn state(&self, motion: &str, account: &str, customer: &str) -> State {
        let Some(k) = key(motion, account, customer) else { return State::Unknown };
        match self.last(&k).await {
            Ok(Some(t)) if self.now_unix_ms().saturating_sub(t) < WINDOW.as_millis() as u64 => State::Open,
            Ok(_) => State::Closed,
            Err(e) => {
                tracing::warn!(motion, account, "cannot read the customer service window, not checking it: {e}");
                State::Unknown
            }
        }
    }
}

/// The store key, or None when the number has no digits.
fn key(motion: &str, account: &str, customer: &str) -> Option<String> {
    let number = normalise(customer)?;
    Some(format!("{motion}\u{1f}{account}\u{1f}{number}"))
}

/// `whatsapp:+39 333-1234` -> `393331234`; None without digits.
pub fn normalise(customer: &str) -> Option<String> {
    let c = customer.trim();
    let c = c.strip_prefix("whatsapp:").unwrap_or(c);
    let digits: String = c.chars().filter(char::is_ascii_digit).collect();
    (!digits.is_empty()).then_some(digits)
}

async fn write_loop(mut rx: mpsc::Receiver<(String, u64)>, store: Arc<dyn WindowStore>) {
    let mut batch: HashMap<String, u64> = HashMap::new();
    while let Some((k, t)) = rx.recv().await {
        batch.insert(k, t);
        // Coalesce what is already waiting: one customer writing ten times is one write.
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok((k, t)) => {
                    let e = batch.entry(k).or_insert(0);
                    *e = (*e).max(t);
                }
                Err(_) => break,
            }
        }
        let work: Vec<(String, u64)> = batch.drain().collect();
        let store = store.clone();
        let res = tokio::task::spawn_blocking(move || store.window_touch(&work)).await;
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("could not record the customer service window: {e}"),
            Err(e) => tracing::warn!("window writer failed: {e}"),
        }
    }
}

async fn prune_loop(recent: Weak<Mutex<HashMap<String, u64>>>, store: Arc<dyn WindowStore>, clock: Arc<dyn Clock>) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(recent) = recent.upgrade() else { return };
        let now = clock.now_unix_ms();
        let cutoff = now.saturating_sub(WINDOW.as_millis() as u64);
        recent.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, t| *t >= cutoff);
        drop(recent);
        let store = store.clone();
        let before = now.saturating_sub(KEEP.as_millis() as u64);
        match tokio::task::spawn_blocking(move || store.prune_window(before)).await {
            Ok(Ok(n)) if n > 0 => tracing::debug!(entries = n, "pruned old customer service window entries"),
            Ok(Err(e)) => tracing::warn!("could not prune the customer service window: {e}"),
            _ => {}
        }
    }
}

/// Reads a send's recipient and template flag (the provider's [`send`](crate::provider::Provider::send)).
/// None when the body is not a send to a known number (a mark-as-read, a Sinch `contact_id`, an
/// unreadable body): then nothing is checked.
pub fn classify(kind: ProviderKind, content_type: Option<&str>, body: &[u8]) -> Option<Outgoing> {
    kind.send(content_type, body).filter(|s| normalise(&s.recipient).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{dialog360, generic, kaleyra, meta, sinch, twilio};

    #[test]
    fn numbers_meet_across_spellings() {
        assert_eq!(normalise("whatsapp:+39 333-12").as_deref(), Some("3933312"));
        assert_eq!(normalise("39333 12").as_deref(), Some("3933312"));
        assert_eq!(normalise("whatsapp:"), None);
        assert_eq!(key("acme", "12", "+1 650"), key("acme", "12", "whatsapp:+1650"));
        assert_ne!(key("acme", "12", "1650"), key("globex", "12", "1650"));
    }

    #[test]
    fn recipients_and_templates_per_provider() {
        let form = Some("application/x-www-form-urlencoded");
        let tw = |b: &str| classify(twilio::KIND, form, b.as_bytes());
        assert_eq!(
            tw("To=whatsapp%3A%2B1650&Body=hi"),
            Some(Outgoing { recipient: "whatsapp:+1650".into(), template: false })
        );
        assert!(tw("To=whatsapp%3A%2B1650&ContentSid=HX1").unwrap().template);
        assert_eq!(tw("Body=&Status=canceled"), None, "an update is not a send");

        let json = Some("application/json");
        let meta = |b: &str| classify(meta::KIND, json, b.as_bytes());
        assert!(!meta(r#"{"messaging_product":"whatsapp","to":"1650","type":"text"}"#).unwrap().template);
        assert!(meta(r#"{"to":"1650","type":"template","template":{}}"#).unwrap().template);
        assert_eq!(meta(r#"{"messaging_product":"whatsapp","status":"read","message_id":"wamid.X"}"#), None);
        assert!(classify(dialog360::KIND, json, br#"{"to":"1650","type":"template"}"#).unwrap().template);

        let sinch = |b: &str| classify(sinch::KIND, json, b.as_bytes());
        let to = r#""recipient":{"identified_by":{"channel_identities":[{"channel":"SMS","identity":"1"},{"channel":"WHATSAPP","identity":"46700"}]}}"#;
        let s = sinch(&format!(r#"{{"app_id":"A",{to},"message":{{"text_message":{{"text":"hi"}}}}}}"#)).unwrap();
        assert_eq!((s.recipient.as_str(), s.template), ("46700", false));
        assert!(sinch(&format!(r#"{{{to},"message":{{"template_message":{{}}}}}}"#)).unwrap().template);
        assert_eq!(sinch(r#"{"recipient":{"contact_id":"C1"},"message":{}}"#), None, "unknown number: not checked");

        let k = classify(kaleyra::KIND, form, b"to=%2B1650&type=template&channel=whatsapp").unwrap();
        assert!(k.template);
        let v2 = br#"{"messaging_object":{"to":"+1650","type":"text","text":{"body":"x"}}}"#;
        assert!(!classify(kaleyra::KIND, json, v2).unwrap().template);
        let mp = "multipart/form-data; boundary=XyZ";
        let body = "--XyZ\r\nContent-Disposition: form-data; name=\"to\"\r\n\r\n+1650\r\n--XyZ\r\nContent-Disposition: form-data; name=\"type\"\r\n\r\ntext\r\n--XyZ--\r\n";
        assert_eq!(
            classify(kaleyra::KIND, Some(mp), body.as_bytes()),
            Some(Outgoing { recipient: "+1650".into(), template: false })
        );
        assert_eq!(classify(generic::KIND, json, br#"{"to":"1"}"#), None);
    }

    #[test]
    fn inbound_messages_open_the_window_statuses_do_not() {
        let senders = |k: ProviderKind, ct, b: &[u8]| k.payload(ct, b).senders;
        let form = Some("application/x-www-form-urlencoded");
        let tw = |b: &[u8]| senders(twilio::KIND, form, b);
        assert_eq!(tw(b"SmsStatus=received&From=whatsapp%3A%2B1650&To=whatsapp%3A%2B1415"), ["whatsapp:+1650"]);
        assert!(tw(b"MessageStatus=read&SmsStatus=read&To=whatsapp%3A%2B1650").is_empty());
        let meta = br#"{"entry":[{"changes":[{"value":{"statuses":[{"id":"s","status":"read","recipient_id":"111"}],
            "messages":[{"from":"222","id":"m1"},{"from":"333","id":"m2"},{"from":"222","id":"m3"}]}}]}]}"#;
        assert_eq!(senders(meta::KIND, None, meta), ["222", "333"]);
        let sinch_in = br#"{"message":{"direction":"TO_APP","channel_identity":{"identity":"46700"}}}"#;
        assert_eq!(senders(sinch::KIND, None, sinch_in), ["46700"]);
        let report = br#"{"message_delivery_report":{"status":"READ","channel_identity":{"identity":"46700"}}}"#;
        assert!(senders(sinch::KIND, None, report).is_empty());
        let json = Some("application/json");
        assert_eq!(senders(kaleyra::KIND, json, br#"{"from":"1650","type":"text"}"#), ["1650"]);
        assert!(senders(kaleyra::KIND, json, br#"{"from":"1","status":"read"}"#).is_empty());
    }

    #[tokio::test]
    async fn window_opens_closes_and_is_read_back_from_the_store() {
        let clock = Arc::new(crate::clock::ManualClock::new());
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn WindowStore> = Arc::new(crate::store::EmbeddedStore::open(dir.path()).unwrap());
        let w = Window::start(clock.clone(), store.clone());
        assert_eq!(w.state("acme", "12", "+1650").await, State::Closed, "never seen");
        w.touch(key("acme", "12", "1650").unwrap(), w.now_unix_ms());
        assert_eq!(w.state("acme", "12", "whatsapp:+1650").await, State::Open);
        assert_eq!(w.state("acme", "13", "+1650").await, State::Closed, "another account");
        clock.advance(Duration::from_secs(25 * 3600));
        assert_eq!(w.state("acme", "12", "+1650").await, State::Closed);
        assert_eq!(w.state("acme", "12", "no digits").await, State::Unknown);

        // A fresh process (empty memory) reads the store, once the writer task has written it.
        let k = key("acme", "12", "1650").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.window_last(&k).unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "the touch never reached the store");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let fresh = Window::start(Arc::new(crate::clock::SystemClock), store);
        assert_eq!(fresh.state("acme", "12", "+1650").await, State::Open);
    }
}
