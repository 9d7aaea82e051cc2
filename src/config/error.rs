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
    /// Byte offset of each line's start, computed on first use: a file of 100,000 accounts
    /// with many warnings must not be rescanned from the top for each.
    line_starts: std::cell::OnceCell<Vec<usize>>,
}

impl<'a> Locator<'a> {
    pub fn new(path: &'a Path, text: &'a str) -> Self {
        Locator { path, text, line_starts: std::cell::OnceCell::new() }
    }

    pub fn error(&self, span: Option<Range<usize>>, message: impl Into<String>) -> ConfigError {
        let (line, col) = span.map(|s| self.line_col(s.start)).unwrap_or((1, 1));
        ConfigError::At { path: self.path.to_path_buf(), line, col, message: message.into() }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let starts = self
            .line_starts
            .get_or_init(|| std::iter::once(0).chain(self.text.match_indices('\n').map(|(i, _)| i + 1)).collect());
        let offset = offset.min(self.text.len());
        let line = starts.partition_point(|&s| s <= offset);
        let start = starts[line - 1];
        (line, self.text[start..offset].chars().count() + 1)
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
    }
}
