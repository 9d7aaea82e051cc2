//! Verification cost per provider on realistic payloads (the fixtures), plus Meta's large
//! batches, through the public API only — what the relay pays per webhook before queueing.

use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue};
use whatsapp_relay::provider::{
    AccountVerifier, Inbound, ProviderKind, VerifierConfig, dialog360, generic, kaleyra, meta, sign_request, sinch,
    twilio,
};

const URL: &str = "https://chat.example.com/acme/api/whatsapp/accounts/12/notify";
const NOW: i64 = 1_750_000_000;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// A Meta batch of at least `size` bytes: the fixture's entry repeated.
fn meta_batch(size: usize) -> Vec<u8> {
    let doc: serde_json::Value = serde_json::from_slice(&fixture("meta-inbound-text.json")).unwrap();
    let entry = doc["entry"][0].to_string();
    let copies = size / entry.len() + 1;
    format!(r#"{{"object":"whatsapp_business_account","entry":[{}]}}"#, vec![entry; copies].join(",")).into_bytes()
}

fn config(kind: ProviderKind) -> VerifierConfig {
    let s = |k: ProviderKind| (kind == k).then(|| "bench-secret".to_owned());
    VerifierConfig {
        provider: Some(kind),
        auth_token: s(twilio::KIND),
        app_secret: s(meta::KIND),
        platform_secret: s(dialog360::KIND),
        webhook_secret: s(sinch::KIND),
        hmac_secret: s(generic::KIND),
        hmac_header: (kind == generic::KIND).then(|| "X-Signature".to_owned()),
        shared_token: s(kaleyra::KIND),
        allow_from: if kind == kaleyra::KIND { vec!["0.0.0.0/0".parse().unwrap()] } else { Vec::new() },
        ..Default::default()
    }
}

fn bench_verify(c: &mut Criterion) {
    let cases = [
        ("twilio/form", twilio::KIND, "twilio-inbound.form".to_owned(), "application/x-www-form-urlencoded"),
        ("meta/text", meta::KIND, "meta-inbound-text.json".to_owned(), "application/json"),
        ("meta/1MiB", meta::KIND, String::new(), "application/json"),
        ("360dialog/text", dialog360::KIND, "meta-inbound-text.json".to_owned(), "application/json"),
        ("sinch/text", sinch::KIND, "sinch-inbound-text.json".to_owned(), "application/json"),
        ("kaleyra/token+allow_from", kaleyra::KIND, "kaleyra-inbound-text.json".to_owned(), "application/json"),
        ("generic/sha256-hex", generic::KIND, "kaleyra-inbound-text.json".to_owned(), "application/json"),
    ];
    let mut group = c.benchmark_group("verify");
    for (name, kind, file, ct) in cases {
        let body = if file.is_empty() { meta_batch(1 << 20) } else { fixture(&file) };
        let cfg = config(kind);
        let verifier = AccountVerifier::new(&cfg).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ct));
        for (k, v) in sign_request(&cfg, URL, Some(ct), &body, NOW).unwrap() {
            headers.insert(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(&v).unwrap());
        }
        let req = Inbound {
            url: URL,
            query: None,
            headers: &headers,
            body: &body,
            client_ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
            now_unix: NOW,
        };
        verifier.verify(&req).expect("the signed request verifies");
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| b.iter(|| black_box(&verifier).verify(black_box(&req))));
    }
    group.finish();

    // The relay also reads the ordering key and dedup id of every accepted body.
    let mut group = c.benchmark_group("payload");
    let cases = [
        ("meta/text", meta::KIND, fixture("meta-inbound-text.json"), None),
        ("meta/1MiB", meta::KIND, meta_batch(1 << 20), None),
        ("sinch/text", sinch::KIND, fixture("sinch-inbound-text.json"), None),
        ("twilio/form", twilio::KIND, fixture("twilio-inbound.form"), Some("application/x-www-form-urlencoded")),
    ];
    for (name, kind, body, ct) in cases {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| b.iter(|| kind.payload(ct, black_box(&body))));
    }
    group.finish();
}

criterion_group!(benches, bench_verify);
criterion_main!(benches);
