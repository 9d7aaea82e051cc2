//! Sinch: payload parsing, sends, the handshake and `x-sinch-webhook-signature` verification.
//! The body and its invariants: `whatsapp_relay::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| whatsapp_relay::fuzzing::provider(whatsapp_relay::provider::sinch::KIND, data));
