//! Dedup, `auto` mode and the operator's queue tools (`queue stats|list|dead|replay|purge`),
//! against the real binary.

mod support;

use std::process::Command;
use std::time::Duration;
use support::*;

const SECRET: &str = "meta-app-secret";
const META: &str = "/acme/api/whatsapp/accounts/13/notify";
const TWILIO: &str = "/acme/api/whatsapp/accounts/12/notify";

fn config(acme: &str, mode: &str) -> String {
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
mode = "{mode}"
timeout = "1s"
retry_initial = "50ms"
retry_max = "200ms"
auto_budget = "5s"

[[motion]]
name = "acme"
url = "{acme}"
  [[motion.account]]
  id = "13"
  provider = "meta"
  app_secret = "{SECRET}"
  [[motion.account]]
  id = "12"
  provider = "twilio"
  auth_token = "12345"
"#
    )
}

/// Runs `whatsapp-relay queue ARGS --config` against a running relay whose admin port is in
/// its config; the config on disk says port 0, so a copy names the bound port.
fn queue_cli(relay: &RelayProcess, args: &[&str]) -> (i32, String, String) {
    let text = std::fs::read_to_string(&relay.config_path).unwrap();
    let cli_cfg = relay.config_path.with_file_name("cli.toml");
    let admin = relay.admin.unwrap();
    std::fs::write(&cli_cfg, text.replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"{admin}\""), 1)).unwrap();
    let out = Command::new(bin()).arg("queue").args(args).arg("--config").arg(&cli_cfg).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn twilio_form(sid: &str, body: &str) -> Vec<u8> {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("MessageSid", sid)
        .append_pair("SmsStatus", "received")
        .append_pair("From", "whatsapp:+16505551234")
        .append_pair("To", "whatsapp:+14155238886")
        .append_pair("Body", body)
        .finish()
        .into_bytes()
}

async fn post_twilio(relay: &RelayProcess, form: Vec<u8>) -> Reply {
    let sig = twilio_signature("12345", &format!("https://chat.example.com{TWILIO}"), &form);
    post(
        &relay.url(TWILIO),
        &[("x-twilio-signature", &sig), ("content-type", "application/x-www-form-urlencoded")],
        form,
    )
    .await
}

