//! The embedded store's journal, `queue.journal` beside `queue.redb`: an append-only file that
//! takes an accepted event in one sequential write and one fdatasync, where a B-tree commit
//! copies pages for the event, its waiting entry and its dedup key. What the journal holds is
//! folded into `queue.redb` now and then (a checkpoint, see `embedded`), and the journal starts
//! over, empty, under the next generation number.
//!
//! Owns the file format and its I/O: the header, the records, reading them back after a crash,
//! and starting a new generation atomically (a file renamed over the old one).
//!
//! A folded journal is kept as the spare (`.queue.journal.spare`) and becomes the next
//! generation: its blocks are already allocated, so an fdatasync writes the records alone,
//! where a growing file also commits its new size and blocks through the filesystem's journal
//! (on ext4 about twice the time and CPU per sync). What the spare held before is left behind
//! the new records: each record's checksum covers the generation and the store id, so an
//! earlier generation's record never reads as one of this generation.
//!
//! Must never: answer a synced write before fdatasync has returned, leave a half-written record
//! in front of a later one (a failed write is cut off again), or read a record whose checksum
//! does not match.
//!
//! Format: a 24-byte header (`MAGIC`, the generation and the store's id, little-endian u64s:
//! the id tells a journal of another store file from an old one of this file), then
//! records: payload length (u32 LE), CRC-32 of the generation and the store id (u64 LE each)
//! followed by the payload (u32 LE), payload (postcard of [`Record`]). A crash can leave the end of the file
//! half-written (a write that was never synced, so never acknowledged), and a recycled file
//! has an earlier generation's records after this one's: reading stops at the first record
//! that is incomplete or fails its checksum, and says how many bytes it left.
//!
//! Journals written before the checksum covered the generation (`MAGIC_V1`: the CRC-32 of the
//! payload alone) are still read and appended to in their format; their next generation is
//! written in the current one.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::NewEvent;
use super::embedded::Disk;

pub const FILE_NAME: &str = "queue.journal";
const MAGIC: &[u8; 8] = b"WARJNL02";
/// The first format: the checksum covers the payload alone (files are never recycled in it).
const MAGIC_V1: &[u8; 8] = b"WARJNL01";
/// A folded journal kept for the next generation (see the module's documentation).
pub const SPARE_NAME: &str = ".queue.journal.spare";
pub const HEADER_LEN: u64 = 24;
/// Larger than any record the relay writes (an event is at most the request body limit plus
/// its headers); a length beyond it is damage, not a record.
const MAX_RECORD: u32 = 256 << 20;
/// Follows the last record of every write (see [`Journal::write`]): no record's frame is all
/// zeros (its checksum covers the generation, or, in `MAGIC_V1`, an empty payload is no record).
const END_MARK: [u8; 8] = [0; 8];

/// What the journal records, in the order it happened.
#[derive(Debug, Serialize, Deserialize)]
pub enum Record {
    /// An accepted event and the sequence number it was given.
    Stored { seq: u64, ev: Box<NewEvent> },
    /// Events Motion has taken: no longer waiting.
    Delivered(Vec<u64>),
    /// Attempt counts of waiting events.
    Attempts(Vec<(u64, u32)>),
}

