//! Generic providers: an HMAC of the raw body in a header the operator names
//! (`hmac_header`, `hmac_secret`, `hmac_algorithm` sha1/sha256/sha512, `hmac_encoding`
//! hex/base64, optional `hmac_prefix` such as "sha256=").

use super::verifier::secret;
use super::{
    Algorithm, Defaults, Encoding, Inbound, Prefix, Provider, ProviderKind, Rejection, SignatureHeader, ToSign,
    VerifierConfig, Verify, kaleyra,
};

/// A provider the relay has no specific knowledge of (`provider = "generic"`): no payload is
/// read (one conversation per account, the body hash for dedup), and sends reach anything below
/// the account's own `api_base` with the client's own credentials.
pub const KIND: ProviderKind = ProviderKind::of(&Generic);

pub struct Generic;

impl Provider for Generic {
    fn name(&self) -> &'static str {
        "generic"
    }

    fn own_settings(&self, cfg: &VerifierConfig) -> Vec<&'static str> {
        [
            ("hmac_header", cfg.hmac_header.is_some()),
            ("hmac_secret", cfg.hmac_secret.is_some()),
            ("hmac_algorithm", cfg.hmac_algorithm.is_some()),
            ("hmac_encoding", cfg.hmac_encoding.is_some()),
            ("hmac_prefix", cfg.hmac_prefix.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }

    fn own_check(&self) -> Option<String> {
        Some("hmac_header + hmac_secret (generic)".into())
    }

    fn signature(&self, cfg: &VerifierConfig) -> Result<Option<Box<dyn Verify>>, String> {
        Ok(Hmac::from_config(cfg)?.map(|g| Box::new(g) as _))
    }

    fn sign(&self, cfg: &VerifierConfig, req: &ToSign<'_>) -> Result<Vec<(String, String)>, String> {
        Ok(Hmac::from_config(cfg)?.map(|g| g.sign(req.body)).unwrap_or_default())
    }

    fn sample(&self, text: &str, id: &str) -> (&'static str, Vec<u8>) {
        kaleyra::sample(text, id)
    }

    /// A generic provider has no known API: its `api_base` (required for outbound) is the
    /// boundary, and the client's own credentials decide what it may do there.
    fn endpoints<'a>(&self, _c: &'a super::OutboundCreds, _pnid: Option<&'a str>) -> Result<Defaults<'a>, String> {
        Ok(Defaults::new(None).with("", "/**"))
    }
}

/// The configured HMAC check of one account.
struct Hmac {
    header: String,
    secret: Vec<u8>,
    algorithm: Algorithm,
    encoding: Encoding,
    prefix: Option<String>,
}

impl Hmac {
    /// None when no HMAC is configured; Err when the settings are incomplete or unknown.
    fn from_config(cfg: &VerifierConfig) -> Result<Option<Self>, String> {
        let (header, secret) = match (&cfg.hmac_header, secret(&cfg.hmac_secret, "hmac_secret")?) {
            (Some(h), Some(s)) => (h, s),
            (Some(_), None) => return Err("hmac_header is set but hmac_secret is not".into()),
            (None, Some(_)) => return Err("hmac_secret is set but hmac_header is not".into()),
            (None, None)
                if cfg.hmac_algorithm.is_some() || cfg.hmac_encoding.is_some() || cfg.hmac_prefix.is_some() =>
            {
                return Err("hmac_algorithm, hmac_encoding and hmac_prefix need hmac_header and hmac_secret".into());
            }
            (None, None) => return Ok(None),
        };
        http::HeaderName::from_bytes(header.as_bytes())
            .map_err(|_| format!("hmac_header {header:?} is not a valid header name"))?;
        let algorithm = match cfg.hmac_algorithm.as_deref() {
            None => Algorithm::Sha256,
            Some(a) => {
                Algorithm::parse(a).ok_or_else(|| format!("unknown hmac_algorithm {a:?} (sha1, sha256 or sha512)"))?
            }
        };
        let encoding = match cfg.hmac_encoding.as_deref() {
            None => Encoding::Hex,
            Some(e) => Encoding::parse(e).ok_or_else(|| format!("unknown hmac_encoding {e:?} (hex or base64)"))?,
        };
        let prefix = cfg.hmac_prefix.clone().filter(|p| !p.is_empty());
        Ok(Some(Hmac { header: header.clone(), secret, algorithm, encoding, prefix }))
    }

