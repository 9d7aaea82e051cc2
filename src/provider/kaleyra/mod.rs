//! Kaleyra: no signature scheme exists, so its accounts rely on `shared_token` and/or
//! `allow_from` (see `token`). This folder reads the conversation and sender of its payloads
//! (JSON, or the forms it also sends) and sends through its API with the account's `api-key`.

use serde::Deserialize;

use super::{Defaults, OutboundAuth, OutboundCreds, Outgoing, Payload, Provider, ProviderKind, body, is_form};

/// Kaleyra, as accounts name it (`provider = "kaleyra"`).
pub const KIND: ProviderKind = ProviderKind::of(&Kaleyra);

/// The header Kaleyra's API reads the account's key from.
pub const API_KEY: http::HeaderName = http::HeaderName::from_static("api-key");

pub struct Kaleyra;

impl Provider for Kaleyra {
    fn name(&self) -> &'static str {
        "kaleyra"
    }

    fn parse_payload(&self, content_type: Option<&str>, body: &[u8]) -> Payload {
        payload(content_type, body)
    }

    fn sample(&self, text: &str, id: &str) -> (&'static str, Vec<u8>) {
        sample(text, id)
    }

    fn api_base(&self, region: Option<&str>) -> Option<String> {
        Some(if region == Some("eu") { "https://api.eu.kaleyra.io" } else { "https://api.kaleyra.io" }.into())
    }

    fn outbound_auth<'a>(&self, c: &'a OutboundCreds) -> OutboundAuth<'a> {
        match &c.api_key {
            Some(k) => OutboundAuth::header(API_KEY, k.expose().to_string()),
            None => OutboundAuth::Client,
        }
    }

    fn endpoints<'a>(&self, c: &'a OutboundCreds, _phone_number_id: Option<&'a str>) -> Result<Defaults<'a>, String> {
        if c.api_key.is_some() && c.sid.is_none() {
            return Err(super::endpoints::unconfined("api_key", "sid"));
        }
        Ok(Defaults::new(c.sid.as_deref()).with("POST", "/v1/{}/messages").with("POST", "/v2/{}/whatsapp/*/messages"))
    }

    /// v1 forms (or multipart) with `to` and `type`/`template_name`; v2 JSON, which wraps the
    /// Cloud API message in `messaging_object`.
    fn send(&self, content_type: Option<&str>, b: &[u8]) -> Option<Outgoing> {
        if body::media_type(content_type) == "application/json" {
            let v = serde_json::from_slice::<serde_json::Value>(b).ok()?;
            let m = if v["messaging_object"].is_object() { &v["messaging_object"] } else { &v };
            return Some(Outgoing {
                recipient: m["to"].as_str()?.to_string(),
                template: m["type"] == "template" || !m["template_name"].is_null(),
            });
        }
        let f = body::fields(content_type, b)?;
        Some(Outgoing {
            recipient: f.get("to")?.clone(),
            template: f.get("type").is_some_and(|t| t == "template") || f.contains_key("template_name"),
        })
    }
}

/// A Kaleyra-shaped text message from [`super::SAMPLE_CUSTOMER`] (also `generic`'s sample).
pub(super) fn sample(text: &str, id: &str) -> (&'static str, Vec<u8>) {
    let v = serde_json::json!({"id": id, "from": super::SAMPLE_CUSTOMER, "name": "Simulated Customer", "type": "text", "body": text});
    ("application/json", v.to_string().into_bytes())
}

#[derive(Deserialize)]
struct Message {
    from: Option<String>,
    status: Option<serde::de::IgnoredAny>,
}

/// The conversation is the customer's number, `from`, of a JSON post (or of a form post, which
/// Kaleyra also sends). The customer wrote unless the payload carries a `status` (a delivery
/// report). Kaleyra gives no event id.
fn payload(content_type: Option<&str>, body: &[u8]) -> Payload {
    let (from, status) = if is_form(content_type) {
        let (mut from, mut status) = (None, false);
        for (k, v) in form_urlencoded::parse(body) {
            match &*k {
                "status" => status = true,
                "from" if from.is_none() => from = Some(v.into_owned()),
                _ => {}
            }
        }
        (from, status)
    } else {
        match serde_json::from_slice::<Message>(body) {
            Ok(m) => (m.from, m.status.is_some()),
            Err(_) => return Payload::default(),
        }
    };
    let senders = if status { Vec::new() } else { from.iter().cloned().collect() };
    Payload { conversation: from, event_id: None, senders }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::fixture;
    use super::*;

    #[test]
    fn from_json_and_form() {
        let body = fixture("kaleyra-inbound-text.json");
        let conversation = |ct, b: &[u8]| payload(ct, b).conversation;
        assert_eq!(conversation(Some("application/json"), &body).as_deref(), Some("16505551234"));
        let form = Some("application/x-www-form-urlencoded");
        assert_eq!(conversation(form, b"from=%2B16505551234&body=hi").as_deref(), Some("+16505551234"));
        assert_eq!(payload(form, b"from=1&status=read").senders, Vec::<String>::new());
        assert_eq!(conversation(None, b"{}"), None);
    }
}
