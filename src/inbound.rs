//! The inbound pipeline, in the order of the SPEC's checks: route (done by the caller, 404),
//! size (413), provider verification (401/403), then the delivery mode. A request that fails a
//! check never reaches a Motion.

use crate::config::{Account, Mode, Motion, Secret};
use crate::deliver::{self, Attempt, AttemptError};
use crate::http_util::{Body, Deadline, ErrorCode, error, full, read_body, strip_hop_by_hop, text};
use crate::metrics::{MotionLabels, VerifyLabels};
use crate::provider::{self, AccountVerifier, Inbound, ProviderKind};
use crate::queue::Queue;
use crate::relay::{AccessInfo, Conn, Relay, Snapshot, client_ip};
use crate::routing::MotionRoute;
use crate::store::{Appended, NewEvent, StoreError, dedup_key};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use std::sync::Arc;

/// The routed destination of a webhook.
pub struct Target<'a> {
    pub motion: &'a Arc<MotionRoute>,
    pub account: &'a Arc<Account>,
    /// Where, in the request path, the part Motion is asked for starts.
    pub forward_at: usize,
    pub by_host: bool,
}

/// A webhook that passed the edge checks: read within the limits and verified.
pub(crate) struct Verified {
    pub parts: http::request::Parts,
    pub body: Bytes,
    pub client_ip: std::net::IpAddr,
    pub now_unix: i64,
}

/// Who must have signed a webhook, and how to name it in logs and metrics.
pub(crate) struct Checks<'a> {
    pub verifier: &'a AccountVerifier,
    pub provider: ProviderKind,
    pub verify_token: Option<&'a Secret>,
    /// Motion and account (or app) names for the log line of a refusal.
    pub who: (&'a str, &'a str),
}

/// The checks every webhook path shares, in the SPEC's order after routing: Meta's GET
/// handshake (answered here, never forwarded), size (413), body within `request_timeout`,
/// then verification (401/403). `Err` is the answer to send.
pub(crate) async fn receive(
    relay: &Relay,
    snap: &Snapshot,
    req: Request<Incoming>,
    conn: Conn,
    checks: Checks<'_>,
    signed_url: impl FnOnce(&http::request::Parts) -> String,
) -> Result<Verified, Response<Body>> {
    let server = &snap.config.server;
    if req.method() == Method::GET {
        if let Some(answer) = provider::meta_handshake(req.uri().query(), checks.verify_token.map(|s| s.expose())) {
            return Err(match answer {
                Ok(challenge) => text(StatusCode::OK, "text/plain", challenge),
                Err(r) => error(ErrorCode::Forbidden, r.message),
            });
        }
    }

    let (parts, body) = read_body(req, server.max_body, server.request_timeout).await?;

    let client_ip = client_ip(conn.peer.ip(), &parts.headers, &server.trusted_proxies);
    // Only Twilio signs the URL it called; building it costs a format per request.
    let url = if checks.verifier.reads_url() { signed_url(&parts) } else { String::new() };
    let now_unix =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let inbound = Inbound {
        method: &parts.method,
        url: &url,
        query: parts.uri.query(),
        headers: &parts.headers,
        body: &body,
        client_ip,
        now_unix,
    };
    if let Err(r) = checks.verifier.verify(&inbound) {
        let provider = checks.provider.as_str();
        let labels = VerifyLabels { provider: provider.to_string(), reason: r.reason.to_string() };
        relay.metrics.verify_failures.get_or_create(&labels).inc();
        let (motion, account) = checks.who;
        tracing::warn!(motion, account, provider, reason = r.reason, "webhook refused: {}", r.message);
        let code = if r.status == 403 { ErrorCode::Forbidden } else { ErrorCode::BadSignature };
        return Err(error(code, r.message));
    }
    Ok(Verified { parts, body, client_ip, now_unix })
}

