//! The certificate files' watcher: re-reads `[server.tls]` when the files change (polled: no
//! inotify dependency, and it sees files replaced behind symlinks too).

use super::{FileCerts, WATCH_INTERVAL};
use crate::metrics::Metrics;
use std::sync::Arc;
use tokio::sync::watch;

/// Polls until `stop` flips.
pub async fn watch_cert_files(certs: Arc<FileCerts>, metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let (certs, metrics) = (certs.clone(), metrics.clone());
                let _ = tokio::task::spawn_blocking(move || certs.refresh(None, false, &metrics)).await;
            }
            _ = stop.changed() => return,
        }
    }
}