async fn a_redelivered_event_arrives_once_but_different_events_with_the_same_text_both_arrive(backend: Backend) {
    let acme = FakeMotion::start().await;
    let relay = RelayProcess::start(&backend.apply(&config(&acme.url(), "queue")));

    let body = meta_message("1", "16505551234", "wamid.SAME", "hello");
    assert_eq!(post_meta(&relay.url(META), SECRET, body.clone()).await.status, 200);
    assert_eq!(post_meta(&relay.url(META), SECRET, body.clone()).await.status, 200, "a redelivery is acknowledged");

    assert_eq!(post_twilio(&relay, twilio_form("SM1", "same text")).await.status, 200);
    assert_eq!(post_twilio(&relay, twilio_form("SM2", "same text")).await.status, 200);

    acme.wait_for(3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = acme.received();
    assert_eq!(got.len(), 3, "the Meta redelivery must not be delivered again");
    assert_eq!(got.iter().filter(|r| r.body == body).count(), 1);
    let metrics = get(&format!("http://{}/metrics", relay.admin.unwrap())).await;
    assert!(String::from_utf8_lossy(&metrics.body).contains("whatsapp_relay_dedup_hits_total{motion=\"acme\"} 1"));
}

async fn dedup_never_spans_motions_whose_accounts_share_an_id(backend: Backend) {
    // Account ids are unique only within one Motion: two tenants may both have account "1".
    let (acme, globex) = (FakeMotion::start().await, FakeMotion::start().await);
    let text = format!(
        r#"
[server]
http = "127.0.0.1:0"
[storage]
path = "{{DATA}}"
[delivery]
mode = "queue"
[[motion]]
name = "acme"
url = "{}"
  [[motion.account]]
  id = "1"
  provider = "kaleyra"
  shared_token = "acme-token"
[[motion]]
name = "globex"
url = "{}"
  [[motion.account]]
  id = "1"
  provider = "kaleyra"
  shared_token = "globex-token"
"#,
        acme.url(),
        globex.url()
    );
    let relay = RelayProcess::start(&backend.apply(&text));
    // The same bytes, each tenant's with its own token: one tenant cannot make the relay drop
    // the other's webhook as a "redelivery" by sending it first.
    let body = br#"{"id":"evt-1","from":"+393001234567","type":"text","text":"hi"}"#.to_vec();
    for (motion, token) in [("acme", "acme-token"), ("globex", "globex-token")] {
        let url = relay.url(&format!("/{motion}/api/whatsapp/accounts/1/notify"));
        let reply = post(&url, &[("x-webhook-token", token), ("content-type", "application/json")], body.clone()).await;
        assert_eq!(reply.status, 200, "{motion}");
    }
    assert_eq!(acme.wait_for(1, Duration::from_secs(10)).await[0].body, body);
    assert_eq!(globex.wait_for(1, Duration::from_secs(10)).await[0].body, body);
}

/// The dead letters once there are `n` (each is written just after Motion's answer).
async fn wait_dead_letters(relay: &RelayProcess, n: usize) -> Vec<serde_json::Value> {
    let mut dead = Vec::new();
    for _ in 0..100 {
        let (code, out, err) = queue_cli(relay, &["dead", "--json"]);
        assert_eq!(code, 0, "{err}");
        dead = serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap();
        if dead.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dead.len(), n, "{dead:?}");
    dead
}

/// Waits until `queue stats` shows nothing waiting: the scheduler has let every delivered event
/// go (it prunes them from the store at its next housekeeping, every 200 ms, after Motion's answer).
async fn wait_nothing_waiting(relay: &RelayProcess) {
    until(Duration::from_secs(10), Duration::from_millis(50), async || {
        let (code, out, err) = queue_cli(relay, &["stats", "--json"]);
        assert_eq!(code, 0, "{err}");
        let empty = serde_json::from_str::<serde_json::Value>(&out).unwrap()["motions"] == serde_json::json!([]);
        done_or(empty, format!("events still waiting: {out}"))
    })
    .await;
}

async fn a_refused_event_is_a_dead_letter_that_can_be_listed_replayed_and_purged(backend: Backend) {
    let acme = FakeMotion::start().await;
    acme.script([Answer { status: 404, body: "{\"error\":\"no such account\"}", delay: Duration::ZERO }]);
    let relay = RelayProcess::start(&backend.apply(&config(&acme.url(), "queue")));
    let body = meta_message("1", "16505551234", "wamid.dead", "lost?");
    assert_eq!(post_meta(&relay.url(META), SECRET, body.clone()).await.status, 200);
    acme.wait_for(1, Duration::from_secs(5)).await;

    // Listed, with Motion's answer (the dead letter is written just after the attempt).
    let dead = wait_dead_letters(&relay, 1).await;
    let id = dead[0]["id"].as_str().unwrap().to_string();
    assert_eq!(dead[0]["status"], 404);
    assert_eq!(dead[0]["account"], "13");
    assert!(dead[0]["answer"].as_str().unwrap().contains("no such account"));
    let (_, table, _) = queue_cli(&relay, &["dead"]);
    assert!(table.lines().any(|l| l.starts_with(&id) && l.contains("HTTP 404")), "{table}");

    // Replayed: Motion now takes it, with the same delivery id.
    let (code, out, err) = queue_cli(&relay, &["replay", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 1"), "{out}");
    let got = acme.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(got[1].body, body);
    assert_eq!(got[1].headers["x-relay-delivery"].to_str().unwrap(), id);
    let (_, out, _) = queue_cli(&relay, &["dead", "--json"]);
    assert_eq!(out.trim(), "[]");

    // Another dead letter, purged (only with --yes).
    acme.script([Answer::status(400)]);
    post_meta(&relay.url(META), SECRET, meta_message("1", "16505559999", "wamid.d2", "x")).await;
    acme.wait_for(3, Duration::from_secs(5)).await;
    let dead = wait_dead_letters(&relay, 1).await;
    let (code, _, err) = queue_cli(&relay, &["purge", "--dead"]);
    assert_eq!(code, 2, "no --yes, no purge");
    assert!(err.contains("--yes"));
    // By id: another id deletes nothing, its own deletes it.
    let id = dead[0]["id"].as_str().unwrap().to_string();
    let (code, _, err) = queue_cli(&relay, &["purge", "--dead", "no-such-id", "--yes", "--json"]);
    assert_eq!(code, 1, "an id that names nothing is an error: {err}");
    assert!(err.contains("no dead letter with that id"), "{err}");
    let (code, out, _) = queue_cli(&relay, &["purge", "--dead", &id, "--yes", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["count"], 1);
    let (_, out, _) = queue_cli(&relay, &["dead", "--json"]);
    assert_eq!(out.trim(), "[]");

    // And all of them.
    acme.script([Answer::status(400)]);
    post_meta(&relay.url(META), SECRET, meta_message("1", "16505559999", "wamid.d3", "y")).await;
    acme.wait_for(4, Duration::from_secs(5)).await;
    wait_dead_letters(&relay, 1).await;
    let (code, out, _) = queue_cli(&relay, &["purge", "--dead", "--yes", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["count"], 1);

    // The admin API needs the token.
    let reply = get(&format!("http://{}/admin/queue/dead", relay.admin.unwrap())).await;
    assert_eq!(reply.status, 401);
}

async fn queue_stats_and_list_report_what_waits(backend: Backend) {
    let down = dead_addr().await;
    let relay = RelayProcess::start(&backend.apply(&config(&format!("http://{down}"), "queue")));
    for i in 0..3 {
        post_meta(&relay.url(META), SECRET, meta_message("1", "16505551234", &format!("wamid.{i}"), "x")).await;
    }
    let (code, out, err) = queue_cli(&relay, &["stats", "--json"]);
    assert_eq!(code, 0, "{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["motions"][0]["motion"], "acme");
    assert_eq!(stats["motions"][0]["depth"], 3);
    assert_eq!(stats["motions"][0]["accounts"][0]["account"], "13");
    let (_, table, _) = queue_cli(&relay, &["stats"]);
    assert!(table.contains("acme") && table.contains("dead letters: 0"), "{table}");
    let (_, out, _) = queue_cli(&relay, &["list", "--json"]);
    assert_eq!(serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap().len(), 3);
}

async fn auto_mode_passes_motions_answer_back_when_up_and_queues_when_down(backend: Backend) {
    // Up: Motion's own answer comes back.
    let acme = FakeMotion::start().await;
    let relay = RelayProcess::start(&backend.apply(&config(&acme.url(), "auto")));
    // On a shared store a relay takes its conversations' leases a moment after it starts: an
    // event stored before then is left to whoever holds it, and its `auto` request gets the
    // acknowledgement. One event delivered first shows the conversation is held.
    let reply = post_meta(&relay.url(META), SECRET, meta_message("1", "1650", "wamid.first", "-")).await;
    assert_eq!(reply.status, 200);
    acme.wait_for(1, Duration::from_secs(10)).await;
    wait_nothing_waiting(&relay).await;
    let reply = post_meta(&relay.url(META), SECRET, meta_message("1", "1650", "wamid.up", "0")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["x-motion"], "yes");
    assert_eq!(&reply.body[..], b"{\"ok\":true}");
    // A refusal is not passed back: the provider is acknowledged and the event is a dead letter
    // (a redelivery, deduplicated, would otherwise be lost).
    acme.script([Answer::status(422)]);
    let reply = post_meta(&relay.url(META), SECRET, meta_message("1", "1650", "wamid.refused", "1")).await;
    assert_eq!(reply.status, 200);
    assert!(reply.body.is_empty());
    let mut dead = Vec::new();
    for _ in 0..50 {
        let (_, out, _) = queue_cli(&relay, &["dead", "--json"]);
        dead = serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap_or_default();
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["status"], 422);
    // A clean stop records what was delivered (with PostgreSQL the next relay shares the queue).
    let mut relay = relay;
    relay.signal("TERM");
    assert_eq!(relay.wait_exit(Duration::from_secs(10)), Some(0));

    // Down: acknowledged, then delivered in order once Motion is back.
    let down = dead_addr().await;
    let relay = RelayProcess::start(&backend.apply(&config(&format!("http://{down}"), "auto")));
    for i in 0..5 {
        let reply =
            post_meta(&relay.url(META), SECRET, meta_message("1", "1650", &format!("wamid.d{i}"), &i.to_string()))
                .await;
        assert_eq!(reply.status, 200);
        assert!(reply.body.is_empty(), "acknowledged, not Motion's answer");
    }
    let acme = FakeMotion::start_on(down).await;
    let got = acme.wait_for(5, Duration::from_secs(10)).await;
    let texts: Vec<String> = got.iter().map(|r| meta_customer_and_text(&r.body).1).collect();
    assert_eq!(texts, ["0", "1", "2", "3", "4"]);
    // With Motion up and nothing waiting, auto answers directly again. (Motion has the last one
    // a moment before the relay reads its answer; until then the conversation still holds it.)
    wait_nothing_waiting(&relay).await;
    let reply = post_meta(&relay.url(META), SECRET, meta_message("1", "1650", "wamid.after", "5")).await;
    assert_eq!(reply.headers.get("x-motion").map(|v| v.to_str().unwrap()), Some("yes"));
}

/// An answer longer than the relay keeps (64 KiB) is not Motion's answer any more: the provider
/// gets its acknowledgement, a whole response (no stale Content-Length from Motion).
#[tokio::test]
async fn auto_mode_acknowledges_when_motions_answer_is_too_long_to_pass_back() {
    let acme = FakeMotion::start().await;
    let long: &'static str = Box::leak(format!("{{\"pad\":\"{}\"}}", "x".repeat(100 * 1024)).into_boxed_str());
    acme.script([Answer { status: 200, body: long, delay: Duration::ZERO }]);
    let relay = RelayProcess::start(&config(&acme.url(), "auto"));
    let reply = post_meta(&relay.url(META), SECRET, meta_message("1", "1650", "wamid.long", "0")).await;
    assert_eq!(reply.status, 200);
    assert!(reply.body.is_empty(), "the acknowledgement, not a cut answer: {} bytes", reply.body.len());
    assert!(reply.headers.get("x-motion").is_none());
    assert_eq!(acme.count(), 1, "delivered once");
    // A short answer still comes back whole, with its own length.
    let reply = post_meta(&relay.url(META), SECRET, meta_message("1", "1650", "wamid.short", "1")).await;
    assert_eq!(&reply.body[..], b"{\"ok\":true}");
    assert_eq!(reply.headers["content-length"], "11");
}

async fn a_motion_added_by_a_reload_gets_its_queue(backend: Backend) {
    let acme = FakeMotion::start().await;
    let globex = FakeMotion::start().await;
    let relay = RelayProcess::start(&backend.apply(&config(&acme.url(), "queue")));
    let text = std::fs::read_to_string(&relay.config_path).unwrap();
    let more = format!(
        "\n[[motion]]\nname = \"globex\"\nurl = \"{}\"\n  [[motion.account]]\n  id = \"7\"\n  provider = \"kaleyra\"\n  shared_token = \"g\"\n",
        globex.url()
    );
    std::fs::write(&relay.config_path, format!("{text}{more}")).unwrap();
    let admin = format!("http://{}/admin/reload", relay.admin.unwrap());
    let reply = send(http::Method::POST, &admin, &[("authorization", "Bearer admin-secret")], "").await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let reply =
        post(&relay.url("/globex/api/whatsapp/accounts/7/notify"), &[("x-webhook-token", "g")], "{\"from\":\"1\"}")
            .await;
    assert_eq!(reply.status, 200);
    globex.wait_for(1, Duration::from_secs(10)).await;
    assert!(!relay.logs().contains("panicked"), "{}", relay.logs());
}

async fn a_replayed_dead_letter_gets_a_whole_give_up_after_again(backend: Backend) {
    let acme = FakeMotion::start().await;
    acme.answer_always(Answer::status(503));
    // 3 s: room for three attempts 50-200 ms apart on a loaded machine, and still less than the
    // event's age at the replay, so a give_up_after counted from its first receipt would fail.
    let text = config(&acme.url(), "queue").replace("auto_budget = \"5s\"", "give_up_after = \"3s\"");
    let relay = RelayProcess::start(&backend.apply(&text));
    post_meta(&relay.url(META), SECRET, meta_message("1", "16505551234", "wamid.late", "x")).await;
    let dead = wait_dead_letters(&relay, 1).await;
    assert!(dead[0]["reason"].as_str().unwrap().starts_with("gave up"), "{dead:?}");
    let before = acme.count();

    // Motion recovers slowly: two more 503s, then it takes the event. Counted from the replay,
    // the event has its whole give_up_after to get there, as it had the first time.
    acme.script([Answer::status(503), Answer::status(503)]);
    acme.answer_always(Answer::ok());
    let (code, out, err) = queue_cli(&relay, &["replay", "--all"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 1"), "{out}");
    acme.wait_for(before + 3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, out, _) = queue_cli(&relay, &["dead", "--json"]);
    assert_eq!(out.trim(), "[]", "delivered on its third attempt after the replay");
    wait_nothing_waiting(&relay).await;
}

/// A Motion that fails is logged once at warn with the reason, not once per attempt; its
/// recovery once at info with what waits; and `queue list` shows each waiting event's last
/// error and next attempt, and its delivery id, which the log lines carry too.
#[tokio::test]
async fn a_failing_motion_is_logged_once_and_its_recovery_once_and_queue_list_shows_why() {
    let acme = FakeMotion::start().await;
    acme.answer_always(Answer::status(503));
    let relay = RelayProcess::start(&config(&acme.url(), "queue"));
    for i in 0..3 {
        let reply =
            post_meta(&relay.url(META), SECRET, meta_message("1", &format!("165{i}"), &format!("wamid.f{i}"), "x"))
                .await;
        assert_eq!(reply.status, 200);
    }
    // Several attempts each (retry_max is 200 ms).
    acme.wait_for(12, Duration::from_secs(10)).await;
    let (code, out, err) = queue_cli(&relay, &["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(list.len(), 3);
    for w in &list {
        assert_eq!(w["last_error"], "Motion answered HTTP 503", "{w}");
        assert!(w["next_attempt_unix_ms"].as_u64().is_some(), "{w}");
        assert!(w["attempts"].as_u64().unwrap() >= 1, "{w}");
    }
    let (_, table, _) = queue_cli(&relay, &["list"]);
    assert!(table.contains("LAST ERROR") && table.contains("Motion answered HTTP 503"), "{table}");

    acme.answer_always(Answer::ok());
    relay.wait_log("Motion recovered", Duration::from_secs(10)).await;
    let logs = relay.logs();
    let failing: Vec<&str> = logs.lines().filter(|l| l.contains("Motion is failing")).collect();
    assert_eq!(failing.len(), 1, "one warn line, not one per attempt:\n{logs}");
    assert!(
        failing[0].contains("\"level\":\"WARN\"") && failing[0].contains("Motion answered HTTP 503"),
        "{}",
        failing[0]
    );
    let recovered = logs.lines().find(|l| l.contains("Motion recovered")).unwrap();
    assert!(recovered.contains("\"level\":\"INFO\"") && recovered.contains("\"waiting\":"), "{recovered}");
    // The first failure names its delivery id, as the access line of that webhook did.
    let id = list.iter().map(|w| w["id"].as_str().unwrap()).find(|id| failing[0].contains(id)).expect("a delivery id");
    assert!(logs.lines().any(|l| l.contains("\"target\":\"access\"") && l.contains(id)), "{logs}");
}

on_both_backends!(
    a_redelivered_event_arrives_once_but_different_events_with_the_same_text_both_arrive,
    dedup_never_spans_motions_whose_accounts_share_an_id,
    a_refused_event_is_a_dead_letter_that_can_be_listed_replayed_and_purged,
    queue_stats_and_list_report_what_waits,
    auto_mode_passes_motions_answer_back_when_up_and_queues_when_down,
    a_motion_added_by_a_reload_gets_its_queue,
    a_replayed_dead_letter_gets_a_whole_give_up_after_again,
);
