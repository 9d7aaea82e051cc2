//! Generic: the handshake and the configurable HMAC, every algorithm, encoding and prefix.
//! The body and its invariants: `whatsapp_relay::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| whatsapp_relay::fuzzing::provider(whatsapp_relay::provider::generic::KIND, data));
