//! `whatsapp-relay simulate MOTION/ACCOUNT [--text TEXT]`: posts a correctly signed sample
//! inbound message of the account's provider to the running relay, as the provider would, and
//! prints the relay's answer. For checking a deployment end to end without a phone.
//!
//! It needs that account's own secrets and a listener, nothing else of the config: on a server
//! whose secrets are systemd credentials it reads them where the running service has them. It
//! posts to the plain listener, or to the https one (trusting `--cacert` or, with `--insecure`,
//! anything) when there is no plain one or the plain one redirects (`redirect_http`).

use super::http::Target;
use crate::clock::{Clock, SystemClock};
use crate::config::{Account, Config};
use bytes::Bytes;
use http::Method;
use std::path::PathBuf;
use std::process::ExitCode;

/// How `simulate` reaches an https listener.
pub struct TlsTrust {
    pub cacert: Option<PathBuf>,
    pub insecure: bool,
}

pub fn run(config: &Config, account_ref: &str, text: &str, trust: &TlsTrust) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("whatsapp-relay simulate: {msg}");
        ExitCode::from(2)
    };
    let Some((motion_name, account_id)) = account_ref.split_once('/') else {
        return fail(format!("{account_ref:?} is not MOTION/ACCOUNT"));
    };
    let Some(motion) = config.motions.iter().find(|m| m.name == motion_name) else {
        return fail(format!("no motion {motion_name:?} in {}", config.path.display()));
    };
    let Some(account) = motion.accounts.iter().find(|a| a.id == account_id) else {
        return fail(format!("motion {motion_name:?} has no account {account_id:?}"));
    };
    if let Some(why) = unreadable_secret(config, account) {
        return fail(format!("cannot sign for {account_ref}: {why}"));
    }
    let (plain, tls) = match targets(config, trust) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    if plain.is_none() && tls.is_none() {
        return fail("the config has no [server] http or https listener to post to".into());
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    match rt.block_on(post(config, &motion.name, account, plain, tls, text)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("whatsapp-relay simulate: {e}");
            ExitCode::from(1)
        }
    }
}

/// The first of the account's signing secrets that could not be read, with the reason.
fn unreadable_secret<'a>(config: &'a Config, account: &Account) -> Option<&'a str> {
    let v = account.verification.as_deref()?;
    [&v.auth_token, &v.app_secret, &v.platform_secret, &v.webhook_secret, &v.hmac_secret, &v.shared_token]
        .into_iter()
        .flatten()
        .find_map(|s| config.unresolved.why(s))
}

/// The plain and the https listener as `simulate` reaches them: the listener's address, with
/// the `Host` and TLS server name of `public_url` (the certificate's name, and what the relay
/// expects), or the address itself without one.
fn targets(config: &Config, trust: &TlsTrust) -> Result<(Option<Target>, Option<Target>), String> {
    let public = config.server.public_url.as_deref().and_then(|u| u.parse::<http::Uri>().ok());
    let authority = |addr: std::net::SocketAddr| {
        public.as_ref().and_then(|u| u.authority()).map_or(addr.to_string(), |a| a.as_str().to_string())
    };
    let plain = config.server.http.map(super::http::reachable).map(|addr| Target {
        addr,
        authority: authority(addr),
        tls: None,
    });
    let tls = match config.server.https.map(super::http::reachable) {
        None => None,
        Some(addr) => {
            let host = public
                .as_ref()
                .and_then(|u| u.host())
                .map_or(addr.ip().to_string(), |h| h.trim_start_matches('[').trim_end_matches(']').to_string());
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("{host:?} is no TLS server name: {e}"))?;
            let config = super::http::tls_config(trust.cacert.as_deref(), trust.insecure)?;
            Some(Target { addr, authority: authority(addr), tls: Some((name, config)) })
        }
    };
    Ok((plain, tls))
}

async fn post(
    config: &Config,
    motion: &str,
    account: &Account,
    plain: Option<Target>,
    tls: Option<Target>,
    text: &str,
) -> Result<ExitCode, String> {
    let path = format!("/{motion}/api/whatsapp/accounts/{}/notify", account.id);
    let first = plain.as_ref().or(tls.as_ref()).expect("a listener");
    // The URL the relay will check a Twilio signature against (README, "The Twilio URL").
    let signed_url = match &config.server.public_url {
        Some(p) => format!("{p}{path}"),
        None => format!("{}://{}{path}", if first.tls.is_some() { "https" } else { "http" }, first.authority),
    };
    let id = format!("simulated-{}", uuid::Uuid::now_v7());
    let (content_type, body) = account.provider.sample(text, &id);
    let now = (SystemClock.now_unix_ms() / 1000) as i64;
    let settings = account.verification.as_deref().ok_or("the config was not loaded for an operator command")?;
    let mut headers = crate::provider::sign_request(settings, &signed_url, Some(content_type), &body, now)?;
    headers.push(("content-type".into(), content_type.into()));
    let body = Bytes::from(body);
    let mut target = first;
    let (mut status, mut resp_headers, mut resp_body) =
        super::http::call(target, Method::POST, &path, &headers, body.clone()).await?;
    // `redirect_http`: the plain listener sends routed paths to https; follow it to the local
    // https listener (the redirect names the public host, which may not lead here).
    if status.is_redirection() {
        if let (Some(https), true) = (tls.as_ref(), plain.is_some()) {
            println!("POST {} ({status}: following to https)", target.show(&path));
            target = https;
            (status, resp_headers, resp_body) =
                super::http::call(target, Method::POST, &path, &headers, body.clone()).await?;
        }
    }
    println!("POST {} ({} sample, message id {id})", target.show(&path), account.provider.as_str());
    println!("{status}");
    if let Some(ct) = resp_headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        println!("content-type: {ct}");
    }
    if !resp_body.is_empty() {
        println!("{}", String::from_utf8_lossy(&resp_body));
    }
    Ok(if status.is_success() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
