//! The realtime board: `GET /board` (one page; its script and styles are embedded in the binary
//! and served from `/board/app.js` and `/board/app.css`) and `GET /board/events`, server-sent
//! events carrying a JSON snapshot at most once a second.
//!
//! The snapshot is built from what the relay already keeps (the metrics, the queue's depth and
//! health, the window's map, the certificate), once a second per open stream, never on the
//! request path; streams are capped at [`MAX_STREAMS`]. A sampler keeps the per-minute history
//! behind the sparklines, whether a board is open or not.
//!
//! Must never: show a message body or a customer's number (account ids, delivery ids and
//! errors only), or accept the token as Basic anywhere but on `/board` and `/board/events`.

use super::{Admin, TokenForms, authorize};
use crate::control::Control;
use crate::http_util::{Body, Channel, ErrorCode, error, text};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Event streams open at once: the board is for a few people, not a fan-out service.
pub const MAX_STREAMS: usize = 4;
/// Minutes of traffic the sparklines show.
const MINUTES: usize = 30;
/// How often the sampler runs (the store's size; a new minute's sample when one has passed).
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

const PAGE: &str = include_str!("board/index.html");
const SCRIPT: &str = include_str!("board/app.js");
const STYLE: &str = include_str!("board/app.css");

pub struct Board {
    started: Instant,
    streams: AtomicUsize,
    /// Per Motion, the (in, out) totals at the start of each of the last minutes, oldest first.
    history: Mutex<HashMap<String, VecDeque<(u64, u64)>>>,
    /// The last snapshot and when it was built: every open stream shares one a second.
    latest: Mutex<Option<(Instant, Arc<str>)>>,
}

impl Board {
    pub fn new() -> Board {
        Board {
            started: Instant::now(),
            streams: AtomicUsize::new(0),
            history: Mutex::new(HashMap::new()),
            latest: Mutex::new(None),
        }
    }

    /// The snapshot as an event's text, built at most once a second whatever the number of
    /// streams. Blocking (it reads the window's map and the store's state): call it off the
    /// runtime's workers.
    fn shared_snapshot(&self, control: &Control) -> Arc<str> {
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, text)) = latest.as_ref().filter(|(at, _)| at.elapsed() < Duration::from_millis(900)) {
            return text.clone();
        }
        let text: Arc<str> = format!("data: {}\n\n", self.snapshot(control)).into();
        *latest = Some((Instant::now(), text.clone()));
        text
    }

    /// Records the current totals as the start of a new minute.
    fn push_minute(&self, control: &Control) {
        let snap = control.services.snapshot();
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        history.retain(|name, _| snap.table.motion(name).is_some());
        for m in &snap.config.motions {
            let t = control.services.metrics.motion_totals(&m.name);
            let h = history.entry(m.name.clone()).or_default();
            if h.len() > MINUTES {
                h.pop_front();
            }
            h.push_back((t.received, t.delivered + t.outbound_2xx + t.outbound_4xx + t.outbound_5xx));
        }
    }

    /// Per-minute (in, out) counts of the last minutes, the current (partial) one last.
    fn per_minute(&self, motion: &str, now: (u64, u64)) -> (Vec<u64>, Vec<u64>) {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let Some(h) = history.get(motion) else { return (vec![0], vec![0]) };
        let points: Vec<(u64, u64)> = h.iter().copied().chain([now]).collect();
        points.windows(2).map(|w| (w[1].0.saturating_sub(w[0].0), w[1].1.saturating_sub(w[0].1))).unzip()
    }

    /// The board's JSON: the relay, then each Motion (by name) and its accounts.
    pub fn snapshot(&self, control: &Control) -> Value {
        let services = &control.services;
        let snap = services.snapshot();
        let now = services.now_unix_ms();
        let windows = services.window.open_counts();
        let mut motions = serde_json::Map::new();
        for m in &snap.config.motions {
            let totals = services.metrics.motion_totals(&m.name);
            let out = totals.delivered + totals.outbound_2xx + totals.outbound_4xx + totals.outbound_5xx;
            let (in_per_minute, out_per_minute) = self.per_minute(&m.name, (totals.received, out));
            let status = services.queue.status(&m.name);
            let depth_of: HashMap<&str, (u64, u64)> = status
                .as_ref()
                .map(|s| s.accounts.iter().map(|(a, n, oldest)| (a.as_str(), (*n, *oldest))).collect())
                .unwrap_or_default();
            let age = |oldest: u64| if oldest == u64::MAX { 0 } else { now.saturating_sub(oldest) / 1000 };
            let mut accounts = serde_json::Map::new();
            for a in &m.accounts {
                let (depth, oldest) = depth_of.get(a.id.as_str()).copied().unwrap_or((0, u64::MAX));
                accounts.insert(
                    a.id.clone(),
                    json!({
                        "provider": a.provider.as_str(),
                        "received": a.received.load(Ordering::Relaxed),
                        "depth": depth,
                        "oldest_age_seconds": age(oldest),
                        "windows_open": windows.get(&(m.name.clone(), a.id.clone())).copied().unwrap_or(0),
                    }),
                );
            }
            let oldest = status.as_ref().and_then(|s| s.accounts.iter().map(|a| a.2).min()).unwrap_or(u64::MAX);
            let failing_since = status.as_ref().and_then(|s| s.failing_since_unix_ms);
            motions.insert(
                m.name.clone(),
                json!({
                    "received": totals.received,
                    "delivered": totals.delivered,
                    "retries": totals.retries,
                    "dead_letters": totals.dead_letters,
                    "rate_limited": totals.rate_limited,
                    "outbound": {"2xx": totals.outbound_2xx, "4xx": totals.outbound_4xx, "5xx": totals.outbound_5xx},
                    "depth": status.as_ref().map_or(0, |s| s.depth),
                    "bytes": status.as_ref().map_or(0, |s| s.bytes),
                    "oldest_age_seconds": age(oldest),
                    "failing": failing_since.is_some(),
                    "failing_since_unix_ms": failing_since,
                    "last_errors": status.as_ref().map(|s| s.last_errors.clone()).unwrap_or_default(),
                    "windows_open": windows.iter().filter(|((motion, _), _)| *motion == m.name).map(|(_, n)| n).sum::<u64>(),
                    "in_per_minute": in_per_minute,
                    "out_per_minute": out_per_minute,
                    "accounts": accounts,
                }),
            );
        }
        let (problems, warnings) = control.readiness();
        let store = services.queue.store();
        let certificate = control.tls.as_ref().and_then(|t| t.info()).map(|c| {
            json!({"names": c.names, "expires_unix": c.not_after, "days_left": (c.not_after - (now / 1000) as i64) / 86_400})
        });
        json!({
            "generated_unix_ms": now,
            "relay": {
                "version": crate::VERSION,
                "uptime_seconds": self.started.elapsed().as_secs(),
                "ready": problems.is_empty(),
                "problems": problems,
                "warnings": warnings,
                "storage": {"backend": store.backend(), "writable": store.writable(), "size_bytes": store.size_bytes()},
                "certificate": certificate,
                "cluster": services.queue.cluster(),
            },
            "motions": motions,
        })
    }
}

