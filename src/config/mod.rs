//! The configuration: the file's schema (`schema`), secrets, units, and `load`, which turns a
//! file into a validated [`Config`] or a [`ConfigError`] naming the file, line and column.
//! Loading binds nothing and starts nothing, so `check` and reload can validate alone.

mod error;
pub mod pg_url;
mod schema;
pub mod secret;
pub mod units;

pub use error::ConfigError;
pub use schema::{Mode, WindowPolicy};
pub use secret::Secret;

pub use crate::provider::OutboundCreds;
use crate::provider::{AccountVerifier, ProviderKind, VerifierConfig};
use error::Locator;
use ipnet::IpNet;
use schema::S;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use units::Dur;

/// A validated configuration with its secrets resolved.
#[derive(Debug)]
pub struct Config {
    pub path: PathBuf,
    pub server: Server,
    pub admin: Admin,
    /// The embedded store's folder (and the ACME cache's default parent, whatever the backend).
    pub storage_path: PathBuf,
    pub storage: StorageBackend,
    pub delivery: Delivery,
    pub outbound_timeout: Duration,
    pub motions: Vec<Arc<Motion>>,
    pub meta_apps: Vec<Arc<MetaApp>>,
    /// Things `check` should point out that are not errors (inline secrets, plain http, no verification).
    pub warnings: Vec<String>,
    /// Secrets [`load_for_operator`] could not read (always empty from [`load`]).
    pub unresolved: Unresolved,
}

/// The secrets an operator command's load could not read: each stands in as a placeholder
/// value, so the rest of the file still validates, and this says why it could not be read.
/// A command asks only about the secrets it uses.
#[derive(Debug, Default)]
pub struct Unresolved(HashMap<String, String>);

impl Unresolved {
    /// Why the secret whose loaded value is `value` could not be read (`PATH:LINE:COL: message`);
    /// None when it was read.
    pub fn why(&self, value: &str) -> Option<&str> {
        self.0.get(value).map(String::as_str)
    }
}

/// How a load treats a secret it cannot read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Secrets {
    /// A config error (`run`, `check`, reload): the relay needs every secret.
    Required,
    /// A placeholder, noted in [`Config::unresolved`] (operator commands, which each need only a
    /// few of them and may run outside the service, without its credentials).
    Deferred,
    /// `check` from a shell: as `Required`, except that a `cred:` secret, which only the
    /// service has, is a warning when neither `$CREDENTIALS_DIRECTORY` nor the running
    /// service's credentials hold it (the service's own `ExecStartPre=` check reads it).
    Check,
    /// Only inline secrets: an `env:`, `file:` or `cred:` reference is a config error, never
    /// read ([`parse_self_contained`]).
    InlineOnly,
}

/// What the packaged config template writes where the operator must fill something in: a file
/// that still holds one is refused, with every line that does.
pub const PLACEHOLDER: &str = "CHANGE_ME";

#[derive(Debug)]
pub struct Server {
    /// Scheme and authority providers call, without a trailing slash (e.g. `https://chat.example.com`).
    pub public_url: Option<String>,
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub max_body: u64,
    pub request_timeout: Duration,
    pub header_timeout: Duration,
    /// A connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// Open connections per listener, and per source address (an IPv6 one by its /64).
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub redirect_http: bool,
    pub shutdown_grace: Duration,
    pub trusted_proxies: Vec<IpNet>,
    pub tls: Option<TlsFiles>,
    pub acme: Option<Acme>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Acme {
    pub domains: Vec<String>,
    pub contact: Vec<String>,
    pub directory: String,
    pub cache_dir: PathBuf,
    pub ca_file: Option<PathBuf>,
    /// Seals the ACME keys relays keep in a shared database (`backend = "postgres"`).
    pub key: Option<Secret>,
}

/// `[storage] backend`: where the queue, dead letters, dedup keys and windows live.
#[derive(Debug, Clone, PartialEq)]
pub enum StorageBackend {
    /// One relay, a redb file under `[storage] path` (the default).
    Embedded,
    /// Any number of relays sharing one PostgreSQL database.
    Postgres(Box<PostgresStorage>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PostgresStorage {
    /// `postgres://user:pass@host:port/db?sslmode=disable|require|verify-full&sslrootcert=PATH`,
    /// parsed (it holds the password: its Debug does not show it).
    pub url: pg_url::PgUrl,
    /// Connections per relay.
    pub pool: u32,
    /// How soon another relay resumes a dead relay's conversations.
    pub takeover: Duration,
}

/// Bounds of `[server] max_connections` and `max_connections_per_ip`.
pub const MAX_CONNECTIONS_RANGE: std::ops::RangeInclusive<i64> = 1..=1_000_000;

/// Files the relay holds besides its connections (store, logs, upstream connections, certificates).
const FILES_BESIDE_CONNECTIONS: u64 = 512;

/// Bounds of `[storage] pool` and `takeover`, given in the error when a value is outside them.
pub const POOL_RANGE: std::ops::RangeInclusive<i64> = 2..=1000;
pub const TAKEOVER_RANGE: std::ops::RangeInclusive<Duration> = Duration::from_secs(3)..=Duration::from_secs(600);

/// The durations a key may take, given in the error when a value is outside them. Zero turns a
/// timeout into "fail at once" (`request_timeout = "0s"` answers 408 to every body that needs a
/// second read) and an absurd one (days) into "never", so both are refused.
pub mod ranges {
    use std::ops::RangeInclusive;
    use std::time::Duration;
    type Range = RangeInclusive<Duration>;
    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    const fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }
    const HOUR: u64 = 3600;
    const DAY: u64 = 24 * HOUR;
    /// `[server] request_timeout`, `header_timeout`: a client gets this long to send.
    pub const CLIENT: Range = s(1)..=s(HOUR);
    /// `[server] idle_timeout`: how long a connection may wait for its next request.
    pub const IDLE: Range = s(1)..=s(HOUR);
    /// `[server] shutdown_grace`.
    pub const SHUTDOWN_GRACE: Range = s(1)..=s(HOUR);
    /// `[delivery] timeout`, a `[[motion]] timeout`, `[outbound] timeout`: one call upstream.
    pub const UPSTREAM: Range = ms(100)..=s(HOUR);
    /// `[delivery] retry_initial`, `retry_max`.
    pub const RETRY: Range = ms(10)..=s(DAY);
    /// `[delivery] give_up_after`.
    pub const GIVE_UP_AFTER: Range = s(1)..=s(365 * DAY);
    /// `[delivery] dedup_window`.
    pub const DEDUP_WINDOW: Range = s(60)..=s(365 * DAY);
    /// `[delivery] auto_budget`.
    pub const AUTO_BUDGET: Range = ms(10)..=s(5 * 60);
}

#[derive(Debug)]
pub struct Admin {
    pub listen: Option<SocketAddr>,
    pub token: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct Delivery {
    pub mode: Mode,
    pub timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub give_up_after: Duration,
    pub dedup_window: Duration,
    pub auto_budget: Duration,
    /// Concurrent requests to one Motion (an extension of the SPEC's schema; default 64). A
    /// conversation has one attempt in flight at a time, so a Motion gets at most
    /// `concurrency / round trip` events a second: at 32, a busy relay accepted events faster
    /// than it delivered them and built a backlog (BENCHMARKS.md, "The durable path").
    pub concurrency: u32,
}

#[derive(Debug)]
pub struct Motion {
    pub name: String,
    /// Base URL without a trailing slash.
    pub url: http::Uri,
    pub hosts: Vec<String>,
    pub outbound_token: Option<Secret>,
    pub signing_secret: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    pub max_queued: u64,
    /// Bytes (bodies and headers) this Motion's waiting events may hold.
    pub max_queued_bytes: u64,
    /// Webhooks accepted for this Motion per period, with their burst.
    pub rate_limit: Option<RateLimit>,
    pub window_policy: WindowPolicy,
    pub mode: Mode,
    pub timeout: Duration,
    pub allow_from: Vec<IpNet>,
    pub accounts: Vec<Arc<Account>>,
}

pub struct Account {
    pub id: String,
    pub provider: ProviderKind,
    pub verifier: AccountVerifier,
    /// The resolved settings the verifier was built from, kept by the operator commands' loads
    /// ([`load_for_operator`], [`load_for_check`]: `simulate` signs with them, `check --urls`
    /// names the token); `None` from [`load`] and [`parse`], whose relay needs only the verifier.
    pub verification: Option<Box<VerifierConfig>>,
    /// Meta's handshake token (any account may carry one).
    pub verify_token: Option<Secret>,
    pub outbound: OutboundCreds,
    pub app: Option<String>,
    pub phone_number_id: Option<String>,
    pub waba_id: Option<String>,
    /// Not configuration: the webhooks accepted for this account since this config was loaded
    /// (the board's per-account figure), kept here so the request path needs no lookup.
    pub received: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account").field("id", &self.id).field("provider", &self.provider).finish_non_exhaustive()
    }
}

/// `rate_limit = "200/s"` with `burst`: `count` webhooks per `per`, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
    pub burst: u32,
}

impl Motion {
    /// Whether inbound messages must open the 24-hour window: only when this Motion can send
    /// through the relay at all (it has an `outbound_token`) and the policy is not `off`.
    /// Otherwise nobody would ever read the window, and reading every payload costs time.
    pub fn tracks_window(&self) -> bool {
        self.outbound_token.is_some() && self.window_policy != WindowPolicy::Off
    }
}

pub struct MetaApp {
    pub name: String,
    pub provider: ProviderKind,
    pub verifier: AccountVerifier,
    pub verify_token: Option<Secret>,
}

impl std::fmt::Debug for MetaApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaApp").field("name", &self.name).finish_non_exhaustive()
    }
}

