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

use crate::event::{Part, app_part, new_delivery_id};
use crate::http_util::{Body, ErrorCode, Failure, fail, text};
use crate::inbound::{self, Checks, Stop, Verified};
use crate::metrics::AppLabels;
use crate::provider::ProviderKind;
use crate::request::{AccessInfo, Conn};
use crate::routing::{AppRoute, AppTarget, Snapshot};
use crate::services::Services;
use crate::store::{DeadInfo, DeadReason, Unowned, UnownedKey};
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
    /// No account claims it: kept as a dead letter that says where it came from.
    Unknown(Unowned),
}

impl Dest {
    pub(crate) fn same(&self, other: &Dest) -> bool {
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
    // serde also reads a struct from a JSON array, field by field in order: `[2]` would pass as
    // an envelope without entries (and be acknowledged, storing nothing). Meta's is an object.
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err("not a Meta webhook batch: not a JSON object".into());
    }
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
                        let from =
                            Unowned { app: app.app.name.clone(), key: UnownedKey::PhoneNumberId(p.into_owned()) };
                        push(&mut groups, Dest::Unknown(from), (i, change))
                    }
                },
                None => {
                    let id = entry_id.clone().unwrap_or_default();
                    let targets = app.by_waba(&id);
                    if targets.is_empty() {
                        let from = Unowned { app: app.app.name.clone(), key: UnownedKey::WabaId(id) };
                        push(&mut groups, Dest::Unknown(from), (i, change));
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
    services: &Services,
    snap: &Snapshot,
    app_name: &str,
    req: Request<Incoming>,
    conn: Conn,
    info: &mut AccessInfo<'_>,
) -> Result<Response<Body>, Failure> {
    let Some(app) = snap.table.app(app_name) else {
        return fail(ErrorCode::NotFound, "no such meta_app");
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
    let Verified { parts, body, client_ip } = match inbound::receive(services, snap, req, conn, checks, url).await {
        Ok(v) => v,
        Err(Stop::Answer(resp)) => return Ok(resp),
        Err(Stop::Refused(f)) => return Err(f),
    };
    if parts.method != Method::POST {
        return fail(ErrorCode::MethodNotAllowed, "a Meta app takes POST webhooks and the GET handshake");
    }
    let routed = route(app, &body).map_err(|msg| Failure::new(ErrorCode::BadRequest, msg))?;
    let queue = &services.queue;
    let mut headers = crate::deliver::forwarded_headers(parts.headers, &parts.uri, client_ip, conn.scheme);
    // The app's shared token is every tenant's key to this URL: one tenant that learnt it could
    // post batches for another's numbers. Its tenants get the batch, never the token.
    for name in app.app.verifier.secret_headers() {
        headers.remove(name);
    }
    let split = split_headers(&headers);
    let (now, dedup_window) = (services.now_unix_ms(), snap.config.delivery.dedup_window);
    let kind = app.app.provider;
    let mut events = Vec::new();
    let mut accepted = Vec::new();
    let mut dead = Vec::new();
    for (dest, payload) in routed.parts {
        let (body, headers) = match payload {
            None => (body.clone(), &headers),
            Some(p) => (Bytes::from(p), &split),
        };
        // Read once: for the event's keys and the customers who open their window.
        let payload = kind.payload(Some("application/json"), &body);
        match dest {
            Dest::Account(t) => {
                // No rate limit here: the batch is one webhook of the operator's own app, stored
                // atomically; refusing it for one tenant's limit would refuse every tenant in it.
                inbound::over_max_queued(queue, &t.motion.motion)?;
                if t.motion.motion.tracks_window() {
                    services.window.record_inbound(&t.motion.motion.name, &t.account.id, &payload.senders);
                }
                events.push(app_part(&t, kind, headers, body, &payload, dedup_window, now));
                accepted.push(t);
            }
            Dest::Unknown(from) => {
                let part = Part {
                    motion: "",
                    account: "",
                    kind,
                    method: Method::POST,
                    path_and_query: "/api/whatsapp/accounts/-/notify",
                    headers,
                    body,
                    payload: &payload,
                    unowned: Some(from),
                };
                dead.push(part.into_event(new_delivery_id(), dedup_window, now));
            }
        }
    }
    // Unknown numbers first: if the relay dies between the two writes, Meta gets no
    // acknowledgement and redelivers; dedup keys make the second try store each part once.
    for ev in dead {
        let from = ev.unowned.as_ref().map(|u| u.to_string()).unwrap_or_default();
        let delivery = ev.delivery_id.clone();
        let store = queue.store().clone();
        let info = DeadInfo {
            reason: DeadReason::NoAccount,
            status: None,
            answer: Vec::new(),
            attempts: 0,
            died_unix_ms: now,
        };
        match tokio::task::spawn_blocking(move || store.append_dead(&ev, info)).await {
            Ok(Ok(_)) => {
                services.metrics.unknown_numbers.get_or_create(&AppLabels { app: app.app.name.clone() }).inc();
                tracing::warn!(meta_app = %app.app.name, delivery, "changes for an unknown number kept as a dead letter ({from})");
            }
            Ok(Err(e)) => return Err(inbound::store_failed("", &delivery, &e)),
            Err(e) => return fail(ErrorCode::Unavailable, e.to_string()),
        }
    }
    // Every account's part in one atomic write: a crash can never half-deliver a batch.
    if !events.is_empty() {
        let ids: Vec<String> = events.iter().map(|e| e.delivery_id.clone()).collect();
        queue.accept(events).await.map_err(|e| inbound::store_failed("", &ids.join(","), &e))?;
        for t in &accepted {
            services.count_accepted(&t.motion.motion.name, &t.account);
        }
    }
    let (content_type, ack) = kind.ack();
    Ok(text(StatusCode::OK, content_type, ack))
}

/// The headers of a split part: the provider's signature no longer applies to the new body (any
/// Cloud API provider's: an app of one kind may be sent the other's headers too).
fn split_headers(headers: &HeaderMap) -> HeaderMap {
    let mut h = headers.clone();
    h.remove(http::header::CONTENT_LENGTH);
    for name in ProviderKind::all().filter(|k| k.cloud_api()).flat_map(|k| k.signature_headers()) {
        h.remove(*name);
    }
    h.insert(X_RELAY_SPLIT, HeaderValue::from_static("true"));
    h
}
