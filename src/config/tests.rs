use super::*;

fn parse_str(text: &str) -> Result<Config, ConfigError> {
    parse(Path::new("relay.toml"), text)
}

/// The error's `PATH:LINE:COL: message` text.
fn err(text: &str) -> String {
    parse_str(text).expect_err("config should be refused").to_string()
}

const BASE: &str = r#"
[delivery]
mode = "direct"

[[motion]]
name = "acme"
url = "http://127.0.0.1:9000"

  [[motion.account]]
  id = "12"
  provider = "kaleyra"
  shared_token = "t"
"#;

#[test]
fn base_config_is_valid() {
    let c = parse_str(BASE).unwrap();
    assert_eq!(c.motions.len(), 1);
    assert_eq!(c.motions[0].accounts[0].id, "12");
    assert_eq!(c.server.max_body, 4 << 20);
    assert_eq!(c.delivery.give_up_after, Duration::from_secs(7 * 86400));
}

#[test]
fn unknown_key_has_line_and_column() {
    let e = err(&format!("{BASE}  colour = \"blue\"\n"));
    assert!(e.starts_with("relay.toml:13:3: unknown field `colour`"), "{e}");
}

#[test]
fn wrong_type_has_line_and_column() {
    let e = err("[server]\nmax_body = true\n");
    assert!(e.starts_with("relay.toml:2:12:"), "{e}");
    let e = err("[server]\nrequest_timeout = \"soon\"\n");
    assert!(e.starts_with("relay.toml:2:19:") && e.contains("invalid duration"), "{e}");
}

#[test]
fn unset_and_unreadable_secrets() {
    let e = err(&BASE.replace("shared_token = \"t\"", "shared_token = \"env:WHATSAPP_RELAY_SURELY_UNSET\""));
    assert!(e.starts_with("relay.toml:12:18:") && e.contains("WHATSAPP_RELAY_SURELY_UNSET is not set"), "{e}");
    let e = err(&BASE.replace("shared_token = \"t\"", "shared_token = \"file:/nonexistent/token\""));
    assert!(e.contains("relay.toml:12:18:") && e.contains("cannot read secret file /nonexistent/token"), "{e}");
    let e = err(&BASE.replace("shared_token = \"t\"", "shared_token = \"cred:acme\""));
    assert!(e.contains("relay.toml:12:18:") && e.contains("CREDENTIALS_DIRECTORY"), "{e}");
}

#[test]
fn duplicate_and_reserved_names() {
    let dup = format!("{BASE}\n[[motion]]\nname = \"acme\"\nurl = \"http://127.0.0.1:9001\"\n");
    let e = err(&dup);
    assert!(e.starts_with("relay.toml:15:8: duplicate motion name"), "{e}");
    for reserved in ["meta", "admin", "healthz", "outbound"] {
        let e = err(&BASE.replace("name = \"acme\"", &format!("name = \"{reserved}\"")));
        assert!(e.starts_with("relay.toml:6:8:") && e.contains("reserved"), "{e}");
    }
    let e = err(&BASE.replace("name = \"acme\"", "name = \".hidden\""));
    assert!(e.starts_with("relay.toml:6:8:"), "{e}");
    let dup_acc =
        format!("{BASE}\n  [[motion.account]]\n  id = \"12\"\n  provider = \"kaleyra\"\n  shared_token = \"u\"\n");
    let e = err(&dup_acc);
    assert!(e.starts_with("relay.toml:15:8: duplicate account id \"12\""), "{e}");
}

#[test]
fn https_needs_certificates() {
    let e = err(&format!("[server]\nhttps = \"127.0.0.1:8443\"\n{BASE}"));
    assert!(e.starts_with("relay.toml:2:9:") && e.contains("[server.tls]"), "{e}");
}

#[test]
fn auto_mode_is_refused_until_available() {
    let e = err(&BASE.replace("mode = \"direct\"", "mode = \"auto\""));
    assert!(e.starts_with("relay.toml:3:8:") && e.contains("mode auto is not available"), "{e}");
    // Without a mode, the default is the durable queue.
    assert_eq!(parse_str(&BASE.replace("mode = \"direct\"", "")).unwrap().delivery.mode, Mode::Queue);
}

#[test]
fn bad_values() {
    let e = err(&BASE.replace("provider = \"kaleyra\"", "provider = \"telegram\""));
    assert!(e.starts_with("relay.toml:11:14: unknown provider"), "{e}");
    let e = err(&BASE.replace("http://127.0.0.1:9000", "ftp://x"));
    assert!(e.starts_with("relay.toml:7:7:"), "{e}");
    let e = err(&format!("[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\n{BASE}"));
    assert!(e.starts_with("relay.toml:2:20: invalid CIDR"), "{e}");
}

#[test]
fn secrets_never_appear_in_debug() {
    let c = parse_str(&BASE.replace("shared_token = \"t\"", "shared_token = \"supersecretvalue\"")).unwrap();
    assert!(!format!("{c:?}").contains("supersecretvalue"));
}

#[test]
fn redirect_http_needs_an_https_listener() {
    let e = err(&format!("[server]\nhttp = \"127.0.0.1:0\"\nredirect_http = true\n{BASE}"));
    assert!(e.starts_with("relay.toml:3:17: redirect_http = true needs an https listener"), "{e}");
}

#[test]
fn acme_cache_dir_defaults_under_storage_and_contact_needs_mailto() {
    let acme = "[server]\nhttps = \"127.0.0.1:0\"\n[server.acme]\ndomains = [\"chat.example.com\"]\n";
    let c = parse_str(&format!("{acme}[storage]\npath = \"/srv/relay\"\n{BASE}")).unwrap();
    let a = c.server.acme.unwrap();
    assert_eq!(a.cache_dir, Path::new("/srv/relay/acme"));
    assert_eq!(a.directory, "https://acme-v02.api.letsencrypt.org/directory");
    let e = err(&format!("{acme}contact = [\"ops@example.com\"]\n{BASE}"));
    assert!(e.contains("must be a URL such as \"mailto:ops@example.com\""), "{e}");
    let e = err(&format!("{acme}directory = \"http://ca.example/dir\"\n{BASE}"));
    assert!(e.contains("unknown ACME directory"), "{e}");
}

#[test]
fn certificates_without_an_https_listener_are_pointed_out() {
    let c = parse_str(&format!("[server]\n[server.acme]\ndomains = [\"chat.example.com\"]\n{BASE}")).unwrap();
    assert!(
        c.warnings.iter().any(|w| w.contains("[server.acme] is unused without an https listener")),
        "{:?}",
        c.warnings
    );
}
