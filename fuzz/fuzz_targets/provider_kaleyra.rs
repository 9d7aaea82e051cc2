//! Kaleyra: payload parsing (JSON, forms), sends (forms, multipart), the handshake and the shared token.
//! The body and its invariants: `whatsapp_relay::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| whatsapp_relay::fuzzing::provider(whatsapp_relay::provider::kaleyra::KIND, data));