/// A webhook for one account's subtree.
pub async fn handle(
    relay: &Relay,
    snap: &Snapshot,
    t: Target<'_>,
    req: Request<Incoming>,
    conn: Conn,
    info: &mut AccessInfo<'_>,
) -> Response<Body> {
    let account = t.account;
    if let Some(app) = &account.app {
        // Its app's secret verifies this account: on this path a batch signed for the app (for
        // another tenant's number, say) would reach this tenant unchecked. Meta posts an app's
        // events to the app's URL, which routes each change by its number.
        return error(
            ErrorCode::NotFound,
            format!("account {} receives its webhooks on the Meta app's URL, /meta/{app}", account.id),
        );
    }
    let checks = Checks {
        verifier: &account.verifier,
        provider: account.provider,
        verify_token: account.verify_token.as_ref(),
        who: (&t.motion.motion.name, &account.id),
    };
    let Verified { parts, body, client_ip: ip, now_unix } =
        match receive(relay, snap, req, conn, checks, |parts| signed_url(snap, parts, conn, t.by_host)).await {
            Ok(v) => v,
            Err(resp) => return resp,
        };
    let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    // Verified: the customers who wrote open their 24-hour window, whatever the delivery mode.
    if t.motion.motion.tracks_window() {
        let ct = parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        relay.window.record_inbound(&t.motion.motion.name, account, ct, &body);
    }

    let forward = &path_and_query[t.forward_at..];
    let delivery_id = uuid::Uuid::now_v7().to_string();
    info.delivery_id = Some(delivery_id.clone());
    let content_type = parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
    let headers = deliver::forwarded_headers(parts.headers, ip, conn.proto);
    match t.motion.motion.mode {
        Mode::Direct => {
            direct(t.motion, parts.method.clone(), forward, headers, body, &delivery_id, account.provider.as_str())
                .await
        }
        mode @ (Mode::Queue | Mode::Auto) => {
            let part = Part {
                motion: &t.motion.motion.name,
                account: &account.id,
                kind: account.provider,
                path_and_query: forward,
                headers: &headers,
                body,
                note: String::new(),
            };
            let ev = part.into_event(delivery_id, parts.method.as_str(), content_type.as_deref(), snap, now_unix);
            queued(relay, snap, t.motion, account.provider, ev, mode == Mode::Auto).await
        }
    }
}

/// What becomes one stored event.
pub(crate) struct Part<'a> {
    pub motion: &'a str,
    pub account: &'a str,
    pub kind: ProviderKind,
    pub path_and_query: &'a str,
    pub headers: &'a http::HeaderMap,
    pub body: Bytes,
    pub note: String,
}

impl Part<'_> {
    /// The stored event, with its conversation (ordering) and dedup keys taken from the payload.
    pub fn into_event(
        self,
        delivery_id: String,
        method: &str,
        content_type: Option<&str>,
        snap: &Snapshot,
        now_unix: i64,
    ) -> NewEvent {
        let keys = provider::payload_keys(self.kind, content_type, &self.body);
        let now_ms = now_unix as u64 * 1000;
        NewEvent {
            delivery_id,
            motion: self.motion.to_string(),
            account: self.account.to_string(),
            dedup_key: Some(dedup_key(
                self.motion,
                self.account,
                keys.event_id.as_deref(),
                &[method.as_bytes(), self.path_and_query.as_bytes(), &self.body],
            )),
            conversation: match keys.conversation {
                Some(c) => format!("{}\u{1f}{c}", self.account),
                None => self.account.to_string(),
            },
            provider: self.kind.as_str().to_string(),
            method: method.to_string(),
            path_and_query: self.path_and_query.to_string(),
            headers: self.headers.iter().map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec())).collect(),
            body: self.body,
            received_unix_ms: now_ms,
            dedup_expires_unix_ms: now_ms + snap.config.delivery.dedup_window.as_millis() as u64,
            note: self.note,
        }
    }
}

