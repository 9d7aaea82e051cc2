//! Pebble (Let's Encrypt's ACME test server) and its DNS stub on loopback, for the ACME tests.
#![allow(dead_code)]

use super::dead_addr;
use super::tls::{TestCa, https_get};
use std::time::{Duration, Instant};

/// Pebble (Let's Encrypt's ACME test server) and its DNS stub, on loopback, killed on drop.
pub struct Pebble {
    children: Vec<std::process::Child>,
    pub dir: tempfile::TempDir,
    pub acme: std::net::SocketAddr,
    pub management: std::net::SocketAddr,
    pub ca: TestCa,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

impl Pebble {
    /// Starts Pebble validating TLS-ALPN-01 on `tls_port` of whatever its DNS stub answers for
    /// any name (127.0.0.1). Its four ports are picked free just before it starts; another test
    /// can take one in between, so a Pebble that exits at start is started again on new ports.
    pub async fn start(tls_port: u16) -> Pebble {
        for _ in 0..3 {
            let mut p = Pebble::start_once(tls_port).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            if p.children.iter_mut().all(|c| matches!(c.try_wait(), Ok(None))) {
                return p;
            }
            eprintln!("pebble exited at start (a port taken?), starting it again:\n{}", p.logs());
        }
        panic!("pebble would not start three times in a row");
    }

    async fn start_once(tls_port: u16) -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        // Debian's pebble ships no certificate for its own https: make one.
        let ca = TestCa::new("pebble https test CA");
        let leaf = ca.leaf(&["localhost", "127.0.0.1"]);
        std::fs::write(dir.path().join("cert.pem"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), &leaf.key_pem).unwrap();
        let (acme, management, dns, dns_mgmt) =
            (dead_addr().await, dead_addr().await, dead_addr().await, dead_addr().await);
        let cfg = serde_json::json!({"pebble": {
            "listenAddress": acme.to_string(),
            "managementListenAddress": management.to_string(),
            "certificate": dir.path().join("cert.pem"),
            "privateKey": dir.path().join("key.pem"),
            "httpPort": 5002,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false
        }});
        std::fs::write(dir.path().join("pebble.json"), cfg.to_string()).unwrap();
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
        let dns_stub = std::process::Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", "", "-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-dns01", &dns.to_string(), "-management", &dns_mgmt.to_string()])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .spawn()
            .expect("start pebble-challtestsrv");
        let pebble = std::process::Command::new("pebble")
            .arg("-config")
            .arg(dir.path().join("pebble.json"))
            .args(["-dnsserver", &dns.to_string()])
            // Pebble rejects 5% of nonces and sleeps before validating by default: both make
            // a test slow or flaky without testing the relay.
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_VA_NOSLEEP", "1")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .expect("start pebble");
        let mut p = Pebble { children: vec![dns_stub, pebble], dir, acme, management, ca };
        // Until both listen, or one of the two processes exited (the caller then retries).
        let start = Instant::now();
        loop {
            let up = |a| async move { tokio::net::TcpStream::connect(a).await.is_ok() };
            if up(acme).await && up(management).await {
                break;
            }
            if p.children.iter_mut().any(|c| !matches!(c.try_wait(), Ok(None))) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "pebble did not start listening:\n{}", p.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p
    }

    pub fn logs(&self) -> String {
        ["pebble.log", "pebble.err", "challtestsrv.log", "challtestsrv.err"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Pebble's root (regenerated at every start), which signs what it issues.
    pub async fn root(&self) -> String {
        let reply = https_get(self.management, "127.0.0.1", &[&self.ca.pem()], "/roots/0").await;
        assert_eq!(reply.status, 200);
        String::from_utf8(reply.body.to_vec()).unwrap()
    }
}

/// Whether Pebble is installed; if not, says SKIPPED loudly, or fails under CI (CI=true), where
/// a test that cannot run must not pass quietly.
pub fn available(test: &str) -> bool {
    if on_path("pebble") && on_path("pebble-challtestsrv") {
        return true;
    }
    let msg = format!("SKIPPED {test}: the `pebble` ACME test server is not installed (apt-get install -y pebble)");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}; CI=true, so this is a failure");
    }
    eprintln!("\n!!!!!!!! {msg} !!!!!!!!\n");
    false
}
