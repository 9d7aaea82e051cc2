//! Sinch Conversation API: `x-sinch-webhook-signature` verification, the conversation, event id
//! and sender of its callbacks, and sends through its Conversation API with an OAuth2 token
//! (`oauth`) fetched with the account's access key.
//!
//! The signature is base64(HMAC-SHA256(secret, body + "." + nonce + "." + timestamp)). The
//! timestamp is what stops a captured callback from being replayed later, so one more than five
//! minutes from our clock is refused before, and whatever, the HMAC says.

use serde::Deserialize;

pub mod oauth;

use super::{
    Algorithm, Defaults, Encoding, Inbound, Keyed, OutboundAuth, OutboundCreds, Outgoing, Payload, Prefix, Provider,
    ProviderKind, Rejection, SignatureHeader, Verify, required_header,
};

/// Sinch, as accounts name it (`provider = "sinch"`).
pub const KIND: ProviderKind = ProviderKind::of(&Sinch);

const AUTH_URL: &str = "https://auth.sinch.com/oauth2/token";

pub struct Sinch;

impl Provider for Sinch {
    fn name(&self) -> &'static str {
        "sinch"
    }

    fn keyed(&self) -> Option<Keyed> {
        Some(Keyed {
            setting: "webhook_secret",
            secret: |c| &c.webhook_secret,
            check: |key| Box::new(Signature::new(key)),
            sign: |key, r| sign(key, r.body, r.now_unix),
        })
    }

    fn parse_payload(&self, _content_type: Option<&str>, body: &[u8]) -> Payload {
        payload(body)
    }

    fn sample(&self, text: &str, id: &str) -> (&'static str, Vec<u8>) {
        let v = serde_json::json!({"app_id": "simulate", "message": {"id": id, "direction": "TO_APP",
            "contact_message": {"text_message": {"text": text}},
            "channel_identity": {"channel": "WHATSAPP", "identity": super::SAMPLE_CUSTOMER, "app_id": "simulate"}}});
        ("application/json", v.to_string().into_bytes())
    }

    fn api_base(&self, region: Option<&str>) -> Option<String> {
        Some(format!("https://{}.conversation.api.sinch.com", if region == Some("eu") { "eu" } else { "us" }))
    }

    fn outbound_auth<'a>(&self, c: &'a OutboundCreds) -> OutboundAuth<'a> {
        match (&c.key_id, &c.key_secret) {
            (Some(id), Some(secret)) => OutboundAuth::OAuth(oauth::KeyRef {
                auth_url: c.auth_url.as_deref().unwrap_or(AUTH_URL),
                key_id: id,
                key_secret: secret.expose(),
            }),
            _ => OutboundAuth::Client,
        }
    }

    fn endpoints<'a>(&self, c: &'a OutboundCreds, _phone_number_id: Option<&'a str>) -> Result<Defaults<'a>, String> {
        if c.key_id.is_some() && c.project_id.is_none() {
            return Err(super::endpoints::unconfined("key_id/key_secret", "project_id"));
        }
        Ok(Defaults::new(c.project_id.as_deref()).with("POST", "/v1/projects/{}/messages:send"))
    }

    /// The WhatsApp identity among the recipient's channel identities (else the first); a send
    /// to a `contact_id` names no number and is not checked.
    fn send(&self, _content_type: Option<&str>, body: &[u8]) -> Option<Outgoing> {
        let v = serde_json::from_slice::<serde_json::Value>(body).ok()?;
        let ids = v["recipient"]["identified_by"]["channel_identities"].as_array()?;
        let id = ids.iter().find(|i| i["channel"] == "WHATSAPP").or_else(|| ids.first())?;
        Some(Outgoing {
            recipient: id["identity"].as_str()?.to_string(),
            template: !v["message"]["template_message"].is_null(),
        })
    }
}

const HEADER: SignatureHeader<'static> = SignatureHeader {
    name: "x-sinch-webhook-signature",
    prefix: Prefix::None,
    encoding: Encoding::Base64,
    algorithm: Algorithm::Sha256,
};
const NONCE: &str = "x-sinch-webhook-signature-nonce";
const TIMESTAMP: &str = "x-sinch-webhook-signature-timestamp";
const ALGORITHM: &str = "x-sinch-webhook-signature-algorithm";
/// How far (seconds, either direction) a timestamp may be from our clock.
const MAX_SKEW: u64 = 300;

