//! What the relay holds for an account's sends (its [`OutboundCreds`]) and which provider
//! endpoints those sends may reach: the provider's defaults (SPEC "Outbound", from
//! [`Provider::endpoints`](super::Provider::endpoints)) or the `outbound_paths` patterns that
//! replace them.
//!
//! Pattern syntax (one string per endpoint): an optional comma-separated method list, a space,
//! then an absolute path whose segments are literals, `*` (exactly one non-empty segment),
//! `prefix*suffix` (one segment with that prefix and suffix, e.g. `*.json` or `v*`), or, as the
//! last segment only, `**` (zero or more segments). Without a method list any method matches.
//! Examples: `"POST /v1/projects/P1/messages:send"`, `"GET,DELETE /v*/*"`, `"/custom/**"`.
//!
//! A request path is matched after the same one-time percent-decoding per segment that routing
//! does (`request::decode_segment`): a dot segment, an encoded slash or backslash, or an empty
//! segment in the middle never matches, so no spelling of a path escapes a pattern. One trailing
//! slash is ignored (`/media/` is `/media`).

use super::ProviderKind;
use crate::secret::Secret;
use http::Method;
use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex};

/// Credentials and endpoint settings for sends through the relay (all optional).
#[derive(Debug, Default)]
pub struct OutboundCreds {
    pub account_sid: Option<String>,
    pub auth_token: Option<Secret>,
    pub access_token: Option<Secret>,
    pub api_key: Option<Secret>,
    pub project_id: Option<String>,
    pub key_id: Option<String>,
    pub key_secret: Option<Secret>,
    pub region: Option<String>,
    pub auth_url: Option<String>,
    pub sid: Option<String>,
    pub api_base: Option<String>,
    pub outbound_paths: Option<Vec<String>>,
    /// The endpoints outbound calls may reach: `outbound_paths` compiled, or the provider's
    /// defaults.
    pub paths: AllowList,
}

impl OutboundCreds {
    /// The account's API base: `api_base`, or the provider's public API for its region.
    pub fn api_base(&self, provider: ProviderKind) -> Option<String> {
        match &self.api_base {
            Some(b) => Some(b.trim_end_matches('/').to_string()),
            None => provider.api_base(self.region.as_deref()),
        }
    }
}

/// One segment of a pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Seg {
    Lit(String),
    /// `{}` in a provider's default: the account's own id (its number, account or project),
    /// matched literally, never read as a wildcard, whatever it holds.
    Id,
    /// `*` or `prefix*suffix`: one non-empty segment.
    Glob {
        prefix: String,
        suffix: String,
    },
    /// `**`: the rest, possibly nothing.
    Rest,
}

impl Seg {
    fn matches(&self, s: &str, id: Option<&str>) -> bool {
        match self {
            Seg::Lit(l) => l == s,
            Seg::Id => id == Some(s),
            Seg::Glob { prefix, suffix } => {
                s.len() > prefix.len() + suffix.len() && s.starts_with(prefix.as_str()) && s.ends_with(suffix.as_str())
            }
            Seg::Rest => true,
        }
    }
}

/// A parsed endpoint pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pattern {
    methods: Option<Vec<Method>>,
    segs: Vec<Seg>,
}

impl Pattern {
    /// Parses the syntax above; `Err` says what is wrong and how to write it.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let text = text.trim();
        let (methods, path) = match text.split_once(' ') {
            Some((m, p)) => {
                let methods = m
                    .split(',')
                    .map(|m| {
                        let m = m.trim();
                        let ok = !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase());
                        if ok { Method::from_bytes(m.as_bytes()).ok() } else { None }
                    })
                    .collect::<Option<Vec<Method>>>()
                    .ok_or_else(|| {
                        format!("outbound path {text:?}: methods must be upper case, e.g. \"GET,POST /v1/x\"")
                    })?;
                (Some(methods), p.trim())
            }
            None => (None, text),
        };
        let Some(rest) = path.strip_prefix('/') else {
            return Err(format!("outbound path {text:?} must start with '/' (after an optional method list)"));
        };
        let raw: Vec<&str> = rest.split('/').collect();
        let mut segs = Vec::with_capacity(raw.len());
        for (i, s) in raw.iter().enumerate() {
            let seg = match *s {
                "" => return Err(format!("outbound path {text:?} has an empty segment")),
                "**" if i + 1 == raw.len() => Seg::Rest,
                "**" => return Err(format!("outbound path {text:?}: '**' may only be the last segment")),
                "." | ".." => return Err(format!("outbound path {text:?} has a dot segment")),
                s if s.matches('*').count() > 1 => {
                    return Err(format!("outbound path {text:?}: a segment may hold one '*' (or be '**')"));
                }
                s => match s.split_once('*') {
                    Some((prefix, suffix)) => Seg::Glob { prefix: prefix.into(), suffix: suffix.into() },
                    None => Seg::Lit(s.into()),
                },
            };
            segs.push(seg);
        }
        Ok(Pattern { methods, segs })
    }

    fn matches(&self, method: &Method, segs: &[std::borrow::Cow<'_, str>], id: Option<&str>) -> bool {
        if self.methods.as_ref().is_some_and(|m| !m.contains(method)) {
            return false;
        }
        let mut i = 0;
        for p in &self.segs {
            if *p == Seg::Rest {
                return true;
            }
            match segs.get(i) {
                Some(s) if p.matches(s, id) => i += 1,
                _ => return false,
            }
        }
        i == segs.len()
    }
}

