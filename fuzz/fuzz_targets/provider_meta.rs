//! Meta: payload parsing, sends, the handshake and `X-Hub-Signature-256` verification.
//! The body and its invariants: `whatsapp_relay::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| whatsapp_relay::fuzzing::provider(whatsapp_relay::provider::meta::KIND, data));
