//! Providers: everything that differs from one WhatsApp provider to the next, one folder each,
//! behind the [`Provider`] trait. The rest of the relay asks the trait and never matches on a
//! provider.
//!
//! A provider owns: how its webhooks are verified (and signed, for `simulate`), what a payload
//! says about itself (the conversation, the event id, the customers who wrote: one parse), the
//! acknowledgement it expects, how the relay authenticates sends to its API, its default API
//! base and messaging endpoints, how a send names its recipient (the 24-hour window), and a
//! sample message. The checks any provider may use (a shared token, `allow_from`), the HMAC
//! helpers and the endpoint patterns live beside them.
//!
//! Adding a provider: a folder `provider/<name>/` with a unit struct that implements
//! [`Provider`], and one line in [`REGISTRY`].
//!
//! Must never: put a secret or an expected signature in a [`Rejection`] message.

use std::fmt;

use http::{HeaderName, HeaderValue};

mod body;
pub mod dialog360;
mod endpoints;
pub mod generic;
pub mod kaleyra;
pub mod meta;
mod signature;
pub mod sinch;
#[cfg(test)]
pub(crate) mod testkit;
mod token;
pub mod twilio;
mod verifier;

pub(crate) use body::is_form;
pub use endpoints::{AllowList, Defaults, OutboundCreds, Pattern};
pub use meta::handshake::meta_handshake;
pub use signature::ct_eq;
pub(crate) use signature::{Algorithm, Encoding, Prefix, SignatureHeader, required_header};
pub use verifier::{AccountVerifier, VerifierConfig, Verify, sign_request};

/// The customer of every [`Provider::sample`].
pub(crate) const SAMPLE_CUSTOMER: &str = "15550000001";

/// Every provider the relay knows, in the order `check` and error messages list them.
static REGISTRY: [&dyn Provider; 6] =
    [&twilio::Twilio, &meta::Meta, &dialog360::Dialog360, &sinch::Sinch, &kaleyra::Kaleyra, &generic::Generic];

/// What one provider does differently. Every method but `name` and `sample` has a default that
/// suits a provider without that feature.
pub trait Provider: Send + Sync + 'static {
    /// The config spelling (`provider = "..."`), also its metric label and its name in the store.
    fn name(&self) -> &'static str;

    /// The provider's signature keyed by one account secret, if it signs that way (most do).
    /// The four methods below follow from it; a provider that signs otherwise overrides them.
    fn keyed(&self) -> Option<Keyed> {
        None
    }

    /// The account settings of this provider's own signature that are set in `cfg` (set on an
    /// account of another provider they would be silently ignored, so they are refused).
    fn own_settings(&self, cfg: &VerifierConfig) -> Vec<&'static str> {
        self.keyed().filter(|k| (k.secret)(cfg).is_some()).map(|k| k.setting).into_iter().collect()
    }

    /// How an error message names this provider's own check ("auth_token (twilio)"); None when
    /// it has no signature scheme.
    fn own_check(&self) -> Option<String> {
        self.keyed().map(|k| format!("{} ({})", k.setting, self.name()))
    }

    /// The provider's signature check from an account's settings: None when none is configured,
    /// Err when the settings are invalid.
    fn signature(&self, cfg: &VerifierConfig) -> Result<Option<Box<dyn Verify>>, String> {
        let Some(k) = self.keyed() else { return Ok(None) };
        Ok(verifier::secret((k.secret)(cfg), k.setting)?.map(k.check))
    }

    /// Headers that make `body`, posted to `url`, pass [`signature`](Self::signature).
    fn sign(&self, cfg: &VerifierConfig, req: &ToSign<'_>) -> Result<Vec<(String, String)>, String> {
        Ok(self
            .keyed()
            .and_then(|k| (k.secret)(cfg).as_deref().map(|key| (k.sign)(key.as_bytes(), req)))
            .unwrap_or_default())
    }

    /// The headers that carry its signature of a body: a body the relay rewrites (a Meta app's
    /// batch split per account) must not carry them any more.
    fn signature_headers(&self) -> &'static [&'static str] {
        &[]
    }

    /// The acknowledgement the provider expects for a stored webhook: (content type, body).
    fn ack(&self) -> (&'static str, &'static str) {
        ("text/plain", "")
    }

    /// What a payload says about itself, read in one pass (see [`ProviderKind::payload`]).
    fn parse_payload(&self, _content_type: Option<&str>, _body: &[u8]) -> Payload {
        Payload::default()
    }

    /// Whether its webhooks come in the Cloud API envelope, so one `[[meta_app]]` may receive
    /// them for many accounts.
    fn cloud_api(&self) -> bool {
        false
    }

    /// A sample inbound text message in the provider's own format, for `simulate`:
    /// (content type, body).
    fn sample(&self, text: &str, id: &str) -> (&'static str, Vec<u8>);

    /// The provider's public API base for an account's `region` (None: it has no known API, and
    /// the account must name its `api_base`).
    fn api_base(&self, _region: Option<&str>) -> Option<String> {
        None
    }

    /// How the relay authenticates an account's sends with the credentials it holds.
    fn outbound_auth<'a>(&self, _creds: &'a OutboundCreds) -> OutboundAuth<'a> {
        OutboundAuth::Client
    }

    /// The messaging endpoints an account may reach when it lists no `outbound_paths`. Err when
    /// the relay holds credentials that a free id segment would let a Motion use as anyone.
    fn endpoints<'a>(&self, creds: &'a OutboundCreds, phone_number_id: Option<&'a str>)
    -> Result<Defaults<'a>, String>;

    /// Who an outbound request body sends to, and whether it is a template (the 24-hour window).
    fn send(&self, _content_type: Option<&str>, _body: &[u8]) -> Option<Outgoing> {
        None
    }
}

