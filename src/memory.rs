//! Giving freed memory back to the system after a large one-off allocation: the parse and
//! validation of a config (hundreds of MiB at 100,000 accounts), and the table a reload
//! replaced. The allocator is the binary's choice (`main.rs`), so the binary says how
//! ([`set_release`]); without it (tests, other embedders) [`release`] does nothing.
//!
//! This lets the allocator keep freed pages briefly in between (the systemd unit sets a short
//! purge delay), so a reload reuses them instead of faulting in fresh zeroed pages for every
//! part of the file, and still ends with the memory given back.

use std::sync::OnceLock;

static RELEASE: OnceLock<fn()> = OnceLock::new();

/// How to give freed memory back; set once, before the relay starts.
pub fn set_release(f: fn()) {
    let _ = RELEASE.set(f);
}

/// Gives the memory freed so far back to the system, if the binary said how.
pub fn release() {
    if let Some(f) = RELEASE.get() {
        f();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    static CALLS: AtomicUsize = AtomicUsize::new(0);

    #[test]
    fn release_calls_what_the_binary_set_each_time() {
        super::set_release(|| {
            CALLS.fetch_add(1, Ordering::SeqCst);
        });
        super::release();
        super::release();
        assert_eq!(CALLS.load(Ordering::SeqCst), 2);
    }
}