/// The signature check of one account.
struct Signature {
    secret: Vec<u8>,
}

impl Signature {
    fn new(secret: Vec<u8>) -> Self {
        Signature { secret }
    }
}

impl Verify for Signature {
    fn verify(&self, req: &Inbound<'_>) -> Result<(), Rejection> {
        // Sinch always sends the algorithm; its absence is read as the one algorithm it uses.
        if req.headers.contains_key(ALGORITHM) && !required_header(req, ALGORITHM)?.eq_ignore_ascii_case("HmacSHA256") {
            return Err(Rejection::unauthorized("bad_encoding", format!("unsupported {ALGORITHM} (only HmacSHA256)")));
        }
        let nonce = required_header(req, NONCE)?;
        let timestamp = required_header(req, TIMESTAMP)?;
        let ts: i64 = timestamp
            .parse()
            .map_err(|_| Rejection::unauthorized("bad_encoding", format!("{TIMESTAMP} is not a number")))?;
        if req.now_unix.abs_diff(ts) > MAX_SKEW {
            return Err(Rejection::unauthorized(
                "stale_timestamp",
                format!("{TIMESTAMP} is more than {MAX_SKEW} s from the relay's clock"),
            ));
        }
        let parts: [&[u8]; 5] = [req.body, b".", nonce.as_bytes(), b".", timestamp.as_bytes()];
        HEADER.verify(req, &self.secret, &parts, "the body, nonce and timestamp")
    }
}

fn sign(secret: &[u8], body: &[u8], now_unix: i64) -> Vec<(String, String)> {
    let (nonce, ts) = (format!("relay-{now_unix}"), now_unix.to_string());
    let signature = HEADER.sign(secret, &[body, b".", nonce.as_bytes(), b".", ts.as_bytes()]);
    vec![
        (NONCE.to_owned(), nonce),
        (TIMESTAMP.to_owned(), ts),
        (ALGORITHM.to_owned(), "HmacSHA256".to_owned()),
        signature,
    ]
}

/// The callback kinds that name a message or an event and the customer's channel identity.
#[derive(Deserialize)]
struct Callback {
    message: Option<Item>,
    message_delivery_report: Option<Item>,
    event: Option<Item>,
    event_inbound: Option<Item>,
    event_delivery_report: Option<Item>,
}

#[derive(Deserialize)]
struct Item {
    id: Option<String>,
    message_id: Option<String>,
    event_id: Option<String>,
    status: Option<String>,
    channel_identity: Option<Identity>,
    /// `TO_APP` for what the customer sent, `TO_CONTACT` for an echo of what the business sent.
    direction: Option<String>,
}

#[derive(Deserialize)]
struct Identity {
    identity: Option<String>,
}

