//! Config errors that point at the place in the file: `PATH:LINE:COL: message`.

use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file itself could not be read.
    #[error("{}: cannot read config file: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// Something in the file is wrong; `line`/`col` are 1-based.
    #[error("{}:{line}:{col}: {message}", path.display())]
    At { path: PathBuf, line: usize, col: usize, message: String },
}

/// Turns byte spans of the source text into positions.
pub(crate) struct Locator<'a> {
    pub path: &'a Path,
    pub text: &'a str,
    /// The last position asked for and its line: warnings come in file order, so each is
    /// counted from the one before, and a file of 100,000 accounts with many warnings is read
    /// about once (not from the top for each, nor indexed line by line for a few).
    cursor: std::cell::Cell<(usize, usize)>,
}

impl<'a> Locator<'a> {
    pub fn new(path: &'a Path, text: &'a str) -> Self {
        Locator { path, text, cursor: std::cell::Cell::new((0, 1)) }
    }

    pub fn error(&self, span: Option<Range<usize>>, message: impl Into<String>) -> ConfigError {
        let (line, col) = span.map(|s| self.line_col(s.start)).unwrap_or((1, 1));
        ConfigError::At { path: self.path.to_path_buf(), line, col, message: message.into() }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let bytes = self.text.as_bytes();
        let offset = offset.min(bytes.len());
        let newlines = |range: std::ops::Range<usize>| bytes[range].iter().filter(|&&b| b == b'\n').count();
        let (from, line) = match self.cursor.get() {
            (at, line) if at <= offset => (at, line),
            _ => (0, 1),
        };
        let line = line + newlines(from..offset);
        self.cursor.set((offset, line));
        let start = bytes[..offset].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        // Spans start on character boundaries; `offset.min` keeps a bad one from panicking.
        let col = self.text.get(start..offset).map_or(offset - start, |s| s.chars().count());
        (line, col + 1)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn line_col() {
        let loc = super::Locator::new(std::path::Path::new("x"), "a = 1\nbb = 2\né = 3");
        assert_eq!(loc.line_col(0), (1, 1));
        assert_eq!(loc.line_col(5), (1, 6));
        assert_eq!(loc.line_col(6), (2, 1));
        assert_eq!(loc.line_col(11), (2, 6));
        assert_eq!(loc.line_col(15), (3, 2));
        // Asked out of order, from the cursor or from the top.
        assert_eq!(loc.line_col(6), (2, 1));
        assert_eq!(loc.line_col(0), (1, 1));
        assert_eq!(loc.line_col(11), (2, 6));
        assert_eq!(loc.line_col(99), (3, 6));
    }
}
