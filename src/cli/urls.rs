//! `whatsapp-relay check --urls`: for every account, the URL to paste into its provider's
//! console and the base URL its Motion sends through, from `[server] public_url` (the same
//! rules the relay routes and verifies by: prefix and Host routes, `/meta/{app}`, Twilio's
//! connection overrides). See docs/providers.md.

use crate::config::{Account, Config, Motion};
use crate::provider::twilio;
use std::fmt::Write;

/// The text `check --urls` prints.
pub fn render(config: &Config) -> String {
    let mut out = String::new();
    let (base, scheme) = match &config.server.public_url {
        Some(u) => (u.clone(), u.split_once("://").map_or("https", |(s, _)| s).to_string()),
        None => {
            // Providers cannot call a loopback listener: say so, but still show the paths.
            let listener = config
                .server
                .https
                .map(|a| format!("https://{a}"))
                .or(config.server.http.map(|a| format!("http://{a}")));
            let base = listener.unwrap_or_else(|| "https://RELAY".to_string());
            let _ = writeln!(
                out,
                "warning: no [server] public_url: these URLs use {base}; set public_url to the https URL providers call\n"
            );
            let scheme = base.split_once("://").map_or("https", |(s, _)| s).to_string();
            (base, scheme)
        }
    };
    let _ = writeln!(out, "public_url: {base}");
    for m in &config.motions {
        for a in &m.accounts {
            let _ = writeln!(out);
            account(&mut out, &base, &scheme, m, a);
        }
    }
    for app in &config.meta_apps {
        let accounts: Vec<String> = config
            .motions
            .iter()
            .flat_map(|m| {
                m.accounts
                    .iter()
                    .filter(|a| a.app.as_deref() == Some(&app.name))
                    .map(|a| format!("{}/{}", m.name, a.id))
            })
            .collect();
        let _ = writeln!(out);
        let _ = writeln!(out, "meta_app {} ({})", app.name, app.provider);
        let _ = writeln!(out, "  webhook   {base}/meta/{}", app.name);
        let _ = writeln!(out, "            the app's one callback URL; verify token: the app's verify_token");
        let _ = writeln!(out, "  accounts  {}", if accounts.is_empty() { "none".into() } else { accounts.join(", ") });
    }
    out
}

fn account(out: &mut String, base: &str, scheme: &str, m: &Motion, a: &Account) {
    let via_app = a.app.as_ref().map_or(String::new(), |app| format!(", meta_app {app}"));
    let _ = writeln!(out, "{}/{}  {}{via_app}", m.name, a.id, a.provider);
    // Host routes first: with a host, the path is exactly Motion's own. The port, if
    // public_url names one, is the listener's for every host.
    let port = base.parse::<http::Uri>().ok().and_then(|u| u.port_u16()).map_or(String::new(), |p| format!(":{p}"));
    let mut roots: Vec<String> = m.hosts.iter().map(|h| format!("{scheme}://{h}{port}")).collect();
    roots.push(format!("{base}/{}", m.name));
    match &a.app {
        Some(app) => {
            let _ = writeln!(out, "  webhook   {base}/meta/{app}");
            let _ = writeln!(out, "            (the app's URL: this account's own path answers 404)");
        }
        None => {
            for root in &roots {
                let url = format!("{root}/api/whatsapp/accounts/{}/notify", a.id);
                let _ = writeln!(out, "  webhook   {url}");
                if a.provider == twilio::KIND {
                    let _ = writeln!(out, "  + retries {url}#{}", twilio::RETRY_OVERRIDES);
                }
            }
            if a.provider == twilio::KIND {
                let _ = writeln!(
                    out,
                    "            Twilio retries only failed connections, once; with the fragment it also retries\n            \
                     a 503 or a timeout, up to 5 times within 15 s. The relay verifies either form."
                );
            }
            if let Some(v) = a.verification.as_deref().filter(|v| v.shared_token.is_some()) {
                // The token itself is never printed.
                let header = v.token_header.as_deref().unwrap_or("X-Webhook-Token");
                let param = v.token_param.as_deref().unwrap_or("token");
                let _ = writeln!(
                    out,
                    "            shared_token: in the {header} header, or add ?{param}=<the token> to the URL"
                );
            }
            let _ =
                writeln!(out, "            (any path below .../accounts/{}/ is routed: status callbacks too)", a.id);
        }
    }
    for root in &roots {
        let _ = writeln!(out, "  outbound  {root}/outbound/{}", a.id);
    }
}
