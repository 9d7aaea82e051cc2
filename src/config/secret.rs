//! Secrets as the config file names them: `env:NAME`, `file:/path`, `cred:NAME`
//! (a systemd credential under `$CREDENTIALS_DIRECTORY`) or, discouraged, inline.
//! Resolution happens once, at load time; a secret that cannot be read is a config error.
//! Secret files are bounded ([`MAX_SECRET_FILE`], regular files only): a config naming
//! `/dev/zero`, a FIFO or a log file by mistake must fail at once, not eat the machine's memory
//! or hang the start.

use std::io::Read;
use std::path::Path;

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
            match read_file(&path) {
                Ok(v) if !v.trim_end_matches(['\r', '\n']).is_empty() => {
                    Ok((Secret::new(v.trim_end_matches('\n').trim_end_matches('\r').to_string()), Source::Credential))
                }
                Ok(_) => Err(format!("credential {} is empty", path.display())),
                Err(e) => Err(format!(
                    "secret cred:{name}: $CREDENTIALS_DIRECTORY is not set (this is not the service) and {e} \
                     (is the service running, and are you root?)"
                )),
            }
        }
        _ => resolve(reference),
    }
}

/// The largest secret file read: far above any token or key a provider issues (a PEM private
/// key is about 3 KiB), far below what would hurt.
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Reads a secret file (`file:`, a credential, `--admin-token-file`): a regular file of at most
/// [`MAX_SECRET_FILE`] bytes, in UTF-8. `Err` names the file and what is wrong with it.
pub fn read_file(path: &Path) -> Result<String, String> {
    let shown = path.display();
    let not_regular = |kind: &str| {
        format!(
            "secret file {shown} is {kind}, not a regular file: a secret file holds only the secret (at most 64 KiB)"
        )
    };
    // Looked at before opening: opening a FIFO waits for a writer, and a device may never end.
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read secret file {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(not_regular(kind_of(&meta)));
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read secret file {shown}: {e}"))?;
    // Looked at again through the open file: the name may have been swapped meanwhile.
    match file.metadata() {
        Ok(m) if m.is_file() => {}
        Ok(m) => return Err(not_regular(kind_of(&m))),
        Err(e) => return Err(format!("cannot read secret file {shown}: {e}")),
    }
    // One byte past the limit is enough to know it is too large; the length the file claims is
    // not trusted (it may grow while being read).
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read secret file {shown}: {e}"))?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(format!(
            "secret file {shown} is larger than 64 KiB, the most a secret file may hold: is it the right file?"
        ));
    }
    String::from_utf8(bytes).map_err(|_| format!("secret file {shown} is not UTF-8 text"))
}

fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
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
        match read_file(Path::new(path)) {
            Ok(v) => (trim(v), Source::File),
            Err(e) => return Err(e),
        }
    } else if let Some(name) = reference.strip_prefix("cred:") {
        let Ok(dir) = std::env::var("CREDENTIALS_DIRECTORY") else {
            return Err(format!(
                "secret cred:{name} needs $CREDENTIALS_DIRECTORY (set by systemd's LoadCredential=); it is not set"
            ));
        };
        let path = std::path::Path::new(&dir).join(name);
        match read_file(&path) {
            Ok(v) => (trim(v), Source::Credential),
            Err(e) => return Err(e),
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
        assert!(resolve("file:/nonexistent/x").unwrap_err().contains("cannot read secret file /nonexistent/x"));
        assert!(resolve("env:WHATSAPP_RELAY_TEST_UNSET_VAR").unwrap_err().contains("is not set"));
        assert_eq!(resolve("plain").unwrap().1, Source::Inline);
        assert_eq!(format!("{:?}", resolve("plain").unwrap().0), "Secret(***)");
    }
}
