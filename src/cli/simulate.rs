//! `whatsapp-relay simulate MOTION/ACCOUNT [--text TEXT]`: posts a correctly signed sample
//! inbound message of the account's provider to the running relay, as the provider would, and
//! prints the relay's answer. For checking a deployment end to end without a phone.

use crate::clock::{Clock, SystemClock};
use crate::config::{Account, Config};
use bytes::Bytes;
use http::Method;
use std::process::ExitCode;

pub fn run(config: &Config, account_ref: &str, text: &str) -> ExitCode {
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
    let Some(addr) = config.server.http.map(super::http::reachable) else {
        return fail("simulate needs the plain [server] http listener".into());
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    match rt.block_on(post(config, &motion.name, account, addr, text)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("whatsapp-relay simulate: {e}");
            ExitCode::from(1)
        }
    }
}

async fn post(
    config: &Config,
    motion: &str,
    account: &Account,
    addr: std::net::SocketAddr,
    text: &str,
) -> Result<ExitCode, String> {
    let path = format!("/{motion}/api/whatsapp/accounts/{}/notify", account.id);
    // The URL the relay will check a Twilio signature against (README, "The Twilio URL").
    let signed_url = match &config.server.public_url {
        Some(p) => format!("{p}{path}"),
        None => format!("http://{addr}{path}"),
    };
    let id = format!("simulated-{}", uuid::Uuid::now_v7());
    let (content_type, body) = account.provider.sample(text, &id);
    let now = (SystemClock.now_unix_ms() / 1000) as i64;
    let mut headers =
        crate::provider::sign_request(&account.verification, &signed_url, Some(content_type), &body, now)?;
    headers.push(("content-type".into(), content_type.into()));
    let url = format!("http://{addr}{path}");
    let (status, resp_headers, resp_body) = super::http::call(Method::POST, &url, &headers, Bytes::from(body)).await?;
    println!("POST {url} ({} sample, message id {id})", account.provider.as_str());
    println!("{status}");
    if let Some(ct) = resp_headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        println!("content-type: {ct}");
    }
    if !resp_body.is_empty() {
        println!("{}", String::from_utf8_lossy(&resp_body));
    }
    Ok(if status.is_success() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
