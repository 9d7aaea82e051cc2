//! `direct` mode end to end: the real binary between a test client and fake Motion servers.

mod support;

use http::Method;
use std::time::Duration;
use support::*;

/// Two tenants: acme (with a signing secret and its own host) and globex.
fn two_motions(acme: &str, globex: &str, extra_server: &str) -> String {
    format!(
        r#"
[server]
http = "127.0.0.1:0"
public_url = "https://chat.example.com"
max_body = "64KiB"
{extra_server}
[admin]
listen = "127.0.0.1:0"
[storage]
path = "{{DATA}}"
[delivery]
mode = "direct"
timeout = "500ms"

[[motion]]
name = "acme"
url = "{acme}"
hosts = ["acme.chat.example.com"]
signing_secret = "acme-signing"
  [[motion.account]]
  id = "12"
  provider = "kaleyra"
  shared_token = "acme-token"

[[motion]]
name = "globex"
url = "{globex}"
  [[motion.account]]
  id = "7"
  provider = "kaleyra"
  shared_token = "globex-token"
"#
    )
}

#[tokio::test]
async fn webhook_arrives_byte_for_byte_and_motions_answer_comes_back() {
    let (acme, globex) = (FakeMotion::start().await, FakeMotion::start().await);
    let relay = RelayProcess::start(&two_motions(&acme.url(), &globex.url(), ""));
    let body = fixture("kaleyra-inbound-text.json");

    let reply = post(
        &relay.url("/acme/api/whatsapp/accounts/12/notify?x=1&y=%20z"),
        &[
            ("x-webhook-token", "acme-token"),
            ("content-type", "application/json"),
            ("x-provider-thing", "kept"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "dropped"),
            ("x-relay-signature", "forged-by-caller"),
            ("x-forwarded-for", "198.51.100.1"),
        ],
        body.clone(),
    )
    .await;

    // Motion's answer comes back as it is.
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["x-motion"], "yes");
    assert_eq!(&reply.body[..], b"{\"ok\":true}");

    let got = acme.wait_for(1, Duration::from_secs(5)).await;
    let r = &got[0];
    assert_eq!(r.method, Method::POST);
    assert_eq!(r.uri, "/api/whatsapp/accounts/12/notify?x=1&y=%20z");
    assert_eq!(&r.body[..], &body[..], "body must arrive byte for byte");
    assert_eq!(r.headers["host"], acme.addr.to_string());
    assert_eq!(r.headers["x-provider-thing"], "kept");
    assert_eq!(r.headers["x-webhook-token"], "acme-token");
    assert!(!r.headers.contains_key("x-hop"), "headers named in Connection are hop-by-hop");
    assert_eq!(r.headers["x-forwarded-for"], "198.51.100.1, 127.0.0.1");
    assert_eq!(r.headers["x-forwarded-proto"], "http");
    assert_eq!(r.headers["x-forwarded-host"], relay.http.to_string());
    assert_eq!(r.headers["x-relay-attempt"], "1");
    assert_eq!(r.headers["x-relay-provider"], "kaleyra");
    assert!(!r.headers["x-relay-delivery"].is_empty());
    // The relay's signature, never the caller's: t=UNIX,v1=HMAC-SHA256("{t}.{body}").
    let sig = r.headers["x-relay-signature"].to_str().unwrap();
    let (t, v1) = sig.strip_prefix("t=").unwrap().split_once(",v1=").unwrap();
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"acme-signing").unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&body);
    assert_eq!(v1, hex::encode(mac.finalize().into_bytes()));
    assert_eq!(globex.count(), 0, "the other tenant sees nothing");

    // Motion's own status passes through too.
    acme.script([Answer::status(422)]);
    let reply =
        post(&relay.url("/acme/api/whatsapp/accounts/12/notify"), &[("x-webhook-token", "acme-token")], "{}").await;
    assert_eq!(reply.status, 422);
    assert_eq!(&reply.body[..], b"{\"motion\":\"says no\"}");
}

