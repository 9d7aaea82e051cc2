//! Reload and readiness: the one place that swaps the routing snapshot, and what `/readyz`
//! reports. Handed to the admin listener and the signal handler; knows nothing of listeners.
//!
//! A reload validates the file and builds the new table on one long-lived thread, swaps the
//! snapshot whole (requests in flight finish on the old one), lets the queue follow the Motions,
//! and re-reads the certificate files. Settings that need a restart are reported, not applied.

use crate::config::{self, Config, ConfigError};
use crate::metrics::{ReloadResult, ResultLabels};
use crate::routing::Snapshot;
use crate::services::Services;
use crate::tls::{CertSource, Tls};
use crate::upstream::UpstreamError;
use sha2::Digest;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Readiness inputs set by the listeners.
#[derive(Default)]
pub struct Readiness {
    pub listeners_bound: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// A reload that took: the snapshots before and after, and how long building the new one took.
pub struct Reloaded {
    pub old: Arc<Snapshot>,
    pub new: Arc<Snapshot>,
    pub took: Duration,
}

/// What the admin listener and the signal handler share: the relay, its readiness, the https
/// listener's certificates, and the one way to reload.
pub struct Control {
    pub services: Arc<Services>,
    pub ready: Readiness,
    pub tls: Option<Arc<Tls>>,
    config_path: PathBuf,
    started: Fixed,
    reload_thread: ReloadThread,
    /// Reloads one at a time (SIGHUP and the admin API may race): the last file read is the one
    /// that stays.
    reload_lock: Arc<Mutex<()>>,
}

/// One long-lived thread that builds every new routing table and frees every old one. With
/// `spawn_blocking` each reload could land on another thread, hence another malloc arena, and
/// memory freed in one arena is not reused by the next: at 100,000 accounts the process grew
/// to about five times its start-up size. On one thread it stays near twice (old + new).
struct ReloadThread {
    jobs: std::sync::Mutex<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>>,
}

impl ReloadThread {
    fn start() -> std::io::Result<ReloadThread> {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        // Ends when the sender (the Control) is dropped.
        std::thread::Builder::new().name("reload".into()).spawn(move || {
            for job in rx {
                // A panicking reload fails that reload (its answer channel drops), not the next.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
        })?;
        Ok(ReloadThread { jobs: std::sync::Mutex::new(tx) })
    }

    /// Runs `f` on the reload thread and waits for its result without blocking the runtime.
    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.detach(move || {
            let _ = tx.send(f());
        })?;
        rx.await.map_err(|_| "the reload failed unexpectedly (see the log)".to_string())
    }

    /// Queues `f` on the reload thread without waiting for it.
    fn detach(&self, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
        let sent = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).send(Box::new(f));
        sent.map_err(|_| "the reload thread has stopped; restart the relay".to_string())
    }
}

/// What a reload reports (the admin API returns it).
#[derive(Debug, serde::Serialize)]
pub struct ReloadReport {
    pub took_ms: f64,
    pub motions: usize,
    pub accounts: usize,
    /// Changes that were not applied (they need a restart) and a refused new certificate.
    pub warnings: Vec<String>,
}

