//! The certificate a relay of a shared ACME setup presents: the current certificate (loaded
//! from the database) to everyone, except a TLS-ALPN-01 validation (ALPN `acme-tls/1`), which
//! gets the challenge certificate for the name it asks, whichever relay started the order.

use arc_swap::ArcSwapOption;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Debug, Default)]
pub struct SharedResolver {
    cert: ArcSwapOption<CertifiedKey>,
    /// Domain → (token, challenge certificate): the token says whether a stored challenge is
    /// the one already built.
    challenges: Mutex<HashMap<String, (String, Arc<CertifiedKey>)>>,
}

impl SharedResolver {
    pub fn set_cert(&self, cert: Arc<CertifiedKey>) {
        self.cert.store(Some(cert));
    }

    pub fn cert(&self) -> Option<Arc<CertifiedKey>> {
        self.cert.load_full()
    }

    /// Whether the challenge for `domain` with `token` is already being answered.
    pub fn has_challenge(&self, domain: &str, token: &str) -> bool {
        self.challenges.lock().unwrap_or_else(PoisonError::into_inner).get(domain).is_some_and(|(t, _)| t == token)
    }

    pub fn set_challenge(&self, domain: String, token: String, key: Arc<CertifiedKey>) {
        self.challenges.lock().unwrap_or_else(PoisonError::into_inner).insert(domain, (token, key));
    }

    /// Keeps only the challenges of these domains (the others were answered or expired).
    pub fn retain_challenges(&self, domains: &[&str]) {
        self.challenges.lock().unwrap_or_else(PoisonError::into_inner).retain(|d, _| domains.contains(&d.as_str()));
    }
}

impl ResolvesServerCert for SharedResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if rustls_acme::is_tls_alpn_challenge(&hello) {
            let name = hello.server_name()?;
            let found =
                self.challenges.lock().unwrap_or_else(PoisonError::into_inner).get(name).map(|(_, k)| k.clone());
            if found.is_none() {
                tracing::warn!(sni = name, "acme: a TLS-ALPN-01 validation for a name with no challenge in progress");
            }
            return found;
        }
        self.cert.load_full()
    }
}
