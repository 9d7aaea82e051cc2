//! The inbound pipeline, in the order of the SPEC's checks: route (done by the caller, 404),
//! size (413), provider verification (401/403), then the delivery mode: `direct` hands the
//! webhook to Motion and passes its answer back; `queue` and `auto` store it (`event`, `queue`)
//! and acknowledge. A request that fails a check never reaches a Motion.

use crate::config::{Account, Mode, Motion, Secret};
use crate::deliver::{self, Attempt, AttemptError};
use crate::event::{Part, new_delivery_id};
use crate::http_util::{Body, Deadline, ErrorCode, Failure, fail, full, read_body, streamed, strip_hop_by_hop, text};
use crate::metrics::{MotionLabels, VerifyLabels};
use crate::provider::{self, AccountVerifier, Inbound, ProviderKind};
use crate::queue::Queue;
use crate::request::{AccessInfo, Conn, client_ip};
use crate::routing::{MotionRoute, Snapshot};
use crate::services::Services;
use crate::store::{Appended, NewEvent, StoreError};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
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
}

/// Who must have signed a webhook, and how to name it in logs and metrics.
pub(crate) struct Checks<'a> {
    pub verifier: &'a AccountVerifier,
    pub provider: ProviderKind,
    pub verify_token: Option<&'a Secret>,
    /// Motion and account (or app) names for the log line of a refusal.
    pub who: (&'a str, &'a str),
}

/// What a request gets instead of going on: an answer (Meta's handshake) or a refusal.
pub(crate) enum Stop {
    Answer(Response<Body>),
    Refused(Failure),
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Stop {
        Stop::Refused(f)
    }
}

/// The checks every webhook path shares, in the SPEC's order after routing: Meta's GET
/// handshake (answered here, never forwarded), size (413), body within `request_timeout`,
/// then verification (401/403).
pub(crate) async fn receive(
    services: &Services,
    snap: &Snapshot,
    req: Request<Incoming>,
    conn: Conn,
    checks: Checks<'_>,
    signed_url: impl FnOnce(&http::request::Parts) -> String,
) -> Result<Verified, Stop> {
    let server = &snap.config.server;
    if req.method() == Method::GET {
        if let Some(answer) = provider::meta_handshake(req.uri().query(), checks.verify_token.map(|s| s.expose())) {
            return match answer {
                Ok(challenge) => Err(Stop::Answer(text(StatusCode::OK, "text/plain", challenge))),
                Err(r) => Err(Failure::new(ErrorCode::Forbidden, r.message).into()),
            };
        }
    }

    let (parts, body) = read_body(req, server.max_body, server.request_timeout).await?;

    let client_ip = client_ip(conn.peer.ip(), &parts.headers, &server.trusted_proxies);
    // Only Twilio signs the URL it called; building it costs a format per request.
    let url = if checks.verifier.reads_url() { signed_url(&parts) } else { String::new() };
    let inbound = Inbound {
        url: &url,
        query: parts.uri.query(),
        headers: &parts.headers,
        body: &body,
        client_ip,
        now_unix: (services.now_unix_ms() / 1000) as i64,
    };
    if let Err(r) = checks.verifier.verify(&inbound) {
        let labels = VerifyLabels { provider: checks.provider, reason: r.reason };
        services.metrics.verify_failures.get_or_create(&labels).inc();
        let (motion, account) = checks.who;
        let provider = checks.provider.as_str();
        tracing::warn!(motion, account, provider, reason = r.reason, "webhook refused: {}", r.message);
        let code = if r.status == 403 { ErrorCode::Forbidden } else { ErrorCode::BadSignature };
        return Err(Failure::new(code, r.message).into());
    }
    Ok(Verified { parts, body, client_ip })
}

