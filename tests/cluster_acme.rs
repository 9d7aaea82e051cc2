//! `[server.acme]` with several relays on one PostgreSQL database, against Pebble on loopback:
//! one account, one order, one certificate for all of them. The relay that orders is not the
//! one Pebble validates on, so the order succeeds only if the other relay answers the
//! TLS-ALPN-01 challenge it read from the database; a relay started later serves the stored
//! certificate without ordering.

mod support;

use std::time::{Duration, Instant};
use support::pebble::Pebble;
use support::tls::*;
use support::*;

/// The schema's ACME ordering lock (`schema::ACME_LOCK`, "wr-acme").
const ACME_LOCK: i64 = 0x0077_722d_6163_6d65;

fn config(https: &str, directory: &str, ca_file: &std::path::Path, key_file: &std::path::Path) -> String {
    format!(
        r#"
[server]
http = "127.0.0.1:0"
https = "{https}"
[server.acme]
domains = ["relay.test"]
contact = ["mailto:ops@relay.test"]
directory = "{directory}"
ca_file = "{ca}"
key = "file:{key}"
[admin]
listen = "127.0.0.1:0"
[storage]
path = "{{DATA}}"
"#,
        ca = ca_file.display(),
        key = key_file.display()
    )
}

async fn pg(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

async fn wait_ready(relay: &RelayProcess, pebble: &Pebble, within: Duration) {
    let start = Instant::now();
    loop {
        let ready = get(&relay.admin_url("/readyz")).await;
        if ready.status == 200 {
            return;
        }
        assert!(
            start.elapsed() < within,
            "no certificate within {within:?}: {:?}\nrelay:\n{}\npebble:\n{}",
            ready.body,
            relay.logs(),
            pebble.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The leaf certificate a relay's https listener presents for relay.test, verified against
/// Pebble's root.
async fn leaf(relay: &RelayProcess, root: &str) -> Vec<u8> {
    let tls = connect(relay.https.unwrap(), "relay.test", client_config(&[root], &[b"http/1.1"], Versions::Both))
        .await
        .expect("the relay's certificate verifies against Pebble's root");
    peer_leaf(&tls)
}

#[tokio::test]
async fn relays_on_one_database_share_one_acme_account_order_and_certificate() {
    const TEST: &str = "relays_on_one_database_share_one_acme_account_order_and_certificate";
    if !support::pebble::available(TEST) {
        return;
    }
    let Some(backend) = Backend::postgres(TEST) else { return };
    let Backend::Postgres(_, url) = &backend else { unreachable!() };
    // Pebble validates on relay B's https port only; relay A's is elsewhere.
    let b_https = dead_addr().await;
    let pebble = Pebble::start(b_https.port()).await;
    let files = tempfile::tempdir().unwrap();
    let ca_file = pebble.ca.write(files.path());
    let key_file = files.path().join("acme.key");
    std::fs::write(&key_file, "an-operator-key-of-at-least-32-random-characters\n").unwrap();
    let directory = format!("https://127.0.0.1:{}/dir", pebble.acme.port());
    let cfg = |https: &str| backend.apply(&config(https, &directory, &ca_file, &key_file));

    // B starts while the test holds the ordering lock, so B only follows the database; once the
    // lock is free, A starts and orders.
    let holder = pg(url).await;
    holder.execute("SELECT pg_advisory_lock($1)", &[&ACME_LOCK]).await.unwrap();
    let b = RelayProcess::start(&cfg(&b_https.to_string()));
    b.wait_log("another relay is ordering the certificate", Duration::from_secs(15)).await;
    holder.execute("SELECT pg_advisory_unlock($1)", &[&ACME_LOCK]).await.unwrap();
    let start = Instant::now();
    let a = RelayProcess::start(&cfg("127.0.0.1:0"));
    wait_ready(&a, &pebble, Duration::from_secs(60)).await;
    let took = start.elapsed();
    wait_ready(&b, &pebble, Duration::from_secs(5)).await;
    let both = start.elapsed();

    // A ordered; B answered the validation from the database; A's listener never saw one.
    assert_eq!(a.count_log("acme: ordering a certificate"), 1, "{}", a.logs());
    assert_eq!(b.count_log("acme: ordering a certificate"), 0, "{}", b.logs());
    assert!(b.logs().contains("answering TLS-ALPN-01 validations for an order in progress"), "{}", b.logs());
    assert!(b.logs().contains("acme: answering a TLS-ALPN-01 validation"), "{}", b.logs());
    assert!(!a.logs().contains("acme: answering a TLS-ALPN-01 validation"), "{}", a.logs());
    // One account and one certificate issued, as the CA saw it.
    let logs = pebble.logs();
    let most = |what: &str| {
        logs.lines()
            .filter_map(|l| l.split("There are now ").nth(1)?.strip_suffix(what)?.trim().parse::<u32>().ok())
            .max()
            .unwrap_or(0)
    };
    let (issued, orders, accounts) =
        (logs.matches("Issued certificate serial").count(), most("orders in the db"), most("accounts in memory"));
    assert_eq!((issued, orders, accounts), (1, 1, 1), "certificates, orders, accounts at Pebble:\n{logs}");

    // Both serve the same certificate, which Pebble's root verifies.
    let root = pebble.root().await;
    let (leaf_a, leaf_b) = (leaf(&a, &root).await, leaf(&b, &root).await);
    assert_eq!(leaf_a, leaf_b, "both relays serve the one certificate");

    // The keys are stored sealed with the operator's key, the challenges are gone.
    let db = pg(url).await;
    let sealed: Vec<String> = db
        .query("SELECT key_id FROM relay_acme_account UNION ALL SELECT key_id FROM relay_acme_cert", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(sealed.len(), 2);
    assert!(sealed.iter().all(|id| !id.is_empty()), "keys stored unsealed: {sealed:?}");
    let challenges: i64 = db.query_one("SELECT count(*) FROM relay_acme_challenge", &[]).await.unwrap().get(0);
    assert_eq!(challenges, 0);

    // With the CA gone, a relay started later serves the stored certificate without ordering.
    drop(pebble);
    let c = RelayProcess::start(&cfg("127.0.0.1:0"));
    c.wait_log("serving the certificate from the database for relay.test", Duration::from_secs(10)).await;
    assert_eq!(leaf(&c, &root).await, leaf_a);
    assert_eq!(get(&c.admin_url("/readyz")).await.status, 200);
    assert!(!c.logs().contains("acme: ordering"), "{}", c.logs());

    // A relay given another key neither opens the stored keys nor orders over them: it says so.
    let other_key = files.path().join("other.key");
    std::fs::write(&other_key, "another-operator-key-of-at-least-32-characters\n").unwrap();
    let d = RelayProcess::start(&backend.apply(&config("127.0.0.1:0", &directory, &ca_file, &other_key)));
    d.wait_log("sealed with another [server.acme] key", Duration::from_secs(10)).await;
    let ready = get(&d.admin_url("/readyz")).await;
    assert_eq!(ready.status, 503);
    assert!(ready.json()["message"].as_str().unwrap().contains("give every relay the same key"), "{:?}", ready.body);
    assert!(!d.logs().contains("acme: ordering"), "{}", d.logs());
    eprintln!(
        "shared ACME: certificate on the ordering relay {took:?} after it started, on both {both:?}; \
         Pebble saw {accounts} account, {orders} order, issued {issued} certificate; the relays logged {} order(s)",
        a.count_log("acme: ordering a certificate") + b.count_log("acme: ordering a certificate")
    );
}
