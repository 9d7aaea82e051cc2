//! The public listeners' request handler: dispatches a request to the pipeline that owns it
//! (inbound, Meta app, outbound, health) and is its one exit: a pipeline's [`Failure`] becomes
//! the SPEC's JSON answer here, every answer is counted, and the access line is written.

use crate::http_util::{Body, ErrorCode, Failure, fail, text};
use crate::metrics::{MotionLabels, RequestLabels};
use crate::request::{AccessInfo, Conn, Scheme, host, host_without_port};
use crate::routing::{Route, Snapshot};
use crate::services::Services;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Instant;

pub struct Relay {
    services: Arc<Services>,
    /// The bound https port, for `redirect_http`.
    https_port: Option<u16>,
}

impl Relay {
    pub fn new(services: Arc<Services>, https_port: Option<u16>) -> Relay {
        Relay { services, https_port }
    }

    /// Serves one request on a public listener.
    pub async fn handle(&self, req: Request<Incoming>, conn: Conn) -> Response<Body> {
        let start = Instant::now();
        let snap = self.services.snapshot();
        let mut info = AccessInfo::default();
        let resp = match self.dispatch(&snap, req, conn, &mut info).await {
            Ok(resp) => resp,
            Err(failure) => failure.response(),
        };
        let status = resp.status().as_u16();
        let motion = info.motion.unwrap_or("");
        let elapsed = start.elapsed();
        let metrics = &self.services.metrics;
        metrics.requests.get_or_create(&RequestLabels { motion: motion.to_string(), status }).inc();
        metrics.latency.get_or_create(&MotionLabels { motion: motion.to_string() }).observe(elapsed.as_secs_f64());
        tracing::info!(
            target: "access",
            motion,
            account = info.account.as_deref().unwrap_or(""),
            provider = info.provider,
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            delivery = info.delivery_id.as_deref().unwrap_or(""),
            peer = %conn.peer,
        );
        resp
    }

    async fn dispatch<'s>(
        &self,
        snap: &'s Snapshot,
        req: Request<Incoming>,
        conn: Conn,
        info: &mut AccessInfo<'s>,
    ) -> Result<Response<Body>, Failure> {
        // A message framed both ways (Content-Length and Transfer-Encoding) never gets here as
        // such: hyper reads it as chunked, drops Content-Length and closes the connection after
        // it (RFC 9112 6.1), so nothing can be smuggled behind it. HTTP/2 has no such framing.
        if req.version() == http::Version::HTTP_11 {
            // RFC 9112 3.2: exactly one Host; with none or two, which host was meant is unknown,
            // and host routing must not guess.
            let hosts = req.headers().get_all(http::header::HOST).iter().count();
            if hosts != 1 {
                return fail(
                    ErrorCode::BadRequest,
                    format!("an HTTP/1.1 request needs exactly one Host header, not {hosts}"),
                );
            }
        }
        let Some(route) = snap.table.lookup(host(req.uri(), req.headers()), req.uri().path()) else {
            return fail(ErrorCode::NotFound, "no route for this path");
        };
        if conn.scheme == Scheme::Http && snap.config.server.redirect_http && !matches!(route, Route::Health) {
            return self.redirect_to_https(snap, &req);
        }
        let services = &self.services;
        match route {
            Route::Health => {
                if req.method() == Method::GET || req.method() == Method::HEAD {
                    Ok(text(StatusCode::OK, "text/plain", "ok\n"))
                } else {
                    fail(ErrorCode::MethodNotAllowed, "use GET /healthz")
                }
            }
            Route::Inbound { motion, account, forward_at, by_host } => {
                info.motion = Some(&motion.motion.name);
                info.account = Some(account.id.as_str().into());
                info.provider = account.provider.as_str();
                let target = crate::inbound::Target { motion, account, forward_at, by_host };
                let webhook = req.method() != Method::GET;
                let answer = crate::inbound::handle(services, snap, target, req, conn, info).await;
                if webhook && answer.as_ref().is_ok_and(|r| r.status().is_success()) {
                    services.count_accepted(&motion.motion.name, account);
                }
                answer
            }
            Route::Outbound { motion, account, rest_at } => {
                info.motion = Some(&motion.motion.name);
                info.account = Some(account.id.as_str().into());
                info.provider = account.provider.as_str();
                let target = crate::outbound::Target { motion, account, rest_at };
                crate::outbound::handle(services, snap, target, req, conn, info).await
            }
            Route::MetaApp { app } => crate::meta_app::handle(services, snap, &app, req, conn, info).await,
        }
    }

    /// `redirect_http`: 308 (method and body kept, so a provider's POST is re-sent as a POST) to
    /// the same host, path and query on the https listener.
    fn redirect_to_https(&self, snap: &Snapshot, req: &Request<Incoming>) -> Result<Response<Body>, Failure> {
        let public = snap.config.server.public_url.as_deref().and_then(|u| u.parse::<http::Uri>().ok());
        let host = host(req.uri(), req.headers())
            .map(|h| host_without_port(h).into_owned())
            .or_else(|| public.as_ref().and_then(|u| u.host().map(str::to_string)));
        let Some(host) = host else {
            return fail(ErrorCode::BadRequest, "this listener redirects to https and needs a Host header");
        };
        let port = match self.https_port {
            Some(443) | None => String::new(),
            Some(p) => format!(":{p}"),
        };
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let location = format!("https://{host}{port}{path}");
        let value = http::HeaderValue::from_str(&location)
            .map_err(|_| Failure::new(ErrorCode::BadRequest, "cannot build the https URL for this request"))?;
        let mut resp = text(StatusCode::PERMANENT_REDIRECT, "text/plain", "use https\n");
        resp.headers_mut().insert(http::header::LOCATION, value);
        Ok(resp)
    }
}
