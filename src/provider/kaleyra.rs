//! Kaleyra: no signature scheme exists, so its accounts rely on `shared_token` and/or
//! `allow_from` (see `token`). This file reads the conversation of its payloads.

use serde::Deserialize;

use super::is_form;

#[derive(Deserialize)]
struct Message {
    from: Option<String>,
    status: Option<serde::de::IgnoredAny>,
}

/// The customer's number, `from`, of a JSON post (or of a form post, which Kaleyra also sends).
pub(super) fn conversation(content_type: Option<&str>, body: &[u8]) -> Option<String> {
    if is_form(content_type) {
        return form_urlencoded::parse(body).find(|(k, _)| k == "from").map(|(_, v)| v.into_owned());
    }
    serde_json::from_slice::<Message>(body).ok()?.from
}

/// The customer who wrote, for the 24-hour window: `from` of an incoming message; a payload
/// that carries a `status` is a delivery report, not the customer writing.
pub(super) fn inbound_sender(content_type: Option<&str>, body: &[u8]) -> Option<String> {
    if is_form(content_type) {
        let mut from = None;
        for (k, v) in form_urlencoded::parse(body) {
            match &*k {
                "status" => return None,
                "from" => from = Some(v.into_owned()),
                _ => {}
            }
        }
        return from;
    }
    let m = serde_json::from_slice::<Message>(body).ok()?;
    if m.status.is_some() { None } else { m.from }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::fixture;
    use super::*;

    #[test]
    fn from_json_and_form() {
        let body = fixture("kaleyra-inbound-text.json");
        assert_eq!(conversation(Some("application/json"), &body).as_deref(), Some("16505551234"));
        let form = Some("application/x-www-form-urlencoded");
        assert_eq!(conversation(form, b"from=%2B16505551234&body=hi").as_deref(), Some("+16505551234"));
        assert_eq!(conversation(None, b"{}"), None);
    }
}
