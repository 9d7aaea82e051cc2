//! Sinch Conversation API: `x-sinch-webhook-signature` verification, and the conversation and
//! event id of its callbacks.
//!
//! The signature is base64(HMAC-SHA256(secret, body + "." + nonce + "." + timestamp)). The
//! timestamp is what stops a captured callback from being replayed later, so one more than five
//! minutes from our clock is refused before, and whatever, the HMAC says.

use serde::Deserialize;

use super::{Algorithm, Encoding, Inbound, PayloadKeys, Rejection, SignatureHeader, Verify, required_header};

const HEADER: SignatureHeader<'static> = SignatureHeader {
    name: "x-sinch-webhook-signature",
    prefix: None,
    encoding: Encoding::Base64,
    algorithm: Algorithm::Sha256,
};
const NONCE: &str = "x-sinch-webhook-signature-nonce";
const TIMESTAMP: &str = "x-sinch-webhook-signature-timestamp";
const ALGORITHM: &str = "x-sinch-webhook-signature-algorithm";
/// How far (seconds, either direction) a timestamp may be from our clock.
const MAX_SKEW: u64 = 300;

pub(super) struct Sinch {
    secret: Vec<u8>,
}

impl Sinch {
    pub(super) fn new(secret: Vec<u8>) -> Self {
        Sinch { secret }
    }
}

impl Verify for Sinch {
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

pub(super) fn sign(secret: &[u8], body: &[u8], now_unix: i64) -> Vec<(String, String)> {
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
/// `message_id:status` / `event_id:status`, or an event's `id`.
pub(super) fn keys(body: &[u8]) -> PayloadKeys {
    let Some(item) = serde_json::from_slice::<Callback>(body).ok().and_then(|c| {
        c.message.or(c.message_delivery_report).or(c.event_inbound).or(c.event_delivery_report).or(c.event)
    }) else {
        return PayloadKeys::default();
    };
    let event_id = item.id.or(item.message_id).or(item.event_id).map(|id| match item.status {
        Some(status) => format!("{id}:{status}"),
        None => id,
    });
    PayloadKeys { conversation: item.channel_identity.and_then(|c| c.identity), event_id }
}

/// The customer who wrote, for the 24-hour window: the channel identity of a `message`
/// callback travelling to the app; None for delivery reports, events and echoes.
pub(super) fn inbound_sender(body: &[u8]) -> Option<String> {
    let m = serde_json::from_slice::<Callback>(body).ok()?.message?;
    if m.direction.as_deref().is_some_and(|d| d != "TO_APP") {
        return None;
    }
    m.channel_identity?.identity
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
            let sinch = Sinch::new(s(&v, "secret").as_bytes().to_vec());
            assert_eq!(outcome(sinch.verify(&vector_request(&v, now).inbound())), "ok");
            assert_eq!(outcome(sinch.verify(&vector_request(&v, now + 300).inbound())), "ok", "edge of the window");

            let mut r = vector_request(&v, now);
            r.body.push(b' ');
            assert_eq!(outcome(sinch.verify(&r.inbound())), "mismatch", "tampered body");
            let r = vector_request(&v, now).header(NONCE, "other");
            assert_eq!(outcome(sinch.verify(&r.inbound())), "mismatch", "tampered nonce");
            let other = Sinch::new(b"wrong".to_vec());
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
        let sinch = Sinch::new(s(v, "secret").as_bytes().to_vec());
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
