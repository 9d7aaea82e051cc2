//! The inbound pipeline, in the order of the SPEC's checks: route (done by the caller, 404),
//! size (413), provider verification (401/403), then the delivery mode. A request that fails a
//! check never reaches a Motion.

use crate::config::{Account, Mode};
use crate::deliver::{self, Attempt, AttemptError};
use crate::http_util::{Body, ErrorCode, error, strip_hop_by_hop, text};
use crate::metrics::VerifyLabels;
use crate::provider::{self, Inbound};
use crate::relay::{AccessInfo, Conn, Relay, Snapshot, client_ip};
use crate::routing::MotionRoute;
use crate::store::{Appended, NewEvent, dedup_key};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Limited};
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

pub async fn handle(
    relay: &Relay,
    snap: &Snapshot,
    t: Target<'_>,
    req: Request<Incoming>,
    conn: Conn,
    info: &mut AccessInfo,
) -> Response<Body> {
    let server = &snap.config.server;
    let account = t.account;

    // Meta's subscription handshake is answered here and never reaches Motion.
    if req.method() == Method::GET {
        if let Some(answer) =
            provider::meta_handshake(req.uri().query(), account.verify_token.as_ref().map(|s| s.expose()))
        {
            return match answer {
                Ok(challenge) => text(StatusCode::OK, "text/plain", challenge),
                Err(r) => error(ErrorCode::Forbidden, r.message),
            };
        }
    }

    // Size before anything is read: a declared length over the limit is refused at once.
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > server.max_body) {
        return too_large(server.max_body);
    }
    let (parts, body) = req.into_parts();
    let limit = usize::try_from(server.max_body).unwrap_or(usize::MAX);
    let body = match tokio::time::timeout(server.request_timeout, Limited::new(body, limit).collect()).await {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(server.max_body),
        Ok(Err(e)) => return error(ErrorCode::BadRequest, format!("could not read the request body: {e}")),
        Err(_) => return error(ErrorCode::RequestTimeout, "the request body did not arrive within request_timeout"),
    };

    let ip = client_ip(conn.peer.ip(), &parts.headers, &server.trusted_proxies);
    let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let url = signed_url(snap, &parts, conn, t.by_host, path_and_query);
    let now_unix =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let inbound = Inbound {
        method: &parts.method,
        url: &url,
        query: parts.uri.query(),
        headers: &parts.headers,
        body: &body,
        client_ip: ip,
        now_unix,
    };
    if let Err(r) = account.verifier.verify(&inbound) {
        relay
            .metrics
            .verify_failures
            .get_or_create(&VerifyLabels {
                provider: account.provider.as_str().to_string(),
                reason: r.reason.to_string(),
            })
            .inc();
        tracing::warn!(motion = %t.motion.motion.name, account = %account.id, provider = account.provider.as_str(), reason = r.reason, "webhook refused: {}", r.message);
        let code = if r.status == 403 { ErrorCode::Forbidden } else { ErrorCode::BadSignature };
        return error(code, r.message);
    }

    // Verified: the customers who wrote open their 24-hour window, whatever the delivery mode.
    if t.motion.motion.window_policy != crate::config::WindowPolicy::Off {
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
        Mode::Queue | Mode::Auto => {
            let Some(queue) = relay.queue() else {
                return error(ErrorCode::Unavailable, "the durable queue is not running");
            };
            let motion = &t.motion.motion;
            if queue.depth(&motion.name) >= motion.max_queued {
                return error(
                    ErrorCode::Unavailable,
                    format!("motion {} has max_queued events waiting; retry later", motion.name),
                );
            }
            let kind = account.provider;
            let keys = provider::payload_keys(kind, content_type.as_deref(), &body);
            let now_ms = now_unix as u64 * 1000;
            let dedup_window = snap.config.delivery.dedup_window;
            let ev = NewEvent {
                delivery_id,
                motion: motion.name.clone(),
                account: account.id.clone(),
                dedup_key: Some(dedup_key(&account.id, keys.event_id.as_deref(), &body)),
                conversation: match keys.conversation {
                    Some(c) => format!("{}\u{1f}{c}", account.id),
                    None => account.id.clone(),
                },
                provider: kind.as_str().to_string(),
                method: parts.method.as_str().to_string(),
                path_and_query: forward.to_string(),
                headers: headers.iter().map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec())).collect(),
                body,
                received_unix_ms: now_ms,
                dedup_expires_unix_ms: now_ms + dedup_window.as_millis() as u64,
                note: String::new(),
            };
            match queue.accept(vec![ev]).await {
                Ok(results) => {
                    if results.iter().any(|r| matches!(r, Appended::Duplicate)) {
                        tracing::debug!(motion = %motion.name, account = %account.id, "redelivery acknowledged, not stored again");
                    }
                    let (content_type, ack) = provider::ack(kind);
                    text(StatusCode::OK, content_type, ack)
                }
                Err(e) => {
                    tracing::error!(motion = %motion.name, "could not store a webhook: {e}");
                    error(ErrorCode::Unavailable, "the relay cannot store events right now; retry later")
                }
            }
        }
    }
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
        client: &motion.client,
        method,
        path_and_query: forward,
        headers,
        body,
        delivery_id,
        attempt: 1,
        provider,
        timeout: motion.motion.timeout,
    };
    match deliver::send(attempt).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Either::Right(body))
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
fn signed_url(snap: &Snapshot, parts: &http::request::Parts, conn: Conn, by_host: bool, pq: &str) -> String {
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

fn too_large(max: u64) -> Response<Body> {
    error(ErrorCode::TooLarge, format!("the body is larger than max_body ({max} bytes)"))
}
