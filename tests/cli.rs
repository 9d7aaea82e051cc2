//! The command line: `check` and `run` on good and bad files, exit codes and messages.

mod support;

use std::process::Command;
use support::bin;

fn write(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

const GOOD: &str = r#"[server]
http = "127.0.0.1:0"
[delivery]
mode = "direct"
[[motion]]
name = "acme"
url = "http://127.0.0.1:9"
  [[motion.account]]
  id = "12"
  provider = "kaleyra"
  shared_token = "env:CLI_TEST_TOKEN"
"#;

#[test]
fn check_prints_a_summary() {
    let (_d, path) = write(GOOD);
    let out = Command::new(bin()).args(["check", "--config"]).arg(&path).env("CLI_TEST_TOKEN", "x").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("motions: 1  accounts: 1"), "{text}");
    assert!(text.contains("kaleyra 1"), "{text}");
}

#[test]
fn bad_config_names_file_line_and_column_for_check_and_run() {
    let (_d, path) = write(GOOD);
    for args in [&["check"][..], &["run"][..], &[][..]] {
        // The secret's variable is unset: both commands refuse with the same message.
        let out =
            Command::new(bin()).args(args).arg("--config").arg(&path).env_remove("CLI_TEST_TOKEN").output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let want = format!("{}:11:18: secret environment variable CLI_TEST_TOKEN is not set", path.display());
        assert!(err.contains(&want), "{args:?}: {err}");
    }
    let (_d, path) = write(&GOOD.replace("[delivery]", "[delivery]\nretries = 3"));
    let out = Command::new(bin()).args(["check", "--config"]).arg(&path).env("CLI_TEST_TOKEN", "x").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("relay.toml:4:1: unknown field `retries`"));
}

