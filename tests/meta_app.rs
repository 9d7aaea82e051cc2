//! One webhook URL for many customers: a Meta app's batches routed by phone number id to the
//! Motion servers that own the numbers, split when they span accounts.

mod support;

use serde_json::{Value, json};
use std::time::Duration;
use support::*;

const APP_SECRET: &str = "meta-app-secret";

fn config(a: &str, b: &str, extra_b_account: &str) -> String {
    format!(
        r#"
[server]
http = "127.0.0.1:0"
public_url = "https://chat.example.com"
[admin]
listen = "127.0.0.1:0"
token = "admin-secret"
[storage]
path = "{{DATA}}"
[delivery]
mode = "direct"
retry_initial = "50ms"
retry_max = "200ms"

[[meta_app]]
name = "main"
app_secret = "{APP_SECRET}"
verify_token = "main-verify"

[[motion]]
name = "tenant-a"
url = "{a}"
signing_secret = "secret-a"
  [[motion.account]]
  id = "a1"
  provider = "meta"
  app = "main"
  phone_number_id = "111"
  waba_id = "W1"
  [[motion.account]]
  id = "a2"
  provider = "meta"
  app = "main"
  phone_number_id = "112"
  waba_id = "W1"

[[motion]]
name = "tenant-b"
url = "{b}"
signing_secret = "secret-b"
  [[motion.account]]
  id = "b1"
  provider = "meta"
  app = "main"
  phone_number_id = "222"
  waba_id = "W1"
{extra_b_account}
"#
    )
}

fn change(phone: &str, customer: &str, wamid: &str) -> Value {
    json!({"field": "messages", "value": {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "1555", "phone_number_id": phone},
        "messages": [{"from": customer, "id": wamid, "timestamp": "1749416383", "type": "text", "text": {"body": wamid}}],
        "unknown_field_kept": {"nested": [1, 2, 3]}
    }})
}

fn batch(entries: Vec<(&str, Vec<Value>)>) -> Vec<u8> {
    let entry: Vec<Value> =
        entries.into_iter().map(|(id, changes)| json!({"id": id, "time": 1749416383, "changes": changes})).collect();
    json!({"object": "whatsapp_business_account", "entry": entry}).to_string().into_bytes()
}

/// Checks `X-Relay-Signature: t=..,v1=..` against a Motion's signing secret.
fn relay_signature_ok(r: &Received, secret: &str) -> bool {
    let sig = r.headers["x-relay-signature"].to_str().unwrap();
    let (t, v1) = sig.strip_prefix("t=").unwrap().split_once(",v1=").unwrap();
    hex::encode(hmac_sha256(secret, &[t.as_bytes(), b".", &r.body])) == v1
}

async fn a_batch_for_one_number_reaches_only_its_tenant_byte_for_byte(backend: Backend) {
    let (a, b) = (FakeMotion::start().await, FakeMotion::start().await);
    let relay = RelayProcess::start(&backend.apply(&config(&a.url(), &b.url(), "")));
    let body =
        batch(vec![("W1", vec![change("111", "16505550001", "wamid.1"), change("111", "16505550001", "wamid.2")])]);
    let reply = post_meta(&relay.url("/meta/main"), APP_SECRET, body.clone()).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let got = a.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].uri, "/api/whatsapp/accounts/a1/notify");
    assert_eq!(got[0].body, body, "forwarded byte for byte");
    assert_eq!(got[0].headers["x-hub-signature-256"].to_str().unwrap(), meta_signature(APP_SECRET, &body));
    assert!(!got[0].headers.contains_key("x-relay-split"));
    assert!(relay_signature_ok(&got[0], "secret-a"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.count(), 0);
    assert_eq!(a.count(), 1);
}

