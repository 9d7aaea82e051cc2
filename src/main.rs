//! whatsapp-relay: see the README. All the work is in the library; this only hands over.
fn main() -> std::process::ExitCode {
    whatsapp_relay::cli::main()
}
