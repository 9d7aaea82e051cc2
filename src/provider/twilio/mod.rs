//! Twilio: `X-Twilio-Signature` verification, the conversation, event id and sender of its form
//! posts, the empty TwiML acknowledgement, and sends through its Messages API (Basic auth with
//! the account SID and auth token).
//!
//! The signature is base64(HMAC-SHA1(auth_token, URL + sorted form parameters)). Because the URL
//! is signed, the relay must check against the URL Twilio called (the public one), never the
//! socket address it listens on. Twilio signs with or without the default port depending on how
//! the webhook URL was written, so both spellings are tried. JSON posts carry `bodySHA256` in the
//! query instead: only the URL is signed, and the body must hash to that value.

use std::borrow::Cow;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{
    Algorithm, Defaults, Encoding, Inbound, Keyed, OutboundAuth, OutboundCreds, Outgoing, Payload, Prefix, Provider,
    ProviderKind, Rejection, SignatureHeader, Verify, body, is_form,
};

/// Twilio, as accounts name it (`provider = "twilio"`).
pub const KIND: ProviderKind = ProviderKind::of(&Twilio);

pub struct Twilio;

impl Provider for Twilio {
    fn name(&self) -> &'static str {
        "twilio"
    }

    fn keyed(&self) -> Option<Keyed> {
        Some(Keyed {
            setting: "auth_token",
            secret: |c| &c.auth_token,
            check: |key| Box::new(Signature::new(key)),
            sign: |key, r| sign(key, r.url, r.content_type, r.body),
        })
    }

    /// An empty TwiML document: anything else would make Twilio reply to the customer.
    fn ack(&self) -> (&'static str, &'static str) {
        ("text/xml", "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>")
    }

    fn parse_payload(&self, content_type: Option<&str>, body: &[u8]) -> Payload {
        payload(content_type, body)
    }

    fn sample(&self, text: &str, id: &str) -> (&'static str, Vec<u8>) {
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("MessageSid", id)
            .append_pair("SmsStatus", "received")
            .append_pair("From", &format!("whatsapp:+{}", super::SAMPLE_CUSTOMER))
            .append_pair("To", "whatsapp:+15550000000")
            .append_pair("Body", text)
            .append_pair("NumMedia", "0")
            .finish();
        ("application/x-www-form-urlencoded", form.into_bytes())
    }

    fn api_base(&self, _region: Option<&str>) -> Option<String> {
        Some("https://api.twilio.com".into())
    }

    fn outbound_auth<'a>(&self, c: &'a OutboundCreds) -> OutboundAuth<'a> {
        use base64::Engine;
        match (&c.account_sid, &c.auth_token) {
            (Some(sid), Some(token)) => {
                let basic = base64::engine::general_purpose::STANDARD.encode(format!("{sid}:{}", token.expose()));
                OutboundAuth::header(http::header::AUTHORIZATION, format!("Basic {basic}"))
            }
            _ => OutboundAuth::Client,
        }
    }

    fn endpoints<'a>(&self, c: &'a OutboundCreds, _phone_number_id: Option<&'a str>) -> Result<Defaults<'a>, String> {
        Ok(Defaults::new(c.account_sid.as_deref())
            // Outgoing. Listing (GET Messages.json) is left out: it shows every number of the account.
            .with("POST", "/2010-04-01/Accounts/{}/Messages.json")
            // Fetch, update (redact, cancel) and delete one message.
            .with("GET,POST,DELETE", "/2010-04-01/Accounts/{}/Messages/*.json")
            // Its media: the list and each item (media download answers with a redirect).
            .with("GET", "/2010-04-01/Accounts/{}/Messages/*/Media.json")
            .with("GET,DELETE", "/2010-04-01/Accounts/{}/Messages/*/Media/**"))
    }

    fn send(&self, content_type: Option<&str>, b: &[u8]) -> Option<Outgoing> {
        let f = body::fields(content_type, b)?;
        Some(Outgoing { recipient: f.get("To")?.clone(), template: f.get("ContentSid").is_some_and(|c| !c.is_empty()) })
    }
}

/// The connection overrides (a URL fragment) that make Twilio retry a webhook that met a 503, a
/// connect timeout or a read timeout, up to 5 times within its 15 seconds, instead of once and
/// only on a failed connection. `check --urls` prints each Twilio account's URL with them, and
/// the signature check accepts a signature over the URL with or without them
/// (docs/providers.md, "Connection overrides").
pub const RETRY_OVERRIDES: &str = "rc=5&rp=ct,rt,5xx";

