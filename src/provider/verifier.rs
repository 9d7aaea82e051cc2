//! An account's checks, combined: its provider's signature, a shared token and `allow_from`,
//! every configured one enforced. Built once from the account's resolved settings.

use std::fmt;

use super::{Inbound, ProviderKind, Rejection, token};

/// Resolved (secrets already read) verification settings of one account. Built by the config layer.
///
/// `Debug` is written by hand so that logging a config never prints a secret.
#[derive(Clone, Default)]
pub struct VerifierConfig {
    pub provider: Option<ProviderKind>,
    pub auth_token: Option<String>,
    pub app_secret: Option<String>,
    pub verify_token: Option<String>,
    pub webhook_secret: Option<String>,
    pub platform_secret: Option<String>,
    pub shared_token: Option<String>,
    pub token_header: Option<String>,
    pub token_param: Option<String>,
    pub allow_from: Vec<ipnet::IpNet>,
    pub hmac_header: Option<String>,
    pub hmac_secret: Option<String>,
    pub hmac_algorithm: Option<String>,
    pub hmac_encoding: Option<String>,
    pub hmac_prefix: Option<String>,
    pub insecure_no_verification: bool,
}

impl fmt::Debug for VerifierConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("VerifierConfig")
            .field("provider", &self.provider)
            .field("auth_token", &redact(&self.auth_token))
            .field("app_secret", &redact(&self.app_secret))
            .field("verify_token", &redact(&self.verify_token))
            .field("webhook_secret", &redact(&self.webhook_secret))
            .field("platform_secret", &redact(&self.platform_secret))
            .field("shared_token", &redact(&self.shared_token))
            .field("token_header", &self.token_header)
            .field("token_param", &self.token_param)
            .field("allow_from", &self.allow_from)
            .field("hmac_header", &self.hmac_header)
            .field("hmac_secret", &redact(&self.hmac_secret))
            .field("hmac_algorithm", &self.hmac_algorithm)
            .field("hmac_encoding", &self.hmac_encoding)
            .field("hmac_prefix", &self.hmac_prefix)
            .field("insecure_no_verification", &self.insecure_no_verification)
            .finish()
    }
}

/// The small trait every check shares.
pub trait Verify: Send + Sync {
    fn verify(&self, req: &Inbound<'_>) -> Result<(), Rejection>;

    /// Whether the check reads [`Inbound::url`]; the caller builds that URL only when one does.
    fn reads_url(&self) -> bool {
        false
    }

    /// A header carrying a reusable secret (a shared token, not a per-message signature): never
    /// forwarded where the webhook's receiver is not the secret's only owner (a Meta app's tenants).
    fn secret_header(&self) -> Option<&http::HeaderName> {
        None
    }
}

/// All checks of one account, combined: every configured check must pass.
pub struct AccountVerifier {
    /// (label, check), cheapest first so a refused source costs no HMAC.
    checks: Vec<(&'static str, Box<dyn Verify>)>,
}

impl AccountVerifier {
    /// Err(message) when the settings cannot authenticate the provider or are invalid.
    ///
    /// `insecure_no_verification` only permits having no check: checks that are configured
    /// anyway are still enforced, so the flag can never silently switch a secret off.
    pub fn new(cfg: &VerifierConfig) -> Result<AccountVerifier, String> {
        let kind = cfg.provider.ok_or("account has no provider")?;
        // A secret of another provider would be silently ignored and leave the operator
        // believing a check is active: refuse it instead.
        for other in ProviderKind::all().filter(|k| *k != kind) {
            if let Some(field) = other.own_settings(cfg).first() {
                return Err(format!("{field} applies to {other} accounts only, not {kind}"));
            }
        }

        secret(&cfg.verify_token, "verify_token")?; // used by `meta_handshake`; checked here

        let mut checks: Vec<(&'static str, Box<dyn Verify>)> = Vec::new();
        if !cfg.allow_from.is_empty() {
            checks.push(("allow_from", Box::new(token::AllowFrom::new(&cfg.allow_from))));
        }
        if let Some(t) = token::SharedToken::from_config(cfg)? {
            checks.push(("shared_token", Box::new(t)));
        }
        if let Some(s) = kind.signature(cfg)? {
            checks.push(("signature", s));
        }

        if checks.is_empty() && !cfg.insecure_no_verification {
            let own = kind.own_check().map_or(String::new(), |c| format!("{c}, "));
            return Err(format!(
                "account has no way to authenticate its provider: set {own}shared_token or allow_from, or insecure_no_verification = true"
            ));
        }
        Ok(AccountVerifier { checks })
    }

    /// The headers that carry this account's (or app's) reusable secrets.
    pub fn secret_headers(&self) -> impl Iterator<Item = &http::HeaderName> + '_ {
        self.checks.iter().filter_map(|(_, c)| c.secret_header())
    }

    /// Whether any check reads [`Inbound::url`] (Twilio signs the URL it called).
    pub fn reads_url(&self) -> bool {
        self.checks.iter().any(|(_, c)| c.reads_url())
    }