/// `max_queued_bytes` when unset: one tenant's backlog of large payloads must not fill the disk.
pub const DEFAULT_MAX_QUEUED_BYTES: u64 = 1 << 30;

/// `[storage] path` by default: the folder systemd's `StateDirectory=whatsapp-relay` gives the
/// service (`systemd/whatsapp-relay.service`).
pub const DEFAULT_STORAGE: &str = "/var/lib/whatsapp-relay";

/// Motion names that would collide with the relay's own paths.
const RESERVED: &[&str] = &["meta", "admin", "healthz", "outbound"];

/// Reads, parses and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    parse(path, &text)
}

/// Like [`load`], for operator commands (`queue`, `simulate`, `check --urls`, `store backup`):
/// a secret that cannot be read is not an error but a placeholder noted in
/// [`Config::unresolved`], and a `cred:` secret is also looked for among the running
/// service's credentials ([`secret::SERVICE_CREDENTIALS`]). Everything else is checked as usual.
pub fn load_for_operator(path: &Path) -> Result<Config, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    parse_with(path, &text, Secrets::Deferred)
}

/// Like [`load`], for `check` run from a shell: a `cred:` secret it cannot read (they are the
/// service's) is a warning, not an error. Every other check is the same.
pub fn load_for_check(path: &Path) -> Result<Config, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    parse_with(path, &text, Secrets::Check)
}

/// Parses and validates `text` as if read from `path` (used by tests and `load`).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    parse_with(path, text, Secrets::Required)
}

/// Like [`parse`], but the text alone decides: a secret must be written inline, and an `env:`,
/// `file:` or `cred:` reference is a config error instead of being read. For the config fuzz
/// target, which feeds arbitrary text and must not read the machine's files or environment
/// (file paths such as `ca_file` are still checked for existence, never opened).
pub fn parse_self_contained(path: &Path, text: &str) -> Result<Config, ConfigError> {
    parse_with(path, text, Secrets::InlineOnly)
}

fn parse_with(path: &Path, text: &str, secrets: Secrets) -> Result<Config, ConfigError> {
    let loc = Locator::new(path, text);
    let started = std::time::Instant::now();
    let file = parse_file(text).map_err(|e| loc.error(e.span(), e.message().to_string()))?;
    let parsed = started.elapsed();
    placeholders_left(&loc)?;
    let scanned = started.elapsed();
    let config = Validator {
        secrets,
        unresolved: HashMap::new(),
        loc,
        warnings: Vec::new(),
        apps: HashMap::new(),
        phone_ids: HashMap::new(),
        secrets_seen: HashMap::new(),
        inline_secrets: (0, None),
    }
    .config(&file);
    let validated = started.elapsed();
    tracing::debug!(
        parse_ms = parsed.as_secs_f64() * 1000.0,
        placeholders_ms = (scanned - parsed).as_secs_f64() * 1000.0,
        validate_ms = (validated - scanned).as_secs_f64() * 1000.0,
        "config parsed"
    );
    config
}

/// The file's TOML. A large file is parsed a Motion at a time (from each line that is exactly
/// `[[motion]]` to the next): toml builds a document of the whole text before handing it to
/// serde, which at 100,000 accounts is some 200 MB that each part's few hundred KB replace.
///
/// This gives exactly what parsing the whole text gives: each part is parsed from the top level,
/// and a part that ends inside something (a multi-line string or array holding such a line)
/// does not parse. A part after the first may hold Motions only, the first none (nor an empty
/// `motion` array), so no key is defined twice across parts. Whenever a part does not parse or
/// breaks those rules, the whole text is parsed instead, and its error is the one reported.
fn parse_file(text: &str) -> Result<schema::File, toml::de::Error> {
    let mut starts = Vec::new();
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.trim() == "[[motion]]" {
            starts.push(at);
        }
        at += line.len();
    }
    if starts.len() < 2 {
        return toml::from_str(text);
    }
    let in_parts = || -> Option<schema::File> {
        let head = &text[..starts[0]];
        let mut file: schema::File = toml::from_str(head).ok()?;
        if !file.motion.is_empty()
            || (head.contains("motion") && toml::from_str::<toml::Table>(head).ok()?.contains_key("motion"))
        {
            return None;
        }
        file.motion.reserve(starts.len());
        for (i, &start) in starts.iter().enumerate() {
            let end = starts.get(i + 1).copied().unwrap_or(text.len());
            let _offset = schema::Offset::set(start);
            let part: schema::Motions = toml::from_str(&text[start..end]).ok()?;
            file.motion.extend(part.motion);
        }
        Some(file)
    };
    match in_parts() {
        Some(file) => Ok(file),
        None => toml::from_str(text),
    }
}

