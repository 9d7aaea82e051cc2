//! A secret's value in memory. Its `Debug` never shows the value, so it cannot leak into logs.
//! Where secrets come from (`env:`, `file:`, `cred:`) is the config's business (`config::secret`).

use std::fmt;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value.into_boxed_str())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}
