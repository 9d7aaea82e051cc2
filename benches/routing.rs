//! Route lookup cost against the number of configured accounts: 10 (one Motion) and 100,000
//! (100 Motions x 1,000 accounts). The routing table is a pair of hash maps, so a lookup should
//! cost the same at both sizes.
//!
//! Run: `cargo bench --bench routing` (append `-- hit` etc. to filter).
//! Cases, each at both sizes:
//! - `hit`: `POST /m{i}/api/whatsapp/accounts/{id}/notify`, cycling over 1,024 accounts picked
//!   across all Motions (so the probes don't all hit one warm cache line);
//! - `miss`: an unknown account under a known Motion (the deepest way to get a 404);
//! - `host_hit`: `/api/whatsapp/accounts/{id}/notify` on the Host of Motion `m0`.
//!
//! The accounts' `shared_token` is a `file:` secret, not an inline one: each inline secret adds a
//! warning, and a warning's line:col is found by scanning the text from its start, so 100,000 of
//! them made parsing quadratic (minutes). The time to parse the config and build the table is
//! printed to stderr for each size.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};
use whatsapp_relay::routing::{Route, RouteTable};
use whatsapp_relay::upstream::Upstream;

const HOST: &str = "acme.example.com";
/// The Host header of prefix-routed requests: not any Motion's, as in production.
const PUBLIC_HOST: Option<&str> = Some("chat.example.com");

/// A direct-mode config of `motions` x `per_motion` Kaleyra accounts whose token is read from
/// `token_file`. Account ids are unique over the whole file (`motion * per_motion + n`); `m0` also
/// answers on [`HOST`].
fn config_text(motions: usize, per_motion: usize, token_file: &Path) -> String {
    let token = format!("file:{}", token_file.display());
    let mut s = String::from("[delivery]\nmode = \"direct\"\n");
    for m in 0..motions {
        let _ = write!(s, "\n[[motion]]\nname = \"m{m}\"\nurl = \"http://127.0.0.1:9000\"\n");
        if m == 0 {
            let _ = writeln!(s, "hosts = [\"{HOST}\"]");
        }
        for n in 0..per_motion {
            let _ = write!(
                s,
                "[[motion.account]]\nid = \"{}\"\nprovider = \"kaleyra\"\nshared_token = {token:?}\n",
                m * per_motion + n
            );
        }
    }
    s
}

fn table(motions: usize, per_motion: usize, token_file: &Path) -> RouteTable {
    let text = config_text(motions, per_motion, token_file);
    let started = Instant::now();
    let config = whatsapp_relay::config::parse(Path::new("bench.toml"), &text).expect("the generated config is valid");
    let table = RouteTable::build(&config, &Upstream::new()).expect("routing table");
    eprintln!(
        "routing bench: {} accounts: config parse + table build took {:?} ({} KiB of TOML)",
        motions * per_motion,
        started.elapsed(),
        text.len() / 1024
    );
    table
}

/// 1,024 hit paths spread over every Motion and account (a fixed LCG: same paths every run).
fn hit_paths(motions: usize, per_motion: usize) -> Vec<String> {
    let total = (motions * per_motion) as u64;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..1024)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let id = (x >> 33) % total;
            format!("/m{}/api/whatsapp/accounts/{id}/notify", id as usize / per_motion)
        })
        .collect()
}

fn lookups(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "t\n").expect("write the token file");
    let mut group = c.benchmark_group("lookup");
    for (motions, per_motion) in [(1, 10), (100, 1_000)] {
        let accounts = motions * per_motion;
        let t = table(motions, per_motion, &token_file);

        let paths = hit_paths(motions, per_motion);
        for p in &paths {
            assert!(matches!(t.lookup(PUBLIC_HOST, p), Some(Route::Inbound { by_host: false, .. })), "{p}");
        }
        let mut i = 0;
        group.bench_function(BenchmarkId::new("hit", accounts), |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                t.lookup(PUBLIC_HOST, black_box(&paths[i])).is_some()
            })
        });

        let miss = "/m0/api/whatsapp/accounts/no-such-account/notify";
        assert!(t.lookup(PUBLIC_HOST, miss).is_none());
        group.bench_function(BenchmarkId::new("miss", accounts), |b| {
            b.iter(|| t.lookup(PUBLIC_HOST, black_box(miss)).is_some())
        });

        // m0's own accounts are ids 0..per_motion.
        let host_paths: Vec<String> =
            (0..per_motion.min(1024)).map(|id| format!("/api/whatsapp/accounts/{id}/notify")).collect();
        for p in &host_paths {
            assert!(matches!(t.lookup(Some(HOST), p), Some(Route::Inbound { by_host: true, .. })), "{p}");
        }
        let mut j = 0;
        group.bench_function(BenchmarkId::new("host_hit", accounts), |b| {
            b.iter(|| {
                j = (j + 1) % host_paths.len();
                t.lookup(black_box(Some(HOST)), black_box(&host_paths[j])).is_some()
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: lookups take nanoseconds, and the bench machines are shared.
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = lookups
}
criterion_main!(benches);