/// Refuses a file that still holds [`PLACEHOLDER`] outside comments, naming every line that does.
fn placeholders_left(loc: &Locator<'_>) -> Result<(), ConfigError> {
    // The usual case, without splitting a large file into lines.
    if !loc.text.contains(PLACEHOLDER) {
        return Ok(());
    }
    let mut first = None;
    let mut lines = Vec::new();
    let mut offset = 0;
    for (n, line) in loc.text.split_inclusive('\n').enumerate() {
        // Outside comments (no value of the template holds a '#').
        let code = line.split('#').next().unwrap_or("");
        if let Some(at) = code.find(PLACEHOLDER) {
            first.get_or_insert(offset + at);
            lines.push((n + 1).to_string());
        }
        offset += line.len();
    }
    match first {
        None => Ok(()),
        Some(at) => Err(loc.error(
            Some(at..at),
            format!(
                "{} placeholder(s) {PLACEHOLDER} left to fill in, on line(s) {}: each line's comment says what goes there",
                lines.len(),
                lines.join(", ")
            ),
        )),
    }
}

struct Validator<'a> {
    secrets: Secrets,
    /// Placeholder value -> why the secret could not be read ([`Secrets::Deferred`] only).
    unresolved: HashMap<String, String>,
    loc: Locator<'a>,
    warnings: Vec<String>,
    /// Verification settings of each `[[meta_app]]`, which its accounts inherit.
    apps: HashMap<String, (VerifierConfig, Option<Secret>)>,
    /// `phone_number_id` -> the account (motion/id) that claims it.
    phone_ids: HashMap<&'a str, &'a str>,
    /// (setting, SHA-256 of a verification secret) -> the first (motion, account) using it.
    secrets_seen: HashMap<(&'static str, [u8; 32]), (&'a str, &'a str)>,
    /// Inline secrets: how many, and where the first is (one warning for all of them).
    inline_secrets: (usize, Option<std::ops::Range<usize>>),
}

type R<T> = Result<T, ConfigError>;

impl<'a> Validator<'a> {
    fn err<T>(&self, span: std::ops::Range<usize>, msg: impl Into<String>) -> R<T> {
        Err(self.loc.error(Some(span), msg))
    }

    fn warn(&mut self, span: std::ops::Range<usize>, msg: impl std::fmt::Display) {
        let (line, col) = self.loc.line_col(span.start);
        self.warnings.push(format!("{}:{line}:{col}: {msg}", self.loc.path.display()));
    }

    fn secret(&mut self, s: &S<String>) -> R<Secret> {
        // Read only where it matters: a file of 100,000 accounts has as many secrets.
        let outside_service = || std::env::var_os("CREDENTIALS_DIRECTORY").is_none();
        let resolved = match self.secrets {
            Secrets::Required => secret::resolve(s.get_ref()),
            Secrets::Deferred => secret::resolve_outside_service(s.get_ref()),
            Secrets::Check if s.get_ref().starts_with("cred:") && outside_service() => {
                match secret::resolve_outside_service(s.get_ref()) {
                    Ok(found) => Ok(found),
                    Err(msg) => {
                        self.warn(
                            s.span(),
                            format!(
                                "{} is not checked here: {msg}; the service's own check (ExecStartPre=) reads it \
                                 from its credentials (LoadCredential=)",
                                s.get_ref()
                            ),
                        );
                        let placeholder = format!("\0unresolved-{}", self.unresolved.len());
                        self.unresolved.insert(placeholder.clone(), msg);
                        return Ok(Secret::new(placeholder));
                    }
                }
            }
            Secrets::Check => secret::resolve(s.get_ref()),
            Secrets::InlineOnly => match s.get_ref().split_once(':') {
                Some((scheme @ ("env" | "file" | "cred"), _)) => {
                    Err(format!("secret {scheme}: references are not read here; write the secret inline"))
                }
                _ => secret::resolve(s.get_ref()),
            },
        };
        match resolved {
            Ok((secret, source)) => {
                if source == secret::Source::Inline {
                    self.inline_secrets.0 += 1;
                    self.inline_secrets.1.get_or_insert(s.span());
                }
                Ok(secret)
            }
            Err(msg) if self.secrets == Secrets::Deferred => {
                // Unique, so two unread secrets never look equal (the shared-secret warning), and
                // starting with NUL, which no secret read from a file or the environment holds.
                let placeholder = format!("\0unresolved-{}", self.unresolved.len());
                self.unresolved.insert(placeholder.clone(), self.loc.error(Some(s.span()), msg).to_string());
                Ok(Secret::new(placeholder))
            }
            Err(msg) => self.err(s.span(), msg),
        }
    }

    /// `[server.acme] key`: long enough to be a key, not a password (it is hashed, not
    /// stretched).
    fn acme_key(&mut self, s: &Option<S<String>>) -> R<Option<Secret>> {
        let key = self.opt_secret(s.as_ref())?;
        if let (Some(k), Some(s)) = (&key, s) {
            let unresolved = k.expose().starts_with("\0unresolved-");
            if !unresolved && k.expose().trim().chars().count() < 32 {
                return self.err(
                    s.span(),
                    "[server.acme] key must hold at least 32 random characters (e.g. the output of \
                     `openssl rand -base64 32`), the same on every relay",
                );
            }
        }
        Ok(key)
    }

    fn opt_secret(&mut self, s: Option<&S<String>>) -> R<Option<Secret>> {
        s.map(|s| self.secret(s)).transpose()
    }

    fn addr(&self, s: &S<String>) -> R<SocketAddr> {
        s.get_ref().parse().or_else(|_| {
            self.err(
                s.span(),
                format!("invalid listen address {:?}; write IP:PORT such as \"127.0.0.1:8080\"", s.get_ref()),
            )
        })
    }

    fn cidrs(&self, list: &[S<String>]) -> R<Vec<IpNet>> {
        list.iter()
            .map(|s| {
                let v = s.get_ref();
                v.parse::<IpNet>().or_else(|_| v.parse::<std::net::IpAddr>().map(IpNet::from)).or_else(|_| {
                    self.err(s.span(), format!("invalid CIDR {v:?}; write e.g. \"10.0.0.0/8\" or \"192.0.2.7\""))
                })
            })
            .collect()
    }

    fn url(&mut self, s: &S<String>, what: &str) -> R<http::Uri> {
        let raw = s.get_ref().trim_end_matches('/');
        let uri: http::Uri = match raw.parse() {
            Ok(u) => u,
            Err(e) => return self.err(s.span(), format!("invalid {what} {raw:?}: {e}")),
        };
        match (uri.scheme_str(), uri.authority()) {
            (Some("https"), Some(_)) => {}
            (Some("http"), Some(_)) => self.warn(s.span(), format!("{what} uses plain http")),
            _ => return self.err(s.span(), format!("{what} must be an absolute http:// or https:// URL")),
        }
        if uri.query().is_some() {
            return self.err(s.span(), format!("{what} must not have a query string"));
        }
        Ok(uri)
    }

