//! A throwaway PostgreSQL server for tests: Debian's binaries (`/usr/lib/postgresql/*/bin`),
//! a cluster copied from a template made once by `initdb`, listening on a free 127.0.0.1 port
//! with its socket in its own temporary folder, stopped (fast shutdown, then SIGKILL) on drop.
//!
//! PostgreSQL refuses to run as root: as root, `initdb` and `postgres` themselves run as the
//! `postgres` user (uid/gid set in the child, the folders chowned first), not through su or
//! runuser, whose parent process would swallow the signals a test sends to stop the server.
//!
//! Without PostgreSQL, [`PgServer::start`] prints a loud SKIPPED line and returns None, or
//! panics when `CI=true` (a CI that cannot run these tests must fail, not pass quietly).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct PgServer {
    child: Option<Child>,
    bin: PathBuf,
    /// Owner of the folders and the server process when the tests run as root.
    owner: Option<(u32, u32)>,
    pub port: u16,
    pub data: PathBuf,
    dir: tempfile::TempDir,
}

/// The folder of the newest PostgreSQL binaries installed, if any.
fn find_bin() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// uid and gid of the `postgres` user, from /etc/passwd.
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres") && f.len() > 3).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

/// Says loudly that a test did not run; under CI that is a failure.
pub fn skip(test: &str, why: &str) {
    let msg = format!("SKIPPED {test}: {why} (apt-get install postgresql)");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}; CI=true, so this is a failure");
    }
    eprintln!("\n!!!!!!!! {msg} !!!!!!!!\n");
}

fn chown_tree(path: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            chown_tree(&e.unwrap().path(), (uid, gid));
        }
    }
}

fn as_owner(cmd: &mut Command, owner: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = owner {
        cmd.gid(gid).uid(uid);
    }
    cmd
}

/// A cluster made by initdb once per machine (and PostgreSQL version); each server copies it,
/// which takes a fraction of initdb's time.
fn template(bin: &Path, owner: Option<(u32, u32)>) -> PathBuf {
    let version = bin.parent().and_then(|p| p.file_name()).and_then(|v| v.to_str()).unwrap_or("x").to_string();
    let path = std::env::temp_dir().join(format!("whatsapp-relay-pg-template-{version}"));
    if path.join("PG_VERSION").exists() {
        return path;
    }
    let tmp = tempfile::Builder::new().prefix("pg-initdb").tempdir_in(std::env::temp_dir()).unwrap();
    let data = tmp.path().join("data");
    if let Some(o) = owner {
        chown_tree(tmp.path(), o);
    }
    let out = as_owner(&mut Command::new(bin.join("initdb")), owner)
        .args(["-U", "relay", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync", "-D"])
        .arg(&data)
        .output()
        .expect("run initdb");
    assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
    // Another test binary may have won the race: either copy is fine.
    if std::fs::rename(&data, &path).is_err() {
        assert!(path.join("PG_VERSION").exists(), "could not create the template cluster at {}", path.display());
    }
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl PgServer {
    /// Starts a fresh server, or returns None (after saying SKIPPED) when PostgreSQL is missing.
    pub fn start(test: &str) -> Option<PgServer> {
        let Some(bin) = find_bin() else {
            skip(test, "PostgreSQL missing (no /usr/lib/postgresql/*/bin/postgres)");
            return None;
        };
        let owner = if is_root() {
            match postgres_user() {
                Some(o) => Some(o),
                None => {
                    skip(test, "running as root and there is no postgres user to run PostgreSQL as");
                    return None;
                }
            }
        } else {
            None
        };
        let template = template(&bin, owner);
        let dir = tempfile::Builder::new().prefix("pg-test").tempdir().unwrap();
        let data = dir.path().join("data");
        let ok = Command::new("cp").arg("-a").arg(&template).arg(&data).status().unwrap();
        assert!(ok.success(), "copy the template cluster");
        if let Some(o) = owner {
            chown_tree(dir.path(), o);
        }
        let mut server = PgServer { child: None, bin, owner, port: free_port(), data, dir };
        server.run();
        Some(server)
    }

    /// Starts the postmaster on the data folder and waits until it accepts connections.
    fn run(&mut self) {
        let log =
            std::fs::File::options().create(true).append(true).open(self.dir.path().join("postgres.log")).unwrap();
        if let Some(o) = self.owner {
            let _ = std::os::unix::fs::chown(self.dir.path().join("postgres.log"), Some(o.0), Some(o.1));
        }
        let child = as_owner(&mut Command::new(self.bin.join("postgres")), self.owner)
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "shared_buffers=16MB",
                "-c",
                "max_connections=200",
                "-c",
                "synchronous_commit=on",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn postgres");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            let pid = std::fs::read_to_string(self.data.join("postmaster.pid")).unwrap_or_default();
            // Line 8 of postmaster.pid is the server's status ("ready" once it takes connections).
            if pid.lines().nth(7).map(str::trim) == Some("ready") {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("postgres exited ({status}) at start:\n{}", self.log());
            }
            assert!(start.elapsed() < Duration::from_secs(30), "postgres did not start:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// The URL of database `postgres` as user `relay` (trust authentication on loopback).
    pub fn url(&self) -> String {
        format!("postgres://relay@127.0.0.1:{}/postgres?sslmode=disable", self.port)
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").arg(format!("-{sig}")).arg(c.id().to_string()).status();
        }
    }

    /// Stops the server: `mode` is "fast" (SIGINT, clean) or "immediate" (SIGQUIT: no
    /// checkpoint, like a crash; committed data survives through the WAL).
    pub fn stop(&mut self, mode: &str) {
        self.signal(if mode == "immediate" { "QUIT" } else { "INT" });
        let Some(mut child) = self.child.take() else { return };
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same data and port (after [`PgServer::stop`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server first");
        self.run();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop("fast");
    }
}
