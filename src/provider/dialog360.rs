//! 360dialog: `x-360dialog-signature`, HMAC-SHA256 of the raw body with the platform secret.
//!
//! 360dialog's documentation names the header, the algorithm and the key but not the encoding
//! (see NOTES-360dialog.md), so hex of either case and base64 are accepted, with or without a
//! "sha256=" prefix. That widens nothing an attacker can use: every form is checked against the
//! same 32-byte MAC. Payloads have Meta's Cloud API shape and are read by `meta`.

use super::{Algorithm, Encoding, Inbound, Rejection, SignatureHeader, Verify};

const HEADER: SignatureHeader<'static> = SignatureHeader {
    name: "x-360dialog-signature",
    prefix: Some("sha256="),
    encoding: Encoding::HexOrBase64,
    algorithm: Algorithm::Sha256,
};

pub(super) struct Dialog360 {
    platform_secret: Vec<u8>,
}

impl Dialog360 {
    pub(super) fn new(platform_secret: Vec<u8>) -> Self {
        Dialog360 { platform_secret }
    }
}

impl Verify for Dialog360 {
    fn verify(&self, req: &Inbound<'_>) -> Result<(), Rejection> {
        HEADER.verify(req, &self.platform_secret, &[req.body], "the body")
    }
}

/// Plain lowercase hex, the form the implementations we found send.
pub(super) fn sign(platform_secret: &[u8], body: &[u8]) -> Vec<(String, String)> {
    let mac = Algorithm::Sha256.sign(platform_secret, &[body]);
    vec![(HEADER.name.to_owned(), hex::encode(mac))]
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
        let d = Dialog360::new(b"platform".to_vec());
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
        assert_eq!(outcome(Dialog360::new(b"other".to_vec()).verify(&req(&body, &hex).inbound())), "mismatch");
        assert_eq!(outcome(d.verify(&req(&body, "%%%").inbound())), "bad_encoding");
        let missing = Req::post("https://x/", "application/json", body);
        assert_eq!(outcome(d.verify(&missing.inbound())), "missing_header");
    }
}
