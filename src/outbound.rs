//! The outbound pipeline (SPEC "Outbound"): a Motion server sends through the relay to its
//! provider's API, because it may only talk to one whitelisted host.
//!
//! In order, each failing step answering with the SPEC's JSON error and never reaching the
//! provider: the Motion's `allow_from` (403), its `outbound_token` in `X-Relay-Token`, compared
//! in constant time (401), the account's endpoint allow-list (`paths`, 403), the body read
//! bounded by `max_body` (413), the 24-hour window under `enforce` (422). Then the call goes to
//! the account's API base (nowhere else: the relay is not an open proxy) through the one pooled
//! client, authenticated with the relay's credentials for the account where it holds them, and
//! the provider's answer comes back as it is (streamed; hop-by-hop headers dropped).
//!
//! The token check is per Motion: a route names one Motion, and only that Motion's token is
//! compared, so one Motion's token can never send for another Motion's accounts.

use crate::config::{Account, Motion, WindowPolicy};
use crate::http_util::{Body, Deadline, ErrorCode, Failure, error_chain, fail, read_body, streamed, strip_hop_by_hop};
use crate::metrics::{ClassLabels, OutboundLabels, StatusClass, WindowAction, WindowLabels};
use crate::provider::sinch::oauth::TokenError;
use crate::provider::{OutboundAuth, ct_eq};
use crate::request::{AccessInfo, Conn, client_ip};
use crate::routing::{MotionRoute, Snapshot};
use crate::services::Services;
use crate::window::{self, State};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use std::sync::Arc;

pub const X_RELAY_TOKEN: HeaderName = HeaderName::from_static("x-relay-token");
pub const X_RELAY_WINDOW: HeaderName = HeaderName::from_static("x-relay-window");

/// Where a route sends.
pub struct Target<'a> {
    pub motion: &'a Arc<MotionRoute>,
    pub account: &'a Arc<Account>,
    /// Byte offset in the request path where the provider path starts.
    pub rest_at: usize,
}

/// A send from a Motion, counted in `outbound_requests` by the status it got, whoever answered.
pub async fn handle(
    services: &Services,
    snap: &Snapshot,
    t: Target<'_>,
    req: Request<Incoming>,
    conn: Conn,
    _info: &mut AccessInfo<'_>,
) -> Result<Response<Body>, Failure> {
    let result = send(services, snap, &t, req, conn).await;
    let status = match &result {
        Ok(resp) => resp.status().as_u16(),
        Err(f) => f.status().as_u16(),
    };
    let labels = OutboundLabels { motion: t.motion.motion.name.clone(), provider: t.account.provider, status };
    services.metrics.outbound_requests.get_or_create(&labels).inc();
    let class = ClassLabels { motion: t.motion.motion.name.clone(), class: StatusClass::of(status) };
    services.metrics.outbound_classes.get_or_create(&class).inc();
    result
}

