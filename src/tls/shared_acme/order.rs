//! One certificate order by the relay holding the ordering lock, over rustls-acme's low-level
//! `Account` API: the shared account, a new order, each authorization's TLS-ALPN-01 challenge
//! published in the database before the CA is told to validate (it may reach any relay), the
//! CSR, the certificate stored for every relay.

use super::{SharedAcmeDriver, cert_row};
use crate::store::{StoredCert, StoredChallenge};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_acme::acme::{Account, AcmeError, Auth, AuthStatus, ChallengeType, Directory, Identifier, OrderStatus};
use std::sync::Arc;
use std::time::Duration;

/// How long a published challenge stays answerable: longer than any validation takes.
const CHALLENGE_TTL: Duration = Duration::from_secs(600);

/// Between publishing a challenge and asking the CA to validate it: the other relays poll the
/// database every [`super::POLL`], so by then every live relay answers it.
const PROPAGATION: Duration = Duration::from_millis(2500);

fn acme(what: &'static str) -> impl Fn(AcmeError) -> String {
    move |e| format!("{what}: {e}")
}

fn rcgen_err(e: rcgen::Error) -> String {
    format!("cannot make the certificate request: {e}")
}

/// Orders and stores a certificate for the configured domains. The caller holds the lock and
/// clears the challenges afterwards, whatever happened.
pub(super) async fn order(d: &SharedAcmeDriver) -> Result<(), String> {
    let client = &d.client;
    let directory = Directory::discover(client, &d.cfg.directory).await.map_err(acme("reading the directory"))?;
    let key = d.account_key(true).await?.ok_or("the account key vanished from the database")?;
    let account = Account::create_with_keypair(client, directory, &d.cfg.contact, &key)
        .await
        .map_err(acme("registering the account"))?;

    let cert_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rcgen_err)?;
    let mut params = CertificateParams::new(d.cfg.domains.clone()).map_err(rcgen_err)?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&cert_key).map_err(rcgen_err)?;

    let (order_url, mut order) =
        account.new_order(client, d.cfg.domains.clone()).await.map_err(acme("creating the order"))?;
    let mut waits = 0u32;
    loop {
        order = match &order.status {
            OrderStatus::Pending => {
                for url in &order.authorizations {
                    authorize(d, &account, url).await?;
                }
                account.order(client, &order_url).await.map_err(acme("reading the order"))?
            }
            OrderStatus::Processing => {
                if waits == 10 {
                    return Err("the CA kept the order processing for too long".into());
                }
                tokio::time::sleep(Duration::from_secs(1 << waits.min(4))).await;
                waits += 1;
                account.order(client, &order_url).await.map_err(acme("reading the order"))?
            }
            OrderStatus::Ready => account
                .finalize(client, order.finalize.clone(), csr.der())
                .await
                .map_err(acme("finalizing the order"))?,
            OrderStatus::Valid { certificate } => {
                let chain_pem =
                    account.certificate(client, certificate).await.map_err(acme("downloading the certificate"))?;
                let key = d.sealer.seal(&cert_row(&d.cfg), &cert_key.serialize_der())?;
                let (directory, domains) = (d.cfg.directory.clone(), d.domains_key.clone());
                let cert = StoredCert { chain_pem, key };
                return d.call(move |s| s.acme_put_cert(&directory, &domains, cert)).await;
            }
            OrderStatus::Invalid => {
                let why = order.error.as_ref().and_then(|p| p.detail.clone()).unwrap_or_default();
                return Err(format!("the CA marked the order invalid {why}"));
            }
        };
    }
}

/// Why the CA refused a TLS-ALPN-01 challenge, as it says.
fn refusal(auth: &Auth) -> String {
    auth.challenges
        .iter()
        .find(|c| c.typ == ChallengeType::TlsAlpn01)
        .and_then(|c| c.error.as_ref())
        .and_then(|p| p.detail.clone())
        .unwrap_or_else(|| format!("{:?}", auth.status))
}

async fn authorize(d: &SharedAcmeDriver, account: &Account, url: &str) -> Result<(), String> {
    let client = &d.client;
    let auth = account.auth(client, url).await.map_err(acme("reading an authorization"))?;
    let Identifier::Dns(domain) = auth.identifier.clone();
    match auth.status {
        AuthStatus::Valid => return Ok(()),
        AuthStatus::Pending => {}
        _ => return Err(format!("the authorization for {domain} is {:?}: {}", auth.status, refusal(&auth))),
    }
    let (challenge, key) = account.tls_alpn_01(&auth.challenges, domain.clone()).map_err(acme("the challenge"))?;
    d.resolver.set_challenge(domain.clone(), challenge.token.clone(), Arc::new(key));
    let stored = StoredChallenge { domain: domain.clone(), token: challenge.token.clone(), url: challenge.url.clone() };
    d.call(move |s| s.acme_put_challenge(stored, CHALLENGE_TTL)).await?;
    tokio::time::sleep(PROPAGATION).await;
    account.challenge(client, &challenge.url).await.map_err(acme("asking the CA to validate"))?;
    for i in 0..6u32 {
        tokio::time::sleep(Duration::from_millis(500 << i)).await;
        let auth = account.auth(client, url).await.map_err(acme("reading an authorization"))?;
        match auth.status {
            AuthStatus::Pending => {}
            AuthStatus::Valid => return Ok(()),
            _ => return Err(format!("the CA could not validate {domain}: {}", refusal(&auth))),
        }
    }
    Err(format!("the CA did not validate {domain} within 30 s"))
}
