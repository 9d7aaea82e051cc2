//! One provider's parsing of outside input and its verification, with fixed secrets.

use http::{HeaderName, HeaderValue};

use super::Request;
use crate::provider::{
    AccountVerifier, Inbound, ProviderKind, Rejection, VerifierConfig, meta_handshake, sign_request,
};

/// Every secret of the fuzzed accounts: long enough that finding it in a message is no accident.
const SECRET: &str = "fuzz-secret-7f3a9c2e51d04b68";
/// The handshake token of every fuzzed account.
const VERIFY_TOKEN: &str = "fuzz-verify-token-0c4e8a1b";
/// The relay's clock (Sinch signs a timestamp, refused when more than five minutes off).
const NOW: i64 = 1_750_000_000;
/// The header of the generic HMAC.
const GENERIC_HEADER: &str = "X-Signature";

/// Refusals Twilio's check gives for a request its own signer signed: a body that is not a
/// form is not covered by the signature unless the URL carries `bodySHA256`, which must match,
/// and a form of more parameters than Twilio ever sends is refused before its signature.
const TWILIO_UNSIGNED: [&str; 3] = ["unsigned_body", "body_hash_mismatch", "too_many_params"];

/// The input is a request: the first line is the URL the provider called (with its query),
/// then headers, a blank line and the body (see [`Request::parse`]).
pub fn provider(kind: ProviderKind, data: &[u8]) {
    let req = Request::parse(data);
    let ct = req.content_type();

    // What the payload says about itself: the same on every read, and a customer who wrote is
    // also the conversation's.
    let p = kind.payload(ct, &req.body);
    assert_eq!(p, kind.payload(ct, &req.body), "payload parsing is deterministic");
    assert!(p.senders.is_empty() || p.conversation.is_some(), "senders without a conversation: {p:?}");
    assert!(p.senders.iter().chain(&p.conversation).chain(&p.event_id).all(|s| !s.is_empty()));
    if let Some(send) = crate::window::classify(kind, ct, &req.body) {
        assert!(!send.recipient.is_empty());
    }

    let url = req.first.as_str();
    let query = url.split_once('?').map(|(_, q)| q.split('#').next().unwrap_or(""));
    handshake(query);

    let cfg = account(kind, req.body.len());
    let verifier = AccountVerifier::new(&cfg).expect("the fuzzed account's settings are valid");
    let signed = sign_request(&cfg, url, ct, &req.body, NOW).expect("the fuzzed account can sign");
    let inbound = |headers| Inbound {
        url,
        query,
        headers,
        body: &req.body,
        client_ip: std::net::Ipv4Addr::new(203, 0, 113, 7).into(),
        now_unix: NOW,
    };

    // The request as it came: accepted or refused, a refusal never says the secret or what
    // was expected.
    if let Err(r) = verifier.verify(&inbound(&req.headers)) {
        refusal_reveals_nothing(&r, &signed);
    }

    // The same request signed by the provider's own signer verifies.
    let mut headers = req.headers.clone();
    for (name, value) in &signed {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("signer header names are valid");
        let value = HeaderValue::from_str(value).expect("signer header values are valid");
        headers.insert(name, value);
    }
    match verifier.verify(&inbound(&headers)) {
        Ok(()) => {}
        Err(r) if kind == crate::provider::twilio::KIND && TWILIO_UNSIGNED.contains(&r.reason) => {}
        Err(r) => panic!("{kind}: a request signed by its own signer is refused: {r:?}"),
    }

    // Where the MAC covers the raw body, any change to the body is refused. (Twilio signs the
    // decoded form parameters, which different bytes may spell alike; Kaleyra signs nothing.)
    use crate::provider::{dialog360, generic, meta, sinch};
    if [meta::KIND, dialog360::KIND, sinch::KIND, generic::KIND].contains(&kind) {
        let mut tampered = req.body.clone();
        match tampered.get_mut(req.body.len() / 2) {
            Some(b) => *b ^= 1,
            None => tampered.push(b' '),
        }
        let r = verifier.verify(&Inbound { body: &tampered, ..inbound(&headers) });
        assert!(r.is_err(), "{kind}: a tampered body passed its signature");
    }
}

/// Meta's handshake (any account with a `verify_token` answers it) grants the challenge only
/// for the account's own token.
fn handshake(query: Option<&str>) {
    match meta_handshake(query, Some(VERIFY_TOKEN)) {
        None => {}
        Some(Ok(_)) => {
            // A query may repeat the parameter (the last one counts): one of them is the token.
            let presented = form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .any(|(k, v)| k == "hub.verify_token" && v == VERIFY_TOKEN);
            assert!(presented, "handshake answered for another token: {query:?}");
        }
        Some(Err(r)) => {
            assert_eq!(r.status, 403);
            assert!(!r.message.contains(VERIFY_TOKEN), "a handshake refusal names the token");
        }
    }
}

fn refusal_reveals_nothing(r: &Rejection, signed: &[(String, String)]) {
    assert!(matches!(r.status, 401 | 403), "{r:?}");
    assert!(!r.message.contains(SECRET), "a refusal names the secret: {r:?}");
    // Signatures and tokens are long; nonces and timestamps are short and public.
    for (_, expected) in signed.iter().filter(|(_, v)| v.len() >= 20) {
        assert!(!r.message.contains(expected.as_str()), "a refusal names the expected value: {r:?}");
    }
}

/// An account of `kind` verified by its own signature with [`SECRET`] (Kaleyra, which has
/// none, by a shared token). The generic HMAC's algorithm, encoding and prefix vary with
/// `variant` (the body's length), so every combination is fuzzed.
fn account(kind: ProviderKind, variant: usize) -> VerifierConfig {
    use crate::provider::{dialog360, generic, kaleyra, meta, sinch, twilio};
    let secret = Some(SECRET.to_string());
    let mut cfg =
        VerifierConfig { provider: Some(kind), verify_token: Some(VERIFY_TOKEN.into()), ..Default::default() };
    if kind == twilio::KIND {
        cfg.auth_token = secret;
    } else if kind == meta::KIND {
        cfg.app_secret = secret;
    } else if kind == dialog360::KIND {
        cfg.platform_secret = secret;
    } else if kind == sinch::KIND {
        cfg.webhook_secret = secret;
    } else if kind == kaleyra::KIND {
        cfg.shared_token = secret;
    } else if kind == generic::KIND {
        cfg.hmac_header = Some(GENERIC_HEADER.into());
        cfg.hmac_secret = secret;
        cfg.hmac_algorithm = Some(["sha1", "sha256", "sha512"][variant % 3].into());
        cfg.hmac_encoding = Some(["hex", "base64"][variant / 3 % 2].into());
        cfg.hmac_prefix = [None, Some("sha256=".to_string())][variant / 6 % 2].clone();
    } else {
        unreachable!("a provider without a fuzzed account: add it here");
    }
    cfg
}