async fn send(
    services: &Services,
    snap: &Snapshot,
    t: &Target<'_>,
    req: Request<Incoming>,
    conn: Conn,
) -> Result<Response<Body>, Failure> {
    let motion = &t.motion.motion;
    let account = t.account;
    let provider = account.provider.as_str();
    let server = &snap.config.server;

    // Who may call: the network first (cheap, and says nothing about the token to strangers).
    let ip = client_ip(conn.peer.ip(), req.headers(), &server.trusted_proxies);
    if !motion.allow_from.is_empty() && !motion.allow_from.iter().any(|n| n.contains(&ip)) {
        tracing::warn!(motion = %motion.name, %ip, "outbound send refused: address not in the motion's allow_from");
        return fail(ErrorCode::Forbidden, format!("{ip} may not send for motion {} (allow_from)", motion.name));
    }
    if let Err(msg) = check_token(motion, req.headers()) {
        tracing::warn!(motion = %motion.name, %ip, "outbound send refused: {msg}");
        return fail(ErrorCode::Unauthorized, msg);
    }

    // Where to: the account's endpoints under its provider base, and nothing else.
    let path = &req.uri().path()[t.rest_at..];
    if !account.outbound.paths.allows(req.method(), path) {
        tracing::warn!(motion = %motion.name, account = %account.id, method = %req.method(), "outbound send refused: not one of the account's endpoints");
        tracing::debug!(path, "refused outbound path");
        return fail(
            ErrorCode::Forbidden,
            format!(
                "{} {path} is not one of account {}'s {provider} messaging endpoints; an operator may widen them with outbound_paths",
                req.method(),
                account.id
            ),
        );
    }
    let Some(base) = account.outbound.api_base(account.provider) else {
        return fail(
            ErrorCode::Forbidden,
            format!("account {} ({provider}) has no api_base: set one to send through the relay", account.id),
        );
    };
    let uri = match req.uri().query() {
        Some(q) => format!("{base}{path}?{q}"),
        None => format!("{base}{path}"),
    };
    let uri: http::Uri =
        uri.parse().map_err(|e| Failure::new(ErrorCode::BadRequest, format!("cannot build the provider URL: {e}")))?;

    // The body, bounded: the window check reads it, and it is sent in one piece.
    let (parts, body) = read_body(req, server.max_body, server.request_timeout).await?;

    // The 24-hour window, for free-form sends to a number the relay can read.
    let mut window_closed = false;
    if motion.window_policy != WindowPolicy::Off && parts.method == http::Method::POST {
        let ct = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        if let Some(send) = window::classify(account.provider, ct, &body).filter(|s| !s.template) {
            if services.window.state(&motion.name, &account.id, &send.recipient).await == State::Closed {
                window_closed = true;
                let action = if motion.window_policy == WindowPolicy::Enforce {
                    WindowAction::Refused
                } else {
                    WindowAction::Warned
                };
                let labels = WindowLabels { motion: motion.name.clone(), provider: account.provider, action };
                services.metrics.window_closed.get_or_create(&labels).inc();
                tracing::info!(motion = %motion.name, account = %account.id, action = action.as_str(), "free-form send outside the customer service window");
                if action == WindowAction::Refused {
                    return fail(
                        ErrorCode::OutsideWindow,
                        "the customer has not written in the last 24 hours (as far as the relay has seen), so WhatsApp allows only an approved template message; send a template instead",
                    );
                }
            }
        }
    }

    // The call, with the relay's credentials where it holds them.
    let auth = account.provider.outbound_auth(&account.outbound);
    let headers = forwarded_headers(parts.headers, &auth);
    let timeout = snap.config.outbound_timeout;
    let client = &services.upstream.client();
    let mut rejected: Option<String> = None;
    // `timeout` bounds the call up to the answer's first bytes, then each pause in its body (a
    // large media download that keeps flowing is not cut; one that stalls is).
    let deadline = tokio::time::Instant::now() + timeout;
    let resp = loop {
        let mut h = headers.clone();
        let oauth_token = match &auth {
            OutboundAuth::OAuth(key) => match services.tokens.get(client, key, timeout, rejected.as_deref()).await {
                Ok(tok) => {
                    let mut v = HeaderValue::from_str(&format!("Bearer {tok}")).unwrap_or(HeaderValue::from_static(""));
                    v.set_sensitive(true);
                    h.insert(header::AUTHORIZATION, v);
                    Some(tok)
                }
                Err(e) => {
                    tracing::warn!(motion = %motion.name, account = %account.id, "{e}");
                    let code = match e {
                        TokenError::Timeout { .. } => ErrorCode::UpstreamTimeout,
                        _ => ErrorCode::UpstreamUnreachable,
                    };
                    return fail(code, e.to_string());
                }
            },
            OutboundAuth::Header(name, value) => {
                h.insert(name.clone(), value.clone());
                None
            }
            OutboundAuth::Client => None,
        };
        let mut out = Request::new(Full::new(body.clone()));
        *out.method_mut() = parts.method.clone();
        *out.uri_mut() = uri.clone();
        *out.headers_mut() = h;
        let resp = match tokio::time::timeout(timeout, client.request(out)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(motion = %motion.name, account = %account.id, provider, "provider API unreachable: {}", error_chain(&e));
                return fail(
                    ErrorCode::UpstreamUnreachable,
                    format!("the {provider} API at {base} is unreachable; retry later"),
                );
            }
            Err(_) => {
                tracing::warn!(motion = %motion.name, account = %account.id, provider, "provider API did not answer within {timeout:?}");
                return fail(
                    ErrorCode::UpstreamTimeout,
                    format!("the {provider} API did not answer within {timeout:?} ([outbound] timeout)"),
                );
            }
        };
        // An OAuth token can be revoked or expire early: fetch a new one and try once more.
        if resp.status() == StatusCode::UNAUTHORIZED && rejected.is_none() {
            if let Some(tok) = oauth_token {
                tracing::info!(motion = %motion.name, account = %account.id, "the provider refused the cached access token; fetching a new one");
                rejected = Some(tok);
                continue;
            }
        }
        break resp;
    };

    let (mut head, body) = resp.into_parts();
    strip_hop_by_hop(&mut head.headers);
    if window_closed {
        head.headers.insert(X_RELAY_WINDOW, HeaderValue::from_static("closed"));
    }
    Ok(Response::from_parts(head, streamed(Deadline::idle(body, deadline, timeout))))
}

