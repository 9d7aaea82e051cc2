//! Test support: the real relay binary on loopback, fake Motion servers that record what they
//! receive, and a small HTTP client. Every test reads as a story built from these pieces.
#![allow(dead_code)]

pub mod pebble;
pub mod pg;
pub mod tls;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// What a fake Motion received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// How a fake Motion answers.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: &'static str,
    pub delay: Duration,
}

impl Answer {
    pub fn ok() -> Answer {
        Answer { status: 200, body: "{\"ok\":true}", delay: Duration::ZERO }
    }
    pub fn status(status: u16) -> Answer {
        Answer { status, body: "{\"motion\":\"says no\"}", delay: Duration::ZERO }
    }
}

#[derive(Default)]
struct MotionState {
    received: Vec<Received>,
    /// Answers to give, in order; when empty, `default` is used.
    script: std::collections::VecDeque<Answer>,
    default: Option<Answer>,
}

/// A fake Motion server on 127.0.0.1 that records every request.
#[derive(Clone)]
pub struct FakeMotion {
    pub addr: SocketAddr,
    state: Arc<Mutex<MotionState>>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl FakeMotion {
    pub async fn start() -> FakeMotion {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on a given address (to bring a Motion "back up" where it was down).
    pub async fn start_on(addr: SocketAddr) -> FakeMotion {
        let listener = TcpListener::bind(addr).await.expect("bind fake motion");
        let addr = listener.local_addr().unwrap();
        let state: Arc<Mutex<MotionState>> = Default::default();
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let st = st.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                            let answer = {
                                let mut s = st.lock().unwrap();
                                s.received.push(Received {
                                    method: parts.method,
                                    uri: parts.uri.to_string(),
                                    headers: parts.headers,
                                    body,
                                });
                                s.script.pop_front().or_else(|| s.default.clone()).unwrap_or_else(Answer::ok)
                            };
                            tokio::time::sleep(answer.delay).await;
                            let mut resp = http::Response::new(Full::new(Bytes::from_static(answer.body.as_bytes())));
                            *resp.status_mut() = StatusCode::from_u16(answer.status).unwrap();
                            resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
                            resp.headers_mut().insert("x-motion", "yes".parse().unwrap());
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeMotion { addr, state, task: Arc::new(task) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn count(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }

    /// The next answers, in order (then the default).
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.state.lock().unwrap().script.extend(answers);
    }

    pub fn answer_always(&self, a: Answer) {
        self.state.lock().unwrap().default = Some(a);
    }

    /// Stops accepting (existing connections may linger until the relay's pool drops them).
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Waits until `n` requests arrived (or panics after `timeout`).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(start.elapsed() < timeout, "fake Motion got {} of {n} requests within {timeout:?}", got.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Asks `check` every `every` until it answers `Ok`; panics after `within` with its last answer
/// (what it saw instead). For what comes a moment after the effect a test waited for.
pub async fn until(within: Duration, every: Duration, mut check: impl AsyncFnMut() -> Result<(), String>) {
    let start = Instant::now();
    loop {
        match check().await {
            Ok(()) => return,
            Err(seen) => assert!(start.elapsed() < within, "not within {within:?}: {seen}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// `Ok` when `done`, else `seen` (an answer for [`until`]).
pub fn done_or(done: bool, seen: impl std::fmt::Display) -> Result<(), String> {
    if done { Ok(()) } else { Err(seen.to_string()) }
}

/// An address nothing listens on (bound then released).
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// The real binary, started on a config written to a temp dir; killed on drop.
pub struct RelayProcess {
    pub child: Child,
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub dir: Option<tempfile::TempDir>,
    pub config_path: PathBuf,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_whatsapp-relay")
}

impl RelayProcess {
    /// `config` may use `{DATA}` for a storage directory; listeners should use port 0.
    pub fn start(config: &str) -> RelayProcess {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, config)
    }

    pub fn start_in(dir: tempfile::TempDir, config: &str) -> RelayProcess {
        let config_path = dir.path().join("relay.toml");
        let data = dir.path().join("data");
        std::fs::write(&config_path, config.replace("{DATA}", &data.display().to_string())).unwrap();
        Self::spawn(dir, config_path)
    }

    pub fn spawn(dir: tempfile::TempDir, config_path: PathBuf) -> RelayProcess {
        Self::spawn_with_env(dir, config_path, &[])
    }

    /// Like [`RelayProcess::start_in`], with extra environment variables.
    pub fn start_in_with_env(dir: tempfile::TempDir, config: &str, env: &[(&str, &str)]) -> RelayProcess {
        let config_path = dir.path().join("relay.toml");
        let data = dir.path().join("data");
        std::fs::write(&config_path, config.replace("{DATA}", &data.display().to_string())).unwrap();
        Self::spawn_with_env(dir, config_path, env)
    }

    pub fn spawn_with_env(dir: tempfile::TempDir, config_path: PathBuf, env: &[(&str, &str)]) -> RelayProcess {
        let mut cmd = Command::new(bin());
        cmd.args(["--log-format", "json", "--config"]).arg(&config_path).envs(env.iter().copied());
        Self::spawn_command(dir, config_path, cmd)
    }

    /// Starts the relay the way systemd does with a socket unit: `socket` (a listening socket
    /// the test holds across restarts) is the relay's fd 3, named `name` in `LISTEN_FDNAMES`,
    /// with `LISTEN_PID` the relay's own pid. A shell does the fd juggling: the socket arrives
    /// as its stdin (the one way std passes a descriptor without `unsafe`), is moved to fd 3, and
    /// the shell `exec`s the relay, keeping its pid for `LISTEN_PID=$$`.
    pub fn spawn_passed(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        socket: &std::net::TcpListener,
        name: &str,
    ) -> RelayProcess {
        let fd = std::os::fd::OwnedFd::from(socket.try_clone().unwrap());
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("exec 3<&0 0</dev/null; export LISTEN_PID=$$; exec \"$0\" \"$@\"")
            .arg(bin())
            .args(["--log-format", "json", "--config"])
            .arg(&config_path)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", name)
            .stdin(Stdio::from(fd));
        Self::spawn_command(dir, config_path, cmd)
    }

    fn spawn_command(dir: tempfile::TempDir, config_path: PathBuf, mut cmd: Command) -> RelayProcess {
        if cmd.get_envs().all(|(k, _)| k != "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn relay");
        let stderr = child.stderr.take().unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Default::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("whatsapp-relay listening") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line.clone());
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        // Generous: a debug build parsing a 100,000-account config takes seconds.
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("relay did not start; stderr:\n{}", lines.lock().unwrap().join("\n"));
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let addr = |k: &str| v["fields"][k].as_str().and_then(|s| s.parse().ok());
        RelayProcess {
            child,
            http: addr("http").expect("http listener"),
            https: addr("https"),
            admin: addr("admin"),
            dir: Some(dir),
            config_path,
            stderr: lines,
        }
    }

    /// Stops this process (SIGKILL if still running) and starts a new one on the same config
    /// and store.
    pub fn restart(mut self) -> RelayProcess {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = self.dir.take().unwrap();
        Self::spawn(dir, self.config_path.clone())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin.expect("admin listener"))
    }

    /// Waits until a log line contains `needle` (or panics after `timeout`), without blocking
    /// the test's runtime (where fake Motions and providers answer meanwhile).
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        until(timeout, Duration::from_millis(20), async || {
            done_or(self.logs().contains(needle), format_args!("no log line with {needle:?}; logs:\n{}", self.logs()))
        })
        .await;
    }

    /// How many log lines contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.stderr.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Sends a signal by name (TERM, KILL, HUP).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response as tests look at it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    pub fn error_code(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_string()
    }
}

pub type TestClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    let mut req = Request::new(Full::new(body.into()));
    *req.method_mut() = method;
    *req.uri_mut() = url.parse().unwrap();
    for (k, v) in headers {
        req.headers_mut().append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    let resp = client().request(req).await.expect("request to relay");
    let (parts, body) = resp.into_parts();
    Reply { status: parts.status.as_u16(), headers: parts.headers, body: body.collect().await.unwrap().to_bytes() }
}

pub async fn post(url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    send(Method::POST, url, headers, body).await
}

pub async fn get(url: &str) -> Reply {
    send(Method::GET, url, &[], Bytes::new()).await
}

/// Writes raw bytes on a fresh connection and returns what comes back until the server closes or 2 s pass.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/").to_string() + name).unwrap()
}

/// A Meta Cloud API inbound text message from `customer` with message id `id`.
pub fn meta_message(phone_number_id: &str, customer: &str, id: &str, text: &str) -> Vec<u8> {
    serde_json::json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": phone_number_id},
            "contacts": [{"profile": {"name": "Test"}, "wa_id": customer}],
            "messages": [{"from": customer, "id": id, "timestamp": "1749416383", "type": "text", "text": {"body": text}}]
        }}]}]
    })
    .to_string()
    .into_bytes()
}

