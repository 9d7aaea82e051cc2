//! The file's schema, exactly as written: serde structs with `deny_unknown_fields`, so an
//! unknown key or a wrong type is reported by the TOML layer with its line and column.
//! Values that need checks beyond their type keep their position (`Spanned`) for `validate`.

use super::units::{Dur, Size};
use serde::Deserialize;
use std::cell::Cell;
use std::ops::Range;

/// A value and its byte range in the file: `toml::Spanned`'s, moved by the offset of the part
/// of the file it was parsed from (`parse_file` parses a large file Motion by Motion).
pub struct S<T> {
    span: Range<usize>,
    value: T,
}

impl<T> S<T> {
    pub fn get_ref(&self) -> &T {
        &self.value
    }

    pub fn span(&self) -> Range<usize> {
        self.span.clone()
    }
}

thread_local! {
    /// Where in the file the text being parsed on this thread starts.
    static OFFSET: Cell<usize> = const { Cell::new(0) };
}

/// Spans read while this lives are moved by `offset` (back to 0 when it is dropped, whatever
/// happens meanwhile).
pub struct Offset(());

impl Offset {
    pub fn set(offset: usize) -> Offset {
        OFFSET.with(|o| o.set(offset));
        Offset(())
    }
}

impl Drop for Offset {
    fn drop(&mut self) {
        OFFSET.with(|o| o.set(0));
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for S<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = toml::Spanned::<T>::deserialize(d)?;
        let offset = OFFSET.with(Cell::get);
        let Range { start, end } = spanned.span();
        Ok(S { span: start + offset..end + offset, value: spanned.into_inner() })
    }
}

/// A part of the file that holds only Motions (from a `[[motion]]` line on).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Motions {
    #[serde(default)]
    pub motion: Vec<Motion>,
}
/// An optional key most entries leave out, boxed: a file of 100,000 accounts holds 100,000
/// [`Account`]s at once while it is validated, and at 40 bytes an unboxed `Option<S<String>>`
/// (8 boxed) the 27 rare keys alone would be a kilobyte each, mostly zeroes.
pub type B<T> = Option<Box<T>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub storage: Storage,
    #[serde(default)]
    pub delivery: Delivery,
    #[serde(default)]
    pub outbound: Outbound,
    #[serde(default)]
    pub motion: Vec<Motion>,
    #[serde(default)]
    pub meta_app: Vec<MetaApp>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub public_url: Option<S<String>>,
    pub http: Option<S<String>>,
    pub https: Option<S<String>>,
    pub max_body: Option<Size>,
    pub request_timeout: Option<S<Dur>>,
    pub header_timeout: Option<S<Dur>>,
    pub idle_timeout: Option<S<Dur>>,
    pub max_connections: Option<S<i64>>,
    pub max_connections_per_ip: Option<S<i64>>,
    pub redirect_http: Option<S<bool>>,
    pub shutdown_grace: Option<S<Dur>>,
    #[serde(default)]
    pub trusted_proxies: Vec<S<String>>,
    pub tls: Option<Tls>,
    pub acme: Option<Acme>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert_file: S<String>,
    pub key_file: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acme {
    pub domains: S<Vec<String>>,
    #[serde(default)]
    pub contact: Vec<String>,
    pub directory: Option<S<String>>,
    pub cache_dir: Option<String>,
    pub ca_file: Option<S<String>>,
    pub key: Option<S<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub listen: Option<S<String>>,
    pub token: Option<S<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    pub path: Option<String>,
    pub backend: Option<S<String>>,
    pub url: Option<S<String>>,
    pub pool: Option<S<i64>>,
    pub takeover: Option<S<Dur>>,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Queue,
    Direct,
    Auto,
}

impl std::fmt::Display for Mode {
    /// The config spelling.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Queue => "queue",
            Mode::Direct => "direct",
            Mode::Auto => "auto",
        })
    }
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum WindowPolicy {
    Off,
    #[default]
    Warn,
    Enforce,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Delivery {
    pub mode: Option<S<Mode>>,
    pub timeout: Option<S<Dur>>,
    pub retry_initial: Option<S<Dur>>,
    pub retry_max: Option<S<Dur>>,
    pub give_up_after: Option<S<Dur>>,
    pub dedup_window: Option<S<Dur>>,
    pub auto_budget: Option<S<Dur>>,
    pub concurrency: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Outbound {
    pub timeout: Option<S<Dur>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Motion {
    pub name: S<String>,
    pub url: S<String>,
    #[serde(default)]
    pub hosts: Vec<S<String>>,
    pub outbound_token: Option<S<String>>,
    pub signing_secret: Option<S<String>>,
    pub ca_file: Option<S<String>>,
    pub max_queued: Option<u64>,
    pub max_queued_bytes: Option<Size>,
    pub rate_limit: Option<S<String>>,
    pub burst: Option<S<u32>>,
    pub window_policy: Option<WindowPolicy>,
    pub mode: Option<S<Mode>>,
    pub timeout: Option<S<Dur>>,
    #[serde(default)]
    pub allow_from: Vec<S<String>>,
    #[serde(default)]
    pub account: Vec<Account>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    pub id: S<String>,
    pub provider: S<String>,
    // Inbound verification.
    pub auth_token: B<S<String>>,
    pub app_secret: B<S<String>>,
    pub verify_token: B<S<String>>,
    pub webhook_secret: B<S<String>>,
    pub platform_secret: B<S<String>>,
    pub shared_token: B<S<String>>,
    pub token_header: B<String>,
    pub token_param: B<String>,
    #[serde(default)]
    pub allow_from: Vec<S<String>>,
    pub hmac_header: B<String>,
    pub hmac_secret: B<S<String>>,
    pub hmac_algorithm: B<S<String>>,
    pub hmac_encoding: B<S<String>>,
    pub hmac_prefix: B<String>,
    #[serde(default)]
    pub insecure_no_verification: bool,
    // Outbound credentials and endpoints.
    pub account_sid: B<String>,
    pub access_token: B<S<String>>,
    pub api_key: B<S<String>>,
    pub project_id: B<String>,
    pub key_id: B<String>,
    pub key_secret: B<S<String>>,
    pub region: B<S<String>>,
    pub auth_url: B<S<String>>,
    pub sid: B<String>,
    pub api_base: B<S<String>>,
    pub outbound_paths: B<Vec<String>>,
    // Meta app routing.
    pub app: B<S<String>>,
    pub phone_number_id: B<S<String>>,
    pub waba_id: B<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaApp {
    pub name: S<String>,
    pub provider: Option<S<String>>,
    pub app_secret: Option<S<String>>,
    pub verify_token: Option<S<String>>,
    pub platform_secret: Option<S<String>>,
    pub shared_token: Option<S<String>>,
    pub token_header: Option<String>,
    pub token_param: Option<String>,
    #[serde(default)]
    pub allow_from: Vec<S<String>>,
}
