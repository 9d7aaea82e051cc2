//! The postgres backend behind the store interfaces, as the embedded store's own tests check
//! it: seq order, dedup in the same transaction (also across relays), dead letters, revive,
//! purge, windows; and leases: two relays on one database split the conversations, and when one
//! goes the other holds them all.

mod support;

use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};
use whatsapp_relay::config::PostgresStorage;
use whatsapp_relay::store::{Appended, DeadInfo, DeadReason, NewEvent, PostgresStore, QueueStore, WindowStore};

fn settings(url: &str, takeover: Duration) -> PostgresStorage {
    PostgresStorage { url: whatsapp_relay::config::pg_url::parse(url).unwrap(), pool: 4, takeover }
}

fn ev(id: &str, conversation: &str, body: &[u8]) -> NewEvent {
    NewEvent {
        delivery_id: id.into(),
        motion: "acme".into(),
        account: "12".into(),
        conversation: conversation.into(),
        provider: whatsapp_relay::provider::twilio::KIND,
        method: http::Method::POST,
        path_and_query: "/api/whatsapp/accounts/12/notify".into(),
        headers: vec![("x-twilio-signature".into(), b"sig".to_vec())],
        body: Bytes::copy_from_slice(body),
        received_unix_ms: 1_000,
        dedup_key: None,
        dedup_expires_unix_ms: 0,
        unowned: None,
    }
}

fn keyed(id: &str, key: u8, received: u64, expires: u64) -> NewEvent {
    NewEvent {
        dedup_key: Some([key; 32]),
        received_unix_ms: received,
        dedup_expires_unix_ms: expires,
        ..ev(id, "c", b"")
    }
}

fn info() -> DeadInfo {
    DeadInfo {
        reason: DeadReason::Refused { status: 404 },
        status: Some(404),
        answer: vec![b'x'; 70_000],
        attempts: 2,
        died_unix_ms: 5,
    }
}