impl Control {
    /// The control of a relay started as `started` says.
    pub fn new(services: Arc<Services>, tls: Option<Arc<Tls>>, started: Started) -> std::io::Result<Control> {
        Ok(Control {
            services,
            ready: Readiness::default(),
            tls,
            config_path: started.config_path,
            started: started.fixed,
            reload_thread: ReloadThread::start()?,
            reload_lock: Default::default(),
        })
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Why the relay is not ready, and what is wrong without making it unready (`/readyz`).
    pub fn readiness(&self) -> (Vec<String>, Vec<String>) {
        let mut problems = Vec::new();
        if !self.ready.listeners_bound.load(Ordering::Acquire) {
            problems.push("listeners not bound".to_string());
        }
        if !self.services.queue.store().writable() {
            problems.push("storage not writable".to_string());
        }
        let mut warnings = Vec::new();
        if let Some(tls) = &self.tls {
            problems.extend(tls.problems());
            warnings.extend(tls.warnings());
        }
        (problems, warnings)
    }

    /// Validates the file again and builds a new snapshot, then swaps it in whole (requests in
    /// flight keep the old one) and lets the queue start schedulers for new Motions. Blocking:
    /// runs on the reload thread.
    fn reload_config(services: &Services, path: &Path, lock: &Mutex<()>) -> Result<Reloaded, ReloadError> {
        let _one_at_a_time = lock.lock().unwrap_or_else(|e| e.into_inner());
        let start = Instant::now();
        let config = config::load(path)?;
        let loaded = start.elapsed();
        let names: Vec<String> = config.motions.iter().map(|m| m.name.clone()).collect();
        let new = Arc::new(Snapshot::build(config, &services.upstream)?);
        let built = start.elapsed();
        let old = services.snapshots.swap(new.clone());
        services.queue.sync_motions(names.into_iter());
        tracing::debug!(
            load_ms = loaded.as_secs_f64() * 1000.0,
            build_ms = (built - loaded).as_secs_f64() * 1000.0,
            swap_ms = (start.elapsed() - built).as_secs_f64() * 1000.0,
            "reload phases"
        );
        Ok(Reloaded { old, new, took: start.elapsed() })
    }

    /// Reloads the config file: validates it and builds the new routing table off the runtime's
    /// workers, swaps it in whole (requests in flight finish on the old one; no listener is
    /// touched), then re-reads the certificate files. A file that does not validate is refused
    /// and the running config stays; the error is logged and returned.
    pub async fn reload(&self, trigger: &'static str) -> Result<ReloadReport, String> {
        notify_reloading();
        let (services, path, lock) = (self.services.clone(), self.config_path.clone(), self.reload_lock.clone());
        let result = self
            .reload_thread
            .run(move || Self::reload_config(&services, &path, &lock))
            .await
            .and_then(|r| r.map_err(|e| e.to_string()));
        let metrics = &self.services.metrics;
        let reloaded = match result {
            Ok(r) => r,
            Err(e) => {
                metrics.config_reloads.get_or_create(&ResultLabels { result: ReloadResult::Refused }).inc();
                tracing::error!(trigger, "reload refused, keeping the running configuration: {e}");
                // What the refused file's parse took (long freed by now) goes back too.
                let _ = self.reload_thread.detach(crate::memory::release);
                notify(&[sd_notify::NotifyState::Ready]);
                return Err(e);
            }
        };
        let config = &reloaded.new.config;
        let mut warnings = self.started.restart_needed(config);
        for w in &warnings {
            tracing::warn!(trigger, "{w}");
        }
        if let Some(CertSource::Files(files)) = self.tls.as_ref().map(|t| &t.source) {
            let (files, paths, m) = (files.clone(), config.server.tls.clone(), metrics.clone());
            // Forced: a reload re-reads the files even if they look unchanged.
            let refreshed = tokio::task::spawn_blocking(move || files.refresh(paths.as_ref(), true, &m)).await;
            if let Ok(Some(Err(e))) = refreshed {
                warnings.push(format!("new certificate refused, the previous one stays: {e}"));
            }
        }
        let report = ReloadReport {
            took_ms: reloaded.took.as_secs_f64() * 1000.0,
            motions: config.motions.len(),
            accounts: config.motions.iter().map(|m| m.accounts.len()).sum(),
            warnings,
        };
        metrics.config_reloads.get_or_create(&ResultLabels { result: ReloadResult::Ok }).inc();
        metrics.config_reload_seconds.set(reloaded.took.as_secs_f64());
        tracing::info!(
            trigger,
            took_ms = report.took_ms,
            motions = report.motions,
            accounts = report.accounts,
            "configuration reloaded"
        );
        // Freeing a large table takes a while too (a fifth of the build time at 100,000
        // accounts): not on a worker that serves requests. In-flight requests may still hold it.
        let old = reloaded.old;
        let _ = self.reload_thread.detach(move || {
            let t = Instant::now();
            drop(old);
            crate::memory::release();
            tracing::debug!(drop_ms = t.elapsed().as_secs_f64() * 1000.0, "previous configuration freed");
        });
        notify(&[sd_notify::NotifyState::Ready]);
        Ok(report)
    }
}

/// What a relay was started from: its config file, and the settings a reload cannot change.
pub struct Started {
    config_path: PathBuf,
    fixed: Fixed,
}

impl Started {
    pub fn of(config: &Config) -> Started {
        Started { config_path: config.path.clone(), fixed: Fixed::of(config) }
    }
}

/// Settings read once at start (listeners, storage, certificate source, timeouts). A reload
/// that changes them is applied except for these, and the log says a restart is needed.
#[derive(PartialEq)]
struct Fixed {
    http: Option<SocketAddr>,
    https: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    storage: PathBuf,
    backend: crate::config::StorageBackend,
    tls_files: bool,
    /// Domains, contact, directory, cache and CA, compared as one.
    acme: Option<String>,
    shutdown_grace: Duration,
    /// The listeners' connection settings, by key: their accept loops keep them until a restart.
    connections: [(&'static str, String); 4],
}

impl Fixed {
    fn of(c: &Config) -> Fixed {
        let s = &c.server;
        Fixed {
            http: s.http,
            https: s.https,
            admin: c.admin.listen,
            storage: c.storage_path.clone(),
            backend: c.storage.clone(),
            tls_files: s.tls.is_some(),
            acme: s.acme.as_ref().map(|a| {
                // The key as a hash: enough to notice a change, nothing to leak.
                let key = a.key.as_ref().map(|k| hex::encode(&sha2::Sha256::digest(k.expose())[..8]));
                format!(
                    "{:?} {:?} {} {} {:?} {key:?}",
                    a.domains,
                    a.contact,
                    a.directory,
                    a.cache_dir.display(),
                    a.ca_file
                )
            }),
            shutdown_grace: s.shutdown_grace,
            connections: [
                ("header_timeout", format!("{:?}", s.header_timeout)),
                ("idle_timeout", format!("{:?}", s.idle_timeout)),
                ("max_connections", s.max_connections.to_string()),
                ("max_connections_per_ip", s.max_connections_per_ip.to_string()),
            ],
        }
    }

    fn restart_needed(&self, c: &Config) -> Vec<String> {
        let new = Fixed::of(c);
        let mut out = Vec::new();
        let opt = |a: Option<SocketAddr>| a.map_or("(none)".to_string(), |a| a.to_string());
        let mut changed = |what: &str, old: String, new: String| {
            if old != new {
                out.push(format!(
                    "{what} changed from {old} to {new}: not applied; restart the relay to apply it \
                     (a reload never re-binds listeners or reopens storage)"
                ));
            }
        };
        changed("[server] http", opt(self.http), opt(new.http));
        changed("[server] https", opt(self.https), opt(new.https));
        changed("[admin] listen", opt(self.admin), opt(new.admin));
        changed("[storage] path", self.storage.display().to_string(), new.storage.display().to_string());
        let backend = |b: &crate::config::StorageBackend| match b {
            crate::config::StorageBackend::Embedded => "embedded".to_string(),
            crate::config::StorageBackend::Postgres(p) => {
                format!("postgres (pool {}, takeover {:?})", p.pool, p.takeover)
            }
        };
        changed("[storage] backend", backend(&self.backend), backend(&new.backend));
        if let (crate::config::StorageBackend::Postgres(a), crate::config::StorageBackend::Postgres(b)) =
            (&self.backend, &new.backend)
        {
            // Never printed: the URL holds a password.
            if a.url != b.url {
                changed("[storage] url", "its value at start".into(), "a new value".into());
            }
        }
        let source = |f: &Fixed| {
            if f.tls_files {
                "[server.tls]"
            } else if f.acme.is_some() {
                "[server.acme]"
            } else {
                "(none)"
            }
        };
        changed("the certificate source", source(self).into(), source(&new).into());
        if self.acme.is_some() && new.acme.is_some() && self.acme != new.acme {
            changed("[server.acme]", "its settings at start".into(), "new settings".into());
        }
        changed("[server] shutdown_grace", format!("{:?}", self.shutdown_grace), format!("{:?}", new.shutdown_grace));
        for ((key, old), (_, new)) in self.connections.iter().zip(new.connections) {
            changed(&format!("[server] {key}"), old.clone(), new);
        }
        out
    }
}

/// `RELOADING=1` with the timestamp newer systemd versions expect alongside it.
fn notify_reloading() {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[sd_notify::NotifyState::Reloading, now]),
        Err(_) => notify(&[sd_notify::NotifyState::Reloading]),
    }
}

/// Tells systemd (Type=notify) about state changes; a no-op outside systemd.
pub fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::debug!("sd_notify failed: {e}");
    }
}
