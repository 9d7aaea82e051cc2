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
    assert_eq!(c.delivery.concurrency, 64);
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

/// Every duration and size key says how to write it right, whatever was wrong: a bare number
/// (`shutdown_grace = 10`), a wrong type, or a string without a known unit.
#[test]
fn duration_and_size_errors_show_the_right_spelling() {
    let durations = [
        ("server", "request_timeout"),
        ("server", "header_timeout"),
        ("server", "idle_timeout"),
        ("server", "shutdown_grace"),
        ("delivery", "timeout"),
        ("delivery", "retry_initial"),
        ("delivery", "retry_max"),
        ("delivery", "give_up_after"),
        ("delivery", "dedup_window"),
        ("delivery", "auto_budget"),
        ("outbound", "timeout"),
    ];
    for (table, key) in durations {
        let e = err(&format!("[{table}]\n{key} = 10\n"));
        assert!(e.starts_with("relay.toml:2:"), "{e}");
        assert!(e.contains("write \"10s\" for 10 seconds") && e.contains("\"500ms\", \"10s\""), "{key}: {e}");
        let e = err(&format!("[{table}]\n{key} = 1.5\n"));
        assert!(e.contains("\"1500ms\"") && e.contains("\"5m\""), "{key}: {e}");
        for bad in ["true", "\"10 parsecs\"", "[1]"] {
            let e = err(&format!("[{table}]\n{key} = {bad}\n"));
            assert!(e.contains("\"500ms\", \"10s\", \"5m\", \"7d\""), "{key} = {bad}: {e}");
        }
    }
    let e = err(&BASE.replace("url = \"http://127.0.0.1:9000\"", "url = \"http://127.0.0.1:9000\"\ntimeout = 3"));
    assert!(e.contains("write \"3s\" for 3 seconds"), "{e}");
    for bad in ["-1", "1.5", "true", "\"4 parsecs\""] {
        let e = err(&format!("[server]\nmax_body = {bad}\n"));
        assert!(e.starts_with("relay.toml:2:12:") && e.contains("\"512KiB\", \"4MiB\", \"1MB\""), "{bad}: {e}");
    }
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
fn self_contained_parsing_reads_no_secret_reference() {
    let self_contained = |text: &str| parse_self_contained(Path::new("relay.toml"), text);
    assert!(self_contained(BASE).is_ok());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "t\n").unwrap();
    let by_file = BASE.replace("shared_token = \"t\"", &format!("shared_token = \"file:{}\"", file.display()));
    assert!(parse_str(&by_file).is_ok(), "the file is readable");
    for reference in [format!("file:{}", file.display()), "env:PATH".into(), "cred:acme".into()] {
        let text = BASE.replace("shared_token = \"t\"", &format!("shared_token = \"{reference}\""));
        let e = self_contained(&text).expect_err(&reference).to_string();
        assert!(e.starts_with("relay.toml:12:18:") && e.contains("references are not read here"), "{e}");
    }
}