    fn config(mut self, f: &'a schema::File) -> R<Config> {
        // Sized once for the whole file: growing them account by account rehashes each a dozen times.
        let accounts = f.motion.iter().map(|m| m.account.len()).sum();
        self.phone_ids.reserve(accounts);
        self.secrets_seen.reserve(accounts);
        let mut server = self.server(&f.server)?;
        let storage_path = PathBuf::from(f.storage.path.as_deref().unwrap_or(DEFAULT_STORAGE));
        let storage = self.storage(&f.storage)?;
        if let Some(acme) = server.acme.as_mut().filter(|a| a.cache_dir.as_os_str().is_empty()) {
            acme.cache_dir = storage_path.join("acme");
        }
        if let (Some(acme), Some(raw)) = (&server.acme, &f.server.acme) {
            match (&storage, &raw.key) {
                (StorageBackend::Embedded, Some(k)) => self.warn(
                    k.span(),
                    "[server.acme] key is unused with the embedded backend: the ACME keys stay in cache_dir, \
                     readable only by the relay's user",
                ),
                (StorageBackend::Postgres(_), None) if acme.key.is_none() => self.warn(
                    raw.domains.span(),
                    "[server.acme] with backend = \"postgres\" and no key: the ACME account key and the \
                     certificate's private key are stored unencrypted in the database, readable by anyone who can \
                     read it (its roles, backups, replicas); set key = \"cred:acme-key\" (32+ random characters, \
                     the same on every relay)",
                ),
                _ => {}
            }
        }
        let admin = Admin {
            listen: f.admin.listen.as_ref().map(|a| self.addr(a)).transpose()?,
            token: self.opt_secret(f.admin.token.as_ref())?,
        };
        if let (Some(addr), Some(raw)) = (admin.listen, &f.admin.listen) {
            if !addr.ip().is_loopback() {
                // The admin listener has no TLS: its bearer token would cross the network in clear.
                self.warn(
                    raw.span(),
                    format!(
                        "[admin] listen {addr} is not a loopback address, and the admin listener speaks plain HTTP: \
                         its token and metrics cross the network unencrypted; listen on 127.0.0.1 (reach it over \
                         SSH, or through a TLS proxy) or firewall the port"
                    ),
                );
            }
        }
        if storage_path.is_relative() && matches!(storage, StorageBackend::Embedded) {
            self.warnings.push(format!(
                "{}: [storage] path {:?} is relative, so it depends on the directory the relay starts in (/ under \
                 systemd); write an absolute path, such as {DEFAULT_STORAGE} (the folder systemd's \
                 StateDirectory=whatsapp-relay gives the service)",
                self.loc.path.display(),
                storage_path.display()
            ));
        }
        let d = &f.delivery;
        let delivery = Delivery {
            mode: d.mode.as_ref().map_or(Mode::Queue, |m| *m.get_ref()),
            timeout: self.duration(&d.timeout, "[delivery] timeout", 10, ranges::UPSTREAM)?,
            retry_initial: self.duration(&d.retry_initial, "[delivery] retry_initial", 1, ranges::RETRY)?,
            retry_max: self.duration(&d.retry_max, "[delivery] retry_max", 300, ranges::RETRY)?,
            give_up_after: self.duration(
                &d.give_up_after,
                "[delivery] give_up_after",
                7 * 86400,
                ranges::GIVE_UP_AFTER,
            )?,
            dedup_window: self.duration(&d.dedup_window, "[delivery] dedup_window", 7 * 86400, ranges::DEDUP_WINDOW)?,
            auto_budget: self.duration(&d.auto_budget, "[delivery] auto_budget", 2, ranges::AUTO_BUDGET)?,
            concurrency: d.concurrency.unwrap_or(64).max(1),
        };
        if let (Some(max), true) = (&d.retry_max, delivery.retry_max < delivery.retry_initial) {
            return self.err(
                max.span(),
                format!(
                    "[delivery] retry_max ({}) is below retry_initial ({}): backoff grows from retry_initial up to retry_max",
                    units::spell(delivery.retry_max),
                    units::spell(delivery.retry_initial)
                ),
            );
        }
        let meta_apps = f.meta_app.iter().map(|a| self.meta_app(a).map(Arc::new)).collect::<R<Vec<_>>>()?;
        self.app_secrets(&f.meta_app);
        let mut names = HashSet::new();
        let mut hosts = HashMap::new();
        let mut motions = Vec::with_capacity(f.motion.len());
        for m in &f.motion {
            let motion = self.motion(m, &delivery)?;
            if !names.insert(motion.name.clone()) {
                return self.err(m.name.span(), format!("duplicate motion name {:?}", motion.name));
            }
            if motion.signing_secret.is_none() && motion.accounts.iter().any(|a| a.app.is_some()) {
                // Split Meta batches lose Meta's signature; the relay's is then the only proof.
                return self.err(
                    m.name.span(),
                    format!("motion {:?} has accounts on a [[meta_app]] and needs a signing_secret", motion.name),
                );
            }
            for (h, raw) in motion.hosts.iter().zip(&m.hosts) {
                if let Some(other) = hosts.insert(h.clone(), motion.name.clone()) {
                    return self.err(raw.span(), format!("host {h:?} is already used by motion {other:?}"));
                }
            }
            motions.push(Arc::new(motion));
        }
        if let (n, Some(first)) = self.inline_secrets.clone() {
            let what = if n == 1 { "a secret".to_string() } else { format!("{n} secrets (the first here)") };
            self.warn(first, format!("{what} written inline; prefer env:, file: or cred:"));
        }
        for (app, raw) in meta_apps.iter().zip(&f.meta_app) {
            if !motions.iter().flat_map(|m| &m.accounts).any(|a| a.app.as_deref() == Some(app.name.as_str())) {
                self.warn(
                    raw.name.span(),
                    format!("meta_app {:?} has no accounts: its events will all be dead letters", app.name),
                );
            }
        }
        Ok(Config {
            path: self.loc.path.to_path_buf(),
            server,
            admin,
            storage_path,
            storage,
            delivery,
            outbound_timeout: self.duration(&f.outbound.timeout, "[outbound] timeout", 30, ranges::UPSTREAM)?,
            motions,
            meta_apps,
            warnings: self.warnings,
            unresolved: Unresolved(self.unresolved),
        })
    }

