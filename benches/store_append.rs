//! Store write throughput: `GroupCommit` appends of 1 KiB events with 1, 16 and 64 concurrent
//! submitters (each a closed loop: append, wait for the answer, append again), and the cost of
//! one bare commit of each kind on `EmbeddedStore`. Prints events per commit (per fsync) for
//! each group-commit run.
//!
//! The database lives under the target directory, not /tmp: /tmp may be a tmpfs, where fsync
//! is free and the numbers would mean nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use whatsapp_relay::store::{EmbeddedStore, FaultyStore, GroupCommit, NewEvent, QueueStore};

fn event(i: u64) -> NewEvent {
    NewEvent {
        delivery_id: format!("d{i}"),
        motion: "acme".into(),
        account: "12".into(),
        conversation: format!("12:+39{}", i % 100),
        provider: whatsapp_relay::provider::twilio::KIND,
        method: http::Method::POST,
        path_and_query: "/api/whatsapp/accounts/12/notify".into(),
        headers: vec![("x-twilio-signature".into(), b"0123456789abcdef".to_vec())],
        body: Bytes::from(vec![b'x'; 1024]),
        received_unix_ms: i,
        dedup_key: None,
        dedup_expires_unix_ms: 0,
        unowned: None,
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn group_commit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut g = c.benchmark_group("group_commit_1KiB");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for submitters in [1u64, 16, 64] {
        let dir = tempdir();
        let store = Arc::new(FaultyStore::new(Arc::new(EmbeddedStore::open(dir.path()).unwrap())));
        let gc = Arc::new(GroupCommit::new(store.clone()));
        let mut events = 0;
        g.throughput(Throughput::Elements(submitters));
        g.bench_function(BenchmarkId::new("submitters", submitters), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                rt.block_on(async {
                    let tasks: Vec<_> = (0..submitters)
                        .map(|s| {
                            let gc = gc.clone();
                            tokio::spawn(async move {
                                for i in 0..iters {
                                    gc.append(vec![event(s * iters + i)]).await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                });
                events += iters * submitters;
                start.elapsed()
            })
        });
        eprintln!(
            "group_commit_1KiB/submitters/{submitters}: {events} events in {} commits = {:.1} events per commit",
            store.append_calls(),
            events as f64 / store.append_calls() as f64
        );
    }
    g.finish();
}

fn single_commit(c: &mut Criterion) {
    let dir = tempdir();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let mut g = c.benchmark_group("embedded_commit");
    g.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    let mut i = 0;
    // One synced (fdatasync) commit holding one 1 KiB event.
    g.bench_function("append_1KiB_immediate", |b| {
        b.iter(|| {
            i += 1;
            store.append(&[event(i)]).unwrap()
        })
    });
    // One cheap (Durability::None) commit, with every 32nd made durable.
    let seq = store.pending().unwrap()[0].seq;
    let mut attempts = 0;
    g.bench_function("progress_attempts_cheap", |b| {
        b.iter(|| {
            attempts += 1;
            store.progress(&[], &[(seq, attempts)]).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, group_commit, single_commit);
criterion_main!(benches);