/// A signature keyed by one account secret: the setting that holds it, the check built from it,
/// and how a sender signs with it (for `simulate`).
pub struct Keyed {
    pub setting: &'static str,
    pub secret: fn(&VerifierConfig) -> &Option<String>,
    pub check: fn(Vec<u8>) -> Box<dyn Verify>,
    pub sign: fn(&[u8], &ToSign<'_>) -> Headers,
}

/// Header names and values, as a sender would set them.
pub type Headers = Vec<(String, String)>;

/// What a sender signs: the URL it posts to, the body and its type, and its clock.
pub struct ToSign<'a> {
    pub url: &'a str,
    pub content_type: Option<&'a str>,
    pub body: &'a [u8],
    pub now_unix: i64,
}

/// A provider, as accounts, events and metrics name it: a handle on its [`Provider`]. Compared,
/// hashed, printed and stored by its name.
#[derive(Clone, Copy)]
pub struct ProviderKind(&'static dyn Provider);

impl ProviderKind {
    pub(crate) const fn of(p: &'static dyn Provider) -> ProviderKind {
        ProviderKind(p)
    }

    /// Every provider, in registry order.
    pub fn all() -> impl Iterator<Item = ProviderKind> {
        REGISTRY.iter().map(|p| ProviderKind(*p))
    }

    /// The config spelling, nothing else: a typo must be a config error.
    pub fn parse(s: &str) -> Option<Self> {
        Self::all().find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        self.0.name()
    }

    /// The names, for error messages ("twilio, meta, ...").
    pub fn names() -> String {
        Self::all().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// What a payload says about itself; empty values are dropped (an empty key would merge
    /// unrelated events).
    pub fn payload(self, content_type: Option<&str>, body: &[u8]) -> Payload {
        let p = self.0.parse_payload(content_type, body);
        Payload {
            conversation: p.conversation.filter(|s| !s.is_empty()),
            event_id: p.event_id.filter(|s| !s.is_empty()),
            senders: p.senders.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }
}

impl std::ops::Deref for ProviderKind {
    type Target = dyn Provider;

    fn deref(&self) -> &Self::Target {
        self.0
    }
}

impl PartialEq for ProviderKind {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for ProviderKind {}

impl std::hash::Hash for ProviderKind {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl fmt::Debug for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Stored by name (the same bytes as the string it replaced in the store's format 1).
impl serde::Serialize for ProviderKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for ProviderKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
        ProviderKind::parse(&name).ok_or_else(|| serde::de::Error::custom(format!("unknown provider {name:?}")))
    }
}

/// A webhook request as the verifiers see it. Everything borrowed; nothing copied.
pub struct Inbound<'a> {
    /// The URL the provider called, reconstructed by the relay: "scheme://host[:port]/path?query",
    /// path and query exactly as received on the wire (still percent-encoded). Empty unless one
    /// of the account's checks [`reads_url`](Verify::reads_url).
    pub url: &'a str,
    /// The raw query string (without '?'), if any.
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    pub body: &'a [u8],
    /// The client address (already resolved through trusted proxies by the caller).
    pub client_ip: std::net::IpAddr,
    /// Unix seconds "now" (injected so tests can control it).
    pub now_unix: i64,
}

impl Inbound<'_> {
    fn content_type(&self) -> Option<&str> {
        self.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok())
    }
}

/// Why a request was refused: 401 (`bad_signature`) or 403 (`forbidden`, for `allow_from` and
/// the handshake token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    /// Short metric label: "missing_header", "mismatch", "bad_encoding", "stale_timestamp", "missing_token", "bad_token", "source_not_allowed", "body_hash_mismatch", "too_many_params".
    pub reason: &'static str,
    /// Human message naming what was wrong — NEVER the expected value or any secret.
    pub message: String,
}

impl Rejection {
    pub(crate) fn unauthorized(reason: &'static str, message: impl Into<String>) -> Self {
        Self { status: 401, reason, message: message.into() }
    }

    pub(crate) fn forbidden(reason: &'static str, message: impl Into<String>) -> Self {
        Self { status: 403, reason, message: message.into() }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Rejection {}

/// What a payload says about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Payload {
    /// The customer (ordering key within the account): the first message's sender or status's
    /// recipient. None when not found or unparseable (the caller then uses the account alone).
    pub conversation: Option<String>,
    /// The provider's event id (dedup key within the account), or None (the caller falls back
    /// to the body hash).
    pub event_id: Option<String>,
    /// The customers who wrote (messages only, never statuses or reports), as the provider
    /// spells them: what opens the 24-hour customer service window.
    pub senders: Vec<String>,
}

/// What an outbound request body says about the 24-hour window: who it goes to, as the client
/// spelled it, and whether it is a template (allowed at any time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub recipient: String,
    pub template: bool,
}

