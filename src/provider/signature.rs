//! The pieces every signing provider shares: HMAC over a few parts, how a signature header is
//! encoded and read, and constant-time comparison of secrets.

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Inbound, Rejection};

/// The hash under an HMAC signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Algorithm {
    Sha1,
    Sha256,
    Sha512,
}

impl Algorithm {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "sha1" => Some(Self::Sha1),
            "sha256" => Some(Self::Sha256),
            "sha512" => Some(Self::Sha512),
            _ => None,
        }
    }

    pub(crate) fn output_len(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha512 => 64,
        }
    }

    /// Whether `tag` is the HMAC of the concatenated `parts`, compared in constant time
    /// (`subtle`; a length difference is public anyway: it is the algorithm's output size).
    pub(crate) fn verify(self, key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
        self.sign(key, parts).ct_eq(tag).into()
    }

    /// The HMAC of the concatenated `parts`: parts spare copying a body to append a suffix.
    pub(crate) fn sign(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        fn run<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
            let mut mac = <M as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
            parts.iter().for_each(|p| mac.update(p));
            mac.finalize().into_bytes().to_vec()
        }
        match self {
            Self::Sha1 => run::<Hmac<sha1::Sha1>>(key, parts),
            Self::Sha256 => run::<Hmac<Sha256>>(key, parts),
            Self::Sha512 => run::<Hmac<sha2::Sha512>>(key, parts),
        }
    }
}

/// How a signature header encodes the MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Encoding {
    Hex,
    Base64,
    /// Hex when it has the hex length of the MAC, else base64 (for 360dialog, whose docs
    /// do not say). The lengths differ, so there is no ambiguity.
    HexOrBase64,
}

impl Encoding {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "hex" => Some(Self::Hex),
            "base64" => Some(Self::Base64),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Hex => "hex",
            Self::Base64 => "base64",
            Self::HexOrBase64 => "hex or base64",
        }
    }

    pub(crate) fn encode(self, mac: &[u8]) -> String {
        match self {
            Self::Base64 => B64_STD.encode(mac),
            Self::Hex | Self::HexOrBase64 => hex::encode(mac),
        }
    }

    /// Hex of either case; base64 of either alphabet, padded or not (senders differ).
    fn decode(self, value: &str, mac_len: usize) -> Option<Vec<u8>> {
        let hex_first = match self {
            Self::Hex => return hex::decode(value).ok(),
            Self::Base64 => false,
            Self::HexOrBase64 => value.len() == 2 * mac_len,
        };
        hex_first
            .then(|| hex::decode(value).ok())
            .flatten()
            .or_else(|| B64_STD.decode(value).or_else(|_| B64_URL.decode(value)).ok())
    }
}

const B64_CONFIG: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const B64_STD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, B64_CONFIG);
const B64_URL: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, B64_CONFIG);

/// What comes before the MAC, naming the algorithm (matched in any case; it carries no security).
#[derive(Clone, Copy)]
pub(crate) enum Prefix<'a> {
    None,
    /// Always sent: a value without it was not written the way the provider writes it.
    Required(&'a str),
    /// Sent by some senders and not others (360dialog documents neither).
    Optional(&'a str),
}

/// Where and how a provider puts its signature.
pub(crate) struct SignatureHeader<'a> {
    /// Header name as the provider documents it (lookups ignore case; messages show this).
    pub name: &'a str,
    pub prefix: Prefix<'a>,
    pub encoding: Encoding,
    pub algorithm: Algorithm,
}

impl SignatureHeader<'_> {
    /// The decoded MAC the request presents: 401 missing_header / bad_encoding otherwise.
    pub(crate) fn read(&self, req: &Inbound<'_>) -> Result<Vec<u8>, Rejection> {
        let value = required_header(req, self.name)?;
        let value = match self.prefix {
            Prefix::Required(p) | Prefix::Optional(p)
                if value.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p)) =>
            {
                &value[p.len()..]
            }
            Prefix::Required(p) => {
                return Err(Rejection::unauthorized(
                    "bad_encoding",
                    format!("{} does not start with {p:?}", self.name),
                ));
            }
            Prefix::Optional(_) | Prefix::None => value,
        };
        self.encoding.decode(value, self.algorithm.output_len()).ok_or_else(|| {
            Rejection::unauthorized("bad_encoding", format!("{} is not valid {}", self.name, self.encoding.name()))
        })
    }

    /// Reads the header and checks it against the HMAC of `parts` (which the message calls `what`).
    pub(crate) fn verify(&self, req: &Inbound<'_>, key: &[u8], parts: &[&[u8]], what: &str) -> Result<(), Rejection> {
        let tag = self.read(req)?;
        if self.algorithm.verify(key, parts, &tag) { Ok(()) } else { Err(self.mismatch(what)) }
    }

    pub(crate) fn mismatch(&self, what: &str) -> Rejection {
        Rejection::unauthorized("mismatch", format!("{} does not match {what}", self.name))
    }

    /// The header value a sender would put, for `sign_request`.
    pub(crate) fn sign(&self, key: &[u8], parts: &[&[u8]]) -> (String, String) {
        let mac = self.encoding.encode(&self.algorithm.sign(key, parts));
        let prefix = match self.prefix {
            Prefix::Required(p) | Prefix::Optional(p) => p,
            Prefix::None => "",
        };
        (self.name.to_owned(), format!("{prefix}{mac}"))
    }
}

/// A header's value as text: 401 missing_header when absent, bad_encoding when not visible ASCII.
pub(crate) fn required_header<'r>(req: &Inbound<'r>, name: &str) -> Result<&'r str, Rejection> {
    let value = req
        .headers
        .get(name)
        .ok_or_else(|| Rejection::unauthorized("missing_header", format!("missing {name} header")))?;
    value
        .to_str()
        .map(str::trim)
        .map_err(|_| Rejection::unauthorized("bad_encoding", format!("{name} is not valid text")))
}

/// Constant-time equality of two secrets of possibly different lengths: comparing their
/// SHA-256 digests means neither the length nor the position of a difference shows in timing.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    Sha256::digest(a).ct_eq(&Sha256::digest(b)).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_eq_handles_lengths() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(!ct_eq(b"", b"a"));
    }

    #[test]
    fn decoding_accepts_what_senders_send() {
        let mac = [0xabu8; 32];
        let hexed = hex::encode(mac);
        for enc in [Encoding::Hex, Encoding::HexOrBase64] {
            assert_eq!(enc.decode(&hexed, 32).unwrap(), mac);
            assert_eq!(enc.decode(&hexed.to_uppercase(), 32).unwrap(), mac);
        }
        let b64 = B64_STD.encode(mac);
        for enc in [Encoding::Base64, Encoding::HexOrBase64] {
            assert_eq!(enc.decode(&b64, 32).unwrap(), mac);
            assert_eq!(enc.decode(b64.trim_end_matches('='), 32).unwrap(), mac);
        }
        assert_eq!(
            Encoding::Base64.decode(&base64::engine::general_purpose::URL_SAFE.encode([0xfb; 9]), 9).unwrap(),
            [0xfb; 9]
        );
        assert!(Encoding::Hex.decode("zz", 1).is_none());
        assert!(Encoding::Base64.decode("*", 1).is_none());
    }
}
