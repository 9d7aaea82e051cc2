//! Verified inbound: each provider's signed webhook reaches Motion byte for byte with its
//! signature header; a forged one gets 401 and Motion sees nothing.

mod support;

use http::Method;
use std::time::Duration;
use support::*;

fn config(acme: &str, globex: &str) -> String {
    format!(
        r#"
[server]
http = "127.0.0.1:0"
public_url = "https://chat.example.com"
trusted_proxies = ["127.0.0.1/32"]
[storage]
path = "{{DATA}}"
[delivery]
mode = "direct"

[[motion]]
name = "acme"
url = "{acme}"
hosts = ["acme.chat.example.com"]
  [[motion.account]]
  id = "twilio"
  provider = "twilio"
  auth_token = "acme-twilio-token"
  [[motion.account]]
  id = "meta"
  provider = "meta"
  app_secret = "acme-meta-secret"
  verify_token = "acme-verify"
  [[motion.account]]
  id = "d360"
  provider = "360dialog"
  platform_secret = "acme-360-secret"
  [[motion.account]]
  id = "sinch"
  provider = "sinch"
  webhook_secret = "acme-sinch-secret"
  [[motion.account]]
  id = "kaleyra"
  provider = "kaleyra"
  shared_token = "acme-kaleyra-token"
  allow_from = ["203.0.113.0/24"]
  [[motion.account]]
  id = "generic"
  provider = "generic"
  hmac_header = "X-Signature"
  hmac_secret = "acme-generic"
  hmac_algorithm = "sha256"
  hmac_encoding = "base64"
  hmac_prefix = "sha256="

[[motion]]
name = "globex"
url = "{globex}"
  [[motion.account]]
  id = "twilio"
  provider = "twilio"
  auth_token = "globex-twilio-token"
"#
    )
}

struct Case {
    account: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The header whose value must reach Motion unchanged.
    sig_header: &'static str,
}

fn cases() -> Vec<Case> {
    let twilio = fixture("twilio-inbound.form");
    let twilio_url = "https://chat.example.com/acme/api/whatsapp/accounts/twilio/notify";
    let meta = fixture("meta-inbound-text.json");
    let sinch = fixture("sinch-inbound-text.json");
    let (nonce, ts) = ("01FJA8B4A7BM43YGWSG9GBV067", unix_now().to_string());
    let sinch_sig = b64(&hmac_sha256("acme-sinch-secret", &[&sinch, b".", nonce.as_bytes(), b".", ts.as_bytes()]));
    let kaleyra = fixture("kaleyra-inbound-text.json");
    let h = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
    vec![
        Case {
            account: "twilio",
            headers: h(&[
                ("x-twilio-signature", &twilio_signature("acme-twilio-token", twilio_url, &twilio)),
                ("content-type", "application/x-www-form-urlencoded"),
            ]),
            body: twilio,
            sig_header: "x-twilio-signature",
        },
        Case {
            account: "meta",
            headers: h(&[("x-hub-signature-256", &meta_signature("acme-meta-secret", &meta))]),
            body: meta.clone(),
            sig_header: "x-hub-signature-256",
        },
        Case {
            account: "d360",
            headers: h(&[("x-360dialog-signature", &hex::encode(hmac_sha256("acme-360-secret", &[&meta])))]),
            body: meta.clone(),
            sig_header: "x-360dialog-signature",
        },
        Case {
            account: "sinch",
            headers: h(&[
                ("x-sinch-webhook-signature", &sinch_sig),
                ("x-sinch-webhook-signature-nonce", nonce),
                ("x-sinch-webhook-signature-timestamp", &ts),
                ("x-sinch-webhook-signature-algorithm", "HmacSHA256"),
            ]),
            body: sinch,
            sig_header: "x-sinch-webhook-signature",
        },
        Case {
            account: "kaleyra",
            headers: h(&[("x-webhook-token", "acme-kaleyra-token"), ("x-forwarded-for", "203.0.113.9")]),
            body: kaleyra,
            sig_header: "x-webhook-token",
        },
        Case {
            account: "generic",
            headers: h(&[("x-signature", &format!("sha256={}", b64(&hmac_sha256("acme-generic", &[&meta]))))]),
            body: meta,
            sig_header: "x-signature",
        },
    ]
}

