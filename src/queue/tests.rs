//! The queue on its own: a real embedded store (wrapped in the fault seam), a routing snapshot
//! built from config text, a manual clock, and Motions at addresses nothing listens on.

use super::*;
use crate::clock::ManualClock;
use crate::metrics::{DeliveryOutcome, OutcomeLabels};
use crate::routing::Snapshot;
use crate::store::{Appended, DeadReason, EmbeddedStore, FaultyStore};
use crate::upstream::Upstream;
use std::time::Instant;

/// An address where nothing listens: every attempt is refused at once.
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

fn config_text(motions: &[&str], delivery: &str) -> String {
    let mut text = format!("[delivery]\nmode = \"queue\"\n{delivery}\n");
    for m in motions {
        text.push_str(&motion_text(m, &dead_url()));
    }
    text
}

/// A Motion at `url` with one Kaleyra account, "1".
fn motion_text(name: &str, url: &str) -> String {
    format!(
        "[[motion]]\nname = \"{name}\"\nurl = \"{url}\"\n  [[motion.account]]\n  id = \"1\"\n  provider = \"kaleyra\"\n  shared_token = \"t\"\n"
    )
}

fn snapshot(text: &str) -> Snapshot {
    let config = crate::config::parse(std::path::Path::new("relay.toml"), text).unwrap();
    Snapshot::build(config, &Upstream::new()).unwrap()
}

struct Setup {
    _dir: tempfile::TempDir,
    store: Arc<FaultyStore>,
    queue: Arc<Queue>,
    ctx: Arc<DeliveryContext>,
    clock: Arc<ManualClock>,
}

/// A queue over a fresh store; `before` runs on the store before the queue resumes it.
fn setup(motions: &[&str], delivery: &str, before: impl FnOnce(&FaultyStore)) -> Setup {
    setup_config(&config_text(motions, delivery), before)
}

/// [`setup`] with the config given whole.
fn setup_config(text: &str, before: impl FnOnce(&FaultyStore)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FaultyStore::new(Arc::new(EmbeddedStore::open(dir.path()).unwrap())));
    before(&store);
    let clock = Arc::new(ManualClock::new());
    let ctx = Arc::new(DeliveryContext {
        snapshots: Arc::new(Snapshots::from_pointee(snapshot(text))),
        metrics: Arc::new(Metrics::new()),
        clock: clock.clone(),
    });
    let queue = Queue::start(ctx.clone(), store.clone()).unwrap();
    Setup { _dir: dir, store, queue, ctx, clock }
}

fn event(motion: &str, id: &str, conversation: &str, now_ms: u64) -> NewEvent {
    NewEvent {
        motion: motion.into(),
        account: "1".into(),
        received_unix_ms: now_ms,
        ..crate::store::tests::ev(id, conversation, b"{}")
    }
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn counter(ctx: &DeliveryContext, motion: &str, outcome: DeliveryOutcome) -> u64 {
    ctx.metrics.deliveries.get_or_create(&OutcomeLabels { motion: motion.into(), outcome }).get()
}

#[tokio::test]
async fn the_scheduler_of_a_motion_removed_by_a_reload_ends() {
    let s = setup(&["acme", "beta"], "", |_| {});
    assert_eq!(s.queue.scheduled_motions(), ["acme", "beta"]);
    s.ctx.snapshots.store(Arc::new(snapshot(&config_text(&["acme"], ""))));
    s.queue.sync_motions(["acme".to_string()].into_iter());
    eventually("beta's scheduler ends", || s.queue.scheduled_motions() == ["acme"]).await;
    // An event for it (accepted before the reload, say) starts a new one, which keeps it.
    let now = s.clock.now_unix_ms();
    s.queue.accept(vec![event("beta", "b1", "c", now)]).await.unwrap();
    assert_eq!(s.queue.scheduled_motions(), ["acme", "beta"]);
    assert_eq!(s.queue.depth("beta"), 1);
}

#[tokio::test]
async fn shutdown_waits_for_every_scheduler_together_within_one_bound() {
    let motions = ["m1", "m2", "m3"];
    let s = setup(&motions, "retry_initial = \"10ms\"\nretry_max = \"20ms\"", |_| {});
    let now = s.clock.now_unix_ms();
    for m in motions {
        let events = (0..4).map(|i| event(m, &format!("{m}-{i}"), &format!("c{i}"), now)).collect();
        s.queue.accept(events).await.unwrap();
    }
    // Retries pile up attempt counts to record; then the disk hangs on every write.
    eventually("retries", || motions.iter().all(|m| counter(&s.ctx, m, DeliveryOutcome::Retry) >= 8)).await;
    s.store.set_progress_delay(Duration::from_secs(4));
    let queue = s.queue.clone();
    let started = Instant::now();
    tokio::task::spawn_blocking(move || queue.shutdown()).await.unwrap();
    // One at a time, each scheduler would get its own 5 s: three of them 15 s.
    assert!(started.elapsed() < Duration::from_secs(9), "shutdown took {:?}", started.elapsed());
}

#[tokio::test]
async fn retries_record_their_attempt_counts_in_batches() {
    let s = setup(&["acme"], "retry_initial = \"10ms\"\nretry_max = \"20ms\"", |_| {});
    let now = s.clock.now_unix_ms();
    let events = (0..5).map(|i| event("acme", &format!("e{i}"), &format!("c{i}"), now)).collect();
    s.queue.accept(events).await.unwrap();
    eventually("many retries", || counter(&s.ctx, "acme", DeliveryOutcome::Retry) >= 100).await;
    let (retries, writes) = (counter(&s.ctx, "acme", DeliveryOutcome::Retry), s.store.progress_calls());
    // One write per housekeeping tick (every 200 ms) at most, whatever the number of retries.
    assert!(writes * 5 < retries, "{writes} writes for {retries} retries");
    // The counts do reach the store.
    eventually("attempts recorded", || s.store.pending().unwrap().iter().all(|m| m.attempts > 0)).await;
}

#[tokio::test]
async fn an_event_gone_from_the_store_is_not_counted_as_delivered() {
    let seq = std::cell::Cell::new(0);
    let s = setup(&["acme"], "", |store| {
        // Waiting before the queue starts: resumed without its body, read back for its attempt.
        let r = store.append(&[event("acme", "e1", "c", 1_000)]).unwrap();
        let [Appended::Stored(n)] = r[..] else { panic!("{r:?}") };
        seq.set(n);
        store.set_load_delay(Duration::from_millis(500));
    });
    // Gone while its attempt reads it back (purged by an operator, say).
    s.store.progress(&[seq.get()], &[]).unwrap();
    eventually("the queue lets it go", || s.queue.depth("acme") == 0).await;
    assert_eq!(counter(&s.ctx, "acme", DeliveryOutcome::Delivered), 0);
}

#[tokio::test]
async fn give_up_after_counts_on_the_relays_clock() {
    let s = setup(&["acme"], "retry_initial = \"10ms\"\nretry_max = \"20ms\"\ngive_up_after = \"1h\"", |_| {});
    let now = s.clock.now_unix_ms();
    s.queue.accept(vec![event("acme", "e1", "c", now)]).await.unwrap();
    eventually("retries", || counter(&s.ctx, "acme", DeliveryOutcome::Retry) >= 3).await;
    assert!(s.store.dead_letters().unwrap().is_empty(), "an hour has not passed");
    s.clock.advance(Duration::from_secs(3601));
    eventually("a dead letter", || !s.store.dead_letters().unwrap().is_empty()).await;
    let dead = s.store.dead_letters().unwrap();
    assert!(matches!(&dead[0].info.reason, DeadReason::GaveUp { after_secs: 3600, .. }), "{:?}", dead[0].info.reason);
    // The queue lets it go once the store has it among the dead letters: a moment after.
    eventually("the queue lets it go", || s.queue.depth("acme") == 0).await;
}

/// A Motion that takes requests and never answers them; its URL. Each request it receives is
/// reported on the channel.
async fn silent_motion() -> (String, tokio::sync::mpsc::UnboundedReceiver<()>, tokio::task::JoinHandle<()>) {
    let motion = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", motion.local_addr().unwrap());
    let (got, received) = tokio::sync::mpsc::unbounded_channel();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        loop {
            let (mut conn, _) = motion.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            if tokio::io::AsyncReadExt::read(&mut conn, &mut buf).await.unwrap_or(0) > 0 {
                let _ = got.send(());
            }
            conns.push(conn);
        }
    });
    (url, received, held)
}