    fn server(&mut self, s: &schema::Server) -> R<Server> {
        let public_url = match &s.public_url {
            Some(u) => Some(self.url(u, "public_url")?.to_string().trim_end_matches('/').to_string()),
            None => None,
        };
        let https = s.https.as_ref().map(|a| self.addr(a)).transpose()?;
        if let (Some(_), None, None) = (&https, &s.tls, &s.acme) {
            return self.err(
                s.https.as_ref().unwrap().span(),
                "an https listener needs [server.tls] (certificate files) or [server.acme] (automatic certificates)",
            );
        }
        if https.is_none() {
            if let Some(t) = &s.tls {
                self.warn(t.cert_file.span(), "[server.tls] is unused without an https listener ([server] https)");
            }
            if let Some(a) = &s.acme {
                self.warn(
                    a.domains.span(),
                    "[server.acme] is unused without an https listener ([server] https): no certificate will be obtained",
                );
            }
        }
        if let (Some(_), Some(acme)) = (&s.tls, &s.acme) {
            return self.err(acme.domains.span(), "[server.tls] and [server.acme] are exclusive: keep one");
        }
        let acme = match &s.acme {
            Some(a) => {
                if a.domains.get_ref().is_empty() {
                    return self.err(a.domains.span(), "[server.acme] domains is empty");
                }
                let directory = match a.directory.as_ref().map(|d| d.get_ref().as_str()) {
                    None | Some("letsencrypt") => "https://acme-v02.api.letsencrypt.org/directory".to_string(),
                    Some("letsencrypt-staging") => "https://acme-staging-v02.api.letsencrypt.org/directory".to_string(),
                    Some(url) if url.starts_with("https://") => url.to_string(),
                    Some(other) => {
                        return self.err(
                            a.directory.as_ref().unwrap().span(),
                            format!("unknown ACME directory {other:?}: use \"letsencrypt\", \"letsencrypt-staging\" or an https:// URL"),
                        );
                    }
                };
                for c in &a.contact {
                    if !c.starts_with("mailto:") {
                        return self.err(
                            a.domains.span(),
                            format!("[server.acme] contact {c:?} must be a URL such as \"mailto:ops@example.com\""),
                        );
                    }
                }
                Some(Acme {
                    domains: a.domains.get_ref().clone(),
                    contact: a.contact.clone(),
                    directory,
                    // Without cache_dir: `acme/` under [storage] path, filled in by `config`.
                    cache_dir: a.cache_dir.as_deref().map(PathBuf::from).unwrap_or_default(),
                    ca_file: a.ca_file.as_ref().map(|c| self.readable(c)).transpose()?,
                    key: self.acme_key(&a.key)?,
                })
            }
            None => None,
        };
        let tls = match &s.tls {
            Some(t) => {
                Some(TlsFiles { cert_file: self.readable(&t.cert_file)?, key_file: self.readable(&t.key_file)? })
            }
            None => None,
        };
        let http = s.http.as_ref().map(|a| self.addr(a)).transpose()?;
        let redirect_http = s.redirect_http.as_ref().is_some_and(|r| *r.get_ref());
        if let (true, None, Some(r)) = (redirect_http, &https, &s.redirect_http) {
            return self.err(r.span(), "redirect_http = true needs an https listener ([server] https) to redirect to");
        }
        if http.is_none() && https.is_none() {
            self.warnings.push(format!("{}: no public listener ([server] http or https)", self.loc.path.display()));
        }
        let (max_connections, max_connections_per_ip) = self.connection_caps(s, [http, https])?;
        Ok(Server {
            public_url,
            http,
            https,
            max_body: s.max_body.map_or(4 << 20, |x| x.0),
            request_timeout: self.duration(&s.request_timeout, "[server] request_timeout", 15, ranges::CLIENT)?,
            header_timeout: self.duration(&s.header_timeout, "[server] header_timeout", 10, ranges::CLIENT)?,
            idle_timeout: self.duration(&s.idle_timeout, "[server] idle_timeout", 60, ranges::IDLE)?,
            max_connections,
            max_connections_per_ip,
            redirect_http,
            shutdown_grace: self.duration(&s.shutdown_grace, "[server] shutdown_grace", 30, ranges::SHUTDOWN_GRACE)?,
            trusted_proxies: self.cidrs(&s.trusted_proxies)?,
            tls,
            acme,
        })
    }

    /// `max_connections` and `max_connections_per_ip`, in range, with a warning when the
    /// listeners together may hold more connections than the process may open files.
    fn connection_caps(&mut self, s: &schema::Server, listeners: [Option<SocketAddr>; 2]) -> R<(usize, usize)> {
        let cap = |v: &Option<S<i64>>, key: &str, default: i64| match v {
            None => Ok(default),
            Some(n) if MAX_CONNECTIONS_RANGE.contains(n.get_ref()) => Ok(*n.get_ref()),
            Some(n) => self.err(n.span(), format!("{key} must be between 1 and {}", MAX_CONNECTIONS_RANGE.end())),
        };
        let max = cap(&s.max_connections, "max_connections", 10_000)?;
        let per_ip = cap(&s.max_connections_per_ip, "max_connections_per_ip", 256)?;
        if let Some(n) = s.max_connections_per_ip.as_ref().filter(|_| per_ip > max) {
            return self.err(n.span(), format!("max_connections_per_ip ({per_ip}) is above max_connections ({max})"));
        }
        // Each connection is a file; the relay raises its soft limit to the hard one at start.
        // The public listeners are what clients can fill (the admin one sits on loopback or a
        // management network); the reserve covers the admin listener, store and upstreams.
        let public = listeners.iter().flatten().count().max(1) as u64;
        let wanted = public * max as u64 + FILES_BESIDE_CONNECTIONS;
        let hard = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(u64::MAX, |(_, hard)| hard);
        if wanted > hard {
            let msg = format!(
                "max_connections = {max} on {public} public listener(s) may need {wanted} open files, more than \
                 this process may open ({hard}): raise LimitNOFILE= in the service, or lower max_connections"
            );
            match &s.max_connections {
                Some(n) => self.warn(n.span(), msg),
                None => self.warnings.push(format!("{}: {msg} (10000 by default)", self.loc.path.display())),
            }
        }
        Ok((max as usize, per_ip as usize))
    }

    fn storage(&mut self, s: &schema::Storage) -> R<StorageBackend> {
        let postgres = match &s.backend {
            None => false,
            Some(b) => match b.get_ref().as_str() {
                "embedded" => false,
                "postgres" => true,
                other => {
                    return self
                        .err(b.span(), format!("unknown storage backend {other:?}: use \"embedded\" or \"postgres\""));
                }
            },
        };
        if !postgres {
            let unused = [
                s.url.as_ref().map(|v| ("url", v.span())),
                s.pool.as_ref().map(|v| ("pool", v.span())),
                s.takeover.as_ref().map(|v| ("takeover", v.span())),
            ];
            for (key, span) in unused.into_iter().flatten() {
                self.warn(
                    span,
                    format!("[storage] {key} is unused with the embedded backend (set backend = \"postgres\")"),
                );
            }
            return Ok(StorageBackend::Embedded);
        }
        let backend_span = s.backend.as_ref().map(|b| b.span()).unwrap_or_default();
        let Some(url_ref) = &s.url else {
            return self.err(
                backend_span,
                "[storage] backend = \"postgres\" needs url, a secret holding the database URL \
                 (e.g. url = \"env:WHATSAPP_RELAY_PG_URL\" with postgres://user:pass@host:5432/relay?sslmode=verify-full)",
            );
        };
        let url = self.secret(url_ref)?;
        let url = match pg_url::parse(url.expose()) {
            Ok(u) => u,
            // The message never repeats the URL: it holds a password.
            Err(e) => return self.err(url_ref.span(), format!("[storage] url: {e}")),
        };
        let pool = match &s.pool {
            None => 16,
            Some(p) if POOL_RANGE.contains(p.get_ref()) => *p.get_ref() as u32,
            Some(p) => {
                return self.err(
                    p.span(),
                    format!(
                        "[storage] pool = {} is out of range: connections per relay, {} to {}",
                        p.get_ref(),
                        POOL_RANGE.start(),
                        POOL_RANGE.end()
                    ),
                );
            }
        };
        let takeover = match &s.takeover {
            None => Duration::from_secs(15),
            Some(t) if TAKEOVER_RANGE.contains(&t.get_ref().0) => t.get_ref().0,
            Some(t) => {
                return self.err(
                    t.span(),
                    format!(
                        "[storage] takeover = {:?} is out of range: from {:?} to {:?} (a dead relay's conversations wait this long)",
                        t.get_ref().0,
                        TAKEOVER_RANGE.start(),
                        TAKEOVER_RANGE.end()
                    ),
                );
            }
        };
        Ok(StorageBackend::Postgres(Box::new(PostgresStorage { url, pool, takeover })))
    }

