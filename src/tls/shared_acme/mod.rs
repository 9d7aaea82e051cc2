//! `[server.acme]` for relays sharing one database (`[storage] backend = "postgres"`): one ACME
//! account and one certificate for all of them, kept in the database ([`AcmeStore`]).
//!
//! Every relay follows the database: it polls a version number every [`POLL`] and, when it
//! moved, loads the stored certificate (if it is not the one served) and the TLS-ALPN-01
//! challenges of an order in progress, building each challenge certificate itself from the
//! shared account key, so the CA's validation succeeds on whichever relay it reaches. At start
//! and every [`CHECK_EVERY`], a relay whose certificate is missing or due for renewal (a third
//! of its lifetime left, as rustls-acme does) takes the ordering lock; the one that gets it
//! looks again (another may just have finished), then orders (`order`). The others see the new
//! certificate within a poll.
//!
//! Keys in the database are sealed with `[server.acme] key` when set (`seal`). Must never: log
//! key material, or order while a stored certificate this relay cannot open exists (it would
//! replace the other relays' certificate with one they cannot open).

mod order;
mod resolver;
mod seal;

use super::{AcmeCerts, CertInfo, TlsError, provider, unix_now};
use crate::config::Acme;
use crate::metrics::{CertLabels, CertResult, CertSourceLabel, Metrics};
use crate::store::{AcmeStore, StoreError};
use arc_swap::ArcSwapOption;
use resolver::SharedResolver;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use rustls_acme::acme::{Account, Challenge, Directory};
use seal::Sealer;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a relay looks at the database's ACME version (one cheap query).
pub const POLL: Duration = Duration::from_secs(1);
/// How often a relay checks whether the certificate is due (and when a failed order is retried
/// at the latest).
pub const CHECK_EVERY: Duration = Duration::from_secs(300);

/// What `shared_acme` sets up, for [`drive_shared_acme`] to run.
pub struct SharedAcmeDriver {
    certs: Arc<AcmeCerts>,
    resolver: Arc<SharedResolver>,
    store: Arc<dyn AcmeStore>,
    sealer: Sealer,
    cfg: Acme,
    /// The domains as they key the certificate row.
    domains_key: String,
    client: Arc<rustls::ClientConfig>,
    metrics: Arc<Metrics>,
    /// The served certificate's validity (not_before, not_after), for renewal.
    validity: Option<(i64, i64)>,
}

/// The rows' names, also the sealed keys' associated data (a key opens only in its own row).
fn account_row(cfg: &Acme) -> String {
    format!("ACME account key for {}", cfg.directory)
}

fn cert_row(cfg: &Acme) -> String {
    format!("certificate key for {} from {}", cfg.domains.join(","), cfg.directory)
}

/// Sets up shared automatic certificates; nothing touches the network or the database until
/// the driver runs.
pub fn shared_acme(
    cfg: &Acme,
    store: Arc<dyn AcmeStore>,
    client: Arc<rustls::ClientConfig>,
    metrics: Arc<Metrics>,
) -> Result<(Arc<AcmeCerts>, SharedAcmeDriver), TlsError> {
    let resolver = Arc::new(SharedResolver::default());
    let mut challenge = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    challenge.alpn_protocols = vec![rustls_acme::acme::ACME_TLS_ALPN_NAME.to_vec()];
    let certs = Arc::new(AcmeCerts {
        resolver: resolver.clone(),
        challenge: Arc::new(challenge),
        info: ArcSwapOption::empty(),
        cached: ArcSwapOption::empty(),
        last_error: Mutex::new(None),
        domains: cfg.domains.clone(),
    });
    let driver = SharedAcmeDriver {
        certs: certs.clone(),
        resolver,
        store,
        sealer: Sealer::new(cfg.key.as_ref()),
        domains_key: cfg.domains.join(","),
        cfg: cfg.clone(),
        client,
        metrics,
        validity: None,
    };
    Ok((certs, driver))
}

/// A stored chain and its key as rustls serves them, with what the relay reports.
fn certified(chain_pem: &str, key_der: Vec<u8>) -> Result<(CertifiedKey, CertInfo, i64), String> {
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the stored certificate chain is not PEM: {e}"))?;
    let leaf = chain.first().ok_or("the stored certificate chain is empty")?;
    let info = CertInfo::parse(leaf)?;
    let not_before = x509_parser::parse_x509_certificate(leaf)
        .map(|(_, c)| c.validity().not_before.timestamp())
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let key = provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)))
        .map_err(|e| format!("the stored certificate key is unusable: {e}"))?;
    Ok((CertifiedKey::new(chain, key), info, not_before))
}