/// The conversation is `channel_identity.identity` of the message, delivery report or event the
/// callback carries (one per callback); the event id is `message.id`, a report's
/// `message_id:status` / `event_id:status`, or an event's `id`. The customer wrote when it is a
/// `message` travelling to the app (not a report, an event or an echo).
fn payload(body: &[u8]) -> Payload {
    let Ok(c) = serde_json::from_slice::<Callback>(body) else {
        return Payload::default();
    };
    let wrote = c.message.as_ref().is_some_and(|m| m.direction.as_deref().is_none_or(|d| d == "TO_APP"));
    let Some(item) =
        c.message.or(c.message_delivery_report).or(c.event_inbound).or(c.event_delivery_report).or(c.event)
    else {
        return Payload::default();
    };
    let event_id = item.id.or(item.message_id).or(item.event_id).map(|id| match item.status {
        Some(status) => format!("{id}:{status}"),
        None => id,
    });
    let conversation = item.channel_identity.and_then(|c| c.identity);
    let senders = if wrote { conversation.iter().cloned().collect() } else { Vec::new() };
    Payload { conversation, event_id, senders }
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

    fn vector_request(v: &toml::Table, now: i64) -> Req {
        let mut r = Req::post("https://x/", "application/json", s(v, "body"))
            .header(NONCE, s(v, "nonce"))
            .header(TIMESTAMP, s(v, "timestamp"))
            .header(ALGORITHM, "HmacSHA256")
            .header(HEADER.name, s(v, "signature"));
        r.now = now;
        r
    }

    #[test]
    fn known_answer_vector_and_tampering() {
        for v in vectors("sinch") {
            let now: i64 = s(&v, "timestamp").parse().unwrap();
            let sinch = Signature::new(s(&v, "secret").as_bytes().to_vec());
            assert_eq!(outcome(sinch.verify(&vector_request(&v, now).inbound())), "ok");
            assert_eq!(outcome(sinch.verify(&vector_request(&v, now + 300).inbound())), "ok", "edge of the window");

            let mut r = vector_request(&v, now);
            r.body.push(b' ');
            assert_eq!(outcome(sinch.verify(&r.inbound())), "mismatch", "tampered body");
            let r = vector_request(&v, now).header(NONCE, "other");
            assert_eq!(outcome(sinch.verify(&r.inbound())), "mismatch", "tampered nonce");
            let other = Signature::new(b"wrong".to_vec());
            assert_eq!(outcome(other.verify(&vector_request(&v, now).inbound())), "mismatch", "wrong secret");

            for h in [HEADER.name, NONCE, TIMESTAMP] {
                let mut r = vector_request(&v, now);
                r.headers.remove(h);
                assert_eq!(outcome(sinch.verify(&r.inbound())), "missing_header", "{h}");
            }
            let mut r = vector_request(&v, now);
            r.headers.remove(ALGORITHM);
            assert_eq!(outcome(sinch.verify(&r.inbound())), "ok", "algorithm header absent");
            let r = vector_request(&v, now).header(ALGORITHM, "HmacSHA1");
            assert_eq!(outcome(sinch.verify(&r.inbound())), "bad_encoding", "other algorithm");
            let r = vector_request(&v, now).header(TIMESTAMP, "yesterday");
            assert_eq!(outcome(sinch.verify(&r.inbound())), "bad_encoding");
        }
    }

    #[test]
    fn stale_and_future_timestamps_are_refused_whatever_the_hmac() {
        let v = &vectors("sinch")[0];
        let ts: i64 = s(v, "timestamp").parse().unwrap();
        let sinch = Signature::new(s(v, "secret").as_bytes().to_vec());
        for now in [ts + 301, ts - 301, i64::MAX, i64::MIN] {
            let e = sinch.verify(&vector_request(v, now).inbound()).unwrap_err();
            assert_eq!((e.status, e.reason), (401, "stale_timestamp"), "now = {now}");
            // The refusal does not depend on the signature being right.
            let r = vector_request(v, now).header(HEADER.name, "AAAA");
            assert_eq!(outcome(sinch.verify(&r.inbound())), "stale_timestamp");
        }
    }

    #[test]
    fn conversation_and_event_id() {
        let body = fixture("sinch-inbound-text.json");
        assert_eq!(conversation(&body).as_deref(), Some("16505551234"));
        assert_eq!(event_id(&body).as_deref(), Some("01W4FFL35P4NC4K35CONVMSG1"));
        let report = br#"{"app_id":"A","message_delivery_report":{"message_id":"01M","conversation_id":"C",
            "status":"DELIVERED","channel_identity":{"channel":"WHATSAPP","identity":"16505550000","app_id":""}}}"#;
        assert_eq!(conversation(report).as_deref(), Some("16505550000"));
        assert_eq!(event_id(report).as_deref(), Some("01M:DELIVERED"));
        let event = br#"{"event":{"id":"01E"}}"#;
        assert_eq!((conversation(event), event_id(event).as_deref()), (None, Some("01E")));
        // The vector's contact notification names neither.
        let contact = vectors("sinch")[0]["body"].as_str().unwrap().as_bytes().to_vec();
        assert_eq!((conversation(&contact), event_id(&contact)), (None, None));
    }
}
