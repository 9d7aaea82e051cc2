//! Outbound sends end to end: a Motion's test client -> the real relay -> a fake provider API on
//! loopback (a `FakeMotion` standing in for Twilio, Meta, Sinch or Kaleyra), plus a fake Sinch
//! OAuth2 `auth_url`. Each test asserts on what the fakes received, or that they received nothing.

mod support;

use http::Method;
use std::sync::Arc;
use std::time::Duration;
use support::*;
use whatsapp_relay::clock::ManualClock;
use whatsapp_relay::store::{EmbeddedStore, Stores};

const ACME_TOKEN: &str = "acme-outbound-token";
const GLOBEX_TOKEN: &str = "globex-outbound-token";
const TWILIO_SEND: &str = "/2010-04-01/Accounts/AC123/Messages.json";

/// acme: a Twilio account with relay-held credentials (12), a Meta account without a token
/// (13), a Sinch account (14) whose token comes from `auth`; globex: one Twilio account (7).
/// Every account's API base is `provider`.
fn config(provider: &str, auth: &str, extra_motion: &str, extra_top: &str) -> String {
    format!(
        r#"
[server]
http = "127.0.0.1:0"
public_url = "https://chat.example.com"
max_body = "64KiB"
[admin]
listen = "127.0.0.1:0"
[storage]
path = "{{DATA}}"
{extra_top}

[[motion]]
name = "acme"
url = "http://127.0.0.1:9"
hosts = ["acme.chat.example.com"]
outbound_token = "{ACME_TOKEN}"
{extra_motion}
  [[motion.account]]
  id = "12"
  provider = "twilio"
  auth_token = "twilio-auth-token"
  account_sid = "AC123"
  api_base = "{provider}"

  [[motion.account]]
  id = "13"
  provider = "meta"
  app_secret = "meta-app-secret"
  api_base = "{provider}"

  [[motion.account]]
  id = "14"
  provider = "sinch"
  webhook_secret = "sinch-secret"
  project_id = "P1"
  key_id = "key-id"
  key_secret = "key-secret"
  auth_url = "{auth}/oauth2/token"
  api_base = "{provider}"

[[motion]]
name = "globex"
url = "http://127.0.0.1:9"
outbound_token = "{GLOBEX_TOKEN}"
  [[motion.account]]
  id = "7"
  provider = "twilio"
  auth_token = "globex-auth-token"
  account_sid = "AC777"
  api_base = "{provider}"
"#
    )
}

fn twilio_form(to: &str, body: &str) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("To", to)
        .append_pair("From", "whatsapp:+14155238886")
        .append_pair("Body", body)
        .finish()
}

fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", b64(format!("{user}:{pass}").as_bytes()))
}

const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

