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