    /// A duration key's value (`default_secs` when absent), refused with its allowed range when
    /// outside `range`.
    fn duration(
        &self,
        v: &Option<S<Dur>>,
        key: &str,
        default_secs: u64,
        range: std::ops::RangeInclusive<Duration>,
    ) -> R<Duration> {
        let Some(v) = v else { return Ok(Duration::from_secs(default_secs)) };
        let d = v.get_ref().0;
        if range.contains(&d) {
            return Ok(d);
        }
        self.err(
            v.span(),
            format!(
                "{key} = {:?} is out of range: write a duration from {:?} to {:?}",
                units::spell(d),
                units::spell(*range.start()),
                units::spell(*range.end())
            ),
        )
    }

    fn readable(&self, p: &S<String>) -> R<PathBuf> {
        match std::fs::metadata(p.get_ref()) {
            Ok(m) if m.is_file() => Ok(PathBuf::from(p.get_ref())),
            Ok(_) => self.err(p.span(), format!("{} is not a file", p.get_ref())),
            Err(e) => self.err(p.span(), format!("cannot read {}: {e}", p.get_ref())),
        }
    }

    fn segment(&self, s: &S<String>, what: &str) -> R<String> {
        let v = s.get_ref();
        let ok = !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok || v.starts_with('.') {
            return self.err(
                s.span(),
                format!("{what} {v:?} must be letters, digits, '-', '_' or '.', not starting with '.'"),
            );
        }
        Ok(v.clone())
    }

    /// One of a Motion's `hosts`, lower-cased: a name or a bracketed IPv6 address, without a
    /// port. Routing compares the Host header without its port, so an entry with a port (or
    /// anything a Host header cannot carry) would be accepted here and never match a request.
    fn host(&self, s: &S<String>) -> R<String> {
        let h = s.get_ref().to_ascii_lowercase();
        let name = !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
        let ipv6 = h
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
        if !(name || ipv6) {
            return self.err(
                s.span(),
                format!("host {h:?} must be a name or address without a port, e.g. \"chat.example.com\" or \"[2001:db8::1]\""),
            );
        }
        Ok(h)
    }

    fn motion(&mut self, m: &'a schema::Motion, delivery: &Delivery) -> R<Motion> {
        let name = self.segment(&m.name, "motion name")?;
        if RESERVED.contains(&name.as_str()) {
            return self
                .err(m.name.span(), format!("motion name {name:?} is reserved (meta, admin, healthz, outbound)"));
        }
        let url = self.url(&m.url, "motion url")?;
        let mut ids = HashSet::with_capacity(m.account.len());
        let mut accounts = Vec::with_capacity(m.account.len());
        for a in &m.account {
            let (acc, settings) = self.account(a)?;
            self.shared_secrets(m.name.get_ref(), a, &acc, &settings);
            if !ids.insert(a.id.get_ref().as_str()) {
                return self.err(a.id.span(), format!("duplicate account id {:?} in motion {name:?}", acc.id));
            }
            accounts.push(Arc::new(acc));
        }
        Ok(Motion {
            hosts: m.hosts.iter().map(|h| self.host(h)).collect::<R<_>>()?,
            outbound_token: self.opt_secret(m.outbound_token.as_ref())?,
            signing_secret: self.opt_secret(m.signing_secret.as_ref())?,
            ca_file: m.ca_file.as_ref().map(|c| self.readable(c)).transpose()?,
            max_queued: m.max_queued.unwrap_or(100_000),
            max_queued_bytes: m.max_queued_bytes.map_or(DEFAULT_MAX_QUEUED_BYTES, |x| x.0),
            rate_limit: self.rate_limit(m)?,
            window_policy: m.window_policy.unwrap_or_default(),
            mode: m.mode.as_ref().map_or(delivery.mode, |x| *x.get_ref()),
            timeout: match &m.timeout {
                None => delivery.timeout,
                Some(_) => self.duration(&m.timeout, "[[motion]] timeout", 0, ranges::UPSTREAM)?,
            },
            allow_from: self.cidrs(&m.allow_from)?,
            name,
            url,
            accounts,
        })
    }