/// One Motion "acme" at `url`, attempts timing out after an hour, and `delivery` settings.
fn silent_config(url: &str, delivery: &str) -> String {
    format!("[delivery]\nmode = \"queue\"\ntimeout = \"1h\"\n{delivery}\n{}", motion_text("acme", url))
}

/// Appends events of `(id, conversation)` to the store; their seqs.
fn append_all(store: &FaultyStore, events: &[(&str, &str)]) -> Vec<u64> {
    let stored = |(id, c): &(&str, &str)| match store.append(&[event("acme", id, c, 1_000)]).unwrap()[0] {
        Appended::Stored(seq) => seq,
        other => panic!("{other:?}"),
    };
    events.iter().map(stored).collect()
}

/// Events read back from the store (resumed after a restart, or past the body cache) are read
/// ahead of their turn: while a conversation's attempt is in flight, the event after it has
/// already been read, so the next attempt does not wait for the store.
#[tokio::test]
async fn the_next_event_is_read_back_while_the_attempt_before_it_is_in_flight() {
    let (url, mut first, held) = silent_motion().await;
    let mut seqs = Vec::new();
    let s = setup_config(&silent_config(&url, ""), |store| {
        seqs = append_all(store, &[("e1", "c"), ("e2", "c"), ("e3", "c")]);
    });
    tokio::time::timeout(Duration::from_secs(10), first.recv()).await.expect("Motion got the first attempt");
    eventually("the second event is read back while the first is held", || s.store.loaded().contains(&seqs[1])).await;
    assert!(!s.store.loaded().contains(&seqs[2]), "only the next one is read ahead: {:?}", s.store.loaded());
    assert_eq!(s.queue.depth("acme"), 3);
    held.abort();
}

/// An event that cannot be read ahead is not read again and again: its attempt reads it in turn.
/// (Here its conversation waits for the only delivery slot, held by a Motion that never answers.)
#[tokio::test]
async fn an_event_that_cannot_be_read_ahead_is_read_ahead_once() {
    let (url, mut first, held) = silent_motion().await;
    let mut seqs = Vec::new();
    let s = setup_config(&silent_config(&url, "concurrency = 1"), |store| {
        seqs = append_all(store, &[("e1", "a"), ("e2", "b")]);
        store.set_fail_load_of(seqs[1]);
    });
    tokio::time::timeout(Duration::from_secs(10), first.recv()).await.expect("Motion got the first attempt");
    eventually("the waiting conversation's head is read ahead", || s.store.loaded().contains(&seqs[1])).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reads = s.store.loaded().iter().filter(|&&seq| seq == seqs[1]).count();
    assert_eq!(reads, 1, "times the event that cannot be read was read");
    held.abort();
}