#[test]
fn credentials_come_from_the_systemd_credentials_directory() {
    let (dir, path) = write(&GOOD.replace("env:CLI_TEST_TOKEN", "cred:acme-token"));
    std::fs::write(dir.path().join("acme-token"), "from-systemd\n").unwrap();
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&path)
        .env("CREDENTIALS_DIRECTORY", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn missing_file_is_a_usage_error() {
    let out = Command::new(bin()).args(["check", "--config", "/nonexistent/relay.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/relay.toml: cannot read config file"));
}

/// `simulate` signs a sample message the way each provider does; the relay accepts it and the
/// Motion receives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_sends_a_signed_sample_for_every_provider() {
    let motion = support::FakeMotion::start().await;
    let accounts = [
        ("tw", "twilio", "auth_token = \"tw-token\""),
        ("me", "meta", "app_secret = \"meta-secret\""),
        ("d3", "360dialog", "platform_secret = \"d3-secret\""),
        ("si", "sinch", "webhook_secret = \"sinch-secret\""),
        ("ka", "kaleyra", "shared_token = \"ka-token\""),
        ("ge", "generic", "hmac_header = \"X-Sig\"\n  hmac_secret = \"ge-secret\""),
    ];
    let mut cfg = format!(
        "[server]\nhttp = \"127.0.0.1:0\"\n[storage]\npath = \"{{DATA}}\"\n[delivery]\nmode = \"direct\"\n[[motion]]\nname = \"acme\"\nurl = \"{}\"\n",
        motion.url()
    );
    for (id, provider, secret) in accounts {
        cfg.push_str(&format!("  [[motion.account]]\n  id = \"{id}\"\n  provider = \"{provider}\"\n  {secret}\n"));
    }
    let relay = support::RelayProcess::start(&cfg);
    let text = std::fs::read_to_string(&relay.config_path).unwrap();
    let cli_cfg = relay.config_path.with_file_name("cli.toml");
    std::fs::write(&cli_cfg, text.replacen("127.0.0.1:0", &relay.http.to_string(), 1)).unwrap();
    for (i, (id, provider, _)) in accounts.iter().enumerate() {
        let out = Command::new(bin())
            .args(["simulate", &format!("acme/{id}"), "--text", "simulated hello", "--config"])
            .arg(&cli_cfg)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{provider}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("200 OK"), "{stdout}");
        let got = motion.wait_for(i + 1, std::time::Duration::from_secs(5)).await;
        assert_eq!(got[i].uri, format!("/api/whatsapp/accounts/{id}/notify"));
        assert!(String::from_utf8_lossy(&got[i].body).contains("simulated"), "{provider}");
    }
    let out = Command::new(bin()).args(["simulate", "acme/nope", "--config"]).arg(&cli_cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// `--version` names the release and the commit it was built from (git's when the build had
/// one, "unknown" otherwise), so an operator can tell which build runs.
#[test]
fn version_names_the_release_and_the_commit() {
    let out = Command::new(bin()).arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!("whatsapp-relay {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(text.starts_with(&want), "{text}");
    let commit = text.trim().trim_start_matches(&want).trim_end_matches(')');
    let head = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output();
    match head {
        // Built from this checkout: the commit is HEAD's (the build script reran when HEAD moved).
        Ok(h) if h.status.success() => assert_eq!(commit, String::from_utf8_lossy(&h.stdout).trim(), "{text}"),
        _ => assert!(commit == "unknown" || commit.len() == 12, "{text}"),
    }
}

/// What `check` points out about where things live: an admin listener reachable from the
/// network without TLS, a relative storage path, and a storage folder the user running `check`
/// (under systemd: the service's own user) could not write. Warnings, not errors: exit 0.
#[test]
fn check_warns_about_the_admin_address_and_the_storage_folder() {
    let check = |text: &str| {
        let (dir, path) = write(text);
        let out =
            Command::new(bin()).args(["check", "--config"]).arg(&path).env("CLI_TEST_TOKEN", "x").output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        (dir, String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (dir, _) = check(GOOD);
    let data = dir.path().join("data");
    let with = |extra: &str| format!("{GOOD}{extra}");

    // A writable absolute folder on loopback: nothing to say.
    let (_d, text) =
        check(&with(&format!("[admin]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = \"{}\"\n", data.display())));
    assert!(!text.contains("[admin]") && !text.contains("[storage]"), "{text}");

    let (_d, text) =
        check(&with(&format!("[admin]\nlisten = \"0.0.0.0:9090\"\n[storage]\npath = \"{}\"\n", data.display())));
    assert!(
        text.contains("warning: ")
            && text.contains("relay.toml:13:10: [admin] listen 0.0.0.0:9090 is not a loopback address"),
        "{text}"
    );
    assert!(text.contains("plain HTTP"), "{text}");

    let (_d, text) = check(&with("[storage]\npath = \"./data\"\n"));
    assert!(text.contains("[storage] path \"./data\" is relative"), "{text}");
    assert!(text.contains("/var/lib/whatsapp-relay") && text.contains("StateDirectory=whatsapp-relay"), "{text}");

    // A folder nobody can create (its parent is a file): even root is refused.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let (_d, text) = check(&with(&format!("[storage]\npath = \"{}/queue\"\n", file.display())));
    assert!(text.contains("does not exist and this user (uid ") && text.contains("cannot create it"), "{text}");
    assert!(text.contains("StateDirectory=whatsapp-relay"), "{text}");

    // A folder that exists but is not writable, for a user the file modes bind (not root).
    let ro = dir.path().join("read-only");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    let (_d, text) = check(&with(&format!("[storage]\npath = \"{}\"\n", ro.display())));
    if std::fs::write(ro.join("probe"), "").is_ok() {
        eprintln!("running as root: the read-only folder case is not observable, skipped");
    } else {
        assert!(text.contains("is not writable by this user"), "{text}");
    }
}

const URLS: &str = r#"[server]
public_url = "https://chat.example.com"
http = "127.0.0.1:0"
[storage]
path = "{DATA}"
[[meta_app]]
name = "main"
app_secret = "app-secret"
verify_token = "app-verify"
[[motion]]
name = "acme"
url = "{MOTION}"
hosts = ["acme.chat.example.com"]
signing_secret = "acme-signing"
  [[motion.account]]
  id = "12"
  provider = "twilio"
  auth_token = "tw-token"
  [[motion.account]]
  id = "13"
  provider = "meta"
  app = "main"
  phone_number_id = "106540352242922"
[[motion]]
name = "beta"
url = "{MOTION}"
  [[motion.account]]
  id = "7"
  provider = "sinch"
  webhook_secret = "sinch-secret"
"#;

/// `check --urls` prints every account's webhook URL (prefix and Host routes, a Meta app's one
/// URL) and outbound base; for Twilio also the URL with the connection overrides that make
/// Twilio retry a 503. A webhook Twilio signed over that URL, fragment included or not (Twilio
/// does not document which), is accepted by the real relay; one signed over another fragment is
/// not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_urls_prints_what_to_paste_and_the_twilio_retry_url_verifies() {
    let motion = support::FakeMotion::start().await;
    let relay = support::RelayProcess::start(&URLS.replace("{MOTION}", &motion.url()));
    let out = Command::new(bin()).args(["check", "--urls", "--config"]).arg(&relay.config_path).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    for want in [
        "acme/12  twilio",
        "webhook   https://acme.chat.example.com/api/whatsapp/accounts/12/notify",
        "webhook   https://chat.example.com/acme/api/whatsapp/accounts/12/notify",
        "+ retries https://chat.example.com/acme/api/whatsapp/accounts/12/notify#rc=5&rp=ct,rt,5xx",
        "outbound  https://chat.example.com/acme/outbound/12",
        "outbound  https://acme.chat.example.com/outbound/12",
        "acme/13  meta, meta_app main",
        "webhook   https://chat.example.com/meta/main",
        "beta/7  sinch",
        "webhook   https://chat.example.com/beta/api/whatsapp/accounts/7/notify",
        "outbound  https://chat.example.com/beta/outbound/7",
        "meta_app main (meta)",
        "accounts  acme/13",
    ] {
        assert!(lines.contains(&want), "missing {want:?} in:\n{text}");
    }
    assert!(!text.contains("accounts/13/notify"), "an app account's own path is not given out:\n{text}");
    assert!(!text.contains("beta/api/whatsapp/accounts/7/notify#"), "only Twilio gets the fragment:\n{text}");
    assert!(!text.contains("tw-token") && !text.contains("sinch-secret"), "no secret is printed:\n{text}");

    // Twilio posts to the URL without its fragment (no client sends one) and signs the URL that
    // was pasted: try both spellings of the pasted URL.
    let pasted = lines.iter().find_map(|l| l.strip_prefix("+ retries https://chat.example.com")).unwrap().to_string();
    let (path, fragment) = pasted.split_once('#').unwrap();
    let form = b"SmsStatus=received&From=whatsapp%3A%2B15550000001&Body=hi".to_vec();
    for (i, signed) in [format!("https://chat.example.com{path}#{fragment}"), format!("https://chat.example.com{path}")]
        .iter()
        .enumerate()
    {
        // A new MessageSid each time: the same one would be a redelivery, acknowledged but not sent.
        let form = [form.clone(), format!("&MessageSid=SM-{i}").into_bytes()].concat();
        let sig = support::twilio_signature("tw-token", signed, &form);
        let headers = [("x-twilio-signature", sig.as_str()), ("content-type", "application/x-www-form-urlencoded")];
        let r = support::post(&relay.url(path), &headers, form.clone()).await;
        assert_eq!(r.status, 200, "signed over {signed}: {:?}", r.body);
        motion.wait_for(i + 1, std::time::Duration::from_secs(5)).await;
    }
    let other = format!("https://chat.example.com{path}#rc=2");
    let sig = support::twilio_signature("tw-token", &other, &form);
    let headers = [("x-twilio-signature", sig.as_str()), ("content-type", "application/x-www-form-urlencoded")];
    let r = support::post(&relay.url(path), &headers, form).await;
    assert_eq!(r.status, 401, "a fragment the relay does not know cannot be verified");
}

const CREDS: &str = r#"[server]
public_url = "https://chat.example.com"
http = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
token = "cred:admin.token"
[storage]
path = "{DATA}"
[[motion]]
name = "acme"
url = "{MOTION}"
outbound_token = "cred:acme-outbound"
signing_secret = "cred:acme-signing"
  [[motion.account]]
  id = "12"
  provider = "twilio"
  auth_token = "cred:acme-12-twilio"
  [[motion.account]]
  id = "13"
  provider = "meta"
  app_secret = "cred:acme-13-meta"
"#;

/// The relay runs as a systemd service with every secret a credential. An operator's shell has
/// none of them: `queue` needs only the admin token (from a credentials folder holding nothing
/// else, or from --admin-token-file), `simulate` only its account's secret, `check --urls`
/// none; `check` itself still needs them all (it validates what the service will run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_need_only_the_secrets_they_use() {
    let motion = support::FakeMotion::start().await;
    let dir = tempfile::tempdir().unwrap();
    let service_creds = dir.path().join("service-creds");
    std::fs::create_dir(&service_creds).unwrap();
    for (name, value) in [
        ("admin.token", "the-admin-token"),
        ("acme-outbound", "o"),
        ("acme-signing", "s"),
        ("acme-12-twilio", "tw-token"),
        ("acme-13-meta", "meta-secret"),
    ] {
        std::fs::write(service_creds.join(name), format!("{value}\n")).unwrap();
    }
    let creds = service_creds.display().to_string();
    let relay = support::RelayProcess::start_in_with_env(
        dir,
        &CREDS.replace("{MOTION}", &motion.url()),
        &[("CREDENTIALS_DIRECTORY", creds.as_str())],
    );
    // The operator's copy names the ports the relay bound.
    let text = std::fs::read_to_string(&relay.config_path).unwrap();
    let text = text.replacen("http = \"127.0.0.1:0\"", &format!("http = \"{}\"", relay.http), 1).replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{}\"", relay.admin.unwrap()),
        1,
    );
    let cli_cfg = relay.config_path.with_file_name("cli.toml");
    std::fs::write(&cli_cfg, text).unwrap();

    let only = |names: &[&str]| {
        let d = tempfile::tempdir().unwrap();
        for n in names {
            std::fs::copy(service_creds.join(n), d.path().join(n)).unwrap();
        }
        d
    };
    let run = |args: &[&str], creds: Option<&std::path::Path>| {
        let mut cmd = Command::new(bin());
        cmd.args(args).arg("--config").arg(&cli_cfg).env_remove("CREDENTIALS_DIRECTORY");
        if let Some(c) = creds {
            cmd.env("CREDENTIALS_DIRECTORY", c);
        }
        let out = cmd.output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code(), said)
    };

    let admin_only = only(&["admin.token"]);
    let (code, said) = run(&["queue", "stats"], Some(admin_only.path()));
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("dead letters: 0"), "{said}");

    // No credentials at all: the token is what is missing, and the message says how to give it.
    let (code, said) = run(&["queue", "stats"], None);
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("cannot read the admin token") && said.contains("--admin-token-file"), "{said}");
    assert!(said.contains("cli.toml:6:9:"), "names where the token is configured: {said}");
    let token_file = service_creds.join("admin.token");
    let (code, said) = run(&["queue", "stats", "--admin-token-file", token_file.to_str().unwrap()], None);
    assert_eq!(code, Some(0), "{said}");

    let (code, said) = run(&["check", "--urls"], None);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("https://chat.example.com/acme/api/whatsapp/accounts/12/notify"), "{said}");
    let (code, said) = run(&["check"], Some(admin_only.path()));
    assert_eq!(code, Some(2), "check validates what the service runs, every secret included: {said}");

    let twilio_only = only(&["acme-12-twilio"]);
    let (code, said) = run(&["simulate", "acme/12"], Some(twilio_only.path()));
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("200 OK"), "{said}");
    motion.wait_for(1, std::time::Duration::from_secs(5)).await;
    let (code, said) = run(&["simulate", "acme/13"], Some(twilio_only.path()));
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("cannot sign for acme/13") && said.contains("acme-13-meta"), "{said}");
}