async fn post_case(relay: &RelayProcess, c: &Case, body: &[u8]) -> Reply {
    let headers: Vec<(&str, &str)> = c.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    post(&relay.url(&format!("/acme/api/whatsapp/accounts/{}/notify", c.account)), &headers, body.to_vec()).await
}

#[tokio::test]
async fn every_providers_signed_webhook_arrives_byte_for_byte() {
    let (acme, globex) = (FakeMotion::start().await, FakeMotion::start().await);
    let relay = RelayProcess::start(&config(&acme.url(), &globex.url()));
    let cases = cases();
    for (i, c) in cases.iter().enumerate() {
        let reply = post_case(&relay, c, &c.body).await;
        assert_eq!(reply.status, 200, "{}: {:?}", c.account, reply.body);
        let got = acme.wait_for(i + 1, Duration::from_secs(5)).await;
        let r = &got[i];
        assert_eq!(r.uri, format!("/api/whatsapp/accounts/{}/notify", c.account));
        assert_eq!(r.body, c.body, "{}: body must be byte-identical", c.account);
        let sent = &c.headers.iter().find(|(k, _)| k == c.sig_header).unwrap().1;
        assert_eq!(r.headers[c.sig_header].to_str().unwrap(), sent, "{}: signature header kept", c.account);
        assert_eq!(
            r.headers["x-relay-provider"].to_str().unwrap(),
            if c.account == "d360" { "360dialog" } else { c.account }
        );
    }
}

#[tokio::test]
async fn forged_webhooks_get_401_and_reach_nobody() {
    let (acme, globex) = (FakeMotion::start().await, FakeMotion::start().await);
    let relay = RelayProcess::start(&config(&acme.url(), &globex.url()));
    for c in cases() {
        // Tampered body (Kaleyra signs nothing: its token and source address are what count).
        if c.account != "kaleyra" {
            let mut body = c.body.clone();
            let last = body.len() - 2;
            body[last] ^= 1;
            let reply = post_case(&relay, &c, &body).await;
            assert_eq!(reply.status, 401, "{}: tampered body", c.account);
            assert_eq!(reply.error_code(), "bad_signature");
        }
        // Missing signature (from an allowed address).
        let path = format!("/acme/api/whatsapp/accounts/{}/notify", c.account);
        let reply = post(&relay.url(&path), &[("x-forwarded-for", "203.0.113.9")], c.body.clone()).await;
        assert_eq!(reply.status, 401, "{}: no signature", c.account);
        let msg = reply.json()["message"].as_str().unwrap().to_string();
        assert!(!msg.is_empty());
        // The message never holds the expected value.
        if let Some((_, v)) = c.headers.iter().find(|(k, _)| k == c.sig_header) {
            assert!(!msg.contains(v.as_str()), "{msg}");
        }
    }
    // A tampered query string breaks Twilio's signature.
    let c = &cases()[0];
    let headers: Vec<(&str, &str)> = c.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let reply = post(&relay.url("/acme/api/whatsapp/accounts/twilio/notify?x=1"), &headers, c.body.clone()).await;
    assert_eq!(reply.status, 401);
    // A Twilio signature computed over the socket address is refused: the public URL is signed.
    let socket_url = relay.url("/acme/api/whatsapp/accounts/twilio/notify");
    let sig = twilio_signature("acme-twilio-token", &socket_url, &c.body);
    let reply = post(
        &socket_url,
        &[("x-twilio-signature", &sig), ("content-type", "application/x-www-form-urlencoded")],
        c.body.clone(),
    )
    .await;
    assert_eq!(reply.status, 401);
    // Kaleyra from outside allow_from: 403.
    let reply = post(
        &relay.url("/acme/api/whatsapp/accounts/kaleyra/notify"),
        &[("x-webhook-token", "acme-kaleyra-token"), ("x-forwarded-for", "198.51.100.1")],
        "{}",
    )
    .await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.error_code(), "forbidden");
    // A stale Sinch timestamp.
    let sinch = fixture("sinch-inbound-text.json");
    let ts = (unix_now() - 600).to_string();
    let sig = b64(&hmac_sha256("acme-sinch-secret", &[&sinch, b".n.", ts.as_bytes()]));
    let reply = post(
        &relay.url("/acme/api/whatsapp/accounts/sinch/notify"),
        &[
            ("x-sinch-webhook-signature", &sig),
            ("x-sinch-webhook-signature-nonce", "n"),
            ("x-sinch-webhook-signature-timestamp", &ts),
        ],
        sinch,
    )
    .await;
    assert_eq!(reply.status, 401);
    assert!(reply.json()["message"].as_str().unwrap().contains("timestamp"));

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(acme.count(), 0, "nothing forged reaches Motion");
    let metrics = relay.logs();
    assert!(!metrics.contains("acme-twilio-token"), "secrets never logged");
}