const HEADER: SignatureHeader<'static> = SignatureHeader {
    name: "X-Twilio-Signature",
    prefix: Prefix::None,
    encoding: Encoding::Base64,
    algorithm: Algorithm::Sha1,
};

/// The signature check of one account.
struct Signature {
    auth_token: Vec<u8>,
}

impl Signature {
    fn new(auth_token: Vec<u8>) -> Self {
        Signature { auth_token }
    }
}

impl Verify for Signature {
    fn reads_url(&self) -> bool {
        true
    }

    fn verify(&self, req: &Inbound<'_>) -> Result<(), Rejection> {
        let tag = HEADER.read(req)?;
        let body_sha = body_sha256_param(req.url);
        let params = signed_params(body_sha.is_some(), req.content_type(), req.body).ok_or_else(|| {
            Rejection::unauthorized(
                "too_many_params",
                format!("a Twilio webhook has far fewer than {MAX_SIGNED_PARAMS} form parameters"),
            )
        })?;
        let signed = |url: &str| Algorithm::Sha1.verify(&self.auth_token, &[url.as_bytes(), params.as_bytes()], &tag);
        let either_port = |url: &str| signed(url) || alternate_port_url(url).is_some_and(|u| signed(&u));
        // The fragment never reaches the relay, and Twilio does not document whether it signs
        // it: the URL as pasted with `check --urls`' overrides is the second candidate. Both are
        // keyed with this account's token, so accepting either lets nobody forge anything.
        if !either_port(req.url) && !either_port(&format!("{}#{RETRY_OVERRIDES}", req.url)) {
            return Err(HEADER.mismatch("the URL and parameters"));
        }
        // Twilio signs a form's parameters, or the body's hash in the URL (bodySHA256); any other
        // body would pass on the URL's signature alone, so anything could be sent in its place.
        if body_sha.is_none() && !is_form(req.content_type()) && !req.body.is_empty() {
            return Err(Rejection::unauthorized(
                "unsigned_body",
                "a Twilio webhook whose body is not a form must carry bodySHA256 in its URL",
            ));
        }
        // Checked after the signature, which is what makes the bodySHA256 in the URL trustworthy.
        if let Some(expected) = body_sha {
            let actual = Sha256::digest(req.body);
            let expected = hex::decode(expected.as_bytes()).unwrap_or_default();
            if !bool::from(actual.as_slice().ct_eq(&expected)) {
                return Err(Rejection::unauthorized("body_hash_mismatch", "body does not match bodySHA256"));
            }
        }
        Ok(())
    }
}

/// The headers a Twilio request to `url` with `body` carries, for `sign_request`.
fn sign(auth_token: &[u8], url: &str, content_type: Option<&str>, body: &[u8]) -> Vec<(String, String)> {
    let params = signed_params(body_sha256_param(url).is_some(), content_type, body).unwrap_or_default();
    vec![HEADER.sign(auth_token, &[url.as_bytes(), params.as_bytes()])]
}

/// The `bodySHA256` query parameter of the signed URL, if any.
fn body_sha256_param(url: &str) -> Option<Cow<'_, str>> {
    let (_, query) = url.split_once('?')?;
    let query = query.split('#').next().unwrap_or("");
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "bodySHA256").map(|(_, v)| v)
}

/// Form parameters a Twilio webhook may carry. Twilio sends a few dozen (about 40 for a message
/// with ten media). The signed string sorts them all, on the serving thread, before the signature
/// can be checked: without a bound, a 4 MiB body of empty parameters (`a&a&…`, no secret needed)
/// cost about a second of CPU and stalled every connection on that thread.
const MAX_SIGNED_PARAMS: usize = 1000;

/// What follows the URL in the signed string: every form parameter as key+value, sorted by key
/// and then value (Twilio's rule for duplicate keys); nothing for JSON (`bodySHA256`) or non-form
/// posts. None past [`MAX_SIGNED_PARAMS`] parameters (not Twilio's).
fn signed_params(json: bool, content_type: Option<&str>, body: &[u8]) -> Option<String> {
    if json || !is_form(content_type) {
        return Some(String::new());
    }
    let mut pairs: Vec<_> = form_urlencoded::parse(body).take(MAX_SIGNED_PARAMS + 1).collect();
    if pairs.len() > MAX_SIGNED_PARAMS {
        return None;
    }
    pairs.sort_unstable();
    Some(pairs.iter().flat_map(|(k, v)| [k.as_ref(), v.as_ref()]).collect())
}