#[test]
fn hosts_are_names_or_addresses_without_a_port() {
    let with_host = |h: &str| {
        BASE.replace("url = \"http://127.0.0.1:9000\"", &format!("url = \"http://127.0.0.1:9000\"\nhosts = [\"{h}\"]"))
    };
    for ok in ["chat.example.com", "Chat.Example.COM", "[2001:db8::1]", "192.0.2.7"] {
        assert!(parse_str(&with_host(ok)).is_ok(), "{ok}");
    }
    // Routing compares the Host header without its port: none of these could ever match.
    for bad in ["chat.example.com:8443", "2001:db8::1", "[2001:db8::1]:443", "", "a b", "a/b", "[nope]"] {
        let e = err(&with_host(bad));
        assert!(e.starts_with("relay.toml:8:10:") && e.contains("without a port"), "{bad}: {e}");
    }
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
fn modes() {
    assert_eq!(parse_str(&BASE.replace("mode = \"direct\"", "mode = \"auto\"")).unwrap().delivery.mode, Mode::Auto);
    // Without a mode, the default is the durable queue.
    assert_eq!(parse_str(&BASE.replace("mode = \"direct\"", "")).unwrap().delivery.mode, Mode::Queue);
    let e = err(&BASE.replace("mode = \"direct\"", "mode = \"fast\""));
    assert!(e.starts_with("relay.toml:3:8: unknown variant `fast`"), "{e}");
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

const APP: &str = r#"
[[meta_app]]
name = "main"
app_secret = "s"

[[motion]]
name = "a"
url = "http://127.0.0.1:9000"
signing_secret = "x"
  [[motion.account]]
  id = "1"
  provider = "meta"
  app = "main"
  phone_number_id = "111"
"#;

#[test]
fn meta_app_accounts() {
    let c = parse_str(APP).unwrap();
    assert_eq!(c.meta_apps[0].name, "main");
    assert_eq!(c.motions[0].accounts[0].app.as_deref(), Some("main"));
    // Two accounts claiming one number.
    let dup = format!(
        "{APP}  [[motion.account]]\n  id = \"2\"\n  provider = \"meta\"\n  app = \"main\"\n  phone_number_id = \"111\"\n"
    );
    let e = err(&dup);
    assert!(e.starts_with("relay.toml:19:21: phone_number_id \"111\" is already claimed"), "{e}");
    // An unknown app.
    let e = err(&APP.replace("app = \"main\"", "app = \"other\""));
    assert!(e.starts_with("relay.toml:13:9: unknown meta_app \"other\""), "{e}");
    // A Motion with app accounts must sign what it forwards.
    let e = err(&APP.replace("signing_secret = \"x\"\n", ""));
    assert!(e.starts_with("relay.toml:7:8:") && e.contains("needs a signing_secret"), "{e}");
    // An app with no accounts is only a warning.
    let c = parse_str(&format!("{APP}\n[[meta_app]]\nname = \"empty\"\napp_secret = \"t\"\n")).unwrap();
    assert!(c.warnings.iter().any(|w| w.contains("meta_app \"empty\" has no accounts")), "{:?}", c.warnings);
}

#[test]
fn an_account_off_the_app_with_the_apps_secret_is_warned_about() {
    let other = |secret: &str| {
        format!(
            "{APP}\n[[motion]]\nname = \"b\"\nurl = \"http://127.0.0.1:9001\"\n  [[motion.account]]\n  id = \"2\"\n  \
             provider = \"meta\"\n  app_secret = \"{secret}\"\n"
        )
    };
    let c = parse_str(&other("s")).unwrap();
    let w: Vec<_> = c.warnings.iter().filter(|w| w.contains("as meta_app \"main\"")).collect();
    assert_eq!(w.len(), 1, "{:?}", c.warnings);
    assert!(w[0].starts_with("relay.toml:20:8: account \"2\" of motion \"b\""), "{}", w[0]);
    assert!(!w[0].contains("\"s\""), "the secret itself is never shown: {}", w[0]);
    // Its own secret: nothing to say.
    let c = parse_str(&other("own")).unwrap();
    assert!(!c.warnings.iter().any(|w| w.contains("has the same")), "{:?}", c.warnings);
}

#[test]
fn outbound_paths_and_sinch_keys_are_checked_at_load() {
    let e = err(&format!("{BASE}  outbound_paths = [\"/v1//messages\"]\n"));
    assert!(e.starts_with("relay.toml:10:8:") && e.contains("empty segment"), "{e}");
    let e = err(&format!("{BASE}  outbound_paths = [\"post /v1/x\"]\n"));
    assert!(e.contains("upper case"), "{e}");
    let c = parse_str(&format!("{BASE}  outbound_paths = [\"POST /v1/*/messages\"]\n")).unwrap();
    assert!(c.motions[0].accounts[0].outbound.paths.allows(&http::Method::POST, "/v1/HX1/messages"));
    let e = err(&format!("{BASE}  key_id = \"k\"\n"));
    assert!(e.contains("key_id and key_secret go together"), "{e}");
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

#[test]
fn a_secret_shared_by_two_tenants_is_a_warning() {
    let text = |b_secret: &str, b_motion: &str| {
        format!(
            r#"
[[motion]]
name = "acme"
url = "http://127.0.0.1:9000"
  [[motion.account]]
  id = "1"
  provider = "meta"
  app_secret = "same"
  [[motion.account]]
  id = "2"
  provider = "meta"
  app_secret = "same"
[[motion]]
name = "{b_motion}"
url = "http://127.0.0.1:9001"
  [[motion.account]]
  id = "1"
  provider = "meta"
  app_secret = "{b_secret}"
"#
        )
    };
    let shared = |c: &Config| c.warnings.iter().filter(|w| w.contains("has the same app_secret")).count();
    let c = parse_str(&text("same", "globex")).unwrap();
    assert_eq!(shared(&c), 1, "{:?}", c.warnings);
    let w = c.warnings.iter().find(|w| w.contains("has the same")).unwrap();
    assert!(w.starts_with("relay.toml:17:8: account \"1\" of motion \"globex\""), "{w}");
    assert!(!w.contains("\"same\""), "the secret itself is never shown: {w}");
    // Within one Motion (one tenant) reuse is the operator's business.
    assert_eq!(shared(&parse_str(&text("own", "globex")).unwrap()), 0);
}

/// `BASE` with lines added to its `[[motion]]` (before its account).
fn with_motion_lines(lines: &str) -> String {
    BASE.replace("url = \"http://127.0.0.1:9000\"\n", &format!("url = \"http://127.0.0.1:9000\"\n{lines}\n"))
}

#[test]
fn rate_limits_and_byte_budgets() {
    let c = parse_str(&with_motion_lines("rate_limit = \"200/s\"")).unwrap();
    let limit = c.motions[0].rate_limit.unwrap();
    assert_eq!((limit.count, limit.per, limit.burst), (200, Duration::from_secs(1), 200), "burst: a second's worth");
    let c = parse_str(&with_motion_lines("rate_limit = \"5000/m\"\nburst = 10")).unwrap();
    let limit = c.motions[0].rate_limit.unwrap();
    assert_eq!((limit.count, limit.per, limit.burst), (5000, Duration::from_secs(60), 10));
    assert_eq!(parse_str(&with_motion_lines("rate_limit = \"30/h\"")).unwrap().motions[0].rate_limit.unwrap().burst, 1);
    assert_eq!(parse_str(BASE).unwrap().motions[0].rate_limit, None);
    for bad in ["200", "200/d", "0/s", "x/s", "-1/s", "1.5/s"] {
        let e = err(&with_motion_lines(&format!("rate_limit = \"{bad}\"")));
        assert!(e.starts_with("relay.toml:8:14: invalid rate_limit") && e.contains("\"5000/m\""), "{bad}: {e}");
    }
    assert!(err(&with_motion_lines("burst = 5")).contains("burst needs rate_limit"));
    assert!(err(&with_motion_lines("rate_limit = \"1/s\"\nburst = 0")).contains("burst must be at least 1"));
    let c = parse_str(&with_motion_lines("max_queued_bytes = \"64MiB\"")).unwrap();
    assert_eq!(c.motions[0].max_queued_bytes, 64 << 20);
    assert_eq!(parse_str(BASE).unwrap().motions[0].max_queued_bytes, DEFAULT_MAX_QUEUED_BYTES);
}

#[test]
fn a_rate_limit_on_a_motion_with_twilio_accounts_is_a_warning() {
    let kaleyra = parse_str(&with_motion_lines("rate_limit = \"10/s\"")).unwrap();
    assert!(!kaleyra.warnings.iter().any(|w| w.contains("Twilio")), "{:?}", kaleyra.warnings);
    let twilio = with_motion_lines("rate_limit = \"10/s\"")
        .replace("provider = \"kaleyra\"\n  shared_token = \"t\"", "provider = \"twilio\"\n  auth_token = \"t\"");
    let c = parse_str(&twilio).unwrap();
    let w = c.warnings.iter().find(|w| w.contains("Twilio")).expect("a warning");
    assert!(w.starts_with("relay.toml:8:14:") && w.contains("does not retry a 429"), "{w}");
}

#[test]
fn storage_backend_postgres_needs_a_url_and_sane_values() {
    let c = parse_str(BASE).unwrap();
    assert_eq!(c.storage, StorageBackend::Embedded);
    let e = err(&format!("[storage]\nbackend = \"postgres\"\n{BASE}"));
    assert!(e.starts_with("relay.toml:2:11:") && e.contains("needs url"), "{e}");
    let e = err(&format!("[storage]\nbackend = \"mysql\"\n{BASE}"));
    assert!(e.starts_with("relay.toml:2:11:") && e.contains("\"embedded\" or \"postgres\""), "{e}");
    let pg = "[storage]\nbackend = \"postgres\"\nurl = \"postgres://relay:pw@db:5432/relay?sslmode=disable\"\n";
    let c = parse_str(&format!("{pg}{BASE}")).unwrap();
    let StorageBackend::Postgres(p) = &c.storage else { panic!("postgres") };
    assert_eq!((p.pool, p.takeover), (16, Duration::from_secs(15)));
    assert!(c.summary().contains("storage: postgres, pool 16"), "{}", c.summary());
    let e = err(&format!("{pg}pool = 0\n{BASE}"));
    assert!(e.starts_with("relay.toml:4:8:") && e.contains("2 to 1000"), "{e}");
    let e = err(&format!("{pg}takeover = \"100ms\"\n{BASE}"));
    assert!(e.starts_with("relay.toml:4:12:") && e.contains("out of range"), "{e}");
    let e = err(&format!("{pg}takeover = \"1d\"\n{BASE}"));
    assert!(e.contains("out of range"), "{e}");
    let e = err(&format!("[storage]\nbackend = \"postgres\"\nurl = \"postgres://relay:hunter2@db/relay\"\n{BASE}"));
    assert!(e.starts_with("relay.toml:3:7:") && e.contains("sslmode") && !e.contains("hunter2"), "{e}");
    // Postgres keys without the backend are pointed out, not silently ignored.
    let c = parse_str(&format!("[storage]\npool = 4\n{BASE}")).unwrap();
    assert!(c.warnings.iter().any(|w| w.contains("pool is unused")), "{:?}", c.warnings);
}

/// The packaged template's placeholders: refused while any is left outside comments, every such
/// line named; a comment may mention one.
#[test]
fn placeholders_left_are_refused_with_their_lines() {
    let text = BASE.replace("name = \"acme\"", "name = \"CHANGE_ME\"").replace("id = \"12\"", "id = \"CHANGE_ME\"");
    let e = err(&format!("# fill in every CHANGE_ME\n{text}"));
    assert!(e.starts_with("relay.toml:7:9: 2 placeholder(s) CHANGE_ME left to fill in, on line(s) 7, 11"), "{e}");
    assert!(parse_str(&format!("# fill in every CHANGE_ME\n{BASE}")).is_ok());
}

#[test]
fn connection_limits_and_idle_timeout() {
    let c = parse_str(BASE).unwrap();
    let s = &c.server;
    assert_eq!((s.idle_timeout, s.max_connections, s.max_connections_per_ip), (Duration::from_secs(60), 10_000, 256));
    let c = parse_str(&format!(
        "[server]\nidle_timeout = \"2m\"\nmax_connections = 50\nmax_connections_per_ip = 5\n{BASE}"
    ))
    .unwrap();
    let s = &c.server;
    assert_eq!((s.idle_timeout, s.max_connections, s.max_connections_per_ip), (Duration::from_secs(120), 50, 5));
    for (line, want) in [
        (
            "idle_timeout = \"0s\"",
            "relay.toml:2:16: [server] idle_timeout = \"0s\" is out of range: write a duration from \"1s\" to \"1h\"",
        ),
        ("idle_timeout = \"2h\"", "relay.toml:2:16: [server] idle_timeout = \"2h\" is out of range"),
        ("max_connections = 0", "relay.toml:2:19: max_connections must be between 1 and 1000000"),
        ("max_connections_per_ip = -3", "relay.toml:2:26: max_connections_per_ip must be between 1 and 1000000"),
        ("max_connections = 10\nmax_connections_per_ip = 11", "relay.toml:3:26: max_connections_per_ip (11) is above"),
    ] {
        let e = err(&format!("[server]\n{line}\n{BASE}"));
        assert!(e.starts_with(want), "{line}: {e}");
    }
}

/// Zero or absurd durations are refused at their line and column, with the range allowed.
#[test]
fn durations_out_of_range_are_refused_with_the_range() {
    let cases = [
        ("server", "request_timeout", "0s", "1s", "1h"),
        ("server", "request_timeout", "2h", "1s", "1h"),
        ("server", "header_timeout", "0s", "1s", "1h"),
        ("server", "header_timeout", "3d", "1s", "1h"),
        ("server", "shutdown_grace", "0s", "1s", "1h"),
        ("delivery", "timeout", "0s", "100ms", "1h"),
        ("delivery", "timeout", "30d", "100ms", "1h"),
        ("delivery", "retry_initial", "0s", "10ms", "1d"),
        ("delivery", "retry_max", "400d", "10ms", "1d"),
        ("delivery", "give_up_after", "0s", "1s", "365d"),
        ("delivery", "dedup_window", "0s", "1m", "365d"),
        ("delivery", "auto_budget", "0s", "10ms", "5m"),
        ("outbound", "timeout", "0s", "100ms", "1h"),
    ];
    for (table, key, value, low, high) in cases {
        let e = err(&format!("[{table}]\n{key} = \"{value}\"\n"));
        assert!(e.starts_with(&format!("relay.toml:2:{}:", key.len() + 4)), "{key} = {value}: {e}");
        assert!(e.contains(&format!("[{table}] {key} = \"{value}\" is out of range")), "{key} = {value}: {e}");
        assert!(e.contains(&format!("from \"{low}\" to \"{high}\"")), "{key} = {value}: {e}");
    }
    let e = err(&BASE.replace("url = \"http://127.0.0.1:9000\"", "url = \"http://127.0.0.1:9000\"\ntimeout = \"0s\""));
    assert!(e.starts_with("relay.toml:8:11:") && e.contains("[[motion]] timeout = \"0s\" is out of range"), "{e}");
    let e =
        err("[storage]\nbackend = \"postgres\"\nurl = \"postgres://u:p@h/db?sslmode=disable\"\ntakeover = \"0s\"\n");
    assert!(e.starts_with("relay.toml:4:12:") && e.contains("out of range"), "{e}");
    let e = err("[delivery]\nretry_initial = \"10s\"\nretry_max = \"1s\"\n");
    assert!(e.starts_with("relay.toml:3:13:") && e.contains("retry_max (1s) is below retry_initial (10s)"), "{e}");
    // The ends of each range are allowed.
    let ok = "[server]\nrequest_timeout = \"1h\"\nheader_timeout = \"1s\"\n[delivery]\ntimeout = \"100ms\"\nretry_initial = \"10ms\"\nretry_max = \"1d\"\ndedup_window = \"365d\"\n";
    parse_str(&format!("{ok}{}", BASE.replace("[delivery]\nmode = \"direct\"\n", ""))).unwrap();
}

/// A secret file is a regular file of at most 64 KiB: a device, a FIFO, a directory or a large
/// file is refused at once, naming the file and the limit, without reading it all.
#[test]
fn secret_files_are_bounded_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let with = |path: &str| BASE.replace("shared_token = \"t\"", &format!("shared_token = \"file:{path}\""));
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo (coreutils)");
    assert!(made.success());
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'a'; 65 * 1024]).unwrap();
    // The cases that cannot hang or exhaust memory go first.
    let cases = [
        (dir.path().display().to_string(), "is a directory, not a regular file"),
        (big.display().to_string(), "is larger than 64 KiB"),
        (fifo.display().to_string(), "is a FIFO (named pipe), not a regular file"),
        ("/dev/zero".to_string(), "is a device, not a regular file"),
    ];
    for (path, says) in cases {
        let started = std::time::Instant::now();
        let e = err(&with(&path));
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{path} took {:?}", started.elapsed());
        assert!(e.starts_with("relay.toml:12:18:"), "{path}: {e}");
        assert!(e.contains(&format!("secret file {path} {says}")), "{path}: {e}");
        assert!(e.contains("64 KiB"), "{path}: {e}");
    }
    // Exactly 64 KiB is still a secret.
    std::fs::write(&big, vec![b'a'; 64 * 1024]).unwrap();
    assert_eq!(parse_str(&with(&big.display().to_string())).unwrap().motions.len(), 1);
}

