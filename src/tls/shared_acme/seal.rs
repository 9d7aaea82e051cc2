//! Sealing the ACME keys relays keep in a shared database with the operator's
//! `[server.acme] key`: AES-256-GCM (ring), a random nonce per seal, and the row the key belongs
//! to as associated data, so a sealed key copied into another row does not open there.
//!
//! Without an operator key, keys are stored as they are (`key_id` ""): `check` warns and the
//! docs say who can read them.

use crate::secret::Secret;
use crate::store::StoredKey;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

pub struct Sealer {
    /// The AEAD key and its id (a hash of it, stored beside what it sealed).
    key: Option<(LessSafeKey, String)>,
}

impl Sealer {
    /// The operator's secret is random text (32+ characters, checked by the config): hashed to
    /// 256 bits, not stretched.
    pub fn new(secret: Option<&Secret>) -> Sealer {
        let key = secret.map(|s| {
            let derived: [u8; 32] = Sha256::new()
                .chain_update(b"whatsapp-relay acme key v1\0")
                .chain_update(s.expose().trim().as_bytes())
                .finalize()
                .into();
            let id = hex::encode(&Sha256::new().chain_update(b"key id\0").chain_update(derived).finalize()[..8]);
            let unbound = UnboundKey::new(&AES_256_GCM, &derived).expect("a 32-byte key is valid for AES-256-GCM");
            (LessSafeKey::new(unbound), id)
        });
        Sealer { key }
    }

    /// Whether keys are sealed (for the log line at start).
    pub fn sealing(&self) -> bool {
        self.key.is_some()
    }

    /// Seals `plain`, bound to `row` (what it is the key of).
    pub fn seal(&self, row: &str, plain: &[u8]) -> Result<StoredKey, String> {
        let Some((key, id)) = &self.key else {
            return Ok(StoredKey { key_id: String::new(), bytes: plain.to_vec() });
        };
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| "no randomness from the system for a nonce".to_string())?;
        let mut bytes = plain.to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(row.as_bytes()), &mut bytes)
            .map_err(|_| "sealing failed".to_string())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&bytes);
        Ok(StoredKey { key_id: id.clone(), bytes: out })
    }

    /// Opens what `seal` stored for `row`. A key stored unsealed opens with or without an
    /// operator key (it was stored before one was set); the errors say which key is missing.
    pub fn open(&self, row: &str, stored: &StoredKey) -> Result<Vec<u8>, String> {
        if stored.key_id.is_empty() {
            return Ok(stored.bytes.clone());
        }
        let Some((key, id)) = &self.key else {
            return Err(format!(
                "the {row} in the database is sealed with a [server.acme] key (id {}) and this relay has none: \
                 give it the same key as the other relays",
                stored.key_id
            ));
        };
        if *id != stored.key_id {
            return Err(format!(
                "the {row} in the database is sealed with another [server.acme] key (id {}; this relay's is {id}): \
                 give every relay the same key",
                stored.key_id
            ));
        }
        if stored.bytes.len() < NONCE_LEN {
            return Err(format!("the {row} in the database is damaged (too short)"));
        }
        let (nonce, sealed) = stored.bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| format!("the {row} has a bad nonce"))?;
        let mut buf = sealed.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(row.as_bytes()), &mut buf)
            .map_err(|_| format!("the {row} in the database does not open with this key (damaged, or moved)"))?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s.to_string())
    }

    #[test]
    fn sealed_keys_open_only_with_the_same_key_and_row() {
        let a = Sealer::new(Some(&secret("a-long-random-operator-key-of-32-characters")));
        let stored = a.seal("account key", b"pkcs8 bytes").unwrap();
        assert!(!stored.key_id.is_empty());
        assert!(!stored.bytes.windows(5).any(|w| w == b"pkcs8"), "the key is not stored in the clear");
        assert_eq!(a.open("account key", &stored).unwrap(), b"pkcs8 bytes");
        assert!(a.open("certificate key", &stored).unwrap_err().contains("does not open"));
        let b = Sealer::new(Some(&secret("another-long-random-operator-key-of-32-chars")));
        assert!(b.open("account key", &stored).unwrap_err().contains("another [server.acme] key"));
        let none = Sealer::new(None);
        assert!(none.open("account key", &stored).unwrap_err().contains("this relay has none"));
        let plain = none.seal("account key", b"pkcs8").unwrap();
        assert_eq!((plain.key_id.as_str(), plain.bytes.as_slice()), ("", &b"pkcs8"[..]));
        assert_eq!(a.open("account key", &plain).unwrap(), b"pkcs8");
    }
}