/// Keeps the per-minute history and the store's size gauge, until `stop` flips.
pub async fn sample(board: &Board, control: &Control, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut minute_started: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if minute_started.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            board.push_minute(control);
            minute_started = Some(Instant::now());
        }
        let store = control.services.queue.store().clone();
        if let Ok(Some(size)) = tokio::task::spawn_blocking(move || store.size_bytes()).await {
            control.services.metrics.store_size.set(size as i64);
        }
    }
}

/// `/board`, `/board/events` (admin token, Bearer or Basic) and the page's two static assets.
pub async fn handle(admin: &Arc<Admin>, req: Request<Incoming>) -> Response<Body> {
    let control = &admin.control;
    if req.method() != Method::GET {
        return error(ErrorCode::MethodNotAllowed, "the board answers GET");
    }
    let path = req.uri().path();
    // The script and styles hold no data: served without the token, so the page loads them
    // whatever the browser does with the credentials it was given.
    match path {
        "/board/app.js" => return hardened(text(StatusCode::OK, "text/javascript; charset=utf-8", SCRIPT)),
        "/board/app.css" => return hardened(text(StatusCode::OK, "text/css; charset=utf-8", STYLE)),
        "/board" | "/board/events" => {}
        _ => return error(ErrorCode::NotFound, "no such board resource"),
    }
    if control.services.snapshot().config.admin.token.is_none() {
        // No prompt for a password that cannot exist.
        return hardened(error(ErrorCode::NotFound, "the board is disabled: set [admin] token"));
    }
    if let Err(why) = authorize(&control.services, &req, TokenForms::BearerOrBasic) {
        let mut resp = error(ErrorCode::Unauthorized, why);
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"whatsapp-relay\", charset=\"UTF-8\""),
        );
        return hardened(resp);
    }
    if path == "/board" {
        return hardened(text(StatusCode::OK, "text/html; charset=utf-8", PAGE));
    }
    events(admin)
}

/// Starts an event stream: a snapshot now, then one a second while the client reads.
fn events(admin: &Arc<Admin>) -> Response<Body> {
    let taken = admin.board.streams.fetch_add(1, Ordering::AcqRel);
    if taken >= MAX_STREAMS {
        admin.board.streams.fetch_sub(1, Ordering::AcqRel);
        return hardened(error(
            ErrorCode::Unavailable,
            format!("{MAX_STREAMS} board streams are open already; close one and reload"),
        ));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
    let slot = Slot(admin.clone());
    let token = admin.control.services.snapshot().config.admin.token.clone();
    let mut stopping = admin.stopping.clone();
    tokio::spawn(async move {
        let admin = slot.0.clone();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopping.changed() => break,
            }
            // A token changed by a reload ends the streams opened with the old one (the browser
            // reconnects, and is asked again).
            if admin.control.services.snapshot().config.admin.token != token {
                break;
            }
            let a = admin.clone();
            let Ok(text) = tokio::task::spawn_blocking(move || a.board.shared_snapshot(&a.control)).await else {
                break;
            };
            // Ends when the client goes away (the body, and with it the receiver, is dropped),
            // or stops reading for 5 s: a stalled client must not hold a place for good.
            match tokio::time::timeout(Duration::from_secs(5), tx.send(Bytes::copy_from_slice(text.as_bytes()))).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        drop(slot);
    });
    let mut resp = Response::new(Either::Right(Either::Right(Channel(rx))));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    hardened(resp)
}

/// An open stream's place among [`MAX_STREAMS`], given back when its task ends.
struct Slot(Arc<Admin>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.board.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The headers every board answer carries: no caching, no framing, no outside resources.
fn hardened(mut resp: Response<Body>) -> Response<Body> {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    resp
}