/// A provider's default endpoints for one account (from
/// [`Provider::endpoints`](super::Provider::endpoints)): patterns in the syntax above where a
/// `{}` segment stands for the account's `id`, or for any one segment (`*`) when it has none.
/// The patterns do not hold the id, so every account of a provider shares one copy of them.
/// They are compiled once per distinct list (see [`compiled`]), not once per account.
pub struct Defaults<'a> {
    id: Option<&'a str>,
    /// (methods, template) pairs, as the provider wrote them.
    templates: Vec<(&'static str, &'static str)>,
}

impl<'a> Defaults<'a> {
    pub(crate) fn new(id: Option<&'a str>) -> Defaults<'a> {
        Defaults { id, templates: Vec::new() }
    }

    /// Adds `template`, for `methods` (a comma-separated list, or "" for any method).
    pub(crate) fn with(mut self, methods: &'static str, template: &'static str) -> Defaults<'a> {
        self.templates.push((methods, template));
        self
    }

    /// The patterns, with `{}` as the id (or as any one segment without an id).
    fn compile(&self) -> Vec<Pattern> {
        let compile = |(methods, template): &(&str, &str)| {
            let text = if methods.is_empty() { template.to_string() } else { format!("{methods} {template}") };
            let mut p = Pattern::parse(&text).expect("built-in patterns are valid");
            for seg in &mut p.segs {
                if *seg == Seg::Lit("{}".into()) {
                    *seg = match self.id {
                        Some(_) => Seg::Id,
                        None => Seg::Glob { prefix: String::new(), suffix: String::new() },
                    };
                }
            }
            p
        };
        self.templates.iter().map(compile).collect()
    }
}

/// The compiled patterns of `d`: a few distinct lists per provider (the id is not in them),
/// each compiled and allocated once for the process, however many accounts and reloads use
/// them. A list is found by its templates (static strings, compared without compiling), so an
/// account costs a short scan instead of parsing, hashing and comparing its patterns.
fn compiled(d: &Defaults<'_>) -> Arc<[Pattern]> {
    /// The templates and whether `{}` is an id, with what they compile to.
    type Entry = ((Vec<(&'static str, &'static str)>, bool), Arc<[Pattern]>);
    static BY_TEMPLATES: LazyLock<Mutex<Vec<Entry>>> = LazyLock::new(Default::default);
    let mut lists = BY_TEMPLATES.lock().unwrap_or_else(|e| e.into_inner());
    let has_id = d.id.is_some();
    if let Some((_, found)) = lists.iter().find(|((t, i), _)| *i == has_id && *t == d.templates) {
        return found.clone();
    }
    let new = shared(d.compile());
    lists.push(((d.templates.clone(), has_id), new.clone()));
    new
}

/// Every distinct compiled list once (two template lists may compile to the same patterns).
fn shared(patterns: Vec<Pattern>) -> Arc<[Pattern]> {
    static SHARED: LazyLock<Mutex<HashSet<Arc<[Pattern]>>>> = LazyLock::new(Default::default);
    let mut set = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = set.get(patterns.as_slice()) {
        return found.clone();
    }
    let new: Arc<[Pattern]> = patterns.into();
    set.insert(new.clone());
    new
}

/// The endpoints one account may reach.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    /// Shared between accounts when they are a provider's defaults.
    patterns: Arc<[Pattern]>,
    /// What an [`Seg::Id`] segment matches.
    id: Option<Box<str>>,
}