/// `X-Hub-Signature-256` of a body.
pub fn meta_signature(app_secret: &str, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(app_secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Posts a signed Meta webhook.
pub async fn post_meta(url: &str, app_secret: &str, body: Vec<u8>) -> Reply {
    let sig = meta_signature(app_secret, &body);
    post(url, &[("x-hub-signature-256", &sig), ("content-type", "application/json")], body).await
}

/// Reads `(customer, text)` back from a Meta message body a fake Motion received.
pub fn meta_customer_and_text(body: &[u8]) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    let m = &v["entry"][0]["changes"][0]["value"]["messages"][0];
    (m["from"].as_str().unwrap().to_string(), m["text"]["body"].as_str().unwrap().to_string())
}

/// `X-Twilio-Signature` of a form body posted to `url`.
pub fn twilio_signature(auth_token: &str, url: &str, form: &[u8]) -> String {
    use base64::Engine;
    use hmac::Mac;
    let mut params: Vec<(String, String)> = form_urlencoded::parse(form).into_owned().collect();
    params.sort();
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(auth_token.as_bytes()).unwrap();
    mac.update(url.as_bytes());
    for (k, v) in params {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Hex or base64 HMAC, computed independently of the relay's code.
pub fn hmac_sha256(key: &str, parts: &[&[u8]]) -> Vec<u8> {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A provider's clock (signature timestamps): the wall clock, as the provider's would be.
#[allow(clippy::disallowed_methods)]
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// A server (a Motion or a provider API) that answers its first request with headers and part of a body, then stalls on that
/// connection; every later request gets a whole `200 ok`. Returns its URL and the request bodies.
pub async fn stalling_motion() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let seen = bodies.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // One request: the head, then Content-Length bytes of body.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = buf[head_end..head_end + len].to_vec();
                    buf.drain(..head_end + len);
                    let first = {
                        let mut b = seen.lock().unwrap();
                        b.push(body);
                        b.len() == 1
                    };
                    if first {
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial").await;
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    if stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, bodies)
}

/// Which store the relays of a story run on: the embedded file (under `{DATA}`) or a PostgreSQL
/// server of the test's own.
#[derive(Clone)]
pub enum Backend {
    Embedded,
    Postgres(Arc<Mutex<pg::PgServer>>, String),
}

impl Backend {
    /// A fresh PostgreSQL server for `test`, or None when PostgreSQL is missing (said loudly;
    /// a failure under CI=true).
    pub fn postgres(test: &str) -> Option<Backend> {
        let server = pg::PgServer::start(test)?;
        let url = server.url();
        Some(Backend::Postgres(Arc::new(Mutex::new(server)), url))
    }

    /// The `[storage]` section of a relay's config (the embedded folder is `{DATA}`, which
    /// [`RelayProcess`] fills in; with PostgreSQL it holds only the ACME cache).
    pub fn storage(&self) -> String {
        match self {
            Backend::Embedded => "[storage]\npath = \"{DATA}\"\n".to_string(),
            Backend::Postgres(_, url) => {
                format!(
                    "[storage]\npath = \"{{DATA}}\"\nbackend = \"postgres\"\nurl = \"{url}\"\npool = 8\ntakeover = \"6s\"\n"
                )
            }
        }
    }

    /// `config` with its `[storage]` section (`path = "{DATA}"`) written for this backend.
    pub fn apply(&self, config: &str) -> String {
        let embedded = "[storage]\npath = \"{DATA}\"\n";
        assert!(config.contains(embedded), "the story's config has no [storage] section to rewrite");
        config.replacen(embedded, &self.storage(), 1)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Postgres(..) => "postgres",
        }
    }
}

/// Runs each named story (`async fn story(backend: Backend)`) once per backend, as
/// `embedded::story` and `postgres::story`.
#[macro_export]
macro_rules! on_both_backends {
    ($($story:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $story() {
                    super::$story(super::support::Backend::Embedded).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $story() {
                    let Some(backend) = super::support::Backend::postgres(stringify!($story)) else { return };
                    super::$story(backend).await
                }
            )*
        }
    };
}