#[tokio::test]
async fn tenants_are_isolated_and_unknown_paths_are_404() {
    let (acme, globex) = (FakeMotion::start().await, FakeMotion::start().await);
    let relay = RelayProcess::start(&two_motions(&acme.url(), &globex.url(), ""));
    let tok = [("x-webhook-token", "globex-token")];

    let reply = post(&relay.url("/globex/api/whatsapp/accounts/7/notify"), &tok, "hi").await;
    assert_eq!(reply.status, 200);
    for path in [
        "/acme/api/whatsapp/accounts/7/notify",
        "/globex/api/whatsapp/accounts/12/notify",
        "/globex/api/users",
        "/globex/api/whatsapp/accounts/7/../../../users",
        "/globex/api/whatsapp/accounts/7/%2e%2e/%2e%2e/users",
        "/globex/api/whatsapp/accounts/7%2f..%2f12/notify",
        "/admin/reload",
        "/metrics",
        "/",
    ] {
        let reply = post(&relay.url(path), &tok, "hi").await;
        assert_eq!(reply.status, 404, "{path}");
        assert_eq!(reply.error_code(), "not_found", "{path}");
    }
    assert_eq!(globex.count(), 1);
    assert_eq!(acme.count(), 0);

    // Host routing: acme's own host, no prefix.
    let reply = post(
        &relay.url("/api/whatsapp/accounts/12/notify"),
        &[("host", "acme.chat.example.com"), ("x-webhook-token", "acme-token")],
        "hello",
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(acme.wait_for(1, Duration::from_secs(5)).await[0].uri, "/api/whatsapp/accounts/12/notify");

    // The public listener answers /healthz.
    assert_eq!(get(&relay.url("/healthz")).await.status, 200);
}

#[tokio::test]
async fn too_large_bodies_are_refused_before_motion() {
    let (acme, globex) = (FakeMotion::start().await, FakeMotion::start().await);
    let relay = RelayProcess::start(&two_motions(&acme.url(), &globex.url(), ""));
    let big = vec![b'x'; 64 * 1024 + 1];
    let reply =
        post(&relay.url("/acme/api/whatsapp/accounts/12/notify"), &[("x-webhook-token", "acme-token")], big).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.error_code(), "too_large");

    // Chunked, no length declared: refused once it passes the limit.
    let mut req = "POST /acme/api/whatsapp/accounts/12/notify HTTP/1.1\r\nhost: x\r\nx-webhook-token: acme-token\r\ntransfer-encoding: chunked\r\n\r\n"
    .as_bytes()
    .to_vec();
    for _ in 0..20 {
        req.extend_from_slice(format!("{:x}\r\n{}\r\n", 4096, "y".repeat(4096)).as_bytes());
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let out = raw(relay.http, &req).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");

    // Route before size: an unknown path is 404 even when too large.
    let reply = post(&relay.url("/acme/api/whatsapp/accounts/99/notify"), &[], vec![b'x'; 70_000]).await;
    assert_eq!(reply.status, 404);

    assert_eq!(acme.count(), 0, "nothing refused may reach Motion");

    // Both framings at once (a smuggling attempt): hyper reads it as chunked per RFC 9112 6.1,
    // drops Content-Length and closes the connection after it, so the smuggled second request
    // is never served. (README "Deviations": it is not refused with a 400.)
    let out = raw(
        relay.http,
        b"POST /acme/api/whatsapp/accounts/12/notify HTTP/1.1\r\nhost: x\r\nx-webhook-token: acme-token\r\ncontent-length: 60\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nPOST /acme/api/whatsapp/accounts/12/smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
    let got = acme.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].uri, "/api/whatsapp/accounts/12/notify");
    assert!(got[0].body.is_empty());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(acme.count(), 1, "the smuggled request must never reach Motion");
}

#[tokio::test]
async fn motion_down_is_502_and_motion_slow_is_504() {
    let down = dead_addr().await;
    let slow = FakeMotion::start().await;
    slow.answer_always(Answer { status: 200, body: "late", delay: Duration::from_secs(3) });
    let relay = RelayProcess::start(&two_motions(&format!("http://{down}"), &slow.url(), ""));

    let reply =
        post(&relay.url("/acme/api/whatsapp/accounts/12/notify"), &[("x-webhook-token", "acme-token")], "x").await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.error_code(), "upstream_unreachable");

    let started = std::time::Instant::now();
    let reply =
        post(&relay.url("/globex/api/whatsapp/accounts/7/notify"), &[("x-webhook-token", "globex-token")], "x").await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.error_code(), "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(3), "the relay must give up at delivery.timeout");
}

#[tokio::test]
async fn http2_prior_knowledge_is_served() {
    let (acme, globex) = (FakeMotion::start().await, FakeMotion::start().await);
    let relay = RelayProcess::start(&two_motions(&acme.url(), &globex.url(), ""));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(relay.url("/acme/api/whatsapp/accounts/12/notify"))
        .header("x-webhook-token", "acme-token")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"h2 body")))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(&acme.wait_for(1, Duration::from_secs(5)).await[0].body[..], b"h2 body");
}

#[tokio::test]
async fn admin_listener_serves_health_readiness_and_metrics() {
    let (acme, globex) = (FakeMotion::start().await, FakeMotion::start().await);
    let relay = RelayProcess::start(&two_motions(&acme.url(), &globex.url(), ""));
    post(&relay.url("/acme/api/whatsapp/accounts/12/notify"), &[("x-webhook-token", "acme-token")], "x").await;
    let admin = relay.admin.unwrap();
    assert_eq!(get(&format!("http://{admin}/healthz")).await.status, 200);
    assert_eq!(get(&format!("http://{admin}/readyz")).await.status, 200);
    let metrics = get(&format!("http://{admin}/metrics")).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("whatsapp_relay_requests_total{motion=\"acme\",status=\"200\"} 1"), "{text}");
    assert!(text.contains("whatsapp_relay_request_duration_seconds_count{motion=\"acme\"} 1"), "{text}");
    // No token configured: the admin API is closed.
    let reply = send(Method::POST, &format!("http://{admin}/admin/reload"), &[], "").await;
    assert_eq!(reply.status, 401);
}

#[tokio::test]
async fn a_motion_that_stalls_mid_answer_is_cut_off_at_the_timeout() {
    let (acme, _) = stalling_motion().await;
    let globex = FakeMotion::start().await;
    let relay = RelayProcess::start(&two_motions(&acme, &globex.url(), ""));
    let body = r#"{"id":"evt-1","from":"+393001234567","type":"text","text":"hi"}"#;
    let request = format!(
        "POST /acme/api/whatsapp/accounts/12/notify HTTP/1.1\r\nhost: x\r\nx-webhook-token: acme-token\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    // Motion sends `200`, a 100-byte length and 7 bytes, then nothing: the relay passes on what
    // came and closes the connection once the 500 ms timeout passes, not whenever Motion wakes.
    let start = std::time::Instant::now();
    let answer = raw(relay.http, request.as_bytes()).await;
    let took = start.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("partial"), "{answer}");
    assert!(took < Duration::from_millis(1500), "the provider's connection was held {took:?}");
}