/// An `Account` for building challenge certificates only: they need the account key and the
/// token, nothing the CA said (no directory, no account URL).
fn key_only_account(pkcs8: &[u8]) -> Result<Account, String> {
    let key_pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &SystemRandom::new())
        .map_err(|e| format!("the stored ACME account key is unusable: {e}"))?;
    let directory = Directory { new_nonce: String::new(), new_account: String::new(), new_order: String::new() };
    Ok(Account { key_pair, directory, kid: String::new() })
}

enum Ordered {
    /// This relay ordered and stored a certificate.
    Done,
    /// Another relay holds the lock (its certificate arrives through the version).
    Busy,
    /// The stored certificate turned out fresh.
    NotDue,
}

impl SharedAcmeDriver {
    /// Runs a store call on the blocking pool (the store's methods block).
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn AcmeStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, String> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(&*store)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(format!("the database call failed: {e}")),
        }
    }

    /// The shared account key (PKCS#8), created and stored first when `create` and there is
    /// none (under the lock: one account for all relays).
    async fn account_key(&self, create: bool) -> Result<Option<Vec<u8>>, String> {
        let (directory, row) = (self.cfg.directory.clone(), account_row(&self.cfg));
        let stored = match self.call(move |s| s.acme_account(&directory)).await? {
            Some(k) => k,
            None if create => {
                let sealed = self.sealer.seal(&row, &Account::generate_key_pair())?;
                let directory = self.cfg.directory.clone();
                self.call(move |s| s.acme_put_account(&directory, sealed)).await?
            }
            None => return Ok(None),
        };
        self.sealer.open(&row, &stored).map(Some)
    }

    /// Whether this relay should order: no certificate, or a third of its lifetime left.
    fn due(&self) -> bool {
        match self.validity {
            None => true,
            Some((not_before, not_after)) => unix_now() >= not_after - (not_after - not_before) / 3,
        }
    }

    /// Serves the stored certificate if it is not the one served already.
    async fn load_cert(&mut self) -> Result<(), String> {
        let (directory, domains) = (self.cfg.directory.clone(), self.domains_key.clone());
        let Some(stored) = self.call(move |s| s.acme_cert(&directory, &domains)).await? else { return Ok(()) };
        let key = self.sealer.open(&cert_row(&self.cfg), &stored.key)?;
        let (key, info, not_before) = certified(&stored.chain_pem, key)?;
        if self.resolver.cert().is_some_and(|c| c.cert.first() == key.cert.first()) {
            return Ok(());
        }
        tracing::info!("acme: serving the certificate from the database for {}", info.describe());
        self.validity = Some((not_before, info.not_after));
        self.resolver.set_cert(Arc::new(key));
        self.certs.set_info(info, &self.metrics);
        let labels = CertLabels { source: CertSourceLabel::Acme, result: CertResult::Ok };
        self.metrics.cert_loads.get_or_create(&labels).inc();
        Ok(())
    }

    /// Answers the challenges of an order in progress (by any relay) and forgets finished ones.
    async fn load_challenges(&mut self) -> Result<(), String> {
        let stored = self.call(|s| s.acme_challenges()).await?;
        let domains: Vec<&str> = stored.iter().map(|c| c.domain.as_str()).collect();
        self.resolver.retain_challenges(&domains);
        let new: Vec<_> = stored.iter().filter(|c| !self.resolver.has_challenge(&c.domain, &c.token)).collect();
        if new.is_empty() {
            return Ok(());
        }
        let key = self.account_key(false).await?.ok_or("a challenge is stored but no ACME account key")?;
        let account = key_only_account(&key)?;
        for c in new {
            let json = serde_json::json!({"type": "tls-alpn-01", "url": c.url, "token": c.token});
            let challenge: Challenge = serde_json::from_value(json).map_err(|e| format!("a stored challenge: {e}"))?;
            let (_, key) = account
                .tls_alpn_01(std::slice::from_ref(&challenge), c.domain.clone())
                .map_err(|e| format!("cannot build the challenge certificate for {}: {e}", c.domain))?;
            self.resolver.set_challenge(c.domain.clone(), c.token.clone(), Arc::new(key));
            tracing::info!(domain = %c.domain, "acme: answering TLS-ALPN-01 validations for an order in progress");
        }
        Ok(())
    }

    async fn sync(&mut self) -> Result<(), String> {
        self.load_cert().await?;
        self.load_challenges().await
    }

    async fn try_order(&mut self) -> Result<Ordered, String> {
        let Some(lock) = self.call(|s| s.acme_try_lock()).await? else {
            tracing::info!("acme: another relay is ordering the certificate; waiting for it in the database");
            return Ok(Ordered::Busy);
        };
        // Another relay may have stored a certificate since the last poll: it decides.
        self.load_cert().await?;
        if !self.due() {
            return Ok(Ordered::NotDue);
        }
        tracing::info!(
            domains = %self.domains_key,
            "acme: ordering a certificate (this relay holds the ordering lock; the others answer its challenges)"
        );
        let result = order::order(self).await;
        self.resolver.retain_challenges(&[]);
        if result.is_err() {
            let _ = self.call(|s| s.acme_clear_challenges()).await;
        }
        drop(lock);
        result?;
        self.load_cert().await?;
        tracing::info!(domains = %self.domains_key, "acme: obtained a new certificate, stored in the database for every relay");
        Ok(Ordered::Done)
    }

    fn report(&self, error: Option<String>) {
        let mut last = self.certs.last_error.lock().unwrap_or_else(|e| e.into_inner());
        match error {
            None => {
                *last = None;
                self.metrics.acme_failing.set(0);
            }
            Some(reason) => {
                let serving = self.certs.info().map_or("no certificate yet".to_string(), |i| {
                    format!("still serving the certificate for {}", i.describe())
                });
                tracing::error!(
                    domains = %self.domains_key,
                    "acme: {reason} ({serving}; retrying later; check that the domains resolve to the relays, port \
                     443 reaches their https listeners, the directory is reachable, and every relay has the same \
                     [server.acme] key)"
                );
                let labels = CertLabels { source: CertSourceLabel::Acme, result: CertResult::Error };
                self.metrics.cert_loads.get_or_create(&labels).inc();
                self.metrics.acme_failing.set(1);
                *last = Some(reason);
            }
        }
    }
}

