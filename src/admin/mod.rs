//! The admin listener: `/healthz`, `/readyz`, `/metrics` (no auth; keep the listener on
//! loopback), `/admin/*` behind `Authorization: Bearer {admin.token}`, and the realtime board
//! (`board`: `/board` and `/board/events`, which also take the token as HTTP Basic). Handed the
//! [`Control`] (reload, readiness) and, through it, the services it reports on.

mod board;

use crate::control::Control;
use crate::http_util::{Body, ErrorCode, error, json, text};
use crate::queue::Queue;
use crate::queue::ops::Count;
use crate::services::Services;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use std::sync::Arc;

/// The admin listener's state: the control, and the board's history.
pub struct Admin {
    control: Arc<Control>,
    board: board::Board,
    /// Flips when the relay shuts down: open board streams end then.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl Admin {
    pub fn new(control: Arc<Control>, stopping: tokio::sync::watch::Receiver<bool>) -> Arc<Admin> {
        Arc::new(Admin { control, board: board::Board::new(), stopping })
    }

    /// Samples what the board and `/metrics` show over time (per-minute traffic, the store's
    /// size) until `stop` flips.
    pub async fn sample(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        board::sample(&self.board, &self.control, stop).await
    }

    pub async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        if req.uri().path() == "/board" || req.uri().path().starts_with("/board/") {
            return board::handle(self, req).await;
        }
        handle(&self.control, req).await
    }
}

async fn handle(control: &Control, req: Request<Incoming>) -> Response<Body> {
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
            if let Err(why) = authorize(services, &req, TokenForms::Bearer) {
                return error(ErrorCode::Unauthorized, why);
            }
            if let Some(rest) = p.strip_prefix("/admin/queue/") {
                return queue_api(&services.queue, req.method(), rest, req.uri().query()).await;
            }
            match (req.method(), p) {
                (&Method::POST, "/admin/store/backup") => return backup(&services.queue).await,
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

/// The forms in which a request may present the admin token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenForms {
    /// `Authorization: Bearer TOKEN` (the admin API).
    Bearer,
    /// Also HTTP Basic with any user name and the token as the password, so a browser can open
    /// the board (its two GETs only).
    BearerOrBasic,
}

/// The admin token check, with the secret comparison every token check shares (constant time,
/// length included). Without a configured token the admin API and the board are closed.
pub(crate) fn authorize(services: &Services, req: &Request<Incoming>, forms: TokenForms) -> Result<(), &'static str> {
    use base64::Engine as _;
    let snap = services.snapshot();
    let Some(token) = &snap.config.admin.token else {
        return Err("the admin API is disabled: set [admin] token");
    };
    let header = req.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    let given = match (header.split_once(' '), forms) {
        (Some(("Bearer", t)), _) => Some(t.as_bytes().to_vec()),
        (Some(("Basic", b)), TokenForms::BearerOrBasic) => base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .ok()
            .and_then(|pair| pair.iter().position(|c| *c == b':').map(|i| pair[i + 1..].to_vec())),
        _ => None,
    };
    match given {
        Some(g) if crate::provider::ct_eq(&g, token.expose().as_bytes()) => Ok(()),
        _ if forms == TokenForms::BearerOrBasic => {
            Err("missing or wrong admin token (Bearer, or Basic with the token as the password)")
        }
        _ => Err("missing or wrong Authorization: Bearer token"),
    }
}

/// `POST /admin/store/backup`: a consistent copy of the store, made in a read transaction
/// beside the live file (deliveries and acknowledgements go on meanwhile) and streamed back;
/// `x-relay-backup` says what it holds, so the receiver can check its copy. See `store backup`.
async fn backup(q: &Queue) -> Response<Body> {
    let store = q.store().clone();
    let started = std::time::Instant::now();
    let backup = match tokio::task::spawn_blocking(move || store.backup()).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return error(ErrorCode::Unavailable, format!("backup failed: {e}")),
        Err(e) => return error(ErrorCode::Unavailable, format!("backup failed: {e}")),
    };
    let s = backup.summary;
    tracing::info!(
        waiting = s.waiting,
        dead_letters = s.dead_letters,
        bytes = s.bytes,
        took_ms = started.elapsed().as_millis() as u64,
        "store backup made"
    );
    let mut resp = Response::new(crate::http_util::file(backup.file));
    let h = resp.headers_mut();
    h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/octet-stream"));
    h.insert(http::header::CONTENT_LENGTH, s.bytes.into());
    if let Ok(v) = http::HeaderValue::from_str(&serde_json::to_string(&s).unwrap_or_default()) {
        h.insert("x-relay-backup", v);
    }
    resp
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
