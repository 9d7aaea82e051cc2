//! Secrets as the config file names them: `env:NAME`, `file:/path`, `cred:NAME`
//! (a systemd credential under `$CREDENTIALS_DIRECTORY`) or, discouraged, inline.
//! Resolution happens once, at load time; a secret that cannot be read is a config error.

pub use crate::secret::Secret;

/// Where a secret came from, for `check`'s summary and warnings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Env,
    File,
    Credential,
    Inline,
}

/// Where systemd keeps the credentials of the running service (`LoadCredential=`), readable by
/// root. An operator command run outside the service reads a `cred:NAME` secret there when
/// `$CREDENTIALS_DIRECTORY` is unset.
pub const SERVICE_CREDENTIALS: &str = "/run/credentials/whatsapp-relay.service";

/// Like [`resolve`], for operator commands run from a shell next to the service: a `cred:`
/// secret is also looked for among the running service's credentials.
pub fn resolve_outside_service(reference: &str) -> Result<(Secret, Source), String> {
    match (reference.strip_prefix("cred:"), std::env::var_os("CREDENTIALS_DIRECTORY")) {
        (Some(name), None) => {
            let path = std::path::Path::new(SERVICE_CREDENTIALS).join(name);
            match std::fs::read_to_string(&path) {
                Ok(v) if !v.trim_end_matches(['\r', '\n']).is_empty() => {
                    Ok((Secret::new(v.trim_end_matches('\n').trim_end_matches('\r').to_string()), Source::Credential))
                }
                Ok(_) => Err(format!("credential {} is empty", path.display())),
                Err(e) => Err(format!(
                    "secret cred:{name}: $CREDENTIALS_DIRECTORY is not set (this is not the service) and {} cannot be \
                     read: {e} (is the service running, and are you root?)",
                    path.display()
                )),
            }
        }
        _ => resolve(reference),
    }
}

/// Resolves a secret reference. `Err` says what is wrong and what to do.
pub fn resolve(reference: &str) -> Result<(Secret, Source), String> {
    let trim = |s: String| s.strip_suffix('\n').map(|s| s.strip_suffix('\r').unwrap_or(s).to_string()).unwrap_or(s);
    let (value, source) = if let Some(name) = reference.strip_prefix("env:") {
        match std::env::var(name) {
            Ok(v) => (v, Source::Env),
            Err(_) => {
                return Err(format!("secret environment variable {name} is not set (export it, or use file:/cred:)"));
            }
        }
    } else if let Some(path) = reference.strip_prefix("file:") {
        match std::fs::read_to_string(path) {
            Ok(v) => (trim(v), Source::File),
            Err(e) => return Err(format!("cannot read secret file {path}: {e}")),
        }
    } else if let Some(name) = reference.strip_prefix("cred:") {
        let Ok(dir) = std::env::var("CREDENTIALS_DIRECTORY") else {
            return Err(format!(
                "secret cred:{name} needs $CREDENTIALS_DIRECTORY (set by systemd's LoadCredential=); it is not set"
            ));
        };
        let path = std::path::Path::new(&dir).join(name);
        match std::fs::read_to_string(&path) {
            Ok(v) => (trim(v), Source::Credential),
            Err(e) => return Err(format!("cannot read credential {}: {e}", path.display())),
        }
    } else {
        (reference.to_string(), Source::Inline)
    };
    if value.is_empty() {
        return Err("secret is empty".to_string());
    }
    Ok((Secret::new(value), source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, "hunter2\n").unwrap();
        let (s, src) = resolve(&format!("file:{}", f.display())).unwrap();
        assert_eq!((s.expose(), src), ("hunter2", Source::File));
        assert!(resolve("file:/nonexistent/x").unwrap_err().contains("cannot read secret file"));
        assert!(resolve("env:WHATSAPP_RELAY_TEST_UNSET_VAR").unwrap_err().contains("is not set"));
        assert_eq!(resolve("plain").unwrap().1, Source::Inline);
        assert_eq!(format!("{:?}", resolve("plain").unwrap().0), "Secret(***)");
    }
}