#[test]
fn the_acme_key_is_long_and_its_absence_with_postgres_is_pointed_out() {
    let acme = "[server]\nhttps = \"127.0.0.1:0\"\n[server.acme]\ndomains = [\"chat.example.com\"]\n";
    let pg = "[storage]\nbackend = \"postgres\"\nurl = \"postgres://relay@127.0.0.1/relay?sslmode=disable\"\n";
    let c = parse_str(&format!("{acme}{pg}{BASE}")).unwrap();
    assert!(c.warnings.iter().any(|w| w.contains("stored unencrypted in the database")), "{:?}", c.warnings);
    let long = "k".repeat(40);
    let c = parse_str(&format!("{acme}key = \"{long}\"\n{pg}{BASE}")).unwrap();
    assert_eq!(c.server.acme.unwrap().key.unwrap().expose(), long);
    assert!(!c.warnings.iter().any(|w| w.contains("stored unencrypted")), "{:?}", c.warnings);
    let e = err(&format!("{acme}key = \"short\"\n{pg}{BASE}"));
    assert!(e.contains("at least 32 random characters"), "{e}");
    let c = parse_str(&format!("{acme}key = \"{long}\"\n{BASE}")).unwrap();
    assert!(c.warnings.iter().any(|w| w.contains("key is unused with the embedded backend")), "{:?}", c.warnings);
}

