//! Looks at the embedded store's file before redb opens it, so that a lost or damaged store
//! stops the start with a message that names the file and what to do, instead of an empty
//! queue (redb creates a new file where there is none, and lays one out in an empty file) or a
//! panic inside redb (a truncated file trips its assertions).
//!
//! Owns: the verdict on the file as it lies on disk (missing, empty, not a redb file,
//! truncated) read against the marker ([`Marker`]), the recovery steps the operator is told,
//! and [`contain`], which turns a panic inside redb on a file damaged in some other way into
//! such an error. Reads only the file's first page; never writes.

use std::cell::Cell;
use std::io::Read;
use std::path::Path;

use super::StoreError;
use super::marker::Marker;

/// redb's file header (its `header.rs`, stable within its file formats 2 and 3): the magic
/// number, then the page size and the region layout, which give the length the file must have.
const MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
const PAGE_SIZE_AT: usize = 12;
const REGION_HEADER_PAGES_AT: usize = 16;
const REGION_MAX_DATA_PAGES_AT: usize = 20;
const FULL_REGIONS_AT: usize = 24;
const TRAILING_REGION_PAGES_AT: usize = 28;
/// The header and its two commit slots.
const HEADER_LEN: usize = 64 + 2 * 128;
/// The page size this build opens files with (redb's default).
const PAGE_SIZE: u32 = 4096;

/// What the file on disk is, before opening.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// No file (or an empty one) and no marker: a first start, which creates it.
    New,
    /// A redb file of the length its header records (or longer: redb repairs that).
    Whole,
}

/// The store file's state against its marker: `Ok` when redb may open (or create) it, the
/// operator's error otherwise.
pub fn examine(file: &Path) -> Result<Found, StoreError> {
    let marker = Marker::of(file);
    let held = marker.present();
    let meta = match std::fs::metadata(file) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !held => return Ok(Found::New),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(damaged(file, "is missing", &marker)),
        Err(e) => {
            return Err(StoreError::Open { path: file.to_path_buf(), source: std::sync::Arc::new(e) });
        }
    };
    if !meta.is_file() {
        return Err(damaged(file, "is not a regular file", &marker));
    }
    if meta.len() == 0 {
        // redb leaves no empty file behind (it lays the file out before writing its header), so
        // with the marker gone this is a first start that died at its first instant.
        return if held { Err(damaged(file, "is empty (0 bytes)", &marker)) } else { Ok(Found::New) };
    }
    let mut head = Vec::with_capacity(HEADER_LEN);
    let read = std::fs::File::open(file).and_then(|f| f.take(HEADER_LEN as u64).read_to_end(&mut head));
    if let Err(e) = read {
        return Err(StoreError::Open { path: file.to_path_buf(), source: std::sync::Arc::new(e) });
    }
    if head.len() < MAGIC.len() || head[..MAGIC.len()] != MAGIC {
        return Err(damaged(file, "is not a store file (its first bytes are not a redb header)", &marker));
    }
    if head.len() < HEADER_LEN {
        let what = format!("is truncated: {} bytes, shorter than its own header", meta.len());
        return Err(damaged(file, &what, &marker));
    }
    match needed_len(&head) {
        Some(need) if meta.len() >= need => Ok(Found::Whole),
        Some(need) => {
            let what = format!("is truncated: {} bytes of the {need} its header records", meta.len());
            Err(damaged(file, &what, &marker))
        }
        None => Err(damaged(file, "has a damaged header (its page size or layout make no sense)", &marker)),
    }
}

/// The length redb's header says the file has: one page for the header, then every region
/// (its header pages and data pages). None when the numbers are not redb's.
fn needed_len(head: &[u8]) -> Option<u64> {
    let u32_at = |at: usize| u32::from_le_bytes(head[at..at + 4].try_into().expect("4 bytes"));
    let page = u64::from(u32_at(PAGE_SIZE_AT));
    if page != u64::from(PAGE_SIZE) {
        return None;
    }
    let (header_pages, max_pages) =
        (u64::from(u32_at(REGION_HEADER_PAGES_AT)), u64::from(u32_at(REGION_MAX_DATA_PAGES_AT)));
    let (full, trailing) = (u64::from(u32_at(FULL_REGIONS_AT)), u64::from(u32_at(TRAILING_REGION_PAGES_AT)));
    if max_pages == 0 || (full == 0 && trailing == 0) {
        return None;
    }
    let full_len = full.checked_mul(header_pages.checked_add(max_pages)?.checked_mul(page)?)?;
    let trailing_len = if trailing > 0 { header_pages.checked_add(trailing)?.checked_mul(page)? } else { 0 };
    page.checked_add(full_len)?.checked_add(trailing_len)
}