async fn a_batch_spanning_tenants_is_split_per_account_in_order(backend: Backend) {
    let (a, b) = (FakeMotion::start().await, FakeMotion::start().await);
    let relay = RelayProcess::start(&backend.apply(&config(&a.url(), &b.url(), "")));
    // Two entries: A, B in the first, A in the second.
    let body = batch(vec![
        ("W1", vec![change("111", "1650001", "wamid.A1"), change("222", "1650002", "wamid.B1")]),
        ("W1", vec![change("111", "1650001", "wamid.A2")]),
    ]);
    assert_eq!(post_meta(&relay.url("/meta/main"), APP_SECRET, body).await.status, 200);

    let got_a = a.wait_for(1, Duration::from_secs(10)).await;
    let got_b = b.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((a.count(), b.count()), (1, 1), "one payload per account");
    for (r, secret, want) in
        [(&got_a[0], "secret-a", vec!["wamid.A1", "wamid.A2"]), (&got_b[0], "secret-b", vec!["wamid.B1"])]
    {
        assert_eq!(r.headers["x-relay-split"], "true");
        assert!(!r.headers.contains_key("x-hub-signature-256"), "Meta's signature no longer applies");
        assert!(relay_signature_ok(r, secret), "verifiable with the Motion's signing secret");
        let v: Value = serde_json::from_slice(&r.body).expect("parseable as a Meta webhook");
        assert_eq!(v["object"], "whatsapp_business_account");
        let ids: Vec<String> = v["entry"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|e| e["changes"].as_array().unwrap().iter())
            .map(|c| c["value"]["messages"][0]["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids, want);
        // Unknown fields pass through untouched.
        assert_eq!(v["entry"][0]["changes"][0]["value"]["unknown_field_kept"], json!({"nested": [1, 2, 3]}));
        assert_eq!(v["entry"][0]["id"], "W1");
    }
    assert_eq!(got_a[0].uri, "/api/whatsapp/accounts/a1/notify");
    assert_eq!(got_b[0].uri, "/api/whatsapp/accounts/b1/notify");
}

async fn account_level_changes_go_once_per_motion_by_waba_id(backend: Backend) {
    let (a, b) = (FakeMotion::start().await, FakeMotion::start().await);
    let relay = RelayProcess::start(&backend.apply(&config(&a.url(), &b.url(), "")));
    let template =
        json!({"field": "message_template_status_update", "value": {"event": "APPROVED", "message_template_id": 1}});
    assert_eq!(post_meta(&relay.url("/meta/main"), APP_SECRET, batch(vec![("W1", vec![template])])).await.status, 200);
    a.wait_for(1, Duration::from_secs(10)).await;
    b.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((a.count(), b.count()), (1, 1), "tenant-a has two accounts on W1 but gets it once");
}

async fn a_forged_batch_reaches_nobody_and_the_handshake_is_answered(backend: Backend) {
    let (a, b) = (FakeMotion::start().await, FakeMotion::start().await);
    let relay = RelayProcess::start(&backend.apply(&config(&a.url(), &b.url(), "")));
    let body = batch(vec![("W1", vec![change("111", "1", "wamid.f")])]);
    let reply = post(&relay.url("/meta/main"), &[("x-hub-signature-256", &meta_signature("wrong", &body))], body).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.error_code(), "bad_signature");
    let reply = get(&relay.url("/meta/main?hub.mode=subscribe&hub.verify_token=main-verify&hub.challenge=42")).await;
    assert_eq!((reply.status, &reply.body[..]), (200, &b"42"[..]));
    let reply = get(&relay.url("/meta/main?hub.mode=subscribe&hub.verify_token=nope&hub.challenge=42")).await;
    assert_eq!(reply.status, 403);
    assert_eq!(post(&relay.url("/meta/other"), &[], "{}").await.status, 404);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.count() + b.count(), 0);
}