/// The same URL with the scheme's default port removed when it is explicit, or inserted when it
/// is absent; None for any other port or scheme.
fn alternate_port_url(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let port = match scheme.to_ascii_lowercase().as_str() {
        "https" => ":443",
        "http" => ":80",
        _ => return None,
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    let host = &authority[authority.rfind('@').map_or(0, |i| i + 1)..];
    // A ':' after any IPv6 literal's ']' introduces a port.
    let has_port = host.rfind(':').is_some_and(|c| host.rfind(']').is_none_or(|b| c > b));
    if has_port {
        authority.strip_suffix(port).map(|a| format!("{scheme}://{a}{tail}"))
    } else {
        Some(format!("{scheme}://{authority}{port}{tail}"))
    }
}

/// The fields of a Twilio form that name the conversation and the event.
struct Fields<'a> {
    from: Option<Cow<'a, str>>,
    to: Option<Cow<'a, str>>,
    sid: Option<Cow<'a, str>>,
    status: Option<Cow<'a, str>>,
}

fn fields<'a>(content_type: Option<&str>, body: &'a [u8]) -> Option<Fields<'a>> {
    // Twilio always posts forms; a missing Content-Type is tolerated, JSON is not ours to read.
    if content_type.is_some() && !is_form(content_type) {
        return None;
    }
    let mut f = Fields { from: None, to: None, sid: None, status: None };
    let mut sms_status = None;
    for (k, v) in form_urlencoded::parse(body) {
        match &*k {
            "From" => f.from = Some(v),
            "To" => f.to = Some(v),
            "MessageSid" => f.sid = Some(v),
            "MessageStatus" => f.status = Some(v),
            "SmsStatus" => sms_status = Some(v),
            _ => {}
        }
    }
    f.status = f.status.or(sms_status);
    Some(f)
}