#[tokio::test]
async fn another_tenants_twilio_token_is_refused() {
    let (acme, globex) = (FakeMotion::start().await, FakeMotion::start().await);
    let relay = RelayProcess::start(&config(&acme.url(), &globex.url()));
    let body = fixture("twilio-inbound.form");
    // Signed with globex's token, sent to acme's account (correct URL).
    let url = "https://chat.example.com/acme/api/whatsapp/accounts/twilio/notify";
    let sig = twilio_signature("globex-twilio-token", url, &body);
    let reply = post(
        &relay.url("/acme/api/whatsapp/accounts/twilio/notify"),
        &[("x-twilio-signature", &sig), ("content-type", "application/x-www-form-urlencoded")],
        body.clone(),
    )
    .await;
    assert_eq!(reply.status, 401);
    // Host-routed: the URL signed is https://{Host}/path.
    let sig = twilio_signature(
        "acme-twilio-token",
        "https://acme.chat.example.com/api/whatsapp/accounts/twilio/notify",
        &body,
    );
    let reply = post(
        &relay.url("/api/whatsapp/accounts/twilio/notify"),
        &[
            ("host", "acme.chat.example.com"),
            ("x-twilio-signature", &sig),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        body,
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(acme.wait_for(1, Duration::from_secs(5)).await.len(), 1);
    assert_eq!(globex.count(), 0);
}

#[tokio::test]
async fn meta_handshake_is_answered_by_the_relay() {
    let (acme, globex) = (FakeMotion::start().await, FakeMotion::start().await);
    let relay = RelayProcess::start(&config(&acme.url(), &globex.url()));
    let base = "/acme/api/whatsapp/accounts/meta/notify?hub.mode=subscribe&hub.challenge=1158201444";
    let reply = get(&relay.url(&format!("{base}&hub.verify_token=acme-verify"))).await;
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], b"1158201444");
    let reply = get(&relay.url(&format!("{base}&hub.verify_token=wrong"))).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.error_code(), "forbidden");
    let reply = send(Method::GET, &relay.url(base), &[], "").await;
    assert_eq!(reply.status, 403);
    assert_eq!(acme.count(), 0, "the handshake never reaches Motion");
}

#[tokio::test]
async fn failures_are_counted_by_provider_and_reason() {
    let (acme, globex) = (FakeMotion::start().await, FakeMotion::start().await);
    let cfg = config(&acme.url(), &globex.url()).replace("[storage]", "[admin]\nlisten = \"127.0.0.1:0\"\n[storage]");
    let relay = RelayProcess::start(&cfg);
    post(&relay.url("/acme/api/whatsapp/accounts/meta/notify"), &[("x-hub-signature-256", "sha256=00")], "{}").await;
    post(&relay.url("/acme/api/whatsapp/accounts/meta/notify"), &[], "{}").await;
    let text =
        String::from_utf8_lossy(&get(&format!("http://{}/metrics", relay.admin.unwrap())).await.body).into_owned();
    assert!(
        text.contains("whatsapp_relay_verification_failures_total{provider=\"meta\",reason=\"missing_header\"} 1"),
        "{text}"
    );
    assert!(text.contains("whatsapp_relay_verification_failures_total{provider=\"meta\",reason="), "{text}");
}
