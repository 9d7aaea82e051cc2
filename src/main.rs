//! whatsapp-relay: see the README. All the work is in the library; this only hands over.

/// mimalloc instead of glibc's malloc: the request path allocates many small, short-lived
/// buffers across worker threads, where it measured faster (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Forces mimalloc to return every freed page now, whatever `MIMALLOC_PURGE_DELAY` says: after
/// a config load or a reload (see `whatsapp_relay::memory`).
fn release() {
    // SAFETY: `mi_collect` takes no pointers and touches only mimalloc's own state, which it
    // guards for calls from any thread; it is the allocator `GLOBAL` uses.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

fn main() -> std::process::ExitCode {
    whatsapp_relay::memory::set_release(release);
    whatsapp_relay::cli::main()
}