async fn an_unknown_number_is_a_dead_letter_replayed_once_an_account_claims_it(backend: Backend) {
    let (a, b) = (FakeMotion::start().await, FakeMotion::start().await);
    let relay = RelayProcess::start(&backend.apply(&config(&a.url(), &b.url(), "")));
    let admin = format!("http://{}", relay.admin.unwrap());
    let auth = [("authorization", "Bearer admin-secret")];
    let body = batch(vec![("W1", vec![change("333", "1650003", "wamid.U1"), change("111", "1650001", "wamid.K1")])]);
    assert_eq!(post_meta(&relay.url("/meta/main"), APP_SECRET, body).await.status, 200, "acknowledged");
    a.wait_for(1, Duration::from_secs(10)).await; // the known part goes on

    let dead = send(http::Method::GET, &format!("{admin}/admin/queue/dead"), &auth, "").await.json();
    assert_eq!(dead.as_array().unwrap().len(), 1);
    assert_eq!(dead[0]["account"], "");
    assert!(dead[0]["note"].as_str().unwrap().contains("phone_number_id=333"));
    let id = dead[0]["id"].as_str().unwrap().to_string();
    // Not claimable yet.
    let reply = send(http::Method::POST, &format!("{admin}/admin/queue/dead/{id}/replay"), &auth, "").await;
    assert_eq!(reply.status, 404);

    // tenant-b claims the number; reload; replay.
    let text = std::fs::read_to_string(&relay.config_path).unwrap();
    let more =
        "  [[motion.account]]\n  id = \"b2\"\n  provider = \"meta\"\n  app = \"main\"\n  phone_number_id = \"333\"\n";
    std::fs::write(&relay.config_path, format!("{text}{more}")).unwrap();
    let reply = send(http::Method::POST, &format!("{admin}/admin/reload"), &auth, "").await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let reply = send(http::Method::POST, &format!("{admin}/admin/queue/dead/{id}/replay"), &auth, "").await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let got = b.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].uri, "/api/whatsapp/accounts/b2/notify");
    let v: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(v["entry"][0]["changes"][0]["value"]["messages"][0]["id"], "wamid.U1");
    assert!(relay_signature_ok(&got[0], "secret-b"));
    let dead = send(http::Method::GET, &format!("{admin}/admin/queue/dead"), &auth, "").await.json();
    assert_eq!(dead.as_array().unwrap().len(), 0);
}

async fn sigkill_right_after_acknowledging_a_split_batch_loses_no_part(backend: Backend) {
    let (down_a, down_b) = (dead_addr().await, dead_addr().await);
    let relay =
        RelayProcess::start(&backend.apply(&config(&format!("http://{down_a}"), &format!("http://{down_b}"), "")));
    let body = batch(vec![(
        "W1",
        vec![change("111", "1", "wamid.s1"), change("222", "2", "wamid.s2"), change("112", "3", "wamid.s3")],
    )]);
    assert_eq!(post_meta(&relay.url("/meta/main"), APP_SECRET, body).await.status, 200);
    let relay = relay.restart(); // SIGKILL, then start again on the same store
    let (a, b) = (FakeMotion::start_on(down_a).await, FakeMotion::start_on(down_b).await);
    let got_a = a.wait_for(2, Duration::from_secs(15)).await;
    let got_b = b.wait_for(1, Duration::from_secs(15)).await;
    let mut uris: Vec<&str> = got_a.iter().map(|r| r.uri.as_str()).collect();
    uris.sort();
    assert_eq!(uris, ["/api/whatsapp/accounts/a1/notify", "/api/whatsapp/accounts/a2/notify"]);
    assert_eq!(got_b[0].uri, "/api/whatsapp/accounts/b1/notify");
    drop(relay);
}

async fn a_360dialog_partner_app_routes_the_same_cloud_api_shape(backend: Backend) {
    let (a, b) = (FakeMotion::start().await, FakeMotion::start().await);
    let cfg = config(&a.url(), &b.url(), "")
        .replace("[[meta_app]]\nname = \"main\"", "[[meta_app]]\nname = \"d360\"\nprovider = \"360dialog\"\nplatform_secret = \"partner-secret\"\n\n[[meta_app]]\nname = \"main\"")
        + "  [[motion.account]]\n  id = \"b360\"\n  provider = \"360dialog\"\n  app = \"d360\"\n  phone_number_id = \"360360\"\n";
    let relay = RelayProcess::start(&backend.apply(&cfg));
    let body = batch(vec![("W9", vec![change("360360", "1650009", "wamid.d1")])]);
    let sig = hex::encode(hmac_sha256("partner-secret", &[&body]));
    let reply = post(&relay.url("/meta/d360"), &[("x-360dialog-signature", &sig)], body.clone()).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let got = b.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].uri, "/api/whatsapp/accounts/b360/notify");
    assert_eq!(got[0].body, body);
    // Meta's app secret does not open a 360dialog app.
    let reply = post_meta(&relay.url("/meta/d360"), APP_SECRET, body).await;
    assert_eq!(reply.status, 401);
    assert_eq!(a.count(), 0);
}