/// 401 unless the request carries the Motion's outbound token; the message says what to fix.
fn check_token(motion: &Motion, headers: &HeaderMap) -> Result<(), String> {
    let Some(expected) = &motion.outbound_token else {
        return Err(format!(
            "motion {} has no outbound_token configured, so it cannot send through the relay",
            motion.name
        ));
    };
    let Some(presented) = headers.get(&X_RELAY_TOKEN) else {
        return Err("missing X-Relay-Token header (the motion's outbound_token)".into());
    };
    if ct_eq(presented.as_bytes(), expected.expose().as_bytes()) {
        Ok(())
    } else {
        Err("X-Relay-Token does not match this motion's outbound_token".into())
    }
}

/// The client's headers as the provider receives them: hop-by-hop headers, `Host` (the client
/// sets the provider's), framing (the body is re-sent whole), the relay's own `X-Relay-*` (the
/// token above all) and forwarding headers (the provider need not learn the Motion's network)
/// are dropped; where the relay authenticates, so are the client's credentials.
fn forwarded_headers(mut headers: HeaderMap, auth: &OutboundAuth<'_>) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    for h in [header::HOST, header::CONTENT_LENGTH, header::EXPECT, header::FORWARDED] {
        headers.remove(h);
    }
    // Some APIs let these replace the request's method, which would step around the
    // method part of the endpoint allow-list.
    for h in ["x-http-method-override", "x-http-method", "x-method-override"] {
        headers.remove(h);
    }
    let drop: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-relay-") || k.as_str().starts_with("x-forwarded-"))
        .cloned()
        .collect();
    for k in drop {
        headers.remove(k);
    }
    for h in auth.replaces() {
        headers.remove(h);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_credentials_replace_the_clients() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer client"));
        h.insert("x-relay-token", HeaderValue::from_static("secret"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("host", HeaderValue::from_static("chat.example.com"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("connection", HeaderValue::from_static("x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-http-method-override", HeaderValue::from_static("DELETE"));
        let kept = forwarded_headers(h.clone(), &OutboundAuth::Client);
        assert_eq!(kept["authorization"], "Bearer client");
        assert_eq!(kept.len(), 2, "{kept:?}");
        let held = forwarded_headers(h, &OutboundAuth::Header(header::AUTHORIZATION, HeaderValue::from_static("x")));
        assert!(!held.contains_key("authorization"));
        assert_eq!(held.len(), 1);
    }
}
