//! Meta WhatsApp Cloud API: `X-Hub-Signature-256` verification, and reading the conversation and
//! event ids of Cloud API payloads (shared with 360dialog, which delivers the same shape).
//!
//! The signature is "sha256=" + hex(HMAC-SHA256(app_secret, raw body)). Payloads are read with
//! typed serde structs that skip everything else, so a 3 MB batch costs one pass and no tree.

use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

use super::{Algorithm, Encoding, Inbound, PayloadKeys, Rejection, SignatureHeader, Verify};

const HEADER: SignatureHeader<'static> = SignatureHeader {
    name: "X-Hub-Signature-256",
    prefix: Some("sha256="),
    encoding: Encoding::Hex,
    algorithm: Algorithm::Sha256,
};

pub(super) struct Meta {
    app_secret: Vec<u8>,
}

impl Meta {
    pub(super) fn new(app_secret: Vec<u8>) -> Self {
        Meta { app_secret }
    }
}

impl Verify for Meta {
    fn verify(&self, req: &Inbound<'_>) -> Result<(), Rejection> {
        HEADER.verify(req, &self.app_secret, &[req.body], "the body")
    }
}

pub(super) fn sign(app_secret: &[u8], body: &[u8]) -> Vec<(String, String)> {
    vec![HEADER.sign(app_secret, &[body])]
}

/// The conversation is the customer of the first message (`from`) or status (`recipient_id`) in
/// document order. The event id joins every message id and every status id with its status
/// ("wamid.Y:read") by ",": a redelivered batch yields the same key, and one message's
/// successive statuses stay distinct events.
pub(super) fn keys(body: &[u8]) -> PayloadKeys {
    let Ok(Events(events)) = serde_json::from_slice::<Events>(body) else {
        return PayloadKeys::default();
    };
    let conversation = events.iter().find_map(|e| match e {
        Event::Message { from, .. } => from.clone().filter(|f| !f.is_empty()),
        Event::Status { recipient_id, .. } => recipient_id.clone().filter(|r| !r.is_empty()),
    });
    let ids: Vec<String> = events
        .into_iter()
        .filter_map(|e| match e {
            Event::Message { id, .. } => id,
            Event::Status { id, status, .. } => id.map(|id| match status {
                Some(s) => format!("{id}:{s}"),
                None => id,
            }),
        })
        .filter(|id| !id.is_empty())
        .collect();
    PayloadKeys { conversation, event_id: (!ids.is_empty()).then(|| ids.join(",")) }
}

/// Every customer who wrote in this payload (`messages[].from`, statuses left out), for the
/// 24-hour window; a batch may carry several.
pub(super) fn message_senders(body: &[u8]) -> Vec<String> {
    let Ok(Events(events)) = serde_json::from_slice::<Events>(body) else { return Vec::new() };
    let mut out: Vec<String> = Vec::new();
    for e in events {
        if let Event::Message { from: Some(f), .. } = e {
            if !f.is_empty() && !out.contains(&f) {
                out.push(f);
            }
        }
    }
    out
}

/// A message or a status, as the visitor below found it (it knows which by the array it read).
enum Event {
    Message { from: Option<String>, id: Option<String> },
    Status { id: Option<String>, status: Option<String>, recipient_id: Option<String> },
}

#[derive(Deserialize)]
struct Message {
    from: Option<String>,
    id: Option<String>,
}

#[derive(Deserialize)]
struct Status {
    id: Option<String>,
    status: Option<String>,
    recipient_id: Option<String>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    changes: Option<Vec<Change>>,
}

#[derive(Deserialize)]
struct Change {
    value: Option<Events>,
}

/// The messages and statuses of an object, in document order. serde's derive would lose the
/// order between a `messages` and a `statuses` key, hence this visitor. It reads the Cloud API
/// envelope (`entry[].changes[].value`) and, for 360dialog's older On-Premise shape, top-level
/// `messages`/`statuses` too.
#[derive(Default)]
struct Events(Vec<Event>);

impl<'de> Deserialize<'de> for Events {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(EventsVisitor)
    }
}

