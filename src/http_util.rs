//! Small HTTP pieces every handler shares: the response body type, the SPEC's JSON errors (a
//! [`Failure`] is what a pipeline returns instead of an answer), bounded body reads, hop-by-hop
//! header removal and error chains for log lines.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// Responses carry bytes we made, stream an upstream's body through untouched (within the
/// upstream call's deadline), or stream what a channel sends (server-sent events).
pub type Body = Either<Full<Bytes>, Either<Deadline<Incoming>, Channel>>;

/// An upstream's answer body, streamed through within its deadline.
pub fn streamed(body: Deadline<Incoming>) -> Body {
    Either::Right(Either::Left(body))
}

/// Streams a file from its current position to its end, in 64 KiB chunks (a store backup). A
/// read error ends the body early, which the receiver sees against the Content-Length.
pub fn file(file: std::fs::File) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut f = tokio::fs::File::from_std(file);
        loop {
            let mut buf = vec![0u8; 64 << 10];
            match f.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send(Bytes::from(buf)).await.is_err() {
                        return; // the client went away
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the backup copy failed; its download ends short");
                    return;
                }
            }
        }
    });
    Either::Right(Either::Right(Channel(rx)))
}

/// A body made of what a channel sends, one frame each, ending when the sender is dropped.
pub struct Channel(pub tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Channel {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An upstream's body streamed through until a deadline: one that sends its headers and then
/// stalls cannot hold the client's connection past the call's timeout (the stream then fails
/// and the connection is cut, as headers are already out). The timer is armed only when the
/// body is not there at once, so a small body costs nothing.
pub struct Deadline<B> {
    inner: B,
    at: tokio::time::Instant,
    /// With `idle`, every frame that arrives moves the deadline that far ahead: a long download
    /// that keeps flowing is not cut, one that stops is.
    idle: Option<std::time::Duration>,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Deadline<B> {
    /// The whole body by `at`.
    pub fn new(inner: B, at: tokio::time::Instant) -> Self {
        Deadline { inner, at, idle: None, sleep: None }
    }

    /// The first frame by `at`, then each next one within `idle` of the last.
    pub fn idle(inner: B, at: tokio::time::Instant, idle: std::time::Duration) -> Self {
        Deadline { inner, at, idle: Some(idle), sleep: None }
    }
}

impl<B> hyper::body::Body for Deadline<B>
where
    B: hyper::body::Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        let this = &mut *self;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            if let Some(idle) = this.idle {
                this.at = tokio::time::Instant::now() + idle;
                if let Some(sleep) = this.sleep.as_mut() {
                    sleep.as_mut().reset(this.at);
                }
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let at = this.at;
        let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err("the upstream's body did not arrive within its timeout".into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Either::Left(Full::new(bytes.into()))
}

/// The error codes of the SPEC. Each has exactly one status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    BadSignature,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    TooLarge,
    OutsideWindow,
    RateLimited,
    UpstreamUnreachable,
    Unavailable,
    UpstreamTimeout,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        use ErrorCode::*;
        match self {
            BadRequest => StatusCode::BAD_REQUEST,
            BadSignature | Unauthorized => StatusCode::UNAUTHORIZED,
            Forbidden => StatusCode::FORBIDDEN,
            NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            OutsideWindow => StatusCode::UNPROCESSABLE_ENTITY,
            RateLimited => StatusCode::TOO_MANY_REQUESTS,
            UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            BadRequest => "bad_request",
            BadSignature => "bad_signature",
            Unauthorized => "unauthorized",
            Forbidden => "forbidden",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            RequestTimeout => "request_timeout",
            TooLarge => "too_large",
            OutsideWindow => "outside_customer_service_window",
            RateLimited => "rate_limited",
            UpstreamUnreachable => "upstream_unreachable",
            Unavailable => "unavailable",
            UpstreamTimeout => "upstream_timeout",
        }
    }
}

/// A request refused with one of the SPEC's errors: what a pipeline returns instead of an
/// answer. The relay's one exit turns it into the JSON answer, counts it and logs the access
/// line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
    /// `Retry-After`, in seconds, for a refusal that says when to come back.
    pub retry_after: Option<u64>,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure { code, message: message.into(), retry_after: None }
    }

    /// With `Retry-After`: `wait` rounded up to whole seconds (at least 1).
    pub fn retry_after(mut self, wait: std::time::Duration) -> Failure {
        self.retry_after = Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).map(|s| s.max(1));
        self
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    pub fn response(&self) -> Response<Body> {
        let mut r = error(self.code, &self.message);
        if let Some(secs) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

/// `Err(Failure)`, for `return fail(..)`.
pub fn fail<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, Failure> {
    Err(Failure::new(code, message))
}

/// `{"error": CODE, "message": TEXT}` with the code's status.
pub fn error(code: ErrorCode, message: impl AsRef<str>) -> Response<Body> {
    let body = serde_json::json!({ "error": code.as_str(), "message": message.as_ref() });
    json(code.status(), &body)
}

pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Reads a request's body within `max_body` and `request_timeout`. A declared length over the
/// limit is refused before anything is read, a chunked body as soon as it passes it. `Err` is
/// why not (413, 408 or 400).
pub async fn read_body(
    req: http::Request<Incoming>,
    max_body: u64,
    request_timeout: std::time::Duration,
) -> Result<(http::request::Parts, Bytes), Failure> {
    use http_body_util::{BodyExt, Limited};
    let too_large =
        || Failure::new(ErrorCode::TooLarge, format!("the body is larger than max_body ({max_body} bytes)"));
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body) {
        return Err(too_large());
    }
    let (parts, body) = req.into_parts();
    let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
    match tokio::time::timeout(request_timeout, Limited::new(body, limit).collect()).await {
        Ok(Ok(c)) => Ok((parts, c.to_bytes())),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => fail(ErrorCode::BadRequest, format!("could not read the request body: {e}")),
        Err(_) => fail(ErrorCode::RequestTimeout, "the request body did not arrive within request_timeout"),
    }
}

/// RFC 9110 hop-by-hop headers, which never cross the relay.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers and every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names present (cheap comparisons)
    // instead of a hash probe per hop-by-hop name on every request and every answer.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(n);
    }
}

/// The error with its causes, which is where hyper keeps the useful part ("connection refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, X-Secret-Hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-twilio-signature", HeaderValue::from_static("abc"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-twilio-signature"));
    }

    #[test]
    fn one_hop_by_hop_header_among_others() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("x-webhook-token", HeaderValue::from_static("t"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        assert!(!h.contains_key("upgrade"));
    }
}
