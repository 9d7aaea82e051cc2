//! The admin listener: `/healthz`, `/readyz`, `/metrics` (no auth; keep the listener on
//! loopback), and `/admin/*` behind `Authorization: Bearer {admin.token}`.

use crate::http_util::{Body, ErrorCode, error, json, text};
use crate::relay::Relay;
use crate::server::Control;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use std::sync::atomic::{AtomicBool, Ordering};

/// Readiness inputs the admin listener reports on.
#[derive(Default)]
pub struct Readiness {
    pub listeners_bound: AtomicBool,
}

pub async fn handle(control: &Control, req: Request<Incoming>) -> Response<Body> {
    let (relay, ready) = (&control.relay, &control.ready);
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            let mut problems = Vec::new();
            if !ready.listeners_bound.load(Ordering::Acquire) {
                problems.push("listeners not bound".to_string());
            }
            if relay.queue().is_some_and(|q| !q.store().writable()) {
                problems.push("storage not writable".to_string());
            }
            let mut warnings = Vec::new();
            if let Some(tls) = &control.tls {
                problems.extend(tls.problems());
                warnings.extend(tls.warnings());
            }
            if problems.is_empty() {
                // Still ready (the https listener has a valid certificate), but say what is wrong.
                let mut body = String::from("ready\n");
                for w in warnings {
                    body.push_str(&format!("warning: {w}\n"));
                }
                text(StatusCode::OK, "text/plain", body)
            } else {
                problems.extend(warnings);
                error(ErrorCode::Unavailable, problems.join("; "))
            }
        }
        (&Method::GET, "/metrics") => {
            text(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", relay.metrics.encode())
        }
        (_, p) if p.starts_with("/admin/") => {
            if let Err(why) = authorize(relay, &req) {
                return error(ErrorCode::Unauthorized, why);
            }
            match (req.method(), p) {
                // Logged inside; the caller gets the same message.
                (&Method::POST, "/admin/reload") => match control.reload("admin API").await {
                    Ok(report) => json(
                        StatusCode::OK,
                        &serde_json::json!({
                            "reloaded": true,
                            "took_ms": report.took_ms,
                            "motions": report.motions,
                            "accounts": report.accounts,
                            "warnings": report.warnings,
                        }),
                    ),
                    Err(e) => {
                        error(ErrorCode::BadRequest, format!("reload refused, the running configuration stays: {e}"))
                    }
                },
                _ => error(ErrorCode::NotFound, "no such admin endpoint"),
            }
        }
        _ => error(ErrorCode::NotFound, "no such endpoint"),
    }
}

/// Constant-time bearer-token check. Without a configured token the admin API is closed.
fn authorize(relay: &Relay, req: &Request<Incoming>) -> Result<(), &'static str> {
    use subtle::ConstantTimeEq;
    let snap = relay.snapshot();
    let Some(token) = &snap.config.admin.token else {
        return Err("the admin API is disabled: set [admin] token");
    };
    let given = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if bool::from(g.as_bytes().ct_eq(token.expose().as_bytes())) => Ok(()),
        _ => Err("missing or wrong Authorization: Bearer token"),
    }
}
