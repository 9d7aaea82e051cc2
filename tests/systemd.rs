//! The shipped unit: what it promises an operator (hardening, notify, reload, credentials), and
//! that `systemd-analyze verify` has nothing to say about it when it points at the built binary.

mod support;

const UNIT: &str = include_str!("../systemd/whatsapp-relay.service");

fn values(key: &str) -> Vec<&'static str> {
    UNIT.lines().filter_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('='))).collect()
}

#[test]
fn the_unit_is_a_hardened_notify_service() {
    for (key, want) in [
        // Not notify-reload: systemd 252 lacks it; the relay's RELOADING=1/READY=1 do that job.
        ("Type", "notify"),
        ("DynamicUser", "yes"),
        ("StateDirectory", "whatsapp-relay"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ] {
        assert_eq!(values(key), [want], "{key}=");
    }
    assert!(values("ExecReload").contains(&"/bin/kill -HUP $MAINPID"));
    assert!(values("SystemCallFilter").contains(&"@system-service"));
    assert!(values("LoadCredential").iter().any(|c| c.starts_with("admin.token:")));
}

#[test]
fn systemd_analyze_verify_reports_nothing() {
    let found = std::process::Command::new("systemd-analyze").arg("--version").output();
    if !found.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "\n!!!!!!!! SKIPPED systemd_analyze_verify_reports_nothing: systemd-analyze is not installed !!!!!!!!\n"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("whatsapp-relay.service");
    std::fs::write(&unit, UNIT.replace("/usr/local/bin/whatsapp-relay", support::bin())).unwrap();
    let out = std::process::Command::new("systemd-analyze").arg("verify").arg(&unit).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify:\n{said}");
}
