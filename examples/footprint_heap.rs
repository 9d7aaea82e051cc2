//! Heap bytes per configured account, without the allocator's own overhead: a counting
//! allocator around the system one, the config `benches/footprint.py` writes (Meta accounts
//! with their own app secret and phone number id, 1,000 per Motion), and the live and peak
//! bytes after parsing it and after building the routing table from it.
//!
//! Run: `cargo run --release --example footprint_heap -- [ACCOUNTS]` (ACCOUNTS defaults to 10000).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use whatsapp_relay::routing::Snapshot;
use whatsapp_relay::upstream::Upstream;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static COUNT: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is handed to `System` unchanged; only counters are updated beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
        PEAK.fetch_max(now, Relaxed);
        COUNT.fetch_add(1, Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        COUNT.fetch_sub(1, Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let now = LIVE.fetch_add(new_size, Relaxed) + new_size;
        PEAK.fetch_max(now, Relaxed);
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn config_text(accounts: usize) -> String {
    let mut out = String::from(
        "[server]\nhttp = \"127.0.0.1:1\"\n[storage]\npath = \"/nonexistent\"\n[delivery]\nmode = \"queue\"\n",
    );
    for m in 0..accounts.div_ceil(1000) {
        out += &format!("\n[[motion]]\nname = \"m{m}\"\nurl = \"http://127.0.0.1:9\"\n");
        for n in m * 1000..accounts.min((m + 1) * 1000) {
            out += &format!(
                "  [[motion.account]]\n  id = \"{n}\"\n  provider = \"meta\"\n  app_secret = \"app-secret-{n:08}\"\n  phone_number_id = \"1{n:014}\"\n"
            );
        }
    }
    out
}

fn main() {
    let accounts: usize = std::env::args().nth(1).map_or(10_000, |a| a.parse().expect("ACCOUNTS is a number"));
    let text = config_text(accounts);
    let upstream = Upstream::new();
    let base = LIVE.load(Relaxed);
    let base_count = COUNT.load(Relaxed);
    PEAK.store(base, Relaxed);
    let config = whatsapp_relay::config::parse(std::path::Path::new("footprint.toml"), &text).expect("valid config");
    let parsed = LIVE.load(Relaxed) - base;
    let parsed_count = COUNT.load(Relaxed) - base_count;
    let parse_peak = PEAK.load(Relaxed) - base;
    let snapshot = Snapshot::build(config, &upstream).expect("routing table");
    let built = LIVE.load(Relaxed) - base;
    let built_count = COUNT.load(Relaxed) - base_count;
    let per = |b: usize| b as f64 / accounts as f64;
    println!(
        "size_of: Account {} B, OutboundCreds {} B, VerifierConfig {} B",
        std::mem::size_of::<whatsapp_relay::config::Account>(),
        std::mem::size_of::<whatsapp_relay::provider::OutboundCreds>(),
        std::mem::size_of::<whatsapp_relay::provider::VerifierConfig>()
    );
    println!("accounts: {accounts} (config text {} B, {:.0} B/account)", text.len(), per(text.len()));
    println!("parse peak:        {parse_peak:>12} B  {:>8.0} B/account", per(parse_peak));
    println!(
        "config live:       {parsed:>12} B  {:>8.0} B/account  {:.1} allocations/account",
        per(parsed),
        per(parsed_count)
    );
    println!(
        "config + routing:  {built:>12} B  {:>8.0} B/account  {:.1} allocations/account",
        per(built),
        per(built_count)
    );
    drop(snapshot);
    println!("after drop:        {:>12} B", LIVE.load(Relaxed) as isize - base as isize);
}