/// Runs `f` on a blocking thread, as the relay calls the store.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_interface_on_postgres() {
    let Some(pg) = support::pg::PgServer::start("the_queue_interface_on_postgres") else { return };
    let url = pg.url();
    blocking(move || {
        let store = PostgresStore::open(&settings(&url, Duration::from_secs(15))).unwrap();
        // Seq order, bodies back whole.
        let r = store.append(&[ev("a", "c1", b"one"), ev("b", "c2", b"two"), ev("c", "c1", b"three")]).unwrap();
        assert_eq!(r, [Appended::Stored(1), Appended::Stored(2), Appended::Stored(3)]);
        let ids: Vec<_> = store.pending().unwrap().into_iter().map(|m| m.delivery_id).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        let loaded = store.load(3).unwrap().unwrap();
        assert_eq!((loaded.ev.body.as_ref(), loaded.ev.headers.clone()), (&b"three"[..], ev("", "", b"").headers));

        // Dedup within a batch, across calls, and after expiry.
        let r = store.append(&[keyed("k1", 1, 100, 200), keyed("k1again", 1, 100, 200)]).unwrap();
        assert_eq!(r, [Appended::Stored(4), Appended::Duplicate]);
        assert_eq!(store.append(&[keyed("k1late", 1, 150, 300)]).unwrap(), [Appended::Duplicate]);
        assert_eq!(store.append(&[keyed("k1expired", 1, 250, 400)]).unwrap(), [Appended::Stored(5)]);

        // Progress: delivered removed, attempts recorded.
        store.progress(&[1], &[(2, 3)]).unwrap();
        let pending = store.pending().unwrap();
        assert_eq!(pending.iter().map(|m| m.seq).collect::<Vec<_>>(), [2, 3, 4, 5]);
        assert_eq!(pending[0].attempts, 3);
        assert!(store.load(1).unwrap().is_none());

        // pending_after: what came after a seq, and up to where it looked.
        let (top, after) = store.pending_after(3).unwrap();
        assert_eq!((top, after.iter().map(|m| m.seq).collect::<Vec<_>>()), (5, vec![4, 5]));

        // Dead letters: kill keeps the reason and cuts the answer; revive takes a new seq.
        store.kill(2, info()).unwrap();
        store.kill(2, info()).unwrap(); // no longer waiting: a no-op
        let dead = store.dead_letters().unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!((dead[0].seq, dead[0].info.answer.len(), dead[0].ev.delivery_id.as_str()), (2, 64 * 1024, "b"));
        assert_eq!(store.dead_seqs_of("b").unwrap(), [2]);
        let revived = store.revive(2, 9_999).unwrap().unwrap();
        assert_eq!(
            (revived.seq, revived.delivery_id.as_str(), revived.attempts, revived.received_unix_ms),
            (6, "b", 0, 9_999)
        );
        assert!(store.revive(2, 1).unwrap().is_none());

        // An event no account owns goes straight to the dead letters, deduplicated.
        let mut unowned = keyed("u", 9, 100, 1_000);
        unowned.account = String::new();
        assert_eq!(store.append_dead(&unowned, info()).unwrap(), Appended::Stored(7));
        assert_eq!(store.append_dead(&unowned, info()).unwrap(), Appended::Duplicate);
        // Replaced by new events once, in one transaction.
        assert_eq!(store.append_replacing_dead(&[ev("r", "c9", b"")], 7).unwrap(), [Appended::Stored(8)]);
        assert!(store.append_replacing_dead(&[ev("r2", "c9", b"")], 7).unwrap().is_empty());

        // Purge one, then all.
        store.kill(3, info()).unwrap();
        store.kill(4, info()).unwrap();
        assert_eq!(store.purge_dead(Some(3)).unwrap(), 1);
        assert_eq!(store.purge_dead(None).unwrap(), 1);
        assert!(store.dead_letters().unwrap().is_empty());
        assert_eq!(store.prune_dedup(10_000).unwrap(), 2);

        // Windows keep the latest touch and prune.
        store.window_touch(&[("k".into(), 10), ("k".into(), 30), ("old".into(), 1)]).unwrap();
        store.window_touch(&[("k".into(), 20)]).unwrap();
        assert_eq!(store.window_last("k").unwrap(), Some(30));
        assert_eq!(store.prune_window(5).unwrap(), 1);
        assert!(store.writable());
        store.sync().unwrap();
        drop(store);

        // Seqs keep increasing across a restart of the relay.
        let store = PostgresStore::open(&settings(&url, Duration::from_secs(15))).unwrap();
        assert_eq!(store.append(&[ev("z", "c", b"")]).unwrap(), [Appended::Stored(9)]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_split_the_conversations_and_one_takes_all_when_the_other_goes() {
    let test = "two_relays_split_the_conversations_and_one_takes_all_when_the_other_goes";
    let Some(pg) = support::pg::PgServer::start(test) else { return };
    let url = pg.url();
    blocking(move || {
        let takeover = Duration::from_secs(3);
        let a = Arc::new(PostgresStore::open(&settings(&url, takeover)).unwrap());
        let b = Arc::new(PostgresStore::open(&settings(&url, takeover)).unwrap());
        let convs: Vec<String> = (0..200).map(|i| format!("12:{i}")).collect();
        let held = |s: &PostgresStore| convs.iter().filter(|c| s.leases().holds("acme", c)).count();
        let start = Instant::now();
        loop {
            let (ha, hb) = (held(&a), held(&b));
            let both = convs.iter().filter(|c| a.leases().holds("acme", c) && b.leases().holds("acme", c)).count();
            assert_eq!(both, 0, "a conversation held by two relays");
            if ha + hb == convs.len() && ha > 0 && hb > 0 {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no split within 10 s: {ha} + {hb}");
            std::thread::sleep(Duration::from_millis(100));
        }

        // A redelivery to the other relay is a duplicate.
        assert_eq!(a.append(&[keyed("x", 7, 100, 1_000)]).unwrap(), [Appended::Stored(1)]);
        assert_eq!(b.append(&[keyed("x", 7, 100, 1_000)]).unwrap(), [Appended::Duplicate]);

        // b leaves cleanly: a holds everything at its next renewal.
        b.leases().release();
        drop(b);
        let start = Instant::now();
        while held(&a) < convs.len() {
            assert!(start.elapsed() < takeover, "not taken over within takeover");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await;
}
