//! Listening sockets passed by the service manager (systemd socket activation: `LISTEN_PID`,
//! `LISTEN_FDS`, `LISTEN_FDNAMES`), so a restart queues connections in the kernel instead of
//! refusing them. A socket is matched to the listener of its name (`http`, `https`, `admin`;
//! `FileDescriptorName=` in the socket unit) and replaces that listener's configured address.

use super::ServeError;
use std::net::{SocketAddr, TcpListener};

/// The names a passed socket may carry.
const NAMES: [&str; 3] = ["http", "https", "admin"];

/// The sockets this process was given, by listener name.
#[derive(Default)]
pub struct Passed {
    sockets: Vec<(&'static str, TcpListener)>,
}

impl Passed {
    /// Takes the sockets the environment passes to this process: none unless `LISTEN_PID` is
    /// this process. Call it before any other thread starts: `listenfd` unsets `LISTEN_PID` and
    /// `LISTEN_FDS` (so nothing this process starts inherits them), which is only sound while
    /// no other thread reads the environment.
    pub fn from_env() -> Result<Passed, ServeError> {
        let ours = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
        if !ours {
            return Ok(Passed::default());
        }
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        let mut fds = listenfd::ListenFd::from_env();
        let names: Vec<&str> = if names.is_empty() { vec![] } else { names.split(':').collect() };
        if names.len() != fds.len() {
            return Err(ServeError::Setup(format!(
                "LISTEN_FDS passes {} socket(s) but LISTEN_FDNAMES names {}: give each socket unit \
                 FileDescriptorName=http, https or admin",
                fds.len(),
                names.len()
            )));
        }
        let mut passed = Passed::default();
        for (i, name) in names.into_iter().enumerate() {
            let Some(name) = NAMES.iter().copied().find(|n| *n == name) else {
                tracing::warn!(
                    "passed socket {i} is named {name:?}, not http, https or admin (FileDescriptorName=): ignored"
                );
                continue;
            };
            if passed.sockets.iter().any(|(n, _)| *n == name) {
                return Err(ServeError::Setup(format!(
                    "two passed sockets are named {name:?}: one socket unit per listener"
                )));
            }
            let bad = |e: std::io::Error| ServeError::Setup(format!("passed socket {i} ({name}): {e}"));
            let listener =
                fds.take_tcp_listener(i).map_err(bad)?.ok_or_else(|| bad(std::io::ErrorKind::NotFound.into()))?;
            listener.set_nonblocking(true).map_err(bad)?;
            passed.sockets.push((name, listener));
        }
        Ok(passed)
    }

    /// The socket passed for listener `what`, if any. `configured` is the listener's address in
    /// the config (None when the config has no such listener: then a passed socket is ignored).
    pub(super) fn take(
        &mut self,
        what: &'static str,
        configured: Option<SocketAddr>,
    ) -> Result<Option<(tokio::net::TcpListener, SocketAddr)>, ServeError> {
        let Some(i) = self.sockets.iter().position(|(n, _)| *n == what) else { return Ok(None) };
        let (_, std) = self.sockets.swap_remove(i);
        let bad = |e: std::io::Error| ServeError::Setup(format!("passed socket {what}: {e}"));
        let bound = std.local_addr().map_err(bad)?;
        let Some(configured) = configured else {
            tracing::warn!("a socket for {what} ({bound}) was passed, but the config has no {what} listener: ignored");
            return Ok(None);
        };
        let same = configured == bound || (configured.port() == 0 && configured.ip() == bound.ip());
        if !same {
            tracing::warn!(
                "{what}: serving the passed socket {bound} instead of the configured {configured} (the socket unit's \
                 ListenStream= differs from the config)"
            );
        }
        Ok(Some((tokio::net::TcpListener::from_std(std).map_err(bad)?, bound)))
    }
}
