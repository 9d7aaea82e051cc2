//! The store marker: a small file beside the embedded store (`queue.redb.marker`) saying that
//! the store has held data. redb alone cannot tell a store that was lost (deleted, emptied by a
//! bad restore or a broken disk) from a first start: it would create a new, empty file and the
//! relay would run on, having silently dropped every acknowledged event. With the marker there,
//! a missing or damaged store file stops the start instead ([`super::preflight`]).
//!
//! Owns: the marker's name, its text (it explains itself to whoever finds it), and writing it
//! durably. Must never: be written before the store file exists and opened soundly, or be
//! removed by the relay (only an operator who means to start empty removes it).

use std::io::Write;
use std::path::{Path, PathBuf};

/// What the marker says to an operator who opens it.
const TEXT: &str = "\
This file records that queue.redb beside it has held whatsapp-relay's queue.

While this file is here, the relay refuses to start when queue.redb is missing, empty,
truncated or unreadable, instead of starting with an empty queue and losing what was
acknowledged. To recover, put the latest `whatsapp-relay store backup` copy in place as
queue.redb (keep this file). To start with an empty store on purpose, losing what
queue.redb held, remove this file and queue.redb.
";

#[derive(Clone, Debug)]
pub struct Marker {
    path: PathBuf,
}

impl Marker {
    /// The marker of the store file `store` (`queue.redb` -> `queue.redb.marker`).
    pub fn of(store: &Path) -> Marker {
        let mut name = store.file_name().unwrap_or_default().to_os_string();
        name.push(".marker");
        Marker { path: store.with_file_name(name) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the marker is there. An error other than "not found" (a folder that cannot be
    /// read) counts as there: doubt must stop the start, not let an empty store through.
    pub fn present(&self) -> bool {
        !matches!(std::fs::symlink_metadata(&self.path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
    }

    /// Writes the marker durably (file synced, renamed into place, folder synced): once the
    /// store has acknowledged data, a crash must not leave it unmarked.
    pub fn write(&self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("marker.partial");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(TEXT.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sits_beside_the_store_and_explains_itself() {
        let dir = tempfile::tempdir().unwrap();
        let m = Marker::of(&dir.path().join("queue.redb"));
        assert_eq!(m.path(), dir.path().join("queue.redb.marker"));
        assert!(!m.present());
        m.write().unwrap();
        assert!(m.present());
        assert!(std::fs::read_to_string(m.path()).unwrap().contains("remove this file"));
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, [std::ffi::OsString::from("queue.redb.marker")]);
    }
}
