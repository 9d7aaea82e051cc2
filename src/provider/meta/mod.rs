//! Meta WhatsApp Cloud API: `X-Hub-Signature-256` verification, reading the conversation, event
//! ids and senders of Cloud API payloads and the recipient of a send (shared with 360dialog,
//! which uses the same shapes), the GET handshake (`handshake`), and sends through the Graph API
//! with the account's access token.
//!
//! The signature is "sha256=" + hex(HMAC-SHA256(app_secret, raw body)). Payloads are read with
//! typed serde structs that skip everything else, so a 3 MB batch costs one pass and no tree.

use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

pub mod handshake;

use super::{
    Algorithm, Defaults, Encoding, Inbound, Keyed, OutboundAuth, OutboundCreds, Outgoing, Payload, Prefix, Provider,
    ProviderKind, Rejection, SignatureHeader, Verify,
};

/// Meta's Cloud API, as accounts name it (`provider = "meta"`).
pub const KIND: ProviderKind = ProviderKind::of(&Meta);

pub struct Meta;

impl Provider for Meta {
    fn name(&self) -> &'static str {
        "meta"
    }

    fn keyed(&self) -> Option<Keyed> {
        Some(Keyed {
            setting: "app_secret",
            secret: |c| &c.app_secret,
            check: |key| Box::new(Signature::new(key)),
            sign: |key, r| vec![HEADER.sign(key, &[r.body])],
        })
    }

    /// `X-Hub-Signature` is the older SHA-1 signature Meta still sends beside the SHA-256 one.
    fn signature_headers(&self) -> &'static [&'static str] {
        &["x-hub-signature-256", "x-hub-signature"]
    }

    fn parse_payload(&self, _content_type: Option<&str>, body: &[u8]) -> Payload {
        payload(body)
    }

    fn cloud_api(&self) -> bool {
        true
    }

    fn sample(&self, text: &str, id: &str) -> (&'static str, Vec<u8>) {
        sample(text, id)
    }

    fn api_base(&self, _region: Option<&str>) -> Option<String> {
        Some("https://graph.facebook.com".into())
    }

    fn outbound_auth<'a>(&self, c: &'a OutboundCreds) -> OutboundAuth<'a> {
        match &c.access_token {
            Some(t) => OutboundAuth::header(http::header::AUTHORIZATION, format!("Bearer {}", t.expose())),
            None => OutboundAuth::Client,
        }
    }

    fn endpoints<'a>(&self, c: &'a OutboundCreds, phone_number_id: Option<&'a str>) -> Result<Defaults<'a>, String> {
        if c.access_token.is_some() && phone_number_id.is_none() {
            return Err(super::endpoints::unconfined("access_token", "phone_number_id"));
        }
        let d = Defaults::new(phone_number_id).with("POST", "/v*/{}/messages").with("POST", "/v*/{}/media");
        // GET /{media-id} reads any Graph object the token can see: with the relay's own
        // token that could be another number's or another tenant's, so only the client's
        // own credentials may use it.
        Ok(if c.access_token.is_none() { d.with("GET,DELETE", "/v*/*") } else { d })
    }

    fn send(&self, _content_type: Option<&str>, body: &[u8]) -> Option<Outgoing> {
        send(body)
    }
}

/// A Cloud API send: `to`, and `type` "template".
pub(super) fn send(body: &[u8]) -> Option<Outgoing> {
    let v = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    Some(Outgoing { recipient: v["to"].as_str()?.to_string(), template: v["type"] == "template" })
}

/// A Cloud API text message from [`super::SAMPLE_CUSTOMER`].
pub(super) fn sample(text: &str, id: &str) -> (&'static str, Vec<u8>) {
    let customer = super::SAMPLE_CUSTOMER;
    let v = serde_json::json!({"object": "whatsapp_business_account", "entry": [{"id": "0", "changes": [{"field": "messages", "value": {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550000000", "phone_number_id": "0"},
        "contacts": [{"profile": {"name": "Simulated Customer"}, "wa_id": customer}],
        "messages": [{"from": customer, "id": id, "timestamp": "0", "type": "text", "text": {"body": text}}]}}]}]});
    ("application/json", v.to_string().into_bytes())
}

const HEADER: SignatureHeader<'static> = SignatureHeader {
    name: "X-Hub-Signature-256",
    prefix: Prefix::Required("sha256="),
    encoding: Encoding::Hex,
    algorithm: Algorithm::Sha256,
};

/// The signature check of one account or app.
struct Signature {
    app_secret: Vec<u8>,
}

impl Signature {
    fn new(app_secret: Vec<u8>) -> Self {
        Signature { app_secret }
    }
}

impl Verify for Signature {
    fn verify(&self, req: &Inbound<'_>) -> Result<(), Rejection> {
        HEADER.verify(req, &self.app_secret, &[req.body], "the body")
    }
}

/// The conversation is the customer of the first message (`from`) or status (`recipient_id`) in
/// document order. The event id joins every message id and every status id with its status
/// ("wamid.Y:read") by ",": a redelivered batch yields the same key, and one message's
/// successive statuses stay distinct events. The senders are every customer who wrote
/// (`messages[].from`, statuses left out): a batch may carry several.
pub(super) fn payload(body: &[u8]) -> Payload {
    let Ok(Events(events)) = serde_json::from_slice::<Events>(body) else {
        return Payload::default();
    };
    let conversation = events.iter().find_map(|e| match e {
        Event::Message { from, .. } => from.clone().filter(|f| !f.is_empty()),
        Event::Status { recipient_id, .. } => recipient_id.clone().filter(|r| !r.is_empty()),
    });
    let mut senders: Vec<String> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    for e in events {
        let id = match e {
            Event::Message { id, from } => {
                if let Some(f) = from.filter(|f| !f.is_empty() && !senders.contains(f)) {
                    senders.push(f);
                }
                id
            }
            Event::Status { id, status, .. } => id.map(|id| match status {
                Some(s) => format!("{id}:{s}"),
                None => id,
            }),
        };
        ids.extend(id.filter(|id| !id.is_empty()));
    }
    Payload { conversation, event_id: (!ids.is_empty()).then(|| ids.join(",")), senders }
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
        payload(body).conversation
    }

    fn event_id(body: &[u8]) -> Option<String> {
        payload(body).event_id
    }

    fn verifier(secret: &str) -> Signature {
        Signature::new(secret.as_bytes().to_vec())
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
            // The right MAC without the "sha256=" Meta always sends: not as Meta signs.
            let bare = &sig["sha256=".len()..];
            let e = m.verify(&signed(body.clone(), bare).inbound()).unwrap_err();
            assert_eq!(
                (e.reason, e.message.as_str()),
                ("bad_encoding", "X-Hub-Signature-256 does not start with \"sha256=\"")
            );
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
        assert_eq!(payload(body).senders, ["222", "333"], "statuses open no window");
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
