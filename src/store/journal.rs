//! The embedded store's journal, `queue.journal` beside `queue.redb`: an append-only file that
//! takes an accepted event in one sequential write and one fdatasync, where a B-tree commit
//! copies pages for the event, its waiting entry and its dedup key. What the journal holds is
//! folded into `queue.redb` now and then (a checkpoint, see `embedded`), and the journal starts
//! over, empty, under the next generation number.
//!
//! Owns the file format and its I/O: the header, the records, reading them back after a crash,
//! and starting a new generation atomically (a new file renamed over the old one).
//!
//! Must never: answer a synced write before fdatasync has returned, leave a half-written record
//! in front of a later one (a failed write is cut off again), or read a record whose checksum
//! does not match.
//!
//! Format: a 24-byte header (`MAGIC`, the generation and the store's id, little-endian u64s:
//! the id tells a journal of another store file from an old one of this file), then
//! records: payload length (u32 LE), CRC-32 of the payload (u32 LE), payload (postcard of
//! [`Record`]). A crash can leave the end of the file half-written (a write that was never
//! synced, so never acknowledged): reading stops at the first record that is incomplete or
//! fails its checksum, and says how many bytes it left.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::NewEvent;
use super::embedded::Disk;

pub const FILE_NAME: &str = "queue.journal";
const MAGIC: &[u8; 8] = b"WARJNL01";
pub const HEADER_LEN: u64 = 24;
/// Larger than any record the relay writes (an event is at most the request body limit plus
/// its headers); a length beyond it is damage, not a record.
const MAX_RECORD: u32 = 256 << 20;

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

/// Appends one framed record to `buf`.
pub fn encode(buf: &mut Vec<u8>, record: &RecordRef) -> Result<(), String> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 8]);
    let mut out = std::mem::take(buf);
    out = postcard::to_extend(record, out).map_err(|e| format!("cannot encode a journal record: {e}"))?;
    let payload = &out[start + 8..];
    let len = u32::try_from(payload.len()).ok().filter(|&l| l <= MAX_RECORD).ok_or("journal record too large")?;
    let crc = crc32fast::hash(payload);
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
    disk: Disk,
}

/// What reading a journal found.
#[derive(Debug)]
pub struct Contents {
    pub generation: u64,
    pub store_id: u64,
    /// Each record with where its payload starts and its length.
    pub records: Vec<(u64, u32, Record)>,
    /// Where the last whole record ends.
    pub len: u64,
    /// Bytes after it: a write the crash cut short (never acknowledged), or damage.
    pub cut: u64,
}

impl Journal {
    /// Starts generation `generation` in `dir`, empty, replacing any journal there: written to a
    /// new file, synced, then renamed over the old one and the folder synced, so a crash leaves
    /// either the old journal or the new one, whole.
    pub fn create(dir: &Path, generation: u64, store_id: u64, disk: Disk) -> std::io::Result<Journal> {
        let path = dir.join(FILE_NAME);
        let tmp = dir.join(format!(".{FILE_NAME}.new"));
        disk.check()?;
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?;
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&generation.to_le_bytes());
        header[16..].copy_from_slice(&store_id.to_le_bytes());
        file.write_all(&header)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()?;
        Ok(Journal { path, file: Arc::new(file), len: HEADER_LEN, generation, store_id, disk })
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
        let (len, generation, store_id) = (contents.len, contents.generation, contents.store_id);
        Ok(Journal { path: path.to_path_buf(), file, len, generation, store_id, disk })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn store_id(&self) -> u64 {
        self.store_id
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

    /// Writes framed records at the end (not synced). On failure the end stays where it was:
    /// the next write goes over what this one left, and the file is cut back to it (should
    /// that fail too, what is left lies past the end, where reading stops at the first damaged
    /// record).
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let written = self.disk.check().and_then(|()| self.file.write_all_at(bytes, self.len));
        match written {
            Ok(()) => {
                self.len += bytes.len() as u64;
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
        if u32::from_le_bytes(frame[..4].try_into().expect("4 bytes")) != len || crc32fast::hash(&frame[8..]) != crc {
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
    if bytes.len() < HEADER_LEN as usize || &bytes[..8] != MAGIC {
        return Err(format!("it is not a journal ({} bytes, no journal header)", bytes.len()));
    }
    let generation = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let store_id = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let (records, len) = parse(&bytes);
    Ok(Some(Contents { generation, store_id, records, len: len as u64, cut: (bytes.len() - len) as u64 }))
}

/// The whole records after the header, and where the last one ends.
fn parse(bytes: &[u8]) -> (Vec<(u64, u32, Record)>, usize) {
    let mut at = HEADER_LEN as usize;
    let mut records = Vec::new();
    while let Some(frame) = bytes.get(at..at + 8) {
        let len = u32::from_le_bytes(frame[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(frame[4..].try_into().expect("4 bytes"));
        if len > MAX_RECORD {
            break;
        }
        let Some(payload) = bytes.get(at + 8..at + 8 + len as usize) else { break };
        if crc32fast::hash(payload) != crc {
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

    fn stored(seq: u64, id: &str) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(&mut buf, &RecordRef::Stored { seq, ev: &ev(id, "c", b"body") }).unwrap();
        buf
    }

    #[test]
    fn records_read_back_in_order_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path(), 7, 42, Disk::default()).unwrap();
        j.write(&stored(1, "a")).unwrap();
        let mut buf = Vec::new();
        encode(&mut buf, &RecordRef::Delivered(&[1])).unwrap();
        encode(&mut buf, &RecordRef::Attempts(&[(2, 3)])).unwrap();
        j.write(&buf).unwrap();
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

    #[test]
    fn a_torn_or_damaged_tail_is_left_and_cut_at_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut j = Journal::create(dir.path(), 1, 42, Disk::default()).unwrap();
        j.write(&stored(1, "a")).unwrap();
        let whole = j.len();
        let second = stored(2, "b");
        j.write(&second[..second.len() - 3]).unwrap(); // a write the crash cut short
        let c = read(&path).unwrap().unwrap();
        assert_eq!((c.records.len(), c.len, c.cut), (1, whole, second.len() as u64 - 3));
        let mut j = Journal::reopen(&path, &c, Disk::default()).unwrap();
        j.write(&stored(3, "c")).unwrap();
        let c = read(&path).unwrap().unwrap();
        assert_eq!((c.records.len(), c.cut), (2, 0));
        assert!(matches!(&c.records[1].2, Record::Stored { seq: 3, .. }));

        // A flipped byte inside the last record: its checksum fails, and it is left.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 2;
        bytes[at] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let c = read(&path).unwrap().unwrap();
        assert_eq!(c.records.len(), 1);
        assert!(c.cut > 0);
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
        j.write(&stored(1, "a")).unwrap();
        let j = Journal::create(dir.path(), 2, 42, Disk::default()).unwrap();
        assert!(j.is_empty());
        let c = read(&dir.path().join(FILE_NAME)).unwrap().unwrap();
        assert_eq!((c.generation, c.records.len()), (2, 0));
        assert!(!dir.path().join(format!(".{FILE_NAME}.new")).exists());
    }
}