struct EventsVisitor;

/// The keys the visitor cares about, recognised without allocating a String per key.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Key {
    Entry,
    Messages,
    Statuses,
    #[serde(other)]
    Other,
}

impl<'de> Visitor<'de> for EventsVisitor {
    type Value = Events;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a WhatsApp webhook object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Events, A::Error> {
        let mut out = Vec::new();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Entry => {
                    let entries = map.next_value::<Option<Vec<Entry>>>()?.unwrap_or_default();
                    let changes = entries.into_iter().flat_map(|e| e.changes.unwrap_or_default());
                    out.extend(changes.flat_map(|c| c.value.unwrap_or_default().0));
                }
                Key::Messages => {
                    let list = map.next_value::<Option<Vec<Message>>>()?.unwrap_or_default();
                    out.extend(list.into_iter().map(|m| Event::Message { from: m.from, id: m.id }));
                }
                Key::Statuses => {
                    let list = map.next_value::<Option<Vec<Status>>>()?.unwrap_or_default();
                    out.extend(list.into_iter().map(|s| Event::Status {
                        id: s.id,
                        status: s.status,
                        recipient_id: s.recipient_id,
                    }));
                }
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Events(out))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;

    fn conversation(body: &[u8]) -> Option<String> {
        keys(body).conversation
    }

    fn event_id(body: &[u8]) -> Option<String> {
        keys(body).event_id
    }

    fn verifier(secret: &str) -> Meta {
        Meta::new(secret.as_bytes().to_vec())
    }

    fn signed(body: Vec<u8>, signature: &str) -> Req {
        Req::post("https://chat.example.com/meta/main", "application/json", body)
            .header("X-Hub-Signature-256", signature)
    }

    #[test]
    fn known_answer_vector() {
        for v in vectors("meta") {
            let body = fixture(s(&v, "body_file"));
            assert_eq!(body.len(), 513, "the vector signs the file with its trailing newline");
            let m = verifier(s(&v, "app_secret"));
            let sig = s(&v, "signature");
            assert_eq!(outcome(m.verify(&signed(body.clone(), sig).inbound())), "ok");
            // Hex is accepted in either case.
            let upper = format!("sha256={}", sig["sha256=".len()..].to_uppercase());
            assert_eq!(outcome(m.verify(&signed(body.clone(), &upper).inbound())), "ok");

            let mut tampered = body.clone();
            tampered.pop();
            assert_eq!(outcome(m.verify(&signed(tampered, sig).inbound())), "mismatch", "tampered body");
            assert_eq!(outcome(verifier("other").verify(&signed(body.clone(), sig).inbound())), "mismatch");
            assert_eq!(outcome(m.verify(&signed(body.clone(), "sha256=xyz").inbound())), "bad_encoding");
            let r = Req::post("https://x/", "application/json", body);
            assert_eq!(m.verify(&r.inbound()).unwrap_err().message, "missing X-Hub-Signature-256 header");
        }
    }

    #[test]
    fn first_event_in_document_order() {
        let body = br#"{"entry":[{"changes":[{"value":{"statuses":[{"id":"wamid.S","status":"delivered","recipient_id":"111"}],
            "messages":[{"from":"222","id":"wamid.M"}]}}]},{"changes":[{"value":{"messages":[{"from":"333","id":"wamid.N"}]}}]}]}"#;
        assert_eq!(conversation(body).as_deref(), Some("111"));
        assert_eq!(event_id(body).as_deref(), Some("wamid.S:delivered,wamid.M,wamid.N"));
    }

    #[test]
    fn payloads_without_events() {
        let template = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"message_template_status_update","value":{"event":"APPROVED"}}]}]}"#;
        assert_eq!(conversation(template), None);
        assert_eq!(event_id(template), None);
        assert_eq!(conversation(br#"{"entry":null}"#), None);
        assert_eq!(conversation(b"[1,2]"), None);
        // 360dialog On-Premise shape.
        assert_eq!(conversation(br#"{"contacts":[],"messages":[{"from":"444","id":"ABG"}]}"#).as_deref(), Some("444"));
    }
}
