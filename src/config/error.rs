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

/// Collects the position of a byte span in the source text.
pub(crate) struct Locator<'a> {
    pub path: &'a Path,
    pub text: &'a str,
    /// Byte offsets where lines start, built on first use: a file with 100,000 accounts and
    /// inline secrets has as many warnings, and scanning the text from the top for each was
    /// quadratic (minutes).
    line_starts: std::cell::OnceCell<Vec<usize>>,
}

impl<'a> Locator<'a> {
    pub fn new(path: &'a Path, text: &'a str) -> Locator<'a> {
        Locator { path, text, line_starts: std::cell::OnceCell::new() }
    }

    pub fn error(&self, span: Option<Range<usize>>, message: impl Into<String>) -> ConfigError {
        let (line, col) = span.map(|s| self.line_col(s.start)).unwrap_or((1, 1));
        ConfigError::At { path: self.path.to_path_buf(), line, col, message: message.into() }
    }

    /// Same as [`line_col`], in O(log lines) once the index is built.
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

/// 1-based line and column (in characters) of a byte offset: the plain definition, which
/// [`Locator::line_col`] is tested against.
#[cfg(test)]
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn line_col() {
        let t = "a = 1\nbb = 2\n";
        assert_eq!(super::line_col(t, 0), (1, 1));
        assert_eq!(super::line_col(t, 6), (2, 1));
        assert_eq!(super::line_col(t, 11), (2, 6));
        let loc = super::Locator::new(std::path::Path::new("x"), t);
        for offset in 0..=t.len() + 2 {
            assert_eq!(loc.line_col(offset), super::line_col(t, offset), "offset {offset}");
        }
    }
}