impl AllowList {
    /// `outbound_paths` when given (it replaces the defaults), else the provider's defaults.
    /// `phone_number_id` is the account's Meta number (it lives beside the credentials).
    pub fn for_account(
        provider: ProviderKind,
        creds: &OutboundCreds,
        phone_number_id: Option<&str>,
    ) -> Result<AllowList, String> {
        match &creds.outbound_paths {
            Some(list) => {
                Ok(AllowList { patterns: list.iter().map(|p| Pattern::parse(p)).collect::<Result<_, _>>()?, id: None })
            }
            None => {
                let d = provider.endpoints(creds, phone_number_id)?;
                Ok(AllowList { patterns: compiled(&d), id: d.id.map(Box::from) })
            }
        }
    }

    /// Whether `method` on `path` (the raw path below the provider base, starting with `/`) is
    /// allowed. Segments are decoded once; anything that does not decode safely is refused.
    pub fn allows(&self, method: &Method, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else { return false };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let mut segs = Vec::new();
        if !rest.is_empty() {
            for raw in rest.split('/') {
                match (raw.is_empty(), crate::request::decode_segment(raw)) {
                    (false, Some(s)) => segs.push(s),
                    _ => return false,
                }
            }
        }
        self.patterns.iter().any(|p| p.matches(method, &segs, self.id.as_deref()))
    }
}

/// A free id segment means "the client's own credentials decide" (SPEC "Outbound"). Where the
/// relay holds the credentials, a free segment would let a Motion send with them as any number,
/// project or sid they can reach, another tenant's included: the id must be named, or the
/// endpoints listed explicitly (`outbound_paths`). This is the error a provider's
/// [`endpoints`](super::Provider::endpoints) gives then.
pub(super) fn unconfined(creds: &str, id: &str) -> String {
    format!(
        "{creds} without {id}: the relay would send with these credentials for any {id} they reach, another \
         tenant's included; set {id}, or list the allowed endpoints in outbound_paths"
    )
}

#[cfg(test)]
mod tests {
    use super::super::{dialog360, kaleyra, meta, sinch, twilio};
    use super::*;

    fn creds() -> OutboundCreds {
        OutboundCreds::default()
    }

    #[test]
    fn twilio_defaults_confine_to_the_account_sid() {
        let c = OutboundCreds { account_sid: Some("AC1".into()), ..creds() };
        let a = AllowList::for_account(twilio::KIND, &c, None).unwrap();
        assert!(a.allows(&Method::POST, "/2010-04-01/Accounts/AC1/Messages.json"));
        assert!(a.allows(&Method::GET, "/2010-04-01/Accounts/AC1/Messages/SM9.json"));
        assert!(a.allows(&Method::GET, "/2010-04-01/Accounts/AC1/Messages/MM9/Media/ME1"));
        assert!(a.allows(&Method::GET, "/2010-04-01/Accounts/AC1/Messages/MM9/Media.json"));
        assert!(!a.allows(&Method::POST, "/2010-04-01/Accounts/AC2/Messages.json"), "another account");
        assert!(!a.allows(&Method::GET, "/2010-04-01/Accounts/AC1/Messages.json"), "listing");
        assert!(!a.allows(&Method::POST, "/2010-04-01/Accounts/AC1/Calls.json"));
        assert!(!a.allows(&Method::GET, "/2010-04-01/Accounts/AC1.json"));
        assert!(!a.allows(&Method::POST, "/2010-04-01/Accounts/AC1/Messages/.json"), "empty glob");
        // Spellings that would escape after a second decoding or a path normalisation.
        assert!(!a.allows(&Method::POST, "/2010-04-01/Accounts/AC1/../AC2/Messages.json"));
        assert!(!a.allows(&Method::POST, "/2010-04-01/Accounts/AC1/%2e%2e/AC2/Messages.json"));
        assert!(!a.allows(&Method::POST, "/2010-04-01/Accounts/AC1%2FMessages.json"));
        assert!(!a.allows(&Method::POST, "/2010-04-01/Accounts//AC1/Messages.json"));
        // Without an account_sid the segment is free.
        let free = AllowList::for_account(twilio::KIND, &creds(), None).unwrap();
        assert!(free.allows(&Method::POST, "/2010-04-01/Accounts/AC2/Messages.json"));
        assert!(free.allows(&Method::POST, "/2010-04-01/Accounts/AC%32/Messages.json"));
    }