async fn an_app_account_takes_nothing_on_its_own_path_not_even_a_batch_signed_for_the_app(backend: Backend) {
    let (a, b) = (FakeMotion::start().await, FakeMotion::start().await);
    let relay = RelayProcess::start(&backend.apply(&config(&a.url(), &b.url(), "")));
    // Tenant A's own batch, validly signed by Meta for the app, replayed by A to B's account path:
    // the app's secret verifies it, so only refusing the path keeps it out of B's Motion.
    let body = batch(vec![("W1", vec![change("111", "16505550001", "wamid.from-a")])]);
    let reply = post_meta(&relay.url("/tenant-b/api/whatsapp/accounts/b1/notify"), APP_SECRET, body.clone()).await;
    assert_eq!(reply.status, 404, "{:?}", reply.body);
    assert!(String::from_utf8_lossy(&reply.body).contains("/meta/main"), "{:?}", reply.body);
    // The app's URL still routes it, to its owner only.
    assert_eq!(post_meta(&relay.url("/meta/main"), APP_SECRET, body).await.status, 200);
    a.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((a.count(), b.count()), (1, 0));
}

async fn an_apps_shared_token_never_reaches_its_tenants(backend: Backend) {
    let (a, b) = (FakeMotion::start().await, FakeMotion::start().await);
    let account = |id: &str, phone: &str| {
        format!(
            "  [[motion.account]]\n  id = \"{id}\"\n  provider = \"360dialog\"\n  app = \"bsp\"\n  phone_number_id = \"{phone}\"\n"
        )
    };
    let cfg = config(&a.url(), &b.url(), &account("b9", "999"))
        .replace(
            "[[meta_app]]\nname = \"main\"",
            "[[meta_app]]\nname = \"bsp\"\nprovider = \"360dialog\"\nshared_token = \"app-wide-token\"\n\n[[meta_app]]\nname = \"main\"",
        )
        .replace("[[motion]]\nname = \"tenant-b\"", &format!("{}\n[[motion]]\nname = \"tenant-b\"", account("a9", "998")));
    let relay = RelayProcess::start(&backend.apply(&cfg));
    // Whole (one account) and split (two accounts) batches alike.
    let whole = batch(vec![("W9", vec![change("999", "1650009", "wamid.t1")])]);
    let split = batch(vec![("W9", vec![change("999", "1650009", "wamid.t2"), change("998", "1650008", "wamid.t3")])]);
    for body in [whole, split] {
        let reply = post(&relay.url("/meta/bsp"), &[("x-webhook-token", "app-wide-token")], body).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    let got_b = b.wait_for(2, Duration::from_secs(10)).await;
    let got_a = a.wait_for(1, Duration::from_secs(10)).await;
    for r in got_b.iter().chain(&got_a) {
        assert!(!r.headers.contains_key("x-webhook-token"), "{} got the app's token", r.uri);
    }
    assert!(got_b.iter().any(|r| r.headers.contains_key("x-relay-split")), "one of them was split");
}

on_both_backends!(
    a_batch_for_one_number_reaches_only_its_tenant_byte_for_byte,
    a_batch_spanning_tenants_is_split_per_account_in_order,
    account_level_changes_go_once_per_motion_by_waba_id,
    a_forged_batch_reaches_nobody_and_the_handshake_is_answered,
    an_unknown_number_is_a_dead_letter_replayed_once_an_account_claims_it,
    sigkill_right_after_acknowledging_a_split_batch_loses_no_part,
    a_360dialog_partner_app_routes_the_same_cloud_api_shape,
    an_app_account_takes_nothing_on_its_own_path_not_even_a_batch_signed_for_the_app,
    an_apps_shared_token_never_reaches_its_tenants,
);