/// Follows the database and orders when due, until `stop`.
pub async fn drive_shared_acme(mut d: SharedAcmeDriver, mut stop: tokio::sync::watch::Receiver<bool>) {
    tracing::info!(
        domains = %d.domains_key,
        sealed = d.sealer.sealing(),
        "acme: starting, shared with the other relays through the database (its certificate first, then the CA \
         if needed)"
    );
    let mut seen: Option<i64> = None;
    let mut sync_error: Option<String> = None;
    let mut next_check = Instant::now();
    let mut failures = 0u32;
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = poll.tick() => {}
            _ = stop.changed() => return,
        }
        let synced = match d.call(|s| s.acme_version()).await {
            Ok(v) if Some(v) == seen => Ok(()),
            Ok(v) => d.sync().await.map(|()| seen = Some(v)),
            Err(e) => Err(e),
        };
        match (synced, &sync_error) {
            (Ok(()), Some(e)) => {
                if d.certs.last_error().as_ref() == Some(e) {
                    d.report(None);
                }
                sync_error = None;
            }
            (Err(e), last) if last.as_ref() != Some(&e) => {
                d.report(Some(e.clone()));
                sync_error = Some(e);
                continue;
            }
            (Err(_), _) => continue,
            _ => {}
        }
        if Instant::now() < next_check || !d.due() {
            continue;
        }
        let ordered = tokio::select! {
            r = d.try_order() => r,
            _ = stop.changed() => return,
        };
        next_check = Instant::now() + CHECK_EVERY;
        match ordered {
            Ok(Ordered::Done) => {
                failures = 0;
                seen = None;
                d.report(None);
            }
            Ok(Ordered::Busy | Ordered::NotDue) => {}
            Err(e) => {
                // Sooner than the next check at first (a CA hiccup), never more often than a
                // minute: Let's Encrypt limits failed validations to 5 an hour.
                failures += 1;
                next_check = Instant::now() + Duration::from_secs(60 << failures.min(3)).min(CHECK_EVERY);
                d.report(Some(e));
            }
        }
    }
}