#[tokio::test]
async fn twilio_send_arrives_unchanged_with_the_relays_basic_auth() {
    let provider = FakeMotion::start().await;
    let relay = RelayProcess::start(&config(&provider.url(), "http://127.0.0.1:9", "", ""));
    let form = twilio_form("whatsapp:+16505551234", "Your order has shipped ✓");

    let reply = post(
        &relay.url(&format!("/acme/outbound/12{TWILIO_SEND}?trace=1&x=%20y")),
        &[
            ("x-relay-token", ACME_TOKEN),
            FORM,
            ("authorization", "Basic Y2xpZW50OnNlY3JldA=="),
            ("x-client-thing", "kept"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "dropped"),
        ],
        form.clone(),
    )
    .await;

    // The provider's answer comes back as it is.
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], b"{\"ok\":true}");
    assert_eq!(reply.headers["x-motion"], "yes");
    // Policy warn (the default): this customer never wrote, so the send is flagged.
    assert_eq!(reply.headers["x-relay-window"], "closed");

    let got = provider.wait_for(1, Duration::from_secs(5)).await;
    let r = &got[0];
    assert_eq!(r.method, Method::POST);
    assert_eq!(r.uri, format!("{TWILIO_SEND}?trace=1&x=%20y"));
    assert_eq!(&r.body[..], form.as_bytes(), "the body arrives byte for byte");
    assert_eq!(
        r.headers["authorization"],
        basic("AC123", "twilio-auth-token"),
        "the relay's credentials, not the client's"
    );
    assert_eq!(r.headers["content-type"], "application/x-www-form-urlencoded");
    assert_eq!(r.headers["x-client-thing"], "kept");
    assert_eq!(r.headers["host"], provider.addr.to_string());
    assert!(!r.headers.contains_key("x-relay-token"), "the relay token is never passed on");
    assert!(!r.headers.contains_key("x-hop"));
    assert!(!r.headers.contains_key("x-forwarded-for"));

    // The same through the Motion's own host, without the /acme prefix.
    let reply = post(
        &relay.url(&format!("/outbound/12{TWILIO_SEND}")),
        &[("host", "acme.chat.example.com"), ("x-relay-token", ACME_TOKEN), FORM],
        form.clone(),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(provider.wait_for(2, Duration::from_secs(5)).await[1].uri, TWILIO_SEND);

    // Counted, and the access line names the Motion and account but no number or body.
    let metrics = get(&format!("http://{}/metrics", relay.admin.unwrap())).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains(r#"whatsapp_relay_outbound_requests_total{motion="acme",provider="twilio",status="200"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"whatsapp_relay_outbound_window_closed_total{motion="acme",provider="twilio",action="warned"} 2"#
        )
    );
    let logs = relay.logs();
    assert!(logs.contains(r#""account":"12""#), "{logs}");
    assert!(!logs.contains("6505551234") && !logs.contains("shipped") && !logs.contains("twilio-auth-token"));
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_401_and_the_provider_sees_nothing() {
    let provider = FakeMotion::start().await;
    let relay = RelayProcess::start(&config(&provider.url(), "http://127.0.0.1:9", "", ""));
    let form = twilio_form("whatsapp:+16505551234", "hi");
    let url = relay.url(&format!("/acme/outbound/12{TWILIO_SEND}"));

    for (what, headers) in [
        ("missing", vec![FORM]),
        ("wrong", vec![FORM, ("x-relay-token", "guess")]),
        ("a prefix of the right one", vec![FORM, ("x-relay-token", &ACME_TOKEN[..10])]),
        ("another motion's", vec![FORM, ("x-relay-token", GLOBEX_TOKEN)]),
        ("in Authorization instead", vec![FORM, ("authorization", ACME_TOKEN)]),
    ] {
        let reply = post(&url, &headers, form.clone()).await;
        assert_eq!(reply.status, 401, "{what}");
        assert_eq!(reply.error_code(), "unauthorized", "{what}");
    }
    // globex's token cannot reach acme's account through globex's prefix either.
    let reply = post(
        &relay.url(&format!("/globex/outbound/12{TWILIO_SEND}")),
        &[FORM, ("x-relay-token", GLOBEX_TOKEN)],
        form.clone(),
    )
    .await;
    assert_eq!(reply.status, 404);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(provider.count(), 0, "nothing reached the provider");

    // globex's own account with globex's token works, with globex's credentials.
    let reply = post(
        &relay.url("/globex/outbound/7/2010-04-01/Accounts/AC777/Messages.json"),
        &[FORM, ("x-relay-token", GLOBEX_TOKEN)],
        form,
    )
    .await;
    assert_eq!(reply.status, 200);
    let got = provider.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got[0].headers["authorization"], basic("AC777", "globex-auth-token"));
}

#[tokio::test]
async fn allow_from_refuses_other_networks_with_403() {
    let provider = FakeMotion::start().await;
    let relay =
        RelayProcess::start(&config(&provider.url(), "http://127.0.0.1:9", r#"allow_from = ["10.0.0.0/8"]"#, ""));
    let reply = post(
        &relay.url(&format!("/acme/outbound/12{TWILIO_SEND}")),
        &[FORM, ("x-relay-token", ACME_TOKEN)],
        twilio_form("whatsapp:+1650", "hi"),
    )
    .await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.error_code(), "forbidden");
    assert_eq!(provider.count(), 0);
}

#[tokio::test]
async fn meta_without_a_relay_token_keeps_the_clients_bearer_and_its_400_comes_back() {
    let provider = FakeMotion::start().await;
    let relay = RelayProcess::start(&config(&provider.url(), "http://127.0.0.1:9", "", ""));
    let meta_error = r#"{"error":{"message":"(#131047) Re-engagement message","type":"OAuthException","code":131047}}"#;
    provider.script([Answer { status: 400, body: meta_error, delay: Duration::ZERO }]);
    let body = r#"{"messaging_product":"whatsapp","to":"16505551234","type":"text","text":{"body":"hi"}}"#;

    let reply = post(
        &relay.url("/acme/outbound/13/v21.0/106540352242922/messages"),
        &[
            ("x-relay-token", ACME_TOKEN),
            ("authorization", "Bearer client-meta-token"),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await;
    assert_eq!(reply.status, 400);
    assert_eq!(&reply.body[..], meta_error.as_bytes(), "the provider's answer, unchanged");
    assert_eq!(reply.headers["content-type"], "application/json");
    let got = provider.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got[0].uri, "/v21.0/106540352242922/messages");
    assert_eq!(got[0].headers["authorization"], "Bearer client-meta-token");
    assert_eq!(&got[0].body[..], body.as_bytes());
}

#[tokio::test]
async fn provider_down_is_502_and_provider_hanging_is_504() {
    let down = dead_addr().await;
    let relay = RelayProcess::start(&config(&format!("http://{down}"), "http://127.0.0.1:9", "", ""));
    let headers = [FORM, ("x-relay-token", ACME_TOKEN)];
    let reply = post(&relay.url(&format!("/acme/outbound/12{TWILIO_SEND}")), &headers, "To=1").await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.error_code(), "upstream_unreachable");

    let slow = FakeMotion::start().await;
    slow.answer_always(Answer { status: 200, body: "{}", delay: Duration::from_secs(5) });
    let relay = RelayProcess::start(&config(&slow.url(), "http://127.0.0.1:9", "", "[outbound]\ntimeout = \"300ms\""));
    let started = std::time::Instant::now();
    let reply = post(&relay.url(&format!("/acme/outbound/12{TWILIO_SEND}")), &headers, "To=1").await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.error_code(), "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(3), "bounded by [outbound] timeout");
}

#[tokio::test]
async fn paths_outside_the_accounts_endpoints_are_403_and_the_provider_sees_nothing() {
    let provider = FakeMotion::start().await;
    let relay = RelayProcess::start(&config(&provider.url(), "http://127.0.0.1:9", "", ""));
    let headers = [FORM, ("x-relay-token", ACME_TOKEN)];
    for (method, path) in [
        (Method::POST, "/acme/outbound/12/2010-04-01/Accounts/AC777/Messages.json"), // another tenant's account
        (Method::GET, "/acme/outbound/12/2010-04-01/Accounts/AC123/Messages.json"),  // listing every number
        (Method::POST, "/acme/outbound/12/2010-04-01/Accounts/AC123/Calls.json"),
        (Method::GET, "/acme/outbound/12/2010-04-01/Accounts/AC123.json"),
        (Method::POST, "/acme/outbound/12/2010-04-01/Accounts/AC123/Messages.json/"),
        (Method::POST, "/acme/outbound/12/2010-04-01/Accounts/AC123//Messages.json"),
        (Method::POST, "/acme/outbound/12/"),
        (Method::POST, "/acme/outbound/12"),
        (Method::POST, "/acme/outbound/14/v1/projects/OTHER/messages:send"),
        (Method::GET, "/acme/outbound/14/v1/projects/P1/contacts"),
    ] {
        let reply = send(method.clone(), &relay.url(path), &headers, "To=1").await;
        // A trailing slash is the same endpoint; everything else is refused.
        if path.ends_with("Messages.json/") {
            assert_eq!(reply.status, 200, "{path}");
            continue;
        }
        assert_eq!(reply.status, 403, "{method} {path}: {:?}", reply.body);
        assert_eq!(reply.error_code(), "forbidden");
    }
    // Traversal never even routes.
    for path in [
        "/acme/outbound/12/2010-04-01/Accounts/AC123/../AC777/Messages.json",
        "/acme/outbound/12/2010-04-01/Accounts/AC123/%2e%2e/AC777/Messages.json",
        "/acme/outbound/12/2010-04-01/Accounts/AC777%2FMessages.json",
    ] {
        let reply = post(&relay.url(path), &headers, "To=1").await;
        assert!(matches!(reply.status, 403 | 404), "{path}: {}", reply.status);
    }
    assert_eq!(provider.count(), 1, "only the trailing-slash spelling of the send went out");
}

#[tokio::test]
async fn sinch_token_is_fetched_once_reused_and_refreshed_once_on_401() {
    let provider = FakeMotion::start().await;
    let auth = FakeMotion::start().await;
    auth.script([
        Answer {
            status: 200,
            body: r#"{"access_token":"tok-1","token_type":"Bearer","expires_in":3600}"#,
            delay: Duration::ZERO,
        },
        Answer {
            status: 200,
            body: r#"{"access_token":"tok-2","token_type":"Bearer","expires_in":3600}"#,
            delay: Duration::ZERO,
        },
    ]);
    let relay = RelayProcess::start(&config(&provider.url(), &auth.url(), "", ""));
    let url = relay.url("/acme/outbound/14/v1/projects/P1/messages:send");
    let body = r#"{"app_id":"APP","recipient":{"identified_by":{"channel_identities":[{"channel":"WHATSAPP","identity":"46700000001"}]}},"message":{"text_message":{"text":"hi"}}}"#;
    let headers =
        [("x-relay-token", ACME_TOKEN), ("content-type", "application/json"), ("authorization", "Bearer client")];

    for _ in 0..3 {
        assert_eq!(post(&url, &headers, body).await.status, 200);
    }
    let tokens = auth.received();
    assert_eq!(tokens.len(), 1, "one token for three sends");
    assert_eq!(tokens[0].method, Method::POST);
    assert_eq!(tokens[0].uri, "/oauth2/token");
    assert_eq!(tokens[0].headers["authorization"], basic("key-id", "key-secret"));
    assert_eq!(&tokens[0].body[..], b"grant_type=client_credentials");
    let sent = provider.wait_for(3, Duration::from_secs(5)).await;
    for r in &sent {
        assert_eq!(r.uri, "/v1/projects/P1/messages:send");
        assert_eq!(r.headers["authorization"], "Bearer tok-1");
        assert_eq!(&r.body[..], body.as_bytes());
    }

    // Sinch refuses the token: one new token, one retry, and the client sees only the success.
    provider.script([Answer::status(401)]);
    let reply = post(&url, &headers, body).await;
    assert_eq!(reply.status, 200);
    assert_eq!(auth.count(), 2);
    let sent = provider.wait_for(5, Duration::from_secs(5)).await;
    assert_eq!(sent[3].headers["authorization"], "Bearer tok-1");
    assert_eq!(sent[4].headers["authorization"], "Bearer tok-2");

    // A second 401 in a row is the provider's answer: no loop.
    provider.script([Answer::status(401), Answer::status(401)]);
    auth.script([Answer { status: 200, body: r#"{"access_token":"tok-3","expires_in":3600}"#, delay: Duration::ZERO }]);
    let reply = post(&url, &headers, body).await;
    assert_eq!(reply.status, 401);
    assert_eq!(auth.count(), 3);
    assert_eq!(provider.count(), 7);

    // The token endpoint refusing the key is a 502 that says what to check.
    auth.script([Answer::status(401)]);
    provider.script([Answer::status(401)]);
    let reply = post(&url, &headers, body).await;
    assert_eq!(reply.status, 502);
    assert!(reply.json()["message"].as_str().unwrap().contains("key_id"));
}

#[tokio::test]
async fn a_hanging_sinch_token_endpoint_holds_no_send_past_the_outbound_timeout() {
    let provider = FakeMotion::start().await;
    let auth = FakeMotion::start().await;
    auth.answer_always(Answer { status: 200, body: r#"{"access_token":"late"}"#, delay: Duration::from_secs(20) });
    let relay = RelayProcess::start(&config(&provider.url(), &auth.url(), "", "[outbound]\ntimeout = \"1s\""));
    let url = relay.url("/acme/outbound/14/v1/projects/P1/messages:send");
    let headers = [("x-relay-token", ACME_TOKEN), ("content-type", "application/json")];
    // Five sends at once: each waits at most the timeout, not its place in line times it.
    let start = std::time::Instant::now();
    let sends: Vec<_> = (0..5).map(|_| post(&url, &headers, "{}")).collect();
    let replies = futures_util::future::join_all(sends).await;
    let took = start.elapsed();
    assert!(replies.iter().all(|r| r.status == 504), "{:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    assert!(took < Duration::from_secs(4), "five sends took {took:?}");
    assert_eq!(auth.count(), 1, "one fetch for all five");
    assert_eq!(provider.count(), 0);
}

/// The real server in-process with a manual clock: the customer's message opens the window, a
/// day later only a template may go out under `enforce`, and a new message opens it again.
#[tokio::test]
async fn enforce_refuses_free_form_after_24_hours_but_not_templates() {
    let provider = FakeMotion::start().await;
    let motion = FakeMotion::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[server]
http = "127.0.0.1:0"
[storage]
path = "{}"
[[motion]]
name = "acme"
url = "{}"
outbound_token = "{ACME_TOKEN}"
window_policy = "enforce"
  [[motion.account]]
  id = "13"
  provider = "meta"
  app_secret = "s"
  access_token = "relay-meta-token"
  phone_number_id = "106"
  api_base = "{}"
"#,
        dir.path().display(),
        motion.url(),
        provider.url()
    );
    let config = whatsapp_relay::config::parse(std::path::Path::new("relay.toml"), &text).unwrap();
    let stores = Stores::of(Arc::new(EmbeddedStore::open(dir.path()).unwrap()));
    let clock = Arc::new(ManualClock::new());
    let running = whatsapp_relay::server::start_with(config, stores, clock.clone()).await.unwrap();
    let base = format!("http://{}", running.http.unwrap());
    let inbound = format!("{base}/acme/api/whatsapp/accounts/13/notify");
    let send_url = format!("{base}/acme/outbound/13/v21.0/106/messages");
    let headers = [("x-relay-token", ACME_TOKEN), ("content-type", "application/json")];
    let free_form = r#"{"messaging_product":"whatsapp","to":"+1 650 555 1234","type":"text","text":{"body":"hi"}}"#;
    let template = r#"{"messaging_product":"whatsapp","to":"16505551234","type":"template","template":{"name":"follow_up","language":{"code":"en"}}}"#;

    // The customer writes; an hour later a free-form reply goes out.
    assert_eq!(post_meta(&inbound, "s", meta_message("106", "16505551234", "wamid.1", "hello")).await.status, 200);
    clock.advance(Duration::from_secs(3600));
    let reply = post(&send_url, &headers, free_form).await;
    assert_eq!(reply.status, 200);
    assert!(!reply.headers.contains_key("x-relay-window"));
    assert_eq!(
        provider.wait_for(1, Duration::from_secs(5)).await[0].headers["authorization"],
        "Bearer relay-meta-token"
    );

    // 25 hours after the customer wrote: free-form is refused without calling Meta...
    clock.advance(Duration::from_secs(24 * 3600));
    let reply = post(&send_url, &headers, free_form).await;
    assert_eq!(reply.status, 422);
    assert_eq!(reply.error_code(), "outside_customer_service_window");
    assert!(reply.json()["message"].as_str().unwrap().contains("template"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(provider.count(), 1);
    // ...a template is not...
    assert_eq!(post(&send_url, &headers, template).await.status, 200);
    assert_eq!(provider.wait_for(2, Duration::from_secs(5)).await[1].body, template.as_bytes());
    // ...nor is a customer who never wrote reachable with free-form, nor another account's customer.
    let stranger = free_form.replace("+1 650 555 1234", "15550000000");
    assert_eq!(post(&send_url, &headers, stranger).await.status, 422);

    // The customer writes again: an hour later free-form passes.
    assert_eq!(
        post_meta(&inbound, "s", meta_message("106", "16505551234", "wamid.2", "still there?")).await.status,
        200
    );
    clock.advance(Duration::from_secs(3600));
    assert_eq!(post(&send_url, &headers, free_form).await.status, 200);
    assert_eq!(provider.wait_for(3, Duration::from_secs(5)).await.len(), 3);
    // A status callback (Meta telling us our message was read) opens nothing.
    clock.advance(Duration::from_secs(25 * 3600));
    let status = fixture("meta-status-read.json");
    assert_eq!(post_meta(&inbound, "s", status).await.status, 200);
    assert_eq!(post(&send_url, &headers, free_form).await.status, 422);

    let text = running.services.metrics.encode();
    assert!(
        text.contains(
            r#"whatsapp_relay_outbound_window_closed_total{motion="acme",provider="meta",action="refused"} 3"#
        ),
        "{text}"
    );
    running.shutdown().await;
}

/// The window is durable: a customer who wrote before a restart can still be answered after it.
async fn the_window_survives_a_restart(backend: Backend) {
    let provider = FakeMotion::start().await;
    let motion = FakeMotion::start().await;
    let text = format!(
        r#"
[server]
http = "127.0.0.1:0"
[storage]
path = "{{DATA}}"
[[motion]]
name = "acme"
url = "{}"
outbound_token = "{ACME_TOKEN}"
window_policy = "enforce"
  [[motion.account]]
  id = "12"
  provider = "kaleyra"
  shared_token = "kaleyra-hook"
  sid = "HXAP1"
  api_key = "kaleyra-key"
  api_base = "{}"
"#,
        motion.url(),
        provider.url()
    );
    let mut relay = RelayProcess::start(&backend.apply(&text));
    let reply = post(
        &relay.url("/acme/api/whatsapp/accounts/12/notify"),
        &[("x-webhook-token", "kaleyra-hook"), ("content-type", "application/json")],
        fixture("kaleyra-inbound-text.json"),
    )
    .await;
    assert_eq!(reply.status, 200);
    motion.wait_for(1, Duration::from_secs(5)).await;

    relay.signal("TERM");
    assert_eq!(relay.wait_exit(Duration::from_secs(10)), Some(0));
    let dir = relay.dir.take().unwrap();
    let relay = RelayProcess::spawn(dir, relay.config_path.clone());

    let send = |to: &'static str| {
        let url = relay.url("/acme/outbound/12/v1/HXAP1/messages");
        async move {
            let body = format!("to={to}&type=text&channel=whatsapp&body=hi&from=15550783881");
            post(&url, &[("x-relay-token", ACME_TOKEN), FORM, ("api-key", "client-key")], body).await
        }
    };
    assert_eq!(send("%2B16505551234").await.status, 200, "the customer wrote before the restart");
    assert_eq!(send("%2B16505550000").await.status, 422, "never wrote");
    let got = provider.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].headers["api-key"], "kaleyra-key", "the relay's key replaces the client's");
}

on_both_backends!(the_window_survives_a_restart);