/// The conversation is `From` for an inbound message and `To` for a status callback (its status
/// is not "received"): either way, the customer, who also wrote when it is a message. The event
/// id is `MessageSid:status`, since one message goes through several statuses, each its own event.
fn payload(content_type: Option<&str>, body: &[u8]) -> Payload {
    let Some(f) = fields(content_type, body) else {
        return Payload::default();
    };
    let is_status = f.status.as_deref().is_some_and(|s| s != "received");
    let conversation = if is_status { f.to } else { f.from }.map(Cow::into_owned);
    let event_id = f.sid.filter(|s| !s.is_empty()).map(|sid| match &f.status {
        Some(status) => format!("{sid}:{status}"),
        None => sid.into_owned(),
    });
    let senders = if is_status { Vec::new() } else { conversation.iter().cloned().collect() };
    Payload { conversation, event_id, senders }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;

    const FORM: &str = "application/x-www-form-urlencoded";

    fn conversation(ct: Option<&str>, body: &[u8]) -> Option<String> {
        payload(ct, body).conversation
    }

    fn event_id(ct: Option<&str>, body: &[u8]) -> Option<String> {
        payload(ct, body).event_id
    }
    const PUBLIC: &str = "https://chat.example.com/acme/api/whatsapp/accounts/12/notify?x=1";

    fn verifier(token: &str) -> Signature {
        Signature::new(token.as_bytes().to_vec())
    }

    /// A request built from a [[twilio]] vector, sent to `url`.
    fn vector_request(v: &toml::Table, url: &str) -> Req {
        let req = match v.get("body") {
            Some(b) => Req::post(url, "application/json", b.as_str().unwrap()),
            None => {
                let mut form = form_urlencoded::Serializer::new(String::new());
                for p in v["params"].as_array().unwrap() {
                    let p = p.as_array().unwrap();
                    form.append_pair(p[0].as_str().unwrap(), p[1].as_str().unwrap());
                }
                Req::post(url, FORM, form.finish())
            }
        };
        req.header("X-Twilio-Signature", s(v, "signature"))
    }

    #[test]
    fn known_answer_vectors_with_and_without_default_port() {
        for v in vectors("twilio") {
            let t = verifier(s(&v, "auth_token"));
            let url = s(&v, "url");
            for u in [url.to_owned(), alternate_port_url(url).unwrap()] {
                assert_eq!(outcome(t.verify(&vector_request(&v, &u).inbound())), "ok", "{}: {u}", s(&v, "name"));
            }
        }
    }

    /// Whether Twilio signs the connection-override fragment is not documented: a signature
    /// over the URL with the relay's recommended fragment passes, as does one without; a
    /// fragment the relay does not know cannot be verified (the relay never sees it).
    #[test]
    fn the_recommended_override_fragment_may_be_signed_or_not() {
        let form = "Body=hi&From=whatsapp%3A%2B15550000001&MessageSid=SM1";
        let t = verifier("12345");
        let sign = |url: &str| sign(b"12345", url, Some(FORM), form.as_bytes())[0].1.clone();
        let with = |sig: String, url: &str| Req::post(url, FORM, form).header("X-Twilio-Signature", &sig);
        for signed_url in [
            PUBLIC.to_string(),
            format!("{PUBLIC}#{RETRY_OVERRIDES}"),
            format!("{}#{RETRY_OVERRIDES}", alternate_port_url(PUBLIC).unwrap()),
        ] {
            assert_eq!(outcome(t.verify(&with(sign(&signed_url), PUBLIC).inbound())), "ok", "{signed_url}");
        }
        for other in [format!("{PUBLIC}#rc=3"), format!("{PUBLIC}#{RETRY_OVERRIDES}&ct=100")] {
            assert_eq!(outcome(t.verify(&with(sign(&other), PUBLIC).inbound())), "mismatch", "{other}");
        }
    }

    #[test]
    fn tampering_is_refused() {
        let v = &vectors("twilio")[0];
        let t = verifier(s(v, "auth_token"));
        let url = s(v, "url");

        let mut r = vector_request(v, url);
        r.body.extend_from_slice(b"&Extra=1");
        assert_eq!(outcome(t.verify(&r.inbound())), "mismatch", "tampered body");

        let r = vector_request(v, &url.replace("foo=1", "foo=2"));
        assert_eq!(outcome(t.verify(&r.inbound())), "mismatch", "tampered query");

        let r = vector_request(v, url);
        assert_eq!(outcome(verifier("54321").verify(&r.inbound())), "mismatch", "wrong secret");

        let mut r = vector_request(v, url);
        r.headers.remove("X-Twilio-Signature");
        let e = t.verify(&r.inbound()).unwrap_err();
        assert_eq!((e.status, e.reason), (401, "missing_header"));
        assert_eq!(e.message, "missing X-Twilio-Signature header");

        let r = vector_request(v, url).header("X-Twilio-Signature", "not*base64");
        assert_eq!(outcome(t.verify(&r.inbound())), "bad_encoding");
    }

    #[test]
    fn a_body_that_is_not_a_form_needs_body_sha256() {
        // Signed on the URL alone (no form parameters, no bodySHA256): the body is not covered.
        let url = "https://chat.example.com/acme/api/whatsapp/accounts/12/notify";
        let headers = sign(b"12345", url, Some("application/json"), b"{\"any\":\"thing\"}");
        let r = Req::post(url, "application/json", &b"{\"any\":\"thing\"}"[..]).headers(headers);
        assert_eq!(outcome(verifier("12345").verify(&r.inbound())), "unsigned_body");
        // An empty body has nothing to sign: a signed URL is the whole request.
        let headers = sign(b"12345", url, Some("application/json"), b"");
        let r = Req::post(url, "application/json", &b""[..]).headers(headers);
        assert_eq!(outcome(verifier("12345").verify(&r.inbound())), "ok");
    }

    #[test]
    fn a_form_with_more_parameters_than_twilio_sends_is_refused_before_sorting() {
        // `a&a&…` up to the body limit, any signature: refused on the count, whatever the tag.
        let url = "https://chat.example.com/acme/api/whatsapp/accounts/12/notify";
        let body = "a&".repeat(2 << 20).into_bytes();
        let r = Req::post(url, FORM, body).header("X-Twilio-Signature", "AAAA");
        let e = verifier("12345").verify(&r.inbound()).unwrap_err();
        assert_eq!((e.status, e.reason), (401, "too_many_params"));
        // Signed and at the bound, a form still verifies: the bound refuses nothing Twilio sends.
        let body: Vec<u8> =
            (0..MAX_SIGNED_PARAMS).map(|i| format!("K{i}=v")).collect::<Vec<_>>().join("&").into_bytes();
        let headers = sign(b"12345", url, Some(FORM), &body);
        let r = Req::post(url, FORM, body.clone()).headers(headers);
        assert_eq!(outcome(verifier("12345").verify(&r.inbound())), "ok");
        let one_more = [&body[..], b"&K=v"].concat();
        let headers = sign(b"12345", url, Some(FORM), &one_more);
        let r = Req::post(url, FORM, one_more).headers(headers);
        assert_eq!(outcome(verifier("12345").verify(&r.inbound())), "too_many_params");
    }

    #[test]
    fn json_body_must_hash_to_body_sha256() {
        let v = vectors("twilio").into_iter().find(|v| v.contains_key("body")).unwrap();
        let t = verifier(s(&v, "auth_token"));
        let mut r = vector_request(&v, s(&v, "url"));
        r.body[2] ^= 1;
        assert_eq!(outcome(t.verify(&r.inbound())), "body_hash_mismatch");
        // The hash in the URL is signed: changing it to match a new body breaks the signature.
        let forged = s(&v, "url").replace("0a1ff7", "0a1ff8");
        assert_eq!(outcome(t.verify(&vector_request(&v, &forged).inbound())), "mismatch");
    }

    #[test]
    fn socket_address_signature_is_refused_on_the_public_url() {
        let body = fixture("twilio-inbound.form");
        let internal = "http://127.0.0.1:8080/acme/api/whatsapp/accounts/12/notify?x=1";
        let t = verifier("secret");
        let r = Req::post(PUBLIC, FORM, body.clone()).headers(sign(b"secret", internal, Some(FORM), &body));
        assert_eq!(outcome(t.verify(&r.inbound())), "mismatch");
        let r = Req::post(PUBLIC, FORM, body.clone()).headers(sign(b"secret", PUBLIC, Some(FORM), &body));
        assert_eq!(outcome(t.verify(&r.inbound())), "ok");
    }

    #[test]
    fn params_are_only_signed_for_forms() {
        let t = verifier("secret");
        let url = "https://chat.example.com/a?MessageSid=SM1";
        // A GET status callback (no body) signs the URL alone.
        let r = Req::post(url, FORM, "").headers(sign(b"secret", url, None, b""));
        assert_eq!(outcome(t.verify(&r.inbound())), "ok");
    }

    #[test]
    fn default_port_alternates() {
        let alt = |u| alternate_port_url(u);
        assert_eq!(alt("https://a.com/x?y=1").as_deref(), Some("https://a.com:443/x?y=1"));
        assert_eq!(alt("https://a.com:443/x").as_deref(), Some("https://a.com/x"));
        assert_eq!(alt("http://a.com").as_deref(), Some("http://a.com:80"));
        assert_eq!(alt("http://a.com:80?q").as_deref(), Some("http://a.com?q"));
        assert_eq!(alt("https://[2001:db8::1]/x").as_deref(), Some("https://[2001:db8::1]:443/x"));
        assert_eq!(alt("https://[2001:db8::1]:443/x").as_deref(), Some("https://[2001:db8::1]/x"));
        assert_eq!(alt("https://a.com:8443/x"), None);
        assert_eq!(alt("http://a.com:8080/x"), None);
        assert_eq!(alt("https://a.com:80/x"), None);
        assert_eq!(alt("ftp://a.com/x"), None);
    }

    #[test]
    fn conversation_and_event_id() {
        let inbound = fixture("twilio-inbound.form");
        let status = fixture("twilio-status-read.form");
        assert_eq!(conversation(Some(FORM), &inbound).as_deref(), Some("whatsapp:+16505551234"));
        assert_eq!(conversation(None, &inbound).as_deref(), Some("whatsapp:+16505551234"));
        assert_eq!(conversation(Some(FORM), &status).as_deref(), Some("whatsapp:+16505551234"));
        assert_eq!(event_id(Some(FORM), &status).as_deref(), Some("SM1a2b3c4d5e6f708192a3b4c5d6e7f809:read"));
        assert_eq!(conversation(Some("application/json"), &inbound), None);
        assert_eq!(event_id(Some(FORM), b"From=x"), None);
        assert_eq!(event_id(Some(FORM), b"MessageSid=SM1").as_deref(), Some("SM1"));
    }
}