/// [`Record`] as written: borrows the event instead of owning it. Same shape, same encoding.
#[derive(Serialize)]
pub enum RecordRef<'a> {
    Stored { seq: u64, ev: &'a NewEvent },
    Delivered(&'a [u64]),
    Attempts(&'a [(u64, u32)]),
}

/// How a journal's records are checksummed: with its generation (the current format) or
/// without (`MAGIC_V1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// The generation and the store id, or none in `MAGIC_V1`.
    seed: Option<(u64, u64)>,
}

impl Framing {
    fn of(magic: &[u8], generation: u64, store_id: u64) -> Option<Framing> {
        match magic {
            m if m == MAGIC => Some(Framing { seed: Some((generation, store_id)) }),
            m if m == MAGIC_V1 => Some(Framing { seed: None }),
            _ => None,
        }
    }

    fn crc(self, payload: &[u8]) -> u32 {
        let mut h = crc32fast::Hasher::new();
        if let Some((generation, store_id)) = self.seed {
            // The store id too: a spare left by a replaced store (a restored backup) may hold
            // records of the very generation this store reaches later.
            h.update(&generation.to_le_bytes());
            h.update(&store_id.to_le_bytes());
        }
        h.update(payload);
        h.finalize()
    }
}

/// Appends one framed record to `buf`, checksummed as `framing` says.
pub fn encode(buf: &mut Vec<u8>, framing: Framing, record: &RecordRef) -> Result<(), String> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 8]);
    let mut out = std::mem::take(buf);
    out = postcard::to_extend(record, out).map_err(|e| format!("cannot encode a journal record: {e}"))?;
    let payload = &out[start + 8..];
    let len = u32::try_from(payload.len()).ok().filter(|&l| l <= MAX_RECORD).ok_or("journal record too large")?;
    let crc = framing.crc(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    *buf = out;
    Ok(())
}

/// The open journal, positioned at its end.
pub struct Journal {
    path: PathBuf,
    /// Shared with [`Sync`]s, which make it durable without holding the journal.
    file: Arc<File>,
    /// Bytes of whole records (and the header): where the next write goes.
    len: u64,
    generation: u64,
    store_id: u64,
    framing: Framing,
    disk: Disk,
}

/// What reading a journal found.
#[derive(Debug)]
pub struct Contents {
    pub generation: u64,
    pub store_id: u64,
    pub framing: Framing,
    /// Each record with where its payload starts and its length.
    pub records: Vec<(u64, u32, Record)>,
    /// Where the last whole record ends.
    pub len: u64,
    /// Bytes after it when no end mark follows it: a write the crash cut short (never
    /// acknowledged), or damage. (Behind an end mark lies what a recycled file held before.)
    pub cut: u64,
}

