//! The admin listener: `/healthz`, `/readyz`, `/metrics` (no auth; keep the listener on
//! loopback), and `/admin/*` behind `Authorization: Bearer {admin.token}`. Handed the
//! [`Control`] (reload, readiness) and, through it, the services it reports on.

use crate::control::Control;
use crate::http_util::{Body, ErrorCode, error, json, text};
use crate::queue::Queue;
use crate::queue::ops::Count;
use crate::services::Services;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

pub async fn handle(control: &Control, req: Request<Incoming>) -> Response<Body> {
    let services = &control.services;
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            let (mut problems, warnings) = control.readiness();
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
            text(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", services.metrics.encode())
        }
        (_, p) if p.starts_with("/admin/") => {
            if let Err(why) = authorize(services, &req) {
                return error(ErrorCode::Unauthorized, why);
            }
            if let Some(rest) = p.strip_prefix("/admin/queue/") {
                return queue_api(&services.queue, req.method(), rest, req.uri().query()).await;
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

/// Bearer-token check, with the secret comparison every token check shares (constant time,
/// length included). Without a configured token the admin API is closed.
fn authorize(services: &Services, req: &Request<Incoming>) -> Result<(), &'static str> {
    let snap = services.snapshot();
    let Some(token) = &snap.config.admin.token else {
        return Err("the admin API is disabled: set [admin] token");
    };
    let given = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if crate::provider::ct_eq(g.as_bytes(), token.expose().as_bytes()) => Ok(()),
        _ => Err("missing or wrong Authorization: Bearer token"),
    }
}

/// `/admin/queue/...`: see the README's "Admin API".
async fn queue_api(q: &Queue, method: &Method, rest: &str, query: Option<&str>) -> Response<Body> {
    let param = |name: &str| {
        query.and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned()))
    };
    let decoded: Vec<String> =
        rest.split('/').map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()).collect();
    let segs: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let result = match (method, segs.as_slice()) {
        (&Method::GET, ["stats"]) => q.stats().await.map(serde_json::to_value),
        (&Method::GET, ["list"]) => {
            let limit = param("limit").and_then(|l| l.parse().ok()).unwrap_or(1000);
            q.list(limit).await.map(serde_json::to_value)
        }
        (&Method::GET, ["dead"]) => q.dead().await.map(serde_json::to_value),
        (&Method::POST, ["dead", "replay"]) => q.replay(None).await.map(|count| serde_json::to_value(Count { count })),
        (&Method::POST, ["dead", id, "replay"]) => {
            q.replay(Some(id.to_string())).await.map(|count| serde_json::to_value(Count { count }))
        }
        (&Method::DELETE, ["dead"]) => q.purge(None).await.map(|count| serde_json::to_value(Count { count })),
        (&Method::DELETE, ["dead", id]) => {
            q.purge(Some(id.to_string())).await.map(|count| serde_json::to_value(Count { count }))
        }
        _ => return error(ErrorCode::NotFound, "no such queue endpoint (see the README's Admin API)"),
    };
    match result {
        Ok(Ok(v)) => {
            let by_id = matches!(
                (method, segs.as_slice()),
                (&Method::DELETE, ["dead", _]) | (&Method::POST, ["dead", _, "replay"])
            );
            if v.get("count").and_then(|c| c.as_u64()) == Some(0) && by_id {
                return error(
                    ErrorCode::NotFound,
                    "no dead letter with that id could be replayed or deleted (an unowned one needs an account that claims its number)",
                );
            }
            json(StatusCode::OK, &v)
        }
        Ok(Err(e)) => error(ErrorCode::Unavailable, format!("cannot encode the answer: {e}")),
        Err(e) => error(ErrorCode::Unavailable, format!("storage: {e}")),
    }
}
