//! Path and Host routing, the client address behind proxies, and the outbound allow-list.
//! The body and its invariants: `whatsapp_relay::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| whatsapp_relay::fuzzing::routing(data));