impl Journal {
    /// Starts generation `generation` in `dir`, empty, replacing any journal there: the spare
    /// (see [`Journal::recycle`]) or else a new file gets the new header, is synced, then renamed
    /// over the old journal and the folder synced, so a crash leaves either the old journal or
    /// the new one, whole.
    pub fn create(dir: &Path, generation: u64, store_id: u64, disk: Disk) -> std::io::Result<Journal> {
        let path = dir.join(FILE_NAME);
        disk.check()?;
        let spare = dir.join(SPARE_NAME);
        let (from, file) = match OpenOptions::new().read(true).write(true).open(&spare) {
            Ok(file) => (spare, file),
            Err(_) => {
                let tmp = dir.join(format!(".{FILE_NAME}.new"));
                (tmp.clone(), OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?)
            }
        };
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&generation.to_le_bytes());
        header[16..].copy_from_slice(&store_id.to_le_bytes());
        file.write_all_at(&header, 0)?;
        file.sync_all()?;
        std::fs::rename(&from, &path)?;
        File::open(dir)?.sync_all()?;
        let framing = Framing { seed: Some((generation, store_id)) };
        Ok(Journal { path, file: Arc::new(file), len: HEADER_LEN, generation, store_id, framing, disk })
    }

    /// Keeps the folded journal at `path` as the spare the next [`Journal::create`] in `dir`
    /// takes, or removes it when a spare is already there (or it cannot be moved). Its records
    /// are all in the store file; left in the spare, they never read as the next generation's.
    pub fn recycle(path: &Path, dir: &Path) {
        let spare = dir.join(SPARE_NAME);
        if !spare.exists() && std::fs::rename(path, &spare).is_ok() {
            return;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(file = %path.display(), error = %e, "could not remove a folded store journal"),
        }
    }

    /// Opens the journal at `path` for appending after its last whole record (the rest is cut
    /// off, so the next record follows it directly).
    pub fn reopen(path: &Path, contents: &Contents, disk: Disk) -> std::io::Result<Journal> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        if contents.cut > 0 {
            file.set_len(contents.len)?;
            file.sync_all()?;
        }
        let file = Arc::new(file);
        let (len, generation, store_id, framing) =
            (contents.len, contents.generation, contents.store_id, contents.framing);
        Ok(Journal { path: path.to_path_buf(), file, len, generation, store_id, framing, disk })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn store_id(&self) -> u64 {
        self.store_id
    }

    /// How records written to this journal are checksummed (see [`encode`]).
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Bytes in the file: what a checkpoint would fold into the store.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it holds no record.
    pub fn is_empty(&self) -> bool {
        self.len == HEADER_LEN
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file was renamed to `path` (the open handle follows it).
    pub fn moved_to(&mut self, path: &Path) {
        self.path = path.to_path_buf();
    }

    /// Writes the framed records in `buf` at the end (not synced), followed by an end mark (a
    /// zero frame, overwritten by the next write): reading stops there, at the end of this
    /// generation's records, without taking what a recycled file holds after it for damage.
    /// `buf` is left as it was given. On failure the end stays where it was: the next write
    /// goes over what this one left, and the file is cut back to it (should that fail too, what
    /// is left lies past the end, where reading stops at the first damaged record).
    pub fn write(&mut self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let records = buf.len();
        buf.extend_from_slice(&END_MARK);
        let written = self.disk.check().and_then(|()| self.file.write_all_at(buf, self.len));
        buf.truncate(records);
        match written {
            Ok(()) => {
                self.len += records as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                Err(e)
            }
        }
    }

    /// Makes everything written so far durable.
    pub fn sync(&self) -> std::io::Result<()> {
        self.syncer().sync()
    }

    /// What makes this journal durable, usable after the journal is let go (so other writers
    /// need not wait for the fdatasync).
    pub fn syncer(&self) -> Syncer {
        Syncer { file: self.file.clone(), disk: self.disk.clone() }
    }

    /// Reads back the record whose payload starts at `at` (`len` bytes), checksum checked.
    pub fn load(&self, at: u64, len: u32) -> std::io::Result<Record> {
        let mut frame = vec![0u8; 8 + len as usize];
        self.file.read_exact_at(&mut frame, at - 8)?;
        let damaged =
            |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("journal record at {at}: {why}"));
        let crc = u32::from_le_bytes(frame[4..8].try_into().expect("4 bytes"));
        if u32::from_le_bytes(frame[..4].try_into().expect("4 bytes")) != len || self.framing.crc(&frame[8..]) != crc {
            return Err(damaged("checksum mismatch"));
        }
        postcard::from_bytes(&frame[8..]).map_err(|e| damaged(&e.to_string()))
    }
}

/// Makes a journal durable (see [`Journal::syncer`]).
pub struct Syncer {
    file: Arc<File>,
    disk: Disk,
}

impl Syncer {
    pub fn sync(&self) -> std::io::Result<()> {
        self.disk.check()?;
        self.file.sync_data()
    }
}

/// Reads the journal at `path`: `Ok(None)` when there is none. An unreadable header is an
/// error (the message says what is wrong); records stop at the first incomplete or damaged one.
pub fn read(path: &Path) -> Result<Option<Contents>, String> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open it: {e}")),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(|e| format!("cannot read it: {e}"))?;
    let header = (bytes.len() >= HEADER_LEN as usize).then(|| {
        let generation = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let store_id = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        Framing::of(&bytes[..8], generation, store_id).map(|f| (generation, store_id, f))
    });
    let Some(Some((generation, store_id, framing))) = header else {
        return Err(format!("it is not a journal ({} bytes, no journal header)", bytes.len()));
    };
    let (records, len) = parse(&bytes, framing);
    // After the end mark: what a recycled file held before, not this generation's.
    let marked = bytes.get(len..len + END_MARK.len()) == Some(&END_MARK[..]);
    let cut = if marked { 0 } else { (bytes.len() - len) as u64 };
    Ok(Some(Contents { generation, store_id, framing, records, len: len as u64, cut }))
}

