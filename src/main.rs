//! whatsapp-relay: see the README. All the work is in the library; this only hands over.

/// mimalloc instead of glibc's malloc: the request path allocates many small, short-lived
/// buffers across worker threads, where it measured faster (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    whatsapp_relay::cli::main()
}