/// How the relay authenticates an account's calls to its provider.
pub enum OutboundAuth<'a> {
    /// The relay holds nothing: the client's own `Authorization` (or key header) passes.
    Client,
    /// A fixed header from the account's credentials (its value marked sensitive).
    Header(HeaderName, HeaderValue),
    /// An OAuth2 client-credentials token for this key, fetched and cached by [`sinch::oauth`].
    OAuth(sinch::oauth::KeyRef<'a>),
}

impl OutboundAuth<'_> {
    /// A fixed header; a value that is not a valid header (config secrets are text, but may
    /// hold anything) cannot be sent: the client's own credentials stand in, and a warning says
    /// the operator must fix it.
    pub(crate) fn header(name: HeaderName, value: String) -> Self {
        match HeaderValue::from_str(&value) {
            Ok(mut v) => {
                v.set_sensitive(true);
                OutboundAuth::Header(name, v)
            }
            Err(_) => {
                tracing::warn!(header = %name, "an outbound credential is not a valid header value; passing the client's credentials instead");
                OutboundAuth::Client
            }
        }
    }

    /// The credential headers the relay sets: the client's own are dropped where it does.
    pub fn replaces(&self) -> &'static [HeaderName] {
        static HELD: [HeaderName; 3] = [http::header::AUTHORIZATION, dialog360::API_KEY, kaleyra::API_KEY];
        if matches!(self, OutboundAuth::Client) { &[] } else { &HELD }
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::*;
    use super::*;

    #[test]
    fn provider_names_round_trip() {
        for k in ProviderKind::all() {
            assert_eq!(ProviderKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(ProviderKind::parse("dialog360"), None);
        assert_eq!(dialog360::KIND.as_str(), "360dialog");
        assert_eq!(ProviderKind::names(), "twilio, meta, 360dialog, sinch, kaleyra, generic");
        let stored = postcard::to_allocvec(&meta::KIND).unwrap();
        assert_eq!(stored, postcard::to_allocvec("meta").unwrap(), "stored as its name");
        assert_eq!(postcard::from_bytes::<ProviderKind>(&stored).unwrap(), meta::KIND);
        assert!(postcard::from_bytes::<ProviderKind>(&postcard::to_allocvec("nope").unwrap()).is_err());
    }

    #[test]
    fn acks() {
        assert_eq!(twilio::KIND.ack(), ("text/xml", "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>"));
        for k in ProviderKind::all().skip(1) {
            assert_eq!(k.ack(), ("text/plain", ""));
        }
    }

    #[test]
    fn conversation_and_event_id_of_every_fixture() {
        let form = Some("application/x-www-form-urlencoded");
        let json = Some("application/json");
        let cases = [
            (
                twilio::KIND,
                "twilio-inbound.form",
                form,
                "whatsapp:+16505551234",
                Some("SM0f8e5b1d2c3a4b5c6d7e8f9a0b1c2d3e:received"),
                true,
            ),
            (
                twilio::KIND,
                "twilio-status-read.form",
                form,
                "whatsapp:+16505551234",
                Some("SM1a2b3c4d5e6f708192a3b4c5d6e7f809:read"),
                false,
            ),
            (
                meta::KIND,
                "meta-inbound-text.json",
                json,
                "16505551234",
                Some("wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA="),
                true,
            ),
            (
                meta::KIND,
                "meta-status-read.json",
                json,
                "16505551234",
                Some("wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBI3MTE5MjVBOTE3MDk5QUVFM0YA:read"),
                false,
            ),
            (
                dialog360::KIND,
                "meta-inbound-text.json",
                json,
                "16505551234",
                Some("wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA="),
                true,
            ),
            (sinch::KIND, "sinch-inbound-text.json", json, "16505551234", Some("01W4FFL35P4NC4K35CONVMSG1"), true),
            (kaleyra::KIND, "kaleyra-inbound-text.json", json, "16505551234", None, true),
        ];
        for (kind, file, ct, conv, id, wrote) in cases {
            let body = fixture(file);
            let p = kind.payload(ct, &body);
            assert_eq!(p.conversation.as_deref(), Some(conv), "{file}");
            assert_eq!(p.event_id.as_deref(), id, "{file}");
            let senders: &[&str] = if wrote { &[conv] } else { &[] };
            assert_eq!(p.senders, senders, "{file}");
        }
        let body = fixture("kaleyra-inbound-text.json");
        assert_eq!(generic::KIND.payload(json, &body), Payload::default());
        for kind in ProviderKind::all() {
            assert_eq!(kind.payload(json, b"not json"), Payload::default());
            assert_eq!(kind.payload(json, b"\xff\x00"), Payload::default());
        }
    }
}
