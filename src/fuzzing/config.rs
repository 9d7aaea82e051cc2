//! The config loader on arbitrary text, secret references refused (never read).

use std::sync::Arc;

use crate::config::{ConfigError, parse_self_contained};
use crate::routing::{Route, RouteTable};

/// The input is the text of a config file (invalid UTF-8 is replaced, so every input is read).
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let config = match parse_self_contained(std::path::Path::new("fuzz.toml"), &text) {
        Ok(c) => c,
        Err(ConfigError::At { line, col, message, .. }) => {
            // The position is inside the text (one past its end at most).
            let lines = text.split('\n').count();
            assert!((1..=lines).contains(&line), "line {line} of {lines}: {message}");
            let width = text.split('\n').nth(line - 1).map_or(0, |l| l.chars().count());
            assert!((1..=width + 1).contains(&col), "column {col} of {width} on line {line}: {message}");
            return;
        }
        Err(e) => panic!("parsing text read a file: {e}"),
    };
    // Reading a Motion's `ca_file` would read a file the text names: such configs stop here.
    if config.motions.iter().any(|m| m.ca_file.is_some()) {
        return;
    }
    let table = RouteTable::build(&config, &crate::upstream::Upstream::new()).expect("no file to read");
    // Every account the config declares is reached at its path, and on each of its Motion's hosts.
    for motion in &config.motions {
        assert!(!motion.name.is_empty() && !["meta", "admin", "healthz", "outbound"].contains(&motion.name.as_str()));
        for account in &motion.accounts {
            let id = percent_encoding::utf8_percent_encode(&account.id, percent_encoding::NON_ALPHANUMERIC);
            let by_path = format!("/{}/api/whatsapp/accounts/{id}/notify", motion.name);
            routes_to(&table, None, &by_path, motion, account);
            for host in &motion.hosts {
                routes_to(&table, Some(host), &format!("/api/whatsapp/accounts/{id}"), motion, account);
            }
        }
    }
}

fn routes_to(
    table: &RouteTable,
    host: Option<&str>,
    path: &str,
    motion: &crate::config::Motion,
    account: &Arc<crate::config::Account>,
) {
    match table.lookup(host, path) {
        Some(Route::Inbound { motion: m, account: a, .. }) => {
            assert_eq!(m.motion.name, motion.name, "{host:?} {path}");
            assert!(Arc::ptr_eq(a, account), "{host:?} {path}");
        }
        other => panic!("account {}/{} is not routed at {host:?} {path}: {other:?}", motion.name, account.id),
    }
}