    /// `rate_limit = "N/s" | "N/m" | "N/h"` and `burst` (default: one second of the rate, at
    /// least 1). Twilio does not retry a 429 (nor a 503): a limit on a Motion with Twilio
    /// accounts drops their excess webhooks for good, which `check` says.
    fn rate_limit(&mut self, m: &schema::Motion) -> R<Option<RateLimit>> {
        let Some(spec) = &m.rate_limit else {
            if let Some(b) = &m.burst {
                return self.err(b.span(), "burst needs rate_limit (e.g. rate_limit = \"200/s\")");
            }
            return Ok(None);
        };
        let bad =
            || format!("invalid rate_limit {:?}; write e.g. \"200/s\", \"5000/m\" or \"100000/h\"", spec.get_ref());
        let (n, unit) =
            spec.get_ref().trim().split_once('/').ok_or_else(|| self.loc.error(Some(spec.span()), bad()))?;
        let count: u32 =
            n.trim().parse().ok().filter(|n| *n > 0).ok_or_else(|| self.loc.error(Some(spec.span()), bad()))?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return self.err(spec.span(), bad()),
        };
        let one_second = (f64::from(count) / per.as_secs_f64()).ceil().max(1.0) as u32;
        let burst = match &m.burst {
            Some(b) if *b.get_ref() == 0 => return self.err(b.span(), "burst must be at least 1"),
            Some(b) => *b.get_ref(),
            None => one_second,
        };
        if m.account.iter().any(|a| a.provider.get_ref() == crate::provider::twilio::KIND.as_str()) {
            self.warn(
                spec.span(),
                format!(
                    "motion {:?} has Twilio accounts: Twilio does not retry a 429 (or a 503), so webhooks past rate_limit are lost for good",
                    m.name.get_ref()
                ),
            );
        }
        Ok(Some(RateLimit { count, per, burst }))
    }

    /// Notes each `[[meta_app]]`'s secrets for [`Self::shared_secrets`] (as held by [`APP_HOLDER`]):
    /// an account outside the app that verifies with one of them accepts, at its own URL, every
    /// batch signed for the app, which any tenant on the app receives.
    fn app_secrets(&mut self, apps: &'a [schema::MetaApp]) {
        for a in apps {
            let Some((v, _)) = self.apps.get(a.name.get_ref().as_str()) else { continue };
            let secrets = [
                ("app_secret", v.app_secret.clone()),
                ("platform_secret", v.platform_secret.clone()),
                ("shared_token", v.shared_token.clone()),
            ];
            for (field, value) in secrets {
                let Some(value) = value else { continue };
                self.secrets_seen.entry(secret_key(field, &value)).or_insert((APP_HOLDER, a.name.get_ref()));
            }
        }
    }

    /// Warns when an account of another Motion verifies with the same secret: signatures do not
    /// name the account, so each would accept webhooks signed for the other (one tenant could
    /// replay its own into the other's Motion). App accounts share their app's on purpose; any
    /// other account with an app's secret is warned about too.
    fn shared_secrets(&mut self, motion: &'a str, raw: &'a schema::Account, acc: &Account, v: &VerifierConfig) {
        if acc.app.is_some() {
            return;
        }
        let secrets = [
            ("auth_token", &v.auth_token),
            ("app_secret", &v.app_secret),
            ("platform_secret", &v.platform_secret),
            ("webhook_secret", &v.webhook_secret),
            ("hmac_secret", &v.hmac_secret),
            ("shared_token", &v.shared_token),
        ];
        for (field, value) in secrets {
            let Some(value) = value else { continue };
            let key = secret_key(field, value);
            match self.secrets_seen.get(&key) {
                Some(&(APP_HOLDER, app)) => {
                    let msg = format!(
                        "account {:?} of motion {motion:?} has the same {field} as meta_app {app:?}: it accepts at its \
                         own URL the batches signed for the app, which every tenant on the app receives; give it its \
                         own secret, or put it on the app (app = {app:?})",
                        acc.id
                    );
                    self.warn(raw.id.span(), msg);
                }
                Some(&(m, other)) if m != motion => {
                    let msg = format!(
                        "account {:?} of motion {motion:?} has the same {field} as account {other:?} of motion {m:?}: \
                         each accepts webhooks signed for the other; give each tenant its own secret",
                        acc.id
                    );
                    self.warn(raw.id.span(), msg);
                }
                Some(_) => {}
                None => {
                    self.secrets_seen.insert(key, (motion, raw.id.get_ref()));
                }
            }
        }
    }

    /// The account, and the resolved settings its verifier was built from.
    fn account(&mut self, a: &'a schema::Account) -> R<(Account, VerifierConfig)> {
        let id = self.segment(&a.id, "account id")?;
        let Some(provider) = ProviderKind::parse(a.provider.get_ref()) else {
            return self.err(
                a.provider.span(),
                format!("unknown provider {:?}: use one of {}", a.provider.get_ref(), ProviderKind::names()),
            );
        };
        let s = |v: &mut Self, x: &schema::B<S<String>>| v.opt_secret(x.as_deref());
        let text = |x: &schema::B<String>| x.as_deref().cloned();
        let auth_token = s(self, &a.auth_token)?;
        let mut verify_token = s(self, &a.verify_token)?;
        let expose = |x: &Option<Secret>| x.as_ref().map(|s| s.expose().to_string());
        let mut vcfg = VerifierConfig {
            provider: Some(provider),
            auth_token: expose(&auth_token),
            app_secret: expose(&s(self, &a.app_secret)?),
            verify_token: expose(&verify_token),
            webhook_secret: expose(&s(self, &a.webhook_secret)?),
            platform_secret: expose(&s(self, &a.platform_secret)?),
            shared_token: expose(&s(self, &a.shared_token)?),
            token_header: text(&a.token_header),
            token_param: text(&a.token_param),
            allow_from: self.cidrs(&a.allow_from)?,
            hmac_header: text(&a.hmac_header),
            hmac_secret: expose(&s(self, &a.hmac_secret)?),
            hmac_algorithm: a.hmac_algorithm.as_ref().map(|x| x.get_ref().clone()),
            hmac_encoding: a.hmac_encoding.as_ref().map(|x| x.get_ref().clone()),
            hmac_prefix: text(&a.hmac_prefix),
            insecure_no_verification: a.insecure_no_verification,
        };
        if let Some(app) = &a.app {
            let Some((inherit, app_verify_token)) = self.apps.get(app.get_ref()) else {
                return self
                    .err(app.span(), format!("unknown meta_app {:?}: declare it with [[meta_app]]", app.get_ref()));
            };
            if inherit.provider != Some(provider) {
                return self.err(a.provider.span(), format!("meta_app {:?} is for another provider", app.get_ref()));
            }
            // An app account takes the app's secrets and needs none of its own.
            let own = &vcfg;
            vcfg = VerifierConfig {
                app_secret: own.app_secret.clone().or_else(|| inherit.app_secret.clone()),
                platform_secret: own.platform_secret.clone().or_else(|| inherit.platform_secret.clone()),
                shared_token: own.shared_token.clone().or_else(|| inherit.shared_token.clone()),
                token_header: own.token_header.clone().or_else(|| inherit.token_header.clone()),
                token_param: own.token_param.clone().or_else(|| inherit.token_param.clone()),
                allow_from: if own.allow_from.is_empty() { inherit.allow_from.clone() } else { own.allow_from.clone() },
                ..own.clone()
            };
            if verify_token.is_none() {
                verify_token = app_verify_token.clone();
            }
            if a.phone_number_id.is_none() && a.waba_id.is_none() {
                return self.err(app.span(), "an account on a meta_app needs its phone_number_id (or waba_id)");
            }
        }
        if let Some(p) = &a.phone_number_id {
            if let Some(other) = self.phone_ids.insert(p.get_ref(), a.id.get_ref()) {
                return self.err(
                    p.span(),
                    format!("phone_number_id {:?} is already claimed by account {other:?}", p.get_ref()),
                );
            }
        }
        let verifier = match AccountVerifier::new(&vcfg) {
            Ok(v) => v,
            Err(msg) => return self.err(a.id.span(), format!("account {id:?}: {msg}")),
        };
        if verifier.is_insecure() {
            self.warn(
                a.id.span(),
                format!("account {id:?} accepts webhooks without verification (insecure_no_verification)"),
            );
        }
        let region = a.region.as_ref().map(|r| r.get_ref().clone());
        if let (Some(r), Some(span)) = (&region, a.region.as_ref().map(|r| r.span())) {
            if r != "us" && r != "eu" {
                return self.err(span, format!("unknown region {r:?}: use \"us\" or \"eu\""));
            }
        }
        let api_base = match &a.api_base {
            Some(u) => Some(self.url(u, "api_base")?.to_string().trim_end_matches('/').to_string()),
            None => None,
        };
        let auth_url = match &a.auth_url {
            Some(u) => Some(self.url(u, "auth_url")?.to_string()),
            None => None,
        };
        if a.key_id.is_some() != a.key_secret.is_some() {
            return self.err(
                a.id.span(),
                format!(
                    "account {id:?}: key_id and key_secret go together (the Sinch access key); set both or neither"
                ),
            );
        }
        let mut outbound = OutboundCreds {
            account_sid: text(&a.account_sid),
            auth_token,
            access_token: s(self, &a.access_token)?,
            api_key: s(self, &a.api_key)?,
            project_id: text(&a.project_id),
            key_id: text(&a.key_id),
            key_secret: s(self, &a.key_secret)?,
            region,
            auth_url,
            sid: text(&a.sid),
            api_base,
            outbound_paths: a.outbound_paths.as_deref().cloned(),
            paths: Default::default(),
        };
        let phone_number_id = a.phone_number_id.as_ref().map(|x| x.get_ref().clone());
        outbound.paths = match crate::provider::AllowList::for_account(provider, &outbound, phone_number_id.as_deref())
        {
            Ok(p) => p,
            Err(msg) => return self.err(a.id.span(), format!("account {id:?}: {msg}")),
        };
        // Only operator commands read the settings again; the relay's own loads keep no second
        // copy of the account's secrets beside its verifier.
        let verification = (self.secrets != Secrets::Required).then(|| Box::new(vcfg.clone()));
        let account = Account {
            outbound,
            id,
            provider,
            verifier,
            verification,
            verify_token,
            app: a.app.as_ref().map(|x| x.get_ref().clone()),
            phone_number_id,
            waba_id: text(&a.waba_id),
            received: Default::default(),
        };
        Ok((account, vcfg))
    }

    fn meta_app(&mut self, a: &schema::MetaApp) -> R<MetaApp> {
        let name = self.segment(&a.name, "meta_app name")?;
        // Any provider whose webhooks come in the Cloud API envelope (Meta, 360dialog's partner apps).
        let provider = match a.provider.as_ref().map(|p| (p.get_ref().as_str(), p.span())) {
            None => crate::provider::meta::KIND,
            Some((name, span)) => match ProviderKind::parse(name).filter(|k| k.cloud_api()) {
                Some(k) => k,
                None => {
                    let apps: Vec<_> =
                        ProviderKind::all().filter(|k| k.cloud_api()).map(|k| format!("\"{k}\"")).collect();
                    return self.err(span, format!("meta_app provider {name:?}: use {}", apps.join(" or ")));
                }
            },
        };
        let verify_token = self.opt_secret(a.verify_token.as_ref())?;
        let expose = |x: Option<Secret>| x.map(|s| s.expose().to_string());
        let vcfg = VerifierConfig {
            provider: Some(provider),
            app_secret: expose(self.opt_secret(a.app_secret.as_ref())?),
            platform_secret: expose(self.opt_secret(a.platform_secret.as_ref())?),
            shared_token: expose(self.opt_secret(a.shared_token.as_ref())?),
            verify_token: verify_token.as_ref().map(|s| s.expose().to_string()),
            token_header: a.token_header.clone(),
            token_param: a.token_param.clone(),
            allow_from: self.cidrs(&a.allow_from)?,
            ..Default::default()
        };
        let verifier =
            AccountVerifier::new(&vcfg).or_else(|msg| self.err(a.name.span(), format!("meta_app {name:?}: {msg}")))?;
        if self.apps.insert(name.clone(), (vcfg, verify_token.clone())).is_some() {
            return self.err(a.name.span(), format!("duplicate meta_app name {name:?}"));
        }
        Ok(MetaApp { name, provider, verifier, verify_token })
    }
}