/// The whole records after the header, and where the last one ends.
fn parse(bytes: &[u8], framing: Framing) -> (Vec<(u64, u32, Record)>, usize) {
    let mut at = HEADER_LEN as usize;
    let mut records = Vec::new();
    while let Some(frame) = bytes.get(at..at + 8) {
        if frame == END_MARK {
            break;
        }
        let len = u32::from_le_bytes(frame[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(frame[4..].try_into().expect("4 bytes"));
        if len > MAX_RECORD {
            break;
        }
        let Some(payload) = bytes.get(at + 8..at + 8 + len as usize) else { break };
        if framing.crc(payload) != crc {
            break;
        }
        let Ok(record) = postcard::from_bytes::<Record>(payload) else { break };
        records.push(((at + 8) as u64, len, record));
        at += 8 + len as usize;
    }
    (records, at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::ev;

    fn stored(j: &Journal, seq: u64, id: &str) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(&mut buf, j.framing(), &RecordRef::Stored { seq, ev: &ev(id, "c", b"body") }).unwrap();
        buf
    }

    #[test]
    fn records_read_back_in_order_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path(), 7, 42, Disk::default()).unwrap();
        j.write(&mut stored(&j, 1, "a")).unwrap();
        let mut buf = Vec::new();
        encode(&mut buf, j.framing(), &RecordRef::Delivered(&[1])).unwrap();
        encode(&mut buf, j.framing(), &RecordRef::Attempts(&[(2, 3)])).unwrap();
        j.write(&mut buf).unwrap();
        j.sync().unwrap();
        let c = read(&dir.path().join(FILE_NAME)).unwrap().unwrap();
        assert_eq!((c.generation, c.store_id, c.records.len(), c.cut, c.len), (7, 42, 3, 0, j.len()));
        assert!(matches!(&c.records[0].2, Record::Stored { seq: 1, ev } if ev.delivery_id == "a"));
        assert!(matches!(&c.records[1].2, Record::Delivered(s) if s == &[1]));
        assert!(matches!(&c.records[2].2, Record::Attempts(a) if a == &[(2, 3)]));
        let (at, len, _) = c.records[0];
        assert!(matches!(j.load(at, len).unwrap(), Record::Stored { seq: 1, .. }));
        assert!(j.load(at, len - 1).is_err());
    }

    /// Appends `bytes` to the file as they are, without an end mark: what a crash leaves of a
    /// write the disk only partly took.
    fn torn(path: &Path, bytes: &[u8]) {
        let len = std::fs::metadata(path).unwrap().len();
        let file = OpenOptions::new().write(true).open(path).unwrap();
        // Over the end mark, as the write that was cut short did.
        file.write_all_at(bytes, len - END_MARK.len() as u64).unwrap();
    }

    #[test]
    fn a_torn_or_damaged_tail_is_left_and_cut_at_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut j = Journal::create(dir.path(), 1, 42, Disk::default()).unwrap();
        j.write(&mut stored(&j, 1, "a")).unwrap();
        let whole = j.len();
        let second = stored(&j, 2, "b");
        torn(&path, &second[..second.len() - 3]);
        let c = read(&path).unwrap().unwrap();
        assert_eq!((c.records.len(), c.len, c.cut), (1, whole, second.len() as u64 - 3));
        let mut j = Journal::reopen(&path, &c, Disk::default()).unwrap();
        j.write(&mut stored(&j, 3, "c")).unwrap();
        let c = read(&path).unwrap().unwrap();
        assert_eq!((c.records.len(), c.cut), (2, 0));
        assert!(matches!(&c.records[1].2, Record::Stored { seq: 3, .. }));

        // A flipped byte inside the last record: its checksum fails, and it is left.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - END_MARK.len() - 2;
        bytes[at] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let c = read(&path).unwrap().unwrap();
        assert_eq!(c.records.len(), 1);
        assert!(c.cut > 0);
    }

    /// A folded journal becomes the next generation's file: its old records stay behind the new
    /// ones and are never read as theirs, even where one starts right at the new end.
    #[test]
    fn a_recycled_journal_reads_only_its_own_generation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut j = Journal::create(dir.path(), 1, 42, Disk::default()).unwrap();
        for seq in 1..=5 {
            j.write(&mut stored(&j, seq, "old")).unwrap();
        }
        let old_len = j.len();
        drop(j);
        let old = std::fs::read(&path).unwrap();
        let folded = dir.path().join("folded");
        std::fs::rename(&path, &folded).unwrap();
        Journal::recycle(&folded, dir.path());
        assert!(dir.path().join(SPARE_NAME).exists() && !folded.exists());

        let mut j = Journal::create(dir.path(), 3, 42, Disk::default()).unwrap();
        assert!(!dir.path().join(SPARE_NAME).exists());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), old_len + END_MARK.len() as u64, "the file was reused");
        // As long as each old one: it ends right where the second old record starts.
        let mut new = stored(&j, 6, "new");
        assert_eq!(new.len() as u64, (old_len - HEADER_LEN) / 5);
        j.write(&mut new).unwrap();
        j.sync().unwrap();
        let c = read(&path).unwrap().unwrap();
        assert_eq!((c.generation, c.records.len(), c.cut), (3, 1, 0));
        assert!(matches!(&c.records[0].2, Record::Stored { seq: 6, .. }));

        // Without the end mark (a crash that wrote the record but not the mark), the second
        // old record follows, whole: its checksum is generation 1's, so reading stops there.
        let end = c.len as usize;
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&old[end..end + END_MARK.len()], end as u64).unwrap();
        let c = read(&path).unwrap().unwrap();
        assert_eq!((c.records.len(), c.len, c.cut), (1, end as u64, (old.len() - end) as u64));
        assert_eq!(std::fs::read(&path).unwrap()[end..], old[end..], "old records behind the new one");

        // A second folded journal while a spare waits is removed.
        let other = dir.path().join("other");
        std::fs::write(&other, b"x").unwrap();
        Journal::create(dir.path(), 4, 42, Disk::default()).unwrap();
        std::fs::rename(&path, dir.path().join(SPARE_NAME)).unwrap();
        Journal::recycle(&other, dir.path());
        assert!(!other.exists());
    }

    /// A journal of the first format (checksums without the generation) is read, and appended
    /// to in its format, after an upgrade.
    #[test]
    fn a_journal_of_the_first_format_is_read_and_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let v1 = Framing::of(MAGIC_V1, 5, 42).unwrap();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(MAGIC_V1);
        bytes.extend_from_slice(&5u64.to_le_bytes());
        bytes.extend_from_slice(&42u64.to_le_bytes());
        encode(&mut bytes, v1, &RecordRef::Stored { seq: 1, ev: &ev("a", "c", b"body") }).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        let c = read(&path).unwrap().unwrap();
        assert_eq!((c.generation, c.framing, c.records.len(), c.cut), (5, v1, 1, 0));
        let mut j = Journal::reopen(&path, &c, Disk::default()).unwrap();
        assert_eq!(j.framing(), v1);
        j.write(&mut stored(&j, 2, "b")).unwrap();
        let c = read(&path).unwrap().unwrap();
        assert_eq!(c.records.len(), 2);
        // Its checksums are the payload's alone.
        let (at, len, _) = c.records[1];
        let crc = u32::from_le_bytes(std::fs::read(&path).unwrap()[at as usize - 4..at as usize].try_into().unwrap());
        assert_eq!(crc, crc32fast::hash(&std::fs::read(&path).unwrap()[at as usize..(at + len as u64) as usize]));
    }

    #[test]
    fn a_file_without_the_header_is_refused_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        assert!(read(&path).unwrap().is_none());
        std::fs::write(&path, b"not a journal at all").unwrap();
        assert!(read(&path).unwrap_err().contains("not a journal"));
        std::fs::write(&path, b"").unwrap();
        assert!(read(&path).unwrap_err().contains("0 bytes"));
    }

    #[test]
    fn create_replaces_the_old_generation_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path(), 1, 42, Disk::default()).unwrap();
        j.write(&mut stored(&j, 1, "a")).unwrap();
        let j = Journal::create(dir.path(), 2, 42, Disk::default()).unwrap();
        assert!(j.is_empty());
        let c = read(&dir.path().join(FILE_NAME)).unwrap().unwrap();
        assert_eq!((c.generation, c.records.len()), (2, 0));
        assert!(!dir.path().join(format!(".{FILE_NAME}.new")).exists());
    }
}
