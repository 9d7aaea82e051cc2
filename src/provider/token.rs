//! Checks any provider may use besides (or instead of) a signature: a shared token, presented in
//! a header or a query parameter, and `allow_from`, the source addresses allowed to call.

use sha2::Digest;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{Inbound, Rejection, VerifierConfig, Verify};

pub(crate) const DEFAULT_HEADER: &str = "X-Webhook-Token";
const DEFAULT_PARAM: &str = "token";

pub(super) struct SharedToken {
    /// SHA-256 of the token, computed once: each request hashes only what it presents.
    digest: [u8; 32],
    /// Parsed once: a lookup by `&str` would parse the name again on every request.
    header: http::HeaderName,
    param: String,
}

impl SharedToken {
    pub(super) fn from_config(cfg: &VerifierConfig) -> Result<Option<Self>, String> {
        let Some(token) = &cfg.shared_token else {
            // A token name without a token reads as if a token were checked: refuse it.
            return match (&cfg.token_header, &cfg.token_param) {
                (None, None) => Ok(None),
                _ => Err("token_header/token_param are set but shared_token is not".into()),
            };
        };
        if token.is_empty() {
            return Err("shared_token is empty".into());
        }
        let header = cfg.token_header.as_deref().unwrap_or(DEFAULT_HEADER);
        let header = http::HeaderName::from_bytes(header.as_bytes())
            .map_err(|_| format!("token_header {header:?} is not a valid header name"))?;
        let param = cfg.token_param.as_deref().unwrap_or(DEFAULT_PARAM);
        if param.is_empty() {
            return Err("token_param is empty".into());
        }
        let digest = sha2::Sha256::digest(token.as_bytes()).into();
        Ok(Some(SharedToken { digest, header, param: param.to_owned() }))
    }
}

impl Verify for SharedToken {
    fn secret_header(&self) -> Option<&http::HeaderName> {
        Some(&self.header)
    }

    fn verify(&self, req: &Inbound<'_>) -> Result<(), Rejection> {
        // The header wins when both are present: it is what a provider configured on purpose.
        let from_header = req.headers.get(&self.header).map(|v| sha2::Sha256::digest(v.as_bytes().trim_ascii()));
        let presented = from_header.or_else(|| {
            let query = req.query?.as_bytes();
            form_urlencoded::parse(query)
                .find(|(k, _)| *k == self.param)
                .map(|(_, v)| sha2::Sha256::digest(v.as_bytes()))
        });
        let Some(presented) = presented else {
            return Err(Rejection::unauthorized(
                "missing_token",
                format!("missing shared token ({} header or {} query parameter)", self.header, self.param),
            ));
        };
        // Digests of equal length compared in constant time: neither the token's length nor
        // the position of a difference shows in the timing.
        if bool::from(subtle::ConstantTimeEq::ct_eq(presented.as_slice(), self.digest.as_slice())) {
            Ok(())
        } else {
            Err(Rejection::unauthorized("bad_token", "shared token does not match"))
        }
    }
}

pub(super) struct AllowFrom {
    nets: Vec<IpNet>,
}

impl AllowFrom {
    pub(super) fn new(nets: &[IpNet]) -> Self {
        AllowFrom { nets: nets.to_vec() }
    }
}

impl Verify for AllowFrom {
    fn verify(&self, req: &Inbound<'_>) -> Result<(), Rejection> {
        // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; operators write IPv4 CIDRs.
        let ips = [req.client_ip, req.client_ip.to_canonical()];
        if self.nets.iter().any(|n| ips.iter().any(|ip: &IpAddr| n.contains(ip))) {
            Ok(())
        } else {
            Err(Rejection::forbidden(
                "source_not_allowed",
                format!("source address {} is not in allow_from", req.client_ip),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::{VerifierConfig, kaleyra};
    use super::*;

    fn token(header: Option<&str>, param: Option<&str>) -> SharedToken {
        let cfg = VerifierConfig {
            provider: Some(kaleyra::KIND),
            shared_token: Some("s3cret".into()),
            token_header: header.map(Into::into),
            token_param: param.map(Into::into),
            ..Default::default()
        };
        SharedToken::from_config(&cfg).unwrap().unwrap()
    }

    fn req(url: &str) -> Req {
        Req::post(url, "application/json", "{}")
    }

    #[test]
    fn token_in_header_or_query() {
        let t = token(None, None);
        assert_eq!(outcome(t.verify(&req("https://x/a").header("x-webhook-token", "s3cret").inbound())), "ok");
        assert_eq!(outcome(t.verify(&req("https://x/a?a=1&token=s3cret").inbound())), "ok");
        assert_eq!(outcome(t.verify(&req("https://x/a?token=s3cre%74").inbound())), "ok", "percent-decoded");
        assert_eq!(outcome(t.verify(&req("https://x/a").header("X-Webhook-Token", "s3cre").inbound())), "bad_token");
        assert_eq!(outcome(t.verify(&req("https://x/a?token=s3cret1").inbound())), "bad_token");
        assert_eq!(outcome(t.verify(&req("https://x/a?tok=s3cret").inbound())), "missing_token");
        let e = t.verify(&req("https://x/a").inbound()).unwrap_err();
        assert_eq!((e.status, e.reason), (401, "missing_token"));
        assert!(!e.message.contains("s3cret"));
    }

    #[test]
    fn custom_token_names() {
        let t = token(Some("Authorization"), Some("key"));
        assert_eq!(outcome(t.verify(&req("https://x/a").header("authorization", "s3cret").inbound())), "ok");
        assert_eq!(outcome(t.verify(&req("https://x/a?key=s3cret").inbound())), "ok");
        assert_eq!(outcome(t.verify(&req("https://x/a?token=s3cret").inbound())), "missing_token");
    }

    #[test]
    fn allow_from_hit_and_miss() {
        let a = AllowFrom::new(&["127.0.0.0/8".parse().unwrap(), "2001:db8::/32".parse().unwrap()]);
        let at = |ip: &str| {
            let mut r = req("https://x/");
            r.ip = ip.parse().unwrap();
            a.verify(&r.inbound())
        };
        for ip in ["127.0.0.1", "::ffff:127.0.0.1", "2001:db8::5"] {
            assert_eq!(outcome(at(ip)), "ok", "{ip}");
        }
        for ip in ["10.0.0.1", "::ffff:10.0.0.1", "::1", "2001:db9::1"] {
            let e = at(ip).unwrap_err();
            assert_eq!((e.status, e.reason), (403, "source_not_allowed"), "{ip}");
        }
    }
}