    fn spec(&self) -> SignatureHeader<'_> {
        SignatureHeader {
            name: &self.header,
            prefix: self.prefix.as_deref().map_or(Prefix::None, Prefix::Required),
            encoding: self.encoding,
            algorithm: self.algorithm,
        }
    }

    fn sign(&self, body: &[u8]) -> Vec<(String, String)> {
        vec![self.spec().sign(&self.secret, &[body])]
    }
}

impl Verify for Hmac {
    fn verify(&self, req: &Inbound<'_>) -> Result<(), Rejection> {
        self.spec().verify(req, &self.secret, &[req.body], "the body")
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;

    fn generic(algorithm: &str, encoding: &str, prefix: Option<&str>) -> Hmac {
        let cfg = VerifierConfig {
            provider: Some(KIND),
            hmac_header: Some("X-Signature".into()),
            hmac_secret: Some("Jefe".into()),
            hmac_algorithm: Some(algorithm.into()),
            hmac_encoding: Some(encoding.into()),
            hmac_prefix: prefix.map(Into::into),
            ..Default::default()
        };
        Hmac::from_config(&cfg).unwrap().unwrap()
    }

    /// RFC 2202 / RFC 4231 test case 2 (key "Jefe").
    const DATA: &str = "what do ya want for nothing?";
    const KNOWN: [(&str, &str); 3] = [
        ("sha1", "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"),
        ("sha256", "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
        (
            "sha512",
            "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
        ),
    ];

    #[test]
    fn rfc_vectors_in_every_algorithm_and_encoding() {
        use base64::Engine as _;
        for (alg, hexed) in KNOWN {
            let b64 = base64::engine::general_purpose::STANDARD.encode(hex::decode(hexed).unwrap());
            for (enc, sig) in [("hex", hexed.to_owned()), ("base64", b64)] {
                let g = generic(alg, enc, None);
                let req =
                    |body: &str, sig: &str| Req::post("https://x/", "text/plain", body).header("x-signature", sig);
                assert_eq!(outcome(g.verify(&req(DATA, &sig).inbound())), "ok", "{alg} {enc}");
                assert_eq!(outcome(g.verify(&req("what do ya want for nothing!", &sig).inbound())), "mismatch");
                let prefixed = generic(alg, enc, Some("sha256="));
                assert_eq!(outcome(prefixed.verify(&req(DATA, &format!("sha256={sig}")).inbound())), "ok");
                // Configured, the prefix is part of what the sender writes: not optional.
                assert_eq!(outcome(prefixed.verify(&req(DATA, &sig).inbound())), "bad_encoding");
            }
        }
    }

    #[test]
    fn wrong_secret_missing_header_bad_encoding() {
        let g = generic("sha256", "hex", None);
        let other = Hmac { secret: b"other".to_vec(), ..generic("sha256", "hex", None) };
        let r = Req::post("https://x/", "text/plain", DATA).header("X-Signature", KNOWN[1].1);
        assert_eq!(outcome(other.verify(&r.inbound())), "mismatch");
        let e = g.verify(&Req::post("https://x/", "text/plain", DATA).inbound()).unwrap_err();
        assert_eq!((e.reason, e.message.as_str()), ("missing_header", "missing X-Signature header"));
        let r = Req::post("https://x/", "text/plain", DATA).header("X-Signature", "not hex");
        assert_eq!(outcome(g.verify(&r.inbound())), "bad_encoding");
    }

    #[test]
    fn configuration_errors() {
        let base = VerifierConfig { provider: Some(KIND), ..Default::default() };
        assert!(Hmac::from_config(&base).unwrap().is_none());
        let prefix_only = VerifierConfig { hmac_prefix: Some("sha256=".into()), ..base.clone() };
        assert!(Hmac::from_config(&prefix_only).is_err());
        let full = VerifierConfig {
            hmac_header: Some("X-Sig".into()),
            hmac_secret: Some("s".into()),
            hmac_algorithm: Some("SHA512".into()),
            hmac_encoding: Some("Base64".into()),
            ..base
        };
        let g = Hmac::from_config(&full).unwrap().unwrap();
        assert_eq!((g.algorithm, g.encoding), (Algorithm::Sha512, Encoding::Base64));
    }
}