/// A webhook for one account's subtree.
pub async fn handle(
    services: &Services,
    snap: &Snapshot,
    t: Target<'_>,
    req: Request<Incoming>,
    conn: Conn,
    info: &mut AccessInfo<'_>,
) -> Result<Response<Body>, Failure> {
    let account = t.account;
    if let Some(app) = &account.app {
        // Its app's secret verifies this account: on this path a batch signed for the app (for
        // another tenant's number, say) would reach this tenant unchecked. Meta posts an app's
        // events to the app's URL, which routes each change by its number.
        return fail(
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
    let signed = |parts: &http::request::Parts| signed_url(snap, parts, conn, t.by_host);
    let Verified { parts, body, client_ip: ip } = match receive(services, snap, req, conn, checks, signed).await {
        Ok(v) => v,
        Err(Stop::Answer(resp)) => return Ok(resp),
        Err(Stop::Refused(f)) => return Err(f),
    };
    let motion = &t.motion.motion;
    admit(services, t.motion)?;
    let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let forward = &path_and_query[t.forward_at..];
    let delivery_id = new_delivery_id();
    info.delivery_id = Some(delivery_id.clone());
    let content_type = parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let queued = motion.mode != Mode::Direct;
    // The payload is read once, for what it needs: the keys of a stored event, the customers
    // who open their 24-hour window (whatever the mode).
    let payload = if queued || motion.tracks_window() {
        account.provider.payload(content_type, &body)
    } else {
        Default::default()
    };
    if motion.tracks_window() {
        services.window.record_inbound(&motion.name, &account.id, &payload.senders);
    }
    let headers = deliver::forwarded_headers(parts.headers, &parts.uri, ip, conn.scheme);
    if !queued {
        let now_unix = services.now_unix_ms() / 1000;
        return direct(t.motion, parts.method, forward, headers, body, &delivery_id, account.provider, now_unix).await;
    }
    let part = Part {
        motion: &motion.name,
        account: &account.id,
        kind: account.provider,
        method: parts.method,
        path_and_query: forward,
        headers: &headers,
        body,
        payload: &payload,
        unowned: None,
    };
    let ev = part.into_event(delivery_id, snap.config.delivery.dedup_window, services.now_unix_ms());
    queued_answer(services, snap, t.motion, account.provider, ev, motion.mode == Mode::Auto).await
}

/// `queue` and `auto` modes: stored durably, then acknowledged with the provider's expected
/// answer, or, in `auto` mode, with Motion's own answer when its first attempt comes back
/// within `auto_budget`.
async fn queued_answer(
    services: &Services,
    snap: &Snapshot,
    route: &MotionRoute,
    kind: ProviderKind,
    ev: NewEvent,
    auto: bool,
) -> Result<Response<Body>, Failure> {
    let started = std::time::Instant::now();
    let motion = &route.motion;
    let queue = &services.queue;
    over_max_queued(queue, motion)?;
    let labels = MotionLabels { motion: motion.name.clone() };
    let delivery = ev.delivery_id.clone();
    let accepted = if auto {
        queue.accept_waiting(ev).await.map(|(appended, rx)| (appended, Some(rx)))
    } else {
        queue.accept(vec![ev]).await.map(|mut r| (r.remove(0), None))
    };
    let (appended, waiter) = accepted.map_err(|e| store_failed(&motion.name, &delivery, &e))?;
    if appended == Appended::Duplicate {
        services.metrics.dedup_hits.get_or_create(&labels).inc();
    }
    if let Some(waiter) = waiter {
        if let Ok(Ok(answer)) = tokio::time::timeout(snap.config.delivery.auto_budget, waiter).await {
            let mut resp = Response::new(full(answer.body));
            *resp.status_mut() = answer.status;
            *resp.headers_mut() = answer.headers;
            return Ok(resp);
        }
    }
    services.metrics.ack_latency.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    let (content_type, ack) = kind.ack();
    Ok(text(StatusCode::OK, content_type, ack))
}

/// 429 when a verified webhook passes its Motion's `rate_limit`: nothing is stored or
/// forwarded, and other Motions are not slowed.
pub(crate) fn admit(services: &Services, route: &MotionRoute) -> Result<(), Failure> {
    route.admit().map_err(|wait| {
        let motion = &route.motion.name;
        services.metrics.rate_limited.get_or_create(&MotionLabels { motion: motion.clone() }).inc();
        tracing::debug!(motion = %motion, "webhook refused: rate_limit reached");
        Failure::new(ErrorCode::RateLimited, format!("motion {motion} is over its rate_limit; retry later"))
            .retry_after(wait)
    })
}

/// 503 when a Motion already has `max_queued` events, or `max_queued_bytes` bytes, waiting
/// (the provider retries later).
pub(crate) fn over_max_queued(queue: &Queue, motion: &Motion) -> Result<(), Failure> {
    let (events, bytes) = queue.waiting(&motion.name);
    if events >= motion.max_queued {
        return fail(
            ErrorCode::Unavailable,
            format!("motion {} has max_queued events waiting; retry later", motion.name),
        );
    }
    if bytes >= motion.max_queued_bytes {
        return fail(
            ErrorCode::Unavailable,
            format!("motion {} has max_queued_bytes waiting; retry later", motion.name),
        );
    }
    Ok(())
}

/// 503 when the store refused a write: never acknowledge what is not on disk.
pub(crate) fn store_failed(motion: &str, delivery: &str, e: &StoreError) -> Failure {
    tracing::error!(motion, delivery, "could not store a webhook: {e}");
    Failure::new(ErrorCode::Unavailable, "the relay cannot store events right now; retry later")
}

/// `direct` mode: Motion's answer goes back as it is.
#[allow(clippy::too_many_arguments)]
async fn direct(
    motion: &MotionRoute,
    method: Method,
    forward: &str,
    headers: http::HeaderMap,
    body: Bytes,
    delivery_id: &str,
    provider: ProviderKind,
    now_unix: u64,
) -> Result<Response<Body>, Failure> {
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
        now_unix,
    };
    // `timeout` bounds the whole exchange, Motion's answer body included.
    let deadline = tokio::time::Instant::now() + motion.motion.timeout;
    match deliver::send(attempt).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Ok(Response::from_parts(parts, streamed(Deadline::new(body, deadline))))
        }
        Err(e @ AttemptError::Unreachable(_)) => {
            tracing::warn!(motion = %motion.motion.name, delivery = delivery_id, "{e}");
            fail(ErrorCode::UpstreamUnreachable, format!("Motion server {} is unreachable", motion.motion.name))
        }
        Err(e @ AttemptError::Timeout(_)) => {
            tracing::warn!(motion = %motion.motion.name, delivery = delivery_id, "{e}");
            fail(ErrorCode::UpstreamTimeout, e.to_string())
        }
    }
}

/// The URL the provider called, as Twilio signs it (SPEC "Details"): `public_url` + path and query
/// for prefix routes; the scheme of `public_url` + `://` + Host + path and query for host routes.
/// Without `public_url`, the listener's scheme and the Host stand in. Never the socket address.
fn signed_url(snap: &Snapshot, parts: &http::request::Parts, conn: Conn, by_host: bool) -> String {
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let public = snap.config.server.public_url.as_deref();
    let host = || crate::request::host(&parts.uri, &parts.headers).unwrap_or("");
    match (public, by_host) {
        (Some(p), false) => format!("{p}{pq}"),
        (Some(p), true) => format!("{}://{}{pq}", p.split("://").next().unwrap_or("https"), host()),
        (None, _) => format!("{}://{}{pq}", conn.scheme.as_str(), host()),
    }
}