/// `simulate` against a relay whose plain listener redirects to https (`redirect_http`), and
/// against the https listener alone: it connects to the listener's address with the TLS name
/// and Host of `public_url`, trusting `--cacert` (or anything, with `--insecure`); without
/// either, a private CA's certificate is refused with a hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_posts_over_https_and_through_redirect_http() {
    use support::tls::{TestCa, write_leaf};
    let motion = support::FakeMotion::start().await;
    let ca = TestCa::new("simulate test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_leaf(dir.path(), &ca.leaf(&["chat.example.com"]));
    let ca_file = ca.write(dir.path());
    let cfg = format!(
        "[server]\npublic_url = \"https://chat.example.com\"\nhttp = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\nredirect_http = true\n\
         [server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n[storage]\npath = \"{{DATA}}\"\n[delivery]\nmode = \"direct\"\n\
         [[motion]]\nname = \"acme\"\nurl = \"{}\"\n  [[motion.account]]\n  id = \"12\"\n  provider = \"twilio\"\n  auth_token = \"tw-token\"\n",
        cert.display(),
        key.display(),
        motion.url()
    );
    let relay = support::RelayProcess::start_in(dir, &cfg);
    let https = relay.https.unwrap();
    let text = std::fs::read_to_string(&relay.config_path).unwrap();
    let both = text.replacen("http = \"127.0.0.1:0\"", &format!("http = \"{}\"", relay.http), 1).replacen(
        "https = \"127.0.0.1:0\"",
        &format!("https = \"{https}\""),
        1,
    );
    let both_cfg = relay.config_path.with_file_name("both.toml");
    std::fs::write(&both_cfg, &both).unwrap();
    // The operator's copy without the plain listener: https only.
    let https_only =
        both.replacen(&format!("http = \"{}\"\n", relay.http), "", 1).replacen("redirect_http = true\n", "", 1);
    let https_cfg = relay.config_path.with_file_name("https.toml");
    std::fs::write(&https_cfg, &https_only).unwrap();

    let simulate = |cfg: &std::path::Path, extra: &[&str]| {
        let out =
            Command::new(bin()).args(["simulate", "acme/12"]).args(extra).arg("--config").arg(cfg).output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code(), said)
    };
    let cacert = ["--cacert", ca_file.to_str().unwrap()];

    let (code, said) = simulate(&both_cfg, &cacert);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("308 Permanent Redirect: following to https"), "{said}");
    assert!(
        said.contains(&format!("POST https://chat.example.com/acme/api/whatsapp/accounts/12/notify (via {https})")),
        "{said}"
    );
    assert!(said.contains("200 OK"), "{said}");
    motion.wait_for(1, std::time::Duration::from_secs(5)).await;

    let (code, said) = simulate(&https_cfg, &cacert);
    assert_eq!(code, Some(0), "{said}");
    assert!(!said.contains("following"), "{said}");
    motion.wait_for(2, std::time::Duration::from_secs(5)).await;

    let (code, said) = simulate(&https_cfg, &["--insecure"]);
    assert_eq!(code, Some(0), "{said}");
    motion.wait_for(3, std::time::Duration::from_secs(5)).await;

    let (code, said) = simulate(&https_cfg, &[]);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("TLS with https://chat.example.com") && said.contains("--cacert"), "{said}");
    assert_eq!(motion.count(), 3);
}

