//! One webhook URL for many Motion servers: `/meta/{app}` receives every event of a Meta app
//! (or a 360dialog partner app: the same Cloud API shape), verified with the app's secret, and
//! routes each `entry[].changes[]` by `value.metadata.phone_number_id` (account-level changes
//! by `entry[].id` to the accounts declaring that `waba_id`, once per Motion).
//!
//! A batch whose changes all belong to one account is queued byte for byte with Meta's
//! signature. Otherwise it is split into one payload per account in Meta's envelope shape
//! (`object`, `entry[].id`/`time`, `changes[]` in their order; other entry-level fields are not
//! carried over), each with `X-Relay-Split: true` and without Meta's signature (the relay's
//! `X-Relay-Signature` proves it instead). Changes for a number no account owns are kept as
//! dead letters, never guessed. Everything goes through the queue, whatever the Motion's mode,
//! and the acknowledgement waits until every part is stored.

use crate::http_util::{Body, ErrorCode, error, text};
use crate::inbound::{self, Checks, Part, Verified};
use crate::metrics::AppLabels;
use crate::provider::ProviderKind;
use crate::relay::{AccessInfo, Conn, Relay, Snapshot};
use crate::routing::{AppRoute, AppTarget};
use crate::store::{DeadInfo, NewEvent};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

pub const X_RELAY_SPLIT: HeaderName = HeaderName::from_static("x-relay-split");

/// Meta's envelope, borrowed: changes stay raw so they pass through untouched.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    object: Option<&'a RawValue>,
    #[serde(borrow, default)]
    entry: Vec<Entry<'a>>,
}

#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    time: Option<&'a RawValue>,
    #[serde(borrow, default)]
    changes: Vec<&'a RawValue>,
}

/// Just enough of a change to route it.
#[derive(Deserialize)]
struct ChangeProbe<'a> {
    #[serde(borrow)]
    value: Option<ValueProbe<'a>>,
}

#[derive(Deserialize)]
struct ValueProbe<'a> {
    #[serde(borrow)]
    metadata: Option<MetadataProbe<'a>>,
}

#[derive(Deserialize)]
struct MetadataProbe<'a> {
    #[serde(borrow)]
    phone_number_id: Option<Cow<'a, str>>,
}

/// Where a group of changes goes.
#[derive(Clone)]
pub(crate) enum Dest {
    Account(AppTarget),
    /// No account claims it: kept as a dead letter with this note (`meta_app=… phone_number_id=…`).
    Unknown(String),
}

impl Dest {
    fn same(&self, other: &Dest) -> bool {
        match (self, other) {
            (Dest::Account(a), Dest::Account(b)) => {
                a.account.id == b.account.id && std::sync::Arc::ptr_eq(&a.motion, &b.motion)
            }
            (Dest::Unknown(a), Dest::Unknown(b)) => a == b,
            _ => false,
        }
    }
}

/// A batch cut by destination: each destination with its payload (`None`: the batch as it came).
pub(crate) struct Routed {
    pub parts: Vec<(Dest, Option<String>)>,
}

