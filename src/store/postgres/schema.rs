//! The PostgreSQL schema, as numbered migrations applied at start under an advisory lock, so
//! relays starting together migrate once and a relay never runs on a schema newer than it knows.
//!
//! Must never: change a migration that has shipped (add a new one), or drop data a running
//! older relay still reads without a release note saying so.

use tokio_postgres::Client;

/// `pg_advisory_lock` key for migrations ("wr-migr").
const MIGRATION_LOCK: i64 = 0x0077_722d_6d69_6772;
/// `pg_try_advisory_lock` key held by the relay that orders an ACME certificate ("wr-acme").
pub const ACME_LOCK: i64 = 0x0077_722d_6163_6d65;

/// Partitions conversations are hashed into; each is held by one relay at a time (a lease).
/// Part of the schema (lease rows) and of every stored event: never change it in place.
pub const PARTITIONS: u32 = 64;

/// Each migration runs in its own transaction; index + 1 is the schema version it makes.
const MIGRATIONS: &[&str] = &[
    // 1: the queue, dead letters, dedup keys, windows, relays and their leases.
    r#"
    CREATE TABLE relay_counter (id int PRIMARY KEY CHECK (id = 1), next_seq bigint NOT NULL);
    INSERT INTO relay_counter VALUES (1, 1);
    CREATE TABLE relay_events (
        seq bigint PRIMARY KEY,
        part int NOT NULL,
        motion text NOT NULL,
        account text NOT NULL,
        conversation text NOT NULL,
        delivery_id text NOT NULL,
        received_ms bigint NOT NULL,
        attempts int NOT NULL DEFAULT 0,
        bytes bigint NOT NULL,
        event bytea NOT NULL
    );
    CREATE TABLE relay_dead (
        seq bigint PRIMARY KEY,
        delivery_id text NOT NULL,
        info bytea NOT NULL,
        event bytea NOT NULL
    );
    CREATE INDEX relay_dead_delivery ON relay_dead (delivery_id);
    CREATE TABLE relay_dedup (key bytea PRIMARY KEY, expires_ms bigint NOT NULL, seen_ms bigint NOT NULL);
    CREATE INDEX relay_dedup_expiry ON relay_dedup (expires_ms);
    CREATE TABLE relay_window (key text PRIMARY KEY, last_ms bigint NOT NULL);
    CREATE TABLE relay_nodes (id text PRIMARY KEY, seen timestamptz NOT NULL, started timestamptz NOT NULL);
    CREATE TABLE relay_leases (part int PRIMARY KEY, holder text, expires timestamptz NOT NULL DEFAULT '-infinity');
    INSERT INTO relay_leases (part) SELECT generate_series(0, 63);
    "#,
    // 2: the relays' one ACME account and certificate, and the TLS-ALPN-01 challenges of an
    // order in progress; `version` moves with every change (the relays poll it).
    r#"
    CREATE TABLE relay_acme_account (
        directory text PRIMARY KEY,
        key_id text NOT NULL,
        key bytea NOT NULL,
        created timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE relay_acme_cert (
        directory text NOT NULL,
        domains text NOT NULL,
        chain text NOT NULL,
        key_id text NOT NULL,
        key bytea NOT NULL,
        stored timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (directory, domains)
    );
    CREATE TABLE relay_acme_challenge (
        domain text PRIMARY KEY,
        token text NOT NULL,
        url text NOT NULL,
        expires timestamptz NOT NULL
    );
    CREATE TABLE relay_acme_version (id int PRIMARY KEY CHECK (id = 1), version bigint NOT NULL);
    INSERT INTO relay_acme_version VALUES (1, 0);
    "#,
];

/// Brings the database to the latest schema, once across relays starting together. Refuses a
/// database migrated by a newer release (it could hold what this one cannot read).
pub async fn migrate(client: &mut Client) -> Result<(), String> {
    let err = |e: tokio_postgres::Error| format!("migrating the database: {e}");
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map_err(err)?;
    let result = migrate_locked(client).await;
    // Session-level lock: released explicitly (also released if the connection dies).
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    result
}

async fn migrate_locked(client: &mut Client) -> Result<(), String> {
    let err = |e: tokio_postgres::Error| format!("migrating the database: {e}");
    client.batch_execute("CREATE TABLE IF NOT EXISTS relay_schema (version int NOT NULL); ").await.map_err(err)?;
    let rows = client.query("SELECT version FROM relay_schema", &[]).await.map_err(err)?;
    let mut version: i32 = rows.first().map_or(0, |r| r.get(0));
    let latest = MIGRATIONS.len() as i32;
    if version > latest {
        return Err(format!(
            "the database has schema version {version}, newer than this release knows ({latest}): \
             run the newer release, or restore the database it was made for"
        ));
    }
    while version < latest {
        let tx = client.transaction().await.map_err(err)?;
        tx.batch_execute(MIGRATIONS[version as usize]).await.map_err(err)?;
        tx.execute("DELETE FROM relay_schema", &[]).await.map_err(err)?;
        tx.execute("INSERT INTO relay_schema VALUES ($1)", &[&(version + 1)]).await.map_err(err)?;
        tx.commit().await.map_err(err)?;
        version += 1;
        tracing::info!(version, "database schema migrated");
    }
    Ok(())
}
