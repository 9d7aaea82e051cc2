//! 360dialog: `x-360dialog-signature`, HMAC-SHA256 of the raw body with the platform secret.
//!
//! 360dialog's documentation names the header, the algorithm and the key but not the encoding
//! (the README's provider notes), so hex of either case and base64 are accepted, with or without a
//! "sha256=" prefix. That widens nothing an attacker can use: every form is checked against the
//! same 32-byte MAC. Payloads and sends have Meta's Cloud API shape and are read by `meta`;
//! sends go to 360dialog's own API with the account's `D360-API-KEY`.

use super::{
    Algorithm, Defaults, Encoding, Inbound, Keyed, OutboundAuth, OutboundCreds, Outgoing, Payload, Prefix, Provider,
    ProviderKind, Rejection, SignatureHeader, Verify, meta,
};

/// 360dialog, as accounts name it (`provider = "360dialog"`).
pub const KIND: ProviderKind = ProviderKind::of(&Dialog360);

/// The header 360dialog's API reads the account's key from.
pub const API_KEY: http::HeaderName = http::HeaderName::from_static("d360-api-key");

pub struct Dialog360;

impl Provider for Dialog360 {
    fn name(&self) -> &'static str {
        "360dialog"
    }

    fn keyed(&self) -> Option<Keyed> {
        Some(Keyed {
            setting: "platform_secret",
            secret: |c| &c.platform_secret,
            check: |key| Box::new(Signature::new(key)),
            // Plain lowercase hex, the form the implementations we found send.
            sign: |key, r| vec![(HEADER.name.to_owned(), hex::encode(Algorithm::Sha256.sign(key, &[r.body])))],
        })
    }

    fn signature_headers(&self) -> &'static [&'static str] {
        &["x-360dialog-signature"]
    }

    fn parse_payload(&self, _content_type: Option<&str>, body: &[u8]) -> Payload {
        meta::payload(body)
    }

    fn cloud_api(&self) -> bool {
        true
    }

    fn sample(&self, text: &str, id: &str) -> (&'static str, Vec<u8>) {
        meta::sample(text, id)
    }

    fn api_base(&self, _region: Option<&str>) -> Option<String> {
        Some("https://waba-v2.360dialog.io".into())
    }

    fn outbound_auth<'a>(&self, c: &'a OutboundCreds) -> OutboundAuth<'a> {
        match &c.api_key {
            Some(k) => OutboundAuth::header(API_KEY, k.expose().to_string()),
            None => OutboundAuth::Client,
        }
    }

    fn endpoints<'a>(&self, _c: &'a OutboundCreds, _phone_number_id: Option<&'a str>) -> Result<Defaults<'a>, String> {
        Ok(Defaults::new(None)
            // The key belongs to one number: everything it reaches is that number's.
            .with("POST", "/messages")
            .with("POST", "/media")
            .with("GET,DELETE", "/*")
            .with("GET,POST", "/whatsapp_business/attachments")
            // The On-Premise shape (base https://waba.360dialog.io).
            .with("POST", "/v1/messages")
            .with("POST", "/v1/media")
            .with("GET,DELETE", "/v1/media/*"))
    }

    fn send(&self, _content_type: Option<&str>, body: &[u8]) -> Option<Outgoing> {
        meta::send(body)
    }
}

const HEADER: SignatureHeader<'static> = SignatureHeader {
    name: "x-360dialog-signature",
    prefix: Prefix::Optional("sha256="),
    encoding: Encoding::HexOrBase64,
    algorithm: Algorithm::Sha256,
};

/// The signature check of one account or partner app.
struct Signature {
    platform_secret: Vec<u8>,
}

impl Signature {
    fn new(platform_secret: Vec<u8>) -> Self {
        Signature { platform_secret }
    }
}

impl Verify for Signature {
    fn verify(&self, req: &Inbound<'_>) -> Result<(), Rejection> {
        HEADER.verify(req, &self.platform_secret, &[req.body], "the body")
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    #[test]
    fn accepts_every_plausible_encoding_and_refuses_tampering() {
        let body = fixture("meta-inbound-text.json");
        let mac = Algorithm::Sha256.sign(b"platform", &[&body]);
        let d = Signature::new(b"platform".to_vec());
        let req =
            |b: &[u8], sig: &str| Req::post("https://x/", "application/json", b).header("x-360dialog-signature", sig);
        let hex = hex::encode(&mac);
        for sig in [
            hex.clone(),
            hex.to_uppercase(),
            format!("sha256={hex}"),
            STANDARD.encode(&mac),
            format!("sha256={}", STANDARD.encode(&mac)),
        ] {
            assert_eq!(outcome(d.verify(&req(&body, &sig).inbound())), "ok", "{sig}");
        }
        let mut tampered = body.clone();
        tampered[10] ^= 1;
        assert_eq!(outcome(d.verify(&req(&tampered, &hex).inbound())), "mismatch");
        assert_eq!(outcome(Signature::new(b"other".to_vec()).verify(&req(&body, &hex).inbound())), "mismatch");
        assert_eq!(outcome(d.verify(&req(&body, "%%%").inbound())), "bad_encoding");
        let missing = Req::post("https://x/", "application/json", body);
        assert_eq!(outcome(d.verify(&missing.inbound())), "missing_header");
    }
}