/// Routes every change of a batch. `Err` when the body is not a Meta webhook.
pub(crate) fn route(app: &AppRoute, body: &[u8]) -> Result<Routed, String> {
    let env: Envelope = serde_json::from_slice(body).map_err(|e| format!("not a Meta webhook batch: {e}"))?;
    // (destination, [(entry index, change)]) in order of first appearance.
    let mut groups: Vec<(Dest, Vec<(usize, &RawValue)>)> = Vec::new();
    fn push<'a>(groups: &mut Vec<(Dest, Vec<(usize, &'a RawValue)>)>, dest: Dest, at: (usize, &'a RawValue)) {
        match groups.iter_mut().find(|(d, _)| d.same(&dest)) {
            Some((_, list)) => list.push(at),
            None => groups.push((dest, vec![at])),
        }
    }
    for (i, entry) in env.entry.iter().enumerate() {
        let entry_id = entry.id.and_then(id_text);
        for change in &entry.changes {
            let probe: ChangeProbe = serde_json::from_str(change.get()).map_err(|e| format!("bad change: {e}"))?;
            let phone = probe.value.and_then(|v| v.metadata).and_then(|m| m.phone_number_id);
            match phone {
                Some(p) => match app.by_phone(&p) {
                    Some(t) => push(&mut groups, Dest::Account(t.clone()), (i, change)),
                    None => {
                        let note = format!("meta_app={} phone_number_id={p}", app.app.name);
                        push(&mut groups, Dest::Unknown(note), (i, change))
                    }
                },
                None => {
                    let id = entry_id.clone().unwrap_or_default();
                    let targets = app.by_waba(&id);
                    if targets.is_empty() {
                        push(
                            &mut groups,
                            Dest::Unknown(format!("meta_app={} waba_id={id}", app.app.name)),
                            (i, change),
                        );
                    }
                    for t in targets {
                        push(&mut groups, Dest::Account(t.clone()), (i, change));
                    }
                }
            }
        }
    }
    if let [(Dest::Account(_), _)] = groups.as_slice() {
        return Ok(Routed { parts: vec![(groups.remove(0).0, None)] });
    }
    let parts = groups
        .into_iter()
        .map(|(dest, changes)| {
            let payload = envelope(&env, &changes);
            (dest, Some(payload))
        })
        .collect();
    Ok(Routed { parts })
}

fn id_text(raw: &RawValue) -> Option<String> {
    serde_json::from_str::<Cow<str>>(raw.get()).ok().map(Cow::into_owned).or_else(|| Some(raw.get().to_string()))
}

/// Meta's envelope around some of a batch's changes, entries in their original order.
fn envelope(env: &Envelope, changes: &[(usize, &RawValue)]) -> String {
    let mut out = String::with_capacity(256 + changes.iter().map(|(_, c)| c.get().len()).sum::<usize>());
    out.push_str("{\"object\":");
    out.push_str(env.object.map_or("\"whatsapp_business_account\"", |o| o.get()));
    out.push_str(",\"entry\":[");
    let mut current: Option<usize> = None;
    for (i, change) in changes {
        if current != Some(*i) {
            if current.is_some() {
                out.push_str("]},");
            }
            current = Some(*i);
            let e = &env.entry[*i];
            out.push('{');
            if let Some(id) = e.id {
                out.push_str("\"id\":");
                out.push_str(id.get());
                out.push(',');
            }
            if let Some(t) = e.time {
                out.push_str("\"time\":");
                out.push_str(t.get());
                out.push(',');
            }
            out.push_str("\"changes\":[");
        } else {
            out.push(',');
        }
        out.push_str(change.get());
    }
    if current.is_some() {
        out.push_str("]}");
    }
    out.push_str("]}");
    out
}