/// Three Motions after a header: `parse_file` takes them a Motion at a time.
fn three_motions(third_account: &str) -> String {
    let mut t = String::from("[delivery]\nmode = \"direct\"\n");
    for (m, extra) in [("a", ""), ("b", ""), ("c", third_account)] {
        t += &format!(
            "\n[[motion]]\nname = \"{m}\"\nurl = \"https://{m}.example\"\n  [[motion.account]]\n  id = \"1\"\n  \
             provider = \"kaleyra\"\n  shared_token = \"t-{m}\"\n{extra}"
        );
    }
    t
}

/// Parsed a Motion at a time or whole, a file gives the same config, and errors and warnings
/// name the same line and column (the positions are the whole file's, not the part's).
#[test]
fn a_file_parsed_motion_by_motion_gives_what_the_whole_text_gives() {
    let text = three_motions("  region = \"us\"\n");
    let by_parts = parse_file(&text).ok().unwrap();
    let whole: schema::File = toml::from_str(&text).unwrap();
    let spans = |f: &schema::File| -> Vec<_> {
        f.motion.iter().flat_map(|m| [m.name.span(), m.url.span(), m.account[0].id.span()]).collect()
    };
    assert_eq!(spans(&by_parts), spans(&whole));
    let region = text.find("\"us\"").unwrap();
    assert_eq!(by_parts.motion[2].account[0].region.as_ref().unwrap().span(), region..region + 4);
    // A validation error and a TOML error in the third Motion, at their place in the file.
    let e = err(&three_motions("  region = \"mars\"\n"));
    assert!(e.starts_with("relay.toml:27:12: unknown region \"mars\""), "{e}");
    let e = err(&three_motions("  colour = \"blue\"\n"));
    assert!(e.starts_with("relay.toml:27:3: unknown field `colour`"), "{e}");
    let c = parse_str(&three_motions("")).unwrap();
    assert_eq!(c.motions.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
}

/// Where the parts would not be what the whole text means, the whole text decides.
#[test]
fn a_file_that_cannot_be_split_is_parsed_whole() {
    // A multi-line string holding a `[[motion]]` line: one Motion's hosts comment, not a header.
    let text = three_motions("").replacen(
        "url = \"https://b.example\"",
        "url = \"https://b.example\"\nrate_limit = \"\"\"\n[[motion]]\n\"\"\"",
        1,
    );
    let e = err(&text);
    assert!(e.starts_with("relay.toml:15:14: invalid rate_limit \"[[motion]]\\n\""), "{e}");
    // An empty static `motion` array before `[[motion]]` tables: TOML refuses to extend it.
    let e = err(&format!("motion = []\n{}", three_motions("")));
    assert!(e.starts_with("relay.toml:"), "{e}");
    // A table after the Motions is fine in TOML, and still read.
    let c = parse_str(&format!("{}\n[outbound]\ntimeout = \"7s\"\n", three_motions(""))).unwrap();
    assert_eq!((c.motions.len(), c.outbound_timeout), (3, Duration::from_secs(7)));
}
