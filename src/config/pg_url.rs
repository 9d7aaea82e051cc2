//! `[storage] url` for the postgres backend: a `postgres://` URL (or key=value conninfo) whose
//! TLS parameters are read here, because the PostgreSQL client reads only part of what libpq
//! users write: `sslmode` is `disable`, `require` (encrypted, the server's certificate not
//! checked, as libpq does) or `verify-full` (checked against `sslrootcert`, a PEM file, or the
//! bundled web roots, and the host name), and `sslrootcert` names the CA file.
//!
//! Never puts the URL itself in an error message: it usually holds a password.

use std::path::PathBuf;

/// How the connection to PostgreSQL is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgTls {
    Disable,
    /// Encrypted; the server is not authenticated (libpq's `require`).
    Require,
    /// Encrypted, the certificate checked against `root` (or the web roots) and the host name.
    VerifyFull {
        root: Option<PathBuf>,
    },
}

/// A parsed `[storage] url`: the connection settings without the TLS parameters, and those.
#[derive(Clone)]
pub struct PgUrl {
    pub config: tokio_postgres::Config,
    pub tls: PgTls,
}

impl std::fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio_postgres::Config's Debug redacts the password; the rest is not secret.
        f.debug_struct("PgUrl").field("hosts", &self.config.get_hosts()).field("tls", &self.tls).finish()
    }
}

impl PartialEq for PgUrl {
    fn eq(&self, other: &PgUrl) -> bool {
        format!("{:?} {:?} {:?} {:?}", self.config, self.config.get_password(), self.config.get_ports(), self.tls)
            == format!(
                "{:?} {:?} {:?} {:?}",
                other.config,
                other.config.get_password(),
                other.config.get_ports(),
                other.tls
            )
    }
}

/// Parses the URL; `Err` says what is wrong (without repeating the URL) and what to write.
pub fn parse(url: &str) -> Result<PgUrl, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(
            "write a URL such as postgres://relay:PASSWORD@db.example.com:5432/relay?sslmode=verify-full".into()
        );
    }
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut sslmode = None;
    let mut root = None;
    let mut rest = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "sslmode" => sslmode = Some(v.into_owned()),
            "sslrootcert" => root = Some(PathBuf::from(&*v)),
            _ => {
                rest.append_pair(&k, &v);
            }
        }
    }
    let rest = rest.finish();
    let tls = match (sslmode.as_deref(), &root) {
        (Some("disable"), _) => PgTls::Disable,
        (Some("require"), _) => PgTls::Require,
        (Some("verify-full"), _) | (None, Some(_)) => PgTls::VerifyFull { root: root.clone() },
        // libpq's default is "prefer", which silently falls back to plain text: not here.
        (None, None) => {
            return Err("say how to reach the database: add sslmode=verify-full (with sslrootcert=PATH to a CA \
                        file unless a public CA signed its certificate), sslmode=require, or sslmode=disable \
                        (loopback or a trusted network only)"
                .into());
        }
        (Some(other), _) => {
            return Err(format!("sslmode={other} is not supported: use disable, require or verify-full"));
        }
    };
    if let Some(r) = &root {
        if let Err(e) = std::fs::metadata(r) {
            return Err(format!("cannot read sslrootcert {}: {e}", r.display()));
        }
    }
    let plain = if rest.is_empty() { base.to_string() } else { format!("{base}?{rest}") };
    let config: tokio_postgres::Config =
        plain.parse().map_err(|e: tokio_postgres::Error| format!("not a valid PostgreSQL URL ({e})"))?;
    if config.get_hosts().is_empty() {
        return Err("the URL names no host".into());
    }
    if config.get_dbname().is_none() {
        return Err("the URL names no database (postgres://user:pass@host:5432/DATABASE)".into());
    }
    Ok(PgUrl { config, tls })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_modes_and_refusals() {
        let u = parse("postgres://u:secret@db:5432/relay?sslmode=disable").unwrap();
        assert_eq!(u.tls, PgTls::Disable);
        assert_eq!(u.config.get_dbname(), Some("relay"));
        assert!(!format!("{u:?}").contains("secret"));
        assert_eq!(parse("postgres://u@db/relay?sslmode=require").unwrap().tls, PgTls::Require);
        assert_eq!(parse("postgres://u@db/relay?sslmode=verify-full").unwrap().tls, PgTls::VerifyFull { root: None });
        let e = parse("postgres://u:hunter2@db/relay").unwrap_err();
        assert!(e.contains("sslmode=verify-full") && !e.contains("hunter2"), "{e}");
        let e = parse("postgres://u@db/relay?sslmode=verify-ca").unwrap_err();
        assert!(e.contains("verify-ca is not supported"), "{e}");
        assert!(
            parse("postgres://u@db/relay?sslmode=verify-full&sslrootcert=/nonexistent")
                .unwrap_err()
                .contains("sslrootcert")
        );
        assert!(parse("mysql://u@db/relay").is_err());
        assert!(parse("postgres://u@db?sslmode=disable").unwrap_err().contains("no database"));
        // Other parameters pass through to the client.
        let u = parse("postgres://u@db/relay?sslmode=disable&connect_timeout=3&application_name=x").unwrap();
        assert_eq!(u.config.get_connect_timeout(), Some(&std::time::Duration::from_secs(3)));
    }
}