/// `POST /meta/{app}` and its GET handshake.
pub async fn handle(
    relay: &Relay,
    snap: &Snapshot,
    app_name: &str,
    req: Request<Incoming>,
    conn: Conn,
    info: &mut AccessInfo<'_>,
) -> Response<Body> {
    let Some(app) = snap.table.app(app_name) else {
        return error(ErrorCode::NotFound, "no such meta_app");
    };
    info.account = Some(format!("meta_app:{}", app.app.name).into());
    info.provider = app.app.provider.as_str();
    let checks = Checks {
        verifier: &app.app.verifier,
        provider: app.app.provider,
        verify_token: app.app.verify_token.as_ref(),
        who: ("", &app.app.name),
    };
    let url = |parts: &http::request::Parts| {
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        format!("{}{pq}", snap.config.server.public_url.as_deref().unwrap_or(""))
    };
    let Verified { parts, body, client_ip, now_unix } =
        match inbound::receive(relay, snap, req, conn, checks, url).await {
            Ok(v) => v,
            Err(resp) => return resp,
        };
    if parts.method != Method::POST {
        return error(ErrorCode::MethodNotAllowed, "a Meta app takes POST webhooks and the GET handshake");
    }
    let routed = match route(app, &body) {
        Ok(r) => r,
        Err(msg) => return error(ErrorCode::BadRequest, msg),
    };
    let Some(queue) = relay.queue() else {
        return error(ErrorCode::Unavailable, "the durable queue is not running");
    };
    let mut headers = crate::deliver::forwarded_headers(parts.headers, client_ip, conn.proto);
    // The app's shared token is every tenant's key to this URL: one tenant that learnt it could
    // post batches for another's numbers. Its tenants get the batch, never the token.
    for name in app.app.verifier.secret_headers() {
        headers.remove(name);
    }
    let split = split_headers(&headers);
    let mut events = Vec::new();
    let mut dead = Vec::new();
    for (dest, payload) in routed.parts {
        let (body, headers) = match payload {
            None => (body.clone(), &headers),
            Some(p) => (Bytes::from(p), &split),
        };
        match dest {
            Dest::Account(t) => {
                if let Some(full) = inbound::over_max_queued(queue, &t.motion.motion) {
                    return full;
                }
                if t.motion.motion.tracks_window() {
                    relay.window.record_inbound(&t.motion.motion.name, &t.account, Some("application/json"), &body);
                }
                events.push(part_event(snap, &t, app.app.provider, headers, body, now_unix));
            }
            Dest::Unknown(note) => {
                let path = "/api/whatsapp/accounts/-/notify";
                let part =
                    Part { motion: "", account: "", kind: app.app.provider, path_and_query: path, headers, body, note };
                dead.push(part.into_event(
                    uuid::Uuid::now_v7().to_string(),
                    "POST",
                    Some("application/json"),
                    snap,
                    now_unix,
                ));
            }
        }
    }
    // Unknown numbers first: if the relay dies between the two writes, Meta gets no
    // acknowledgement and redelivers; dedup keys make the second try store each part once.
    for ev in dead {
        let note = ev.note.clone();
        let store = queue.store().clone();
        let info = DeadInfo {
            reason: "no account claims this number".into(),
            status: None,
            answer: Vec::new(),
            attempts: 0,
            died_unix_ms: now_unix as u64 * 1000,
        };
        match tokio::task::spawn_blocking(move || store.append_dead(&ev, info)).await {
            Ok(Ok(_)) => {
                relay.metrics.unknown_numbers.get_or_create(&AppLabels { app: app.app.name.clone() }).inc();
                tracing::warn!(meta_app = %app.app.name, "changes for an unknown number kept as a dead letter ({note})");
            }
            Ok(Err(e)) => return inbound::store_failed("", &e),
            Err(e) => return error(ErrorCode::Unavailable, e.to_string()),
        }
    }
    // Every account's part in one atomic write: a crash can never half-deliver a batch.
    if !events.is_empty() {
        if let Err(e) = queue.accept(events).await {
            return inbound::store_failed("", &e);
        }
    }
    let (content_type, ack) = crate::provider::ack(app.app.provider);
    text(StatusCode::OK, content_type, ack)
}

/// The headers of a split part: Meta's signature no longer applies to the new body.
fn split_headers(headers: &HeaderMap) -> HeaderMap {
    let mut h = headers.clone();
    for name in ["x-hub-signature-256", "x-hub-signature", "x-360dialog-signature", "content-length"] {
        h.remove(name);
    }
    h.insert(X_RELAY_SPLIT, HeaderValue::from_static("true"));
    h
}

/// The stored event for one account's part of a batch.
pub(crate) fn part_event(
    snap: &Snapshot,
    t: &AppTarget,
    kind: ProviderKind,
    headers: &HeaderMap,
    body: Bytes,
    now_unix: i64,
) -> NewEvent {
    let path = format!("/api/whatsapp/accounts/{}/notify", t.account.id);
    let part = Part {
        motion: &t.motion.motion.name,
        account: &t.account.id,
        kind,
        path_and_query: &path,
        headers,
        body,
        note: String::new(),
    };
    part.into_event(uuid::Uuid::now_v7().to_string(), "POST", Some("application/json"), snap, now_unix)
}
