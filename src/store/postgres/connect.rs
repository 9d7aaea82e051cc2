//! Connections to PostgreSQL: the session settings every connection gets, TLS through rustls as
//! the URL's `sslmode` asks, the pool, and single connections (migrations, LISTEN).
//!
//! Must never: fall back to plain text when TLS was asked for, or log the URL (it holds the
//! password).

use crate::config::pg_url::{PgTls, PgUrl};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How to open connections: the settings and the TLS connector.
#[derive(Clone)]
pub struct Connector {
    config: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
}

impl Connector {
    pub fn new(url: &PgUrl) -> Result<Connector, String> {
        let mut config = url.config.clone();
        if config.get_application_name().is_none() {
            config.application_name("whatsapp-relay");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(3));
        }
        // Every commit is flushed (and, with a synchronous standby, replicated) before COMMIT
        // returns, whatever the server's default: the provider's 2xx relies on it. TCP
        // keep-alives notice a dead server or a cut network in about 11 s instead of hours.
        config.options("-c synchronous_commit=on");
        config.keepalives(true).keepalives_idle(Duration::from_secs(5)).keepalives_interval(Duration::from_secs(2));
        config.keepalives_retries(3);
        let tls = match &url.tls {
            PgTls::Disable => {
                config.ssl_mode(SslMode::Disable);
                None
            }
            PgTls::Require => {
                config.ssl_mode(SslMode::Require);
                Some(MakeRustlsConnect::new(client_config(None, false)?))
            }
            PgTls::VerifyFull { root } => {
                config.ssl_mode(SslMode::Require);
                Some(MakeRustlsConnect::new(client_config(root.as_deref(), true)?))
            }
        };
        Ok(Connector { config, tls })
    }

    /// A pool of `size` connections; getting one waits at most `wait` (for a free one, or to
    /// open one).
    pub fn pool(&self, size: usize, wait: Duration) -> Result<Pool, String> {
        let mgr_config = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = match &self.tls {
            None => Manager::from_config(self.config.clone(), tokio_postgres::NoTls, mgr_config),
            Some(tls) => Manager::from_config(self.config.clone(), tls.clone(), mgr_config),
        };
        Pool::builder(manager)
            .max_size(size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(wait))
            .create_timeout(Some(wait))
            .recycle_timeout(Some(wait))
            .build()
            .map_err(|e| format!("cannot build the connection pool: {e}"))
    }

    /// One connection outside the pool; its notifications go to `notices`. The connection's
    /// driver task ends (and `notices` closes) when the connection breaks.
    pub async fn connect(
        &self,
        notices: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
    ) -> Result<Client, tokio_postgres::Error> {
        match &self.tls {
            None => drive(self.config.connect(tokio_postgres::NoTls).await?, notices),
            Some(tls) => drive(self.config.connect(tls.clone()).await?, notices),
        }
    }
}

fn drive<S, T>(
    (client, mut conn): (Client, tokio_postgres::Connection<S, T>),
    notices: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
) -> Result<Client, tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(Ok(message)) = messages.next().await {
            if let (AsyncMessage::Notification(n), Some(tx)) = (message, &notices) {
                let _ = tx.send(n);
            }
        }
    });
    Ok(client)
}

fn client_config(root: Option<&std::path::Path>, verify: bool) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    if !verify {
        // `sslmode=require`: encrypted, the server not authenticated (what libpq does).
        return Ok(crate::upstream::encrypted_only(builder, provider));
    }
    let mut roots = rustls::RootCertStore::empty();
    match root {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("cannot read sslrootcert {}: {e}", path.display()))?;
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                let cert = cert.map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                roots.add(cert).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("sslrootcert {} holds no PEM certificate", path.display()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}