    #[test]
    fn meta_media_by_id_only_with_client_credentials() {
        let held = OutboundCreds { access_token: Some(Secret::new("t".into())), ..creds() };
        let a = AllowList::for_account(meta::KIND, &held, Some("106")).unwrap();
        assert!(a.allows(&Method::POST, "/v21.0/106/messages"));
        assert!(a.allows(&Method::POST, "/v21.0/106/media/"));
        assert!(!a.allows(&Method::POST, "/v21.0/107/messages"));
        assert!(!a.allows(&Method::GET, "/v21.0/1234"));
        assert!(!a.allows(&Method::POST, "/106/messages"), "a version is required");
        let own = AllowList::for_account(meta::KIND, &creds(), None).unwrap();
        assert!(own.allows(&Method::GET, "/v21.0/1234"));
        assert!(own.allows(&Method::POST, "/v21.0/107/messages"));
    }

    #[test]
    fn sinch_kaleyra_and_360dialog_defaults() {
        let s = OutboundCreds { project_id: Some("P1".into()), ..creds() };
        let a = AllowList::for_account(sinch::KIND, &s, None).unwrap();
        assert!(a.allows(&Method::POST, "/v1/projects/P1/messages:send"));
        assert!(!a.allows(&Method::POST, "/v1/projects/P2/messages:send"));
        assert!(!a.allows(&Method::GET, "/v1/projects/P1/messages:send"));
        let k = OutboundCreds { sid: Some("HX1".into()), ..creds() };
        let a = AllowList::for_account(kaleyra::KIND, &k, None).unwrap();
        assert!(a.allows(&Method::POST, "/v1/HX1/messages"));
        assert!(a.allows(&Method::POST, "/v2/HX1/whatsapp/+15550001/messages"));
        assert!(!a.allows(&Method::POST, "/v1/HX2/messages"));
        let a = AllowList::for_account(dialog360::KIND, &creds(), None).unwrap();
        assert!(a.allows(&Method::POST, "/messages"));
        assert!(a.allows(&Method::GET, "/whatsapp_business/attachments/"));
        assert!(a.allows(&Method::GET, "/1234567"));
        assert!(!a.allows(&Method::POST, "/v1/configs/webhook"));
    }

    #[test]
    fn held_credentials_need_the_id_they_are_for() {
        let secret = || Secret::new("s".into());
        let meta = OutboundCreds { access_token: Some(secret()), ..creds() };
        let err = AllowList::for_account(meta::KIND, &meta, None).unwrap_err();
        assert!(err.contains("access_token without phone_number_id"), "{err}");
        assert!(AllowList::for_account(meta::KIND, &meta, Some("106")).is_ok());
        let sinch = OutboundCreds { key_id: Some("k".into()), key_secret: Some(secret()), ..creds() };
        assert!(AllowList::for_account(sinch::KIND, &sinch, None).unwrap_err().contains("project_id"));
        let kaleyra = OutboundCreds { api_key: Some(secret()), ..creds() };
        assert!(AllowList::for_account(kaleyra::KIND, &kaleyra, None).unwrap_err().contains("sid"));
        // Explicit endpoints are the operator's decision.
        let listed = OutboundCreds { outbound_paths: Some(vec!["POST /v*/*/messages".into()]), ..meta };
        assert!(AllowList::for_account(meta::KIND, &listed, None).is_ok());
        // Without held credentials the client's own decide, as before.
        assert!(AllowList::for_account(meta::KIND, &creds(), None).is_ok());
    }

    #[test]
    fn custom_patterns_replace_the_defaults() {
        let c =
            OutboundCreds { outbound_paths: Some(vec!["GET,POST /api/*/send".into(), "/files/**".into()]), ..creds() };
        let a = AllowList::for_account(twilio::KIND, &c, None).unwrap();
        assert!(a.allows(&Method::POST, "/api/x/send"));
        assert!(!a.allows(&Method::DELETE, "/api/x/send"));
        assert!(a.allows(&Method::DELETE, "/files"));
        assert!(a.allows(&Method::PUT, "/files/a/b/c"));
        assert!(!a.allows(&Method::POST, "/2010-04-01/Accounts/AC1/Messages.json"));
        let none = OutboundCreds { outbound_paths: Some(vec![]), ..creds() };
        assert!(!AllowList::for_account(meta::KIND, &none, None).unwrap().allows(&Method::POST, "/v1/1/messages"));
    }

    #[test]
    fn bad_patterns_say_how_to_write_them() {
        for bad in ["v1/x", "/a//b", "/**/x", "/a/**b*", "post /x", "/a/..", "GET  "] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
        assert!(Pattern::parse("/").is_err());
        assert!(Pattern::parse("/**").is_ok());
    }
}