    pub fn verify(&self, req: &Inbound<'_>) -> Result<(), Rejection> {
        self.checks.iter().try_for_each(|(_, c)| c.verify(req))
    }

    /// True when no check at all is configured (insecure_no_verification).
    pub fn is_insecure(&self) -> bool {
        self.checks.is_empty()
    }

    /// Labels of the active checks, in the order they run ("allow_from", "shared_token",
    /// "signature"), for `check`'s summary and logs.
    pub fn checks(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.checks.iter().map(|(label, _)| *label)
    }
}

impl fmt::Debug for AccountVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.checks()).finish()
    }
}

/// An optional secret as key bytes; an empty one is a mistake (e.g. an empty file), not "off".
pub(crate) fn secret(value: &Option<String>, field: &str) -> Result<Option<Vec<u8>>, String> {
    match value.as_deref() {
        Some("") => Err(format!("{field} is empty")),
        v => Ok(v.map(|s| s.as_bytes().to_vec())),
    }
}

/// Headers that make `body`, sent to `url`, pass the checks of an account configured by `cfg`
/// (signature and shared token; `allow_from` is the sender's business). Used by `simulate`.
pub fn sign_request(
    cfg: &VerifierConfig,
    url: &str,
    content_type: Option<&str>,
    body: &[u8],
    now_unix: i64,
) -> Result<Vec<(String, String)>, String> {
    let kind = cfg.provider.ok_or("account has no provider")?;
    let mut headers = kind.sign(cfg, &super::ToSign { url, content_type, body, now_unix })?;
    if let Some(t) = &cfg.shared_token {
        let name = cfg.token_header.as_deref().unwrap_or(token::DEFAULT_HEADER);
        headers.push((name.to_owned(), t.clone()));
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::{Algorithm, dialog360, generic, kaleyra, meta, sinch, twilio};
    use super::*;

    fn cfg(kind: ProviderKind) -> VerifierConfig {
        VerifierConfig { provider: Some(kind), ..Default::default() }
    }

    #[test]
    fn new_refuses_accounts_that_cannot_authenticate() {
        let err = AccountVerifier::new(&cfg(twilio::KIND)).unwrap_err();
        assert_eq!(
            err,
            "account has no way to authenticate its provider: set auth_token (twilio), shared_token or allow_from, or insecure_no_verification = true"
        );
        let err = AccountVerifier::new(&cfg(kaleyra::KIND)).unwrap_err();
        assert!(err.contains("set shared_token or allow_from"), "{err}");
        assert!(AccountVerifier::new(&VerifierConfig::default()).is_err());
    }

    #[test]
    fn new_refuses_invalid_settings() {
        let bad = [
            VerifierConfig { app_secret: Some("x".into()), ..cfg(twilio::KIND) },
            VerifierConfig { auth_token: Some(String::new()), ..cfg(twilio::KIND) },
            VerifierConfig { hmac_header: Some("X-Sig".into()), ..cfg(generic::KIND) },
            VerifierConfig { hmac_secret: Some("s".into()), ..cfg(generic::KIND) },
            VerifierConfig {
                hmac_header: Some("X-Sig".into()),
                hmac_secret: Some("s".into()),
                hmac_algorithm: Some("md5".into()),
                ..cfg(generic::KIND)
            },
            VerifierConfig {
                hmac_header: Some("X-Sig".into()),
                hmac_secret: Some("s".into()),
                hmac_encoding: Some("base32".into()),
                ..cfg(generic::KIND)
            },
            VerifierConfig {
                hmac_header: Some("bad header".into()),
                hmac_secret: Some("s".into()),
                ..cfg(generic::KIND)
            },
            VerifierConfig { verify_token: Some(String::new()), app_secret: Some("x".into()), ..cfg(meta::KIND) },
            VerifierConfig { token_header: Some("X-T".into()), ..cfg(kaleyra::KIND) },
            VerifierConfig { shared_token: Some(String::new()), ..cfg(kaleyra::KIND) },
        ];
        for c in bad {
            assert!(AccountVerifier::new(&c).is_err(), "{c:?}");
        }
    }

    #[test]
    fn insecure_only_when_nothing_is_configured() {
        let v = AccountVerifier::new(&VerifierConfig { insecure_no_verification: true, ..cfg(meta::KIND) }).unwrap();
        assert!(v.is_insecure());
        assert_eq!(outcome(v.verify(&Req::post("https://x/", "application/json", "{}").inbound())), "ok");
        // The flag never switches off a secret that is configured.
        let v = AccountVerifier::new(&VerifierConfig {
            insecure_no_verification: true,
            app_secret: Some("s".into()),
            ..cfg(meta::KIND)
        })
        .unwrap();
        assert!(!v.is_insecure());
        assert_eq!(outcome(v.verify(&Req::post("https://x/", "application/json", "{}").inbound())), "missing_header");
    }

    #[test]
    fn combined_checks_all_must_pass() {
        let c = VerifierConfig {
            auth_token: Some("12345".into()),
            shared_token: Some("tok".into()),
            allow_from: vec!["203.0.113.0/24".parse().unwrap()],
            ..cfg(twilio::KIND)
        };
        let v = AccountVerifier::new(&c).unwrap();
        assert_eq!(v.checks().collect::<Vec<_>>(), ["allow_from", "shared_token", "signature"]);
        let url = "https://chat.example.com/acme/api/whatsapp/accounts/12/notify";
        let body = fixture("twilio-inbound.form");
        let ct = "application/x-www-form-urlencoded";
        let signed = sign_request(&c, url, Some(ct), &body, 0).unwrap();
        let ok = Req::post(url, ct, body.clone()).headers(signed.clone());
        assert_eq!(outcome(v.verify(&ok.inbound())), "ok");

        // Signature fine, token missing.
        let sig_only: Vec<_> = signed.iter().filter(|(k, _)| k != "X-Webhook-Token").cloned().collect();
        let r = Req::post(url, ct, body.clone()).headers(sig_only);
        assert_eq!(outcome(v.verify(&r.inbound())), "missing_token");
        // Token fine, signature missing.
        let r = Req::post(url, ct, body.clone()).header("X-Webhook-Token", "tok");
        assert_eq!(outcome(v.verify(&r.inbound())), "missing_header");
        // Everything fine but the source.
        let mut r = Req::post(url, ct, body).headers(signed);
        r.ip = "198.51.100.1".parse().unwrap();
        let e = v.verify(&r.inbound()).unwrap_err();
        assert_eq!((e.status, e.reason), (403, "source_not_allowed"));
    }

    #[test]
    fn sign_request_round_trips_for_every_provider() {
        let url = "https://chat.example.com/acme/api/whatsapp/accounts/1/notify";
        let cases = [
            (twilio::KIND, "twilio-inbound.form", "application/x-www-form-urlencoded"),
            (meta::KIND, "meta-inbound-text.json", "application/json"),
            (dialog360::KIND, "meta-status-read.json", "application/json"),
            (sinch::KIND, "sinch-inbound-text.json", "application/json"),
            (kaleyra::KIND, "kaleyra-inbound-text.json", "application/json"),
            (generic::KIND, "kaleyra-inbound-text.json", "application/json"),
        ];
        for (kind, file, ct) in cases {
            let c = VerifierConfig {
                auth_token: (kind == twilio::KIND).then(|| "a".into()),
                app_secret: (kind == meta::KIND).then(|| "b".into()),
                platform_secret: (kind == dialog360::KIND).then(|| "c".into()),
                webhook_secret: (kind == sinch::KIND).then(|| "d".into()),
                hmac_header: (kind == generic::KIND).then(|| "X-Sig".into()),
                hmac_secret: (kind == generic::KIND).then(|| "e".into()),
                shared_token: (kind == kaleyra::KIND).then(|| "f".into()),
                ..cfg(kind)
            };
            let v = AccountVerifier::new(&c).unwrap();
            let body = fixture(file);
            let mut r = Req::post(url, ct, body.clone())
                .headers(sign_request(&c, url, Some(ct), &body, 1_750_000_000).unwrap());
            assert_eq!(outcome(v.verify(&r.inbound())), "ok", "{kind}");
            // The caller builds the URL only for checks that read it, and passes "" otherwise:
            // a check that does read it must say so, or it would refuse every webhook.
            assert_eq!(v.reads_url(), kind == twilio::KIND, "{kind}");
            if !v.reads_url() {
                let blank = Req::post("", ct, body.clone())
                    .headers(sign_request(&c, url, Some(ct), &body, 1_750_000_000).unwrap());
                assert_eq!(outcome(v.verify(&blank.inbound())), "ok", "{kind} without the URL");
            }
            r.body.push(b' ');
            let expect = if kind == kaleyra::KIND { "ok" } else { "mismatch" };
            assert_eq!(outcome(v.verify(&r.inbound())), expect, "{kind} tampered");
        }
    }

    #[test]
    fn messages_never_reveal_the_expected_value_or_secret() {
        let c = VerifierConfig { app_secret: Some("topsecret".into()), ..cfg(meta::KIND) };
        let v = AccountVerifier::new(&c).unwrap();
        let body = fixture("meta-inbound-text.json");
        let expected = hex::encode(Algorithm::Sha256.sign(b"topsecret", &[&body]));
        let r = Req::post("https://x/", "application/json", body)
            .header("X-Hub-Signature-256", &format!("sha256={}", "00".repeat(32)));
        let e = v.verify(&r.inbound()).unwrap_err();
        assert_eq!(e.message, "X-Hub-Signature-256 does not match the body");
        assert!(!e.message.contains(&expected) && !e.message.contains("topsecret"));
        assert!(!format!("{c:?}").contains("topsecret"));
    }
}
