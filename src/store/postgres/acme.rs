//! [`AcmeStore`] on PostgreSQL: the account key, the certificate and the challenges in three
//! tables (schema version 2), a version row every change moves, and the ordering lock as a
//! session-level advisory lock on a connection of its own (a relay that dies mid-order frees it
//! with its connection).

use super::{PgError, PostgresStore, schema::ACME_LOCK};
use crate::store::{AcmeLock, AcmeStore, StoreError, StoredCert, StoredChallenge, StoredKey};
use std::sync::Arc;
use std::time::Duration;

const BUMP: &str = "UPDATE relay_acme_version SET version = version + 1 WHERE id = 1";

/// The lock's own connection: the advisory lock lives as long as it does.
struct PgAcmeLock(#[allow(dead_code)] tokio_postgres::Client);

impl AcmeLock for PgAcmeLock {}

fn key_of(r: &tokio_postgres::Row, id: usize, bytes: usize) -> StoredKey {
    StoredKey { key_id: r.get(id), bytes: r.get(bytes) }
}

impl AcmeStore for PostgresStore {
    fn acme_account(&self, directory: &str) -> Result<Option<StoredKey>, StoreError> {
        let directory = directory.to_string();
        self.read(move |inner| async move {
            let client = inner.pool.get().await?;
            let row = client
                .query_opt("SELECT key_id, key FROM relay_acme_account WHERE directory = $1", &[&directory])
                .await?;
            Ok(row.map(|r| key_of(&r, 0, 1)))
        })
    }

    fn acme_put_account(&self, directory: &str, key: StoredKey) -> Result<StoredKey, StoreError> {
        let (directory, key) = (Arc::new(directory.to_string()), Arc::new(key));
        self.write(move |inner| {
            let (directory, key) = (directory.clone(), key.clone());
            async move {
                let client = inner.pool.get().await?;
                client
                    .execute(
                        "INSERT INTO relay_acme_account (directory, key_id, key) VALUES ($1, $2, $3) \
                         ON CONFLICT (directory) DO NOTHING",
                        &[&*directory, &key.key_id, &key.bytes],
                    )
                    .await?;
                let row = client
                    .query_one("SELECT key_id, key FROM relay_acme_account WHERE directory = $1", &[&*directory])
                    .await?;
                Ok(key_of(&row, 0, 1))
            }
        })
    }

    fn acme_cert(&self, directory: &str, domains: &str) -> Result<Option<StoredCert>, StoreError> {
        let (directory, domains) = (directory.to_string(), domains.to_string());
        self.read(move |inner| async move {
            let client = inner.pool.get().await?;
            let row = client
                .query_opt(
                    "SELECT chain, key_id, key FROM relay_acme_cert WHERE directory = $1 AND domains = $2",
                    &[&directory, &domains],
                )
                .await?;
            Ok(row.map(|r| StoredCert { chain_pem: r.get(0), key: key_of(&r, 1, 2) }))
        })
    }

    fn acme_put_cert(&self, directory: &str, domains: &str, cert: StoredCert) -> Result<(), StoreError> {
        let (directory, domains, cert) =
            (Arc::new(directory.to_string()), Arc::new(domains.to_string()), Arc::new(cert));
        self.write(move |inner| {
            let (directory, domains, cert) = (directory.clone(), domains.clone(), cert.clone());
            async move {
                let mut client = inner.pool.get().await?;
                let tx = client.transaction().await?;
                tx.execute(
                    "INSERT INTO relay_acme_cert (directory, domains, chain, key_id, key) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (directory, domains) DO UPDATE SET chain = EXCLUDED.chain, key_id = EXCLUDED.key_id, \
                     key = EXCLUDED.key, stored = now()",
                    &[&*directory, &*domains, &cert.chain_pem, &cert.key.key_id, &cert.key.bytes],
                )
                .await?;
                tx.execute("DELETE FROM relay_acme_challenge", &[]).await?;
                tx.execute(BUMP, &[]).await?;
                tx.commit().await?;
                Ok(())
            }
        })
    }

    fn acme_challenges(&self) -> Result<Vec<StoredChallenge>, StoreError> {
        self.read(|inner| async move {
            let client = inner.pool.get().await?;
            let rows = client
                .query("SELECT domain, token, url FROM relay_acme_challenge WHERE expires > now() ORDER BY domain", &[])
                .await?;
            Ok(rows.iter().map(|r| StoredChallenge { domain: r.get(0), token: r.get(1), url: r.get(2) }).collect())
        })
    }

    fn acme_put_challenge(&self, challenge: StoredChallenge, ttl: Duration) -> Result<(), StoreError> {
        let challenge = Arc::new(challenge);
        let ttl = ttl.as_secs_f64();
        self.write(move |inner| {
            let challenge = challenge.clone();
            async move {
                let mut client = inner.pool.get().await?;
                let tx = client.transaction().await?;
                tx.execute(
                    "INSERT INTO relay_acme_challenge (domain, token, url, expires) \
                     VALUES ($1, $2, $3, now() + make_interval(secs => $4)) \
                     ON CONFLICT (domain) DO UPDATE SET token = EXCLUDED.token, url = EXCLUDED.url, \
                     expires = EXCLUDED.expires",
                    &[&challenge.domain, &challenge.token, &challenge.url, &ttl],
                )
                .await?;
                tx.execute(BUMP, &[]).await?;
                tx.commit().await?;
                Ok(())
            }
        })
    }

    fn acme_clear_challenges(&self) -> Result<(), StoreError> {
        self.write(|inner| async move {
            let mut client = inner.pool.get().await?;
            let tx = client.transaction().await?;
            if tx.execute("DELETE FROM relay_acme_challenge", &[]).await? > 0 {
                tx.execute(BUMP, &[]).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn acme_version(&self) -> Result<i64, StoreError> {
        self.read(|inner| async move {
            let client = inner.pool.get().await?;
            Ok(client.query_one("SELECT version FROM relay_acme_version WHERE id = 1", &[]).await?.get(0))
        })
    }

    fn acme_try_lock(&self) -> Result<Option<Box<dyn AcmeLock>>, StoreError> {
        self.read(|inner| async move {
            let client = inner.connector.connect(None).await.map_err(PgError::from)?;
            let got: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&ACME_LOCK]).await?.get(0);
            Ok(got.then(|| Box::new(PgAcmeLock(client)) as Box<dyn AcmeLock>))
        })
    }
}