/// The error for a store file that cannot be used, with the recovery steps.
pub fn damaged(file: &Path, what: &str, marker: &Marker) -> StoreError {
    let f = file.display();
    let steps = if marker.present() {
        format!(
            "it held data (see {}), so the relay will not start with an empty queue. To recover: put the latest \
             `whatsapp-relay store backup` copy in place as {f} and start again. To start with an empty store on \
             purpose, losing what it held: move {f} away and remove {}",
            marker.path().display(),
            marker.path().display()
        )
    } else {
        format!(
            "to recover: put the latest `whatsapp-relay store backup` copy in place as {f} and start again. To start \
             with an empty store on purpose, losing what it held: move {f} away"
        )
    };
    StoreError::Damaged(format!("the store file {f} {what}; {steps}"))
}

thread_local! {
    /// Set while [`contain`] runs on this thread: its panics are turned into errors, not printed.
    static CONTAINED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (redb opening or reading a file that may be damaged), turning a panic into an
/// error. A last resort: [`examine`] catches the damage seen so far (a truncated file trips
/// redb's `raw_file_len() >= layout().len()` assertion), but redb trusts the rest of its file
/// too (page numbers, lengths), and garbage there panics deep inside it. The panic would end
/// the start (or `store check`) with a backtrace instead of the file's name and the recovery
/// steps. redb holds no lock or shared state across the unwind: the half-opened handle and its
/// file are dropped with the stack. The panic message is kept off stderr on this thread only,
/// so a panic elsewhere is still reported as usual.
pub fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CONTAINED.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was = CONTAINED.with(|c| c.replace(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(was));
    out.map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with_data(dir: &Path) -> std::path::PathBuf {
        use crate::store::QueueStore;
        let store = crate::store::EmbeddedStore::open(dir).unwrap();
        store.append(&[crate::store::tests::ev("a", "c", &[7; 50_000])]).unwrap();
        store.path().to_path_buf()
    }

    #[test]
    fn a_first_start_is_new_and_a_sound_file_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("queue.redb");
        assert_eq!(examine(&file).unwrap(), Found::New);
        std::fs::write(&file, b"").unwrap();
        assert_eq!(examine(&file).unwrap(), Found::New, "an empty file, never marked");
        std::fs::remove_file(&file).unwrap();
        let file = store_with_data(dir.path());
        assert_eq!(examine(&file).unwrap(), Found::Whole);
    }

    #[test]
    fn a_store_that_held_data_and_is_gone_or_damaged_is_refused_with_the_steps() {
        let dir = tempfile::tempdir().unwrap();
        let file = store_with_data(dir.path());
        let whole = std::fs::read(&file).unwrap();
        let cases: [(&str, Vec<u8>); 4] = [
            ("is empty (0 bytes)", Vec::new()),
            ("is truncated", whole[..whole.len() / 2].to_vec()),
            ("is truncated", whole[..100].to_vec()),
            ("is not a store file", vec![0x5a; whole.len()]),
        ];
        for (says, bytes) in cases {
            std::fs::write(&file, &bytes).unwrap();
            let e = examine(&file).unwrap_err().to_string();
            assert!(e.contains(&format!("{} {says}", file.display())), "{e}");
            assert!(e.contains("store backup") && e.contains("queue.redb.marker"), "{e}");
        }
        std::fs::remove_file(&file).unwrap();
        assert!(examine(&file).unwrap_err().to_string().contains("is missing"));
    }

    #[test]
    fn contain_turns_a_panic_into_an_error() {
        assert_eq!(contain(|| 7), Ok(7));
        assert_eq!(contain(|| -> u8 { panic!("boom {}", 1) }), Err("boom 1".to_string()));
    }
}