/// How [`Validator::shared_secrets`] knows a secret again without keeping it: the field and the
/// value's SHA-256.
fn secret_key(field: &'static str, value: &str) -> (&'static str, [u8; 32]) {
    use sha2::Digest;
    (field, sha2::Sha256::digest(value.as_bytes()).into())
}

/// Stands for "a `[[meta_app]]`" where the loader notes which Motion holds a secret (no Motion is
/// named "": names are path segments).
const APP_HOLDER: &str = "";

impl Config {
    /// Whether the user running this could keep the store at `[storage] path`: `check` runs it
    /// (under systemd, `ExecStartPre=` runs `check` as the service's own user, so the answer is
    /// the service's). None when it could; otherwise what is wrong and what to do.
    pub fn storage_problem(&self) -> Option<String> {
        if !matches!(self.storage, StorageBackend::Embedded) {
            return None; // `path` is unused
        }
        let dir = self.storage_path.as_path();
        let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").ok()?);
        let fix = format!(
            "under systemd, use {DEFAULT_STORAGE}, the folder StateDirectory=whatsapp-relay creates for the \
             service user; elsewhere make the folder writable by the user the relay runs as"
        );
        if dir.exists() {
            if !dir.is_dir() {
                return Some(format!("[storage] path {} is not a folder; {fix}", dir.display()));
            }
            // A real write, not the mode bits: ACLs, read-only mounts and ProtectSystem= all count.
            let probe = dir.join(format!(".whatsapp-relay-check-{}", std::process::id()));
            return match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
                Ok(_) => {
                    let _ = std::fs::remove_file(&probe);
                    None
                }
                Err(e) => Some(format!(
                    "[storage] path {} is not writable by this user (uid {uid}): {e}; {fix}",
                    dir.display()
                )),
            };
        }
        if dir == Path::new(DEFAULT_STORAGE) {
            return None; // systemd creates it when the service starts
        }
        // The relay creates the folder at start: the nearest existing parent must let it.
        let mut parent = dir.parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
            parent = p.parent();
        }
        let parent = parent.filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let probe = parent.join(format!(".whatsapp-relay-check-{}", std::process::id()));
        match std::fs::create_dir(&probe) {
            Ok(()) => {
                let _ = std::fs::remove_dir(&probe);
                None
            }
            Err(e) => Some(format!(
                "[storage] path {} does not exist and this user (uid {uid}) cannot create it in {}: {e}; {fix}",
                dir.display(),
                parent.display()
            )),
        }
    }

    /// The one-screen summary `check` prints.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let s = &self.server;
        let opt = |a: Option<SocketAddr>| a.map_or("-".to_string(), |a| a.to_string());
        let _ = writeln!(out, "config {}: OK", self.path.display());
        let _ = writeln!(
            out,
            "listeners: http {}  https {}{}  admin {}",
            opt(s.http),
            opt(s.https),
            if s.acme.is_some() {
                " (acme)"
            } else if s.tls.is_some() {
                " (tls files)"
            } else {
                ""
            },
            opt(self.admin.listen)
        );
        let _ = writeln!(out, "public_url: {}", s.public_url.as_deref().unwrap_or("-"));
        match &self.storage {
            StorageBackend::Embedded => {
                let _ = writeln!(out, "storage: embedded, {}", self.storage_path.display());
            }
            StorageBackend::Postgres(p) => {
                let _ = writeln!(out, "storage: postgres, pool {}, takeover {:?}", p.pool, p.takeover);
            }
        }
        let _ = writeln!(out, "delivery: mode {}, timeout {:?}", self.delivery.mode, self.delivery.timeout);
        let accounts: usize = self.motions.iter().map(|m| m.accounts.len()).sum();
        let _ = writeln!(
            out,
            "motions: {}  accounts: {}  meta apps: {}",
            self.motions.len(),
            accounts,
            self.meta_apps.len()
        );
        for m in self.motions.iter().take(20) {
            let mut by: Vec<(&str, usize)> = Vec::new();
            for a in &m.accounts {
                match by.iter_mut().find(|(p, _)| *p == a.provider.as_str()) {
                    Some(e) => e.1 += 1,
                    None => by.push((a.provider.as_str(), 1)),
                }
            }
            let providers: Vec<String> = by.iter().map(|(p, n)| format!("{p} {n}")).collect();
            let _ = writeln!(
                out,
                "  {:<16} {:<36} {:<6} accounts: {}",
                m.name,
                m.url.to_string(),
                m.mode,
                providers.join(", ")
            );
        }
        if self.motions.len() > 20 {
            let _ = writeln!(out, "  ... and {} more", self.motions.len() - 20);
        }
        for w in self.warnings.iter().take(20) {
            let _ = writeln!(out, "warning: {w}");
        }
        out
    }
}

#[cfg(test)]
mod tests;
