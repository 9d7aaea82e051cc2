//! [`AcmeStore`]: what relays sharing one database keep of ACME there, so that they use one
//! account and one certificate (`[server.acme]` with `[storage] backend = "postgres"`).
//!
//! The store keeps bytes: key material arrives sealed (or not) by the caller, which alone knows
//! the operator's key (`[server.acme] key`); `key_id` says which key sealed it ("" for none), so
//! a relay with another key can say so instead of failing to decrypt.
//!
//! Every method blocks (network I/O); async code calls them through `spawn_blocking`.

use super::StoreError;

/// A private key as stored: sealed with the operator's key, or plain when `key_id` is "".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredKey {
    pub key_id: String,
    pub bytes: Vec<u8>,
}

/// The certificate of one set of domains: its chain (PEM, leaf first) and its private key.
#[derive(Clone, Debug)]
pub struct StoredCert {
    pub chain_pem: String,
    pub key: StoredKey,
}

/// A TLS-ALPN-01 challenge in progress: what any relay needs, with the shared account key, to
/// build the challenge certificate the CA will ask for on whichever relay it reaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredChallenge {
    pub domain: String,
    pub token: String,
    pub url: String,
}

/// Held while one relay orders; dropping it lets another relay order.
pub trait AcmeLock: Send {}

/// ACME state shared by the relays of one database. `directory` is the ACME directory URL and
/// `domains` the certificate's names as configured, joined by ","; both key the rows, so a
/// config that moves to another CA or other names starts afresh.
pub trait AcmeStore: Send + Sync + 'static {
    /// The account key registered with `directory`, if a relay created one.
    fn acme_account(&self, directory: &str) -> Result<Option<StoredKey>, StoreError>;
    /// Stores the account key unless one is there already; returns the one that is stored.
    fn acme_put_account(&self, directory: &str, key: StoredKey) -> Result<StoredKey, StoreError>;
    fn acme_cert(&self, directory: &str, domains: &str) -> Result<Option<StoredCert>, StoreError>;
    /// Replaces the certificate, clears the challenges and tells the other relays, atomically.
    fn acme_put_cert(&self, directory: &str, domains: &str, cert: StoredCert) -> Result<(), StoreError>;
    /// The challenges not yet expired.
    fn acme_challenges(&self) -> Result<Vec<StoredChallenge>, StoreError>;
    /// Adds (or replaces, for its domain) a challenge valid for `ttl`, and tells the other relays.
    fn acme_put_challenge(&self, challenge: StoredChallenge, ttl: std::time::Duration) -> Result<(), StoreError>;
    fn acme_clear_challenges(&self) -> Result<(), StoreError>;
    /// A number that moves whenever a certificate or a challenge changes: cheap to poll.
    fn acme_version(&self) -> Result<i64, StoreError>;
    /// The ordering lock, if no other relay holds it. Released when the guard is dropped, or
    /// when this relay's connection to the database ends (it died).
    fn acme_try_lock(&self) -> Result<Option<Box<dyn AcmeLock>>, StoreError>;
}