/// `queue` and `auto` modes: stored durably, then acknowledged with the provider's expected
/// answer, or, in `auto` mode, with Motion's own answer when its first attempt comes back
/// within `auto_budget`.
async fn queued(
    relay: &Relay,
    snap: &Snapshot,
    route: &MotionRoute,
    kind: ProviderKind,
    ev: NewEvent,
    auto: bool,
) -> Response<Body> {
    let started = std::time::Instant::now();
    let motion = &route.motion;
    let Some(queue) = relay.queue() else {
        return error(ErrorCode::Unavailable, "the durable queue is not running");
    };
    if let Some(full) = over_max_queued(queue, motion) {
        return full;
    }
    let labels = MotionLabels { motion: motion.name.clone() };
    let accepted = if auto {
        queue.accept_waiting(ev).await.map(|(appended, rx)| (appended, Some(rx)))
    } else {
        queue.accept(vec![ev]).await.map(|mut r| (r.remove(0), None))
    };
    let (appended, waiter) = match accepted {
        Ok(x) => x,
        Err(e) => return store_failed(&motion.name, &e),
    };
    if appended == Appended::Duplicate {
        relay.metrics.dedup_hits.get_or_create(&labels).inc();
    }
    if let Some(waiter) = waiter {
        if let Ok(Ok(answer)) = tokio::time::timeout(snap.config.delivery.auto_budget, waiter).await {
            let mut resp = Response::new(full(answer.body));
            *resp.status_mut() = answer.status;
            *resp.headers_mut() = answer.headers;
            return resp;
        }
    }
    relay.metrics.ack_latency.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    let (content_type, ack) = provider::ack(kind);
    text(StatusCode::OK, content_type, ack)
}

/// 503 when a Motion already has `max_queued` events waiting (the provider retries later).
pub(crate) fn over_max_queued(queue: &Queue, motion: &Motion) -> Option<Response<Body>> {
    (queue.depth(&motion.name) >= motion.max_queued).then(|| {
        error(ErrorCode::Unavailable, format!("motion {} has max_queued events waiting; retry later", motion.name))
    })
}

/// 503 when the store refused a write: never acknowledge what is not on disk.
pub(crate) fn store_failed(motion: &str, e: &StoreError) -> Response<Body> {
    tracing::error!(motion, "could not store a webhook: {e}");
    error(ErrorCode::Unavailable, "the relay cannot store events right now; retry later")
}

/// `direct` mode: Motion's answer goes back as it is.
async fn direct(
    motion: &MotionRoute,
    method: Method,
    forward: &str,
    headers: http::HeaderMap,
    body: Bytes,
    delivery_id: &str,
    provider: &'static str,
) -> Response<Body> {
    let attempt = Attempt {
        motion: &motion.motion,
        client: &motion.client(),
        method,
        path_and_query: forward,
        headers,
        body,
        delivery_id,
        attempt: 1,
        provider,
        timeout: motion.motion.timeout,
    };
    // `timeout` bounds the whole exchange, Motion's answer body included.
    let deadline = tokio::time::Instant::now() + motion.motion.timeout;
    match deliver::send(attempt).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Either::Right(Deadline::new(body, deadline)))
        }
        Err(e @ AttemptError::Unreachable(_)) => {
            tracing::warn!(motion = %motion.motion.name, delivery = delivery_id, "{e}");
            error(ErrorCode::UpstreamUnreachable, format!("Motion server {} is unreachable", motion.motion.name))
        }
        Err(e @ AttemptError::Timeout(_)) => {
            tracing::warn!(motion = %motion.motion.name, delivery = delivery_id, "{e}");
            error(ErrorCode::UpstreamTimeout, e.to_string())
        }
    }
}

/// The URL the provider called, as Twilio signs it (SPEC "Details"): `public_url` + path and query
/// for prefix routes; the scheme of `public_url` + `://` + Host + path and query for host routes.
/// Without `public_url`, the listener's scheme and the Host stand in. Never the socket address.
fn signed_url(snap: &Snapshot, parts: &http::request::Parts, conn: Conn, by_host: bool) -> String {
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let public = snap.config.server.public_url.as_deref();
    let host = || {
        parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| parts.headers.get(http::header::HOST).and_then(|v| v.to_str().ok()))
            .unwrap_or("")
    };
    match (public, by_host) {
        (Some(p), false) => format!("{p}{pq}"),
        (Some(p), true) => format!("{}://{}{pq}", p.split("://").next().unwrap_or("https"), host()),
        (None, _) => format!("{}://{}{pq}", conn.proto, host()),
    }
}