/// `check` says when the listeners could hold more connections than the process may open
/// files (the relay raises its soft limit to the hard one; beyond that, only the service's
/// LimitNOFILE= helps).
#[test]
fn check_warns_when_max_connections_exceeds_the_open_files_limit() {
    let check = |limit: u32, extra: &str| {
        let (dir, path) = write(&GOOD.replace("[server]\n", &format!("[server]\n{extra}")));
        // `ulimit -n` in a shell sets both limits for what it then runs.
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("ulimit -n {limit} && exec \"$0\" check --config \"$1\""))
            .arg(bin())
            .arg(&path)
            .env("CLI_TEST_TOKEN", "x")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        drop(dir);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = check(4096, "");
    assert!(
        text.contains("relay.toml: max_connections = 10000 on 1 public listener(s) may need 10512 open files, more than this process may open (4096)")
            && text.contains("(10000 by default)"),
        "{text}"
    );
    let text = check(4096, "max_connections = 5000\n");
    assert!(text.contains("relay.toml:2:19: max_connections = 5000 on 1 public listener(s) may need 5512"), "{text}");
    assert!(text.contains("LimitNOFILE="), "{text}");
    let text = check(4096, "max_connections = 1000\n");
    assert!(!text.contains("max_connections"), "{text}");
}
