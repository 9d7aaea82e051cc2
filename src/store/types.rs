//! Closed sets that are stored: why an event became a dead letter ([`DeadReason`]) and where an
//! event no account owns came from ([`Unowned`]). Typed, so nothing parses text back; their
//! `Display` is what operators read (the admin API, the log).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// Why an event is a dead letter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeadReason {
    /// Motion answered with a status that means "never" (a 4xx other than 408/429).
    Refused { status: u16 },
    /// Motion did not take it within `give_up_after` of its acceptance (or replay).
    GaveUp { attempts: u32, after_secs: u64, last: String },
    /// Its Motion left the configuration and did not come back within `give_up_after`.
    MotionRemoved { motion: String },
    /// A Meta app's change for a number no account claims.
    NoAccount,
    /// A reason recorded by a version of the relay that stored it as text.
    Recorded(String),
}

impl DeadReason {
    /// Every value of [`label`](Self::label), for reading the counters back.
    pub const LABELS: [&'static str; 4] = ["refused", "gave_up", "no_account", "recorded"];

    /// The metric label (`whatsapp_relay_dead_letters_total{reason}`): a bounded set.
    pub fn label(&self) -> &'static str {
        match self {
            DeadReason::Refused { .. } => "refused",
            DeadReason::GaveUp { .. } | DeadReason::MotionRemoved { .. } => "gave_up",
            DeadReason::NoAccount => "no_account",
            DeadReason::Recorded(_) => "recorded",
        }
    }

    /// A reason read from a format-1 store, where it was text: the known spellings become their
    /// variant again (what a replay or a metric needs), anything else is kept as it was.
    pub(super) fn from_text(text: String) -> DeadReason {
        if let Some(status) = text.strip_prefix("Motion refused the event with HTTP ").and_then(|s| s.parse().ok()) {
            return DeadReason::Refused { status };
        }
        if text == "no account claims this number" {
            return DeadReason::NoAccount;
        }
        DeadReason::Recorded(text)
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadReason::Refused { status } => write!(f, "Motion refused the event with HTTP {status}"),
            DeadReason::GaveUp { attempts, after_secs, last } => write!(
                f,
                "gave up after {attempts} attempts over {:?} (last: {last})",
                Duration::from_secs(*after_secs)
            ),
            DeadReason::MotionRemoved { motion } => write!(f, "gave up: motion {motion} is no longer configured"),
            DeadReason::NoAccount => f.write_str("no account claims this number"),
            DeadReason::Recorded(text) => f.write_str(text),
        }
    }
}

/// Where an event no account owns came from: a Meta app's change, by the number or business
/// account it named.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unowned {
    pub app: String,
    pub key: UnownedKey,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnownedKey {
    /// `value.metadata.phone_number_id` of a change.
    PhoneNumberId(String),
    /// `entry[].id` of an account-level change.
    WabaId(String),
}

impl Unowned {
    /// A format-1 note (`meta_app=NAME phone_number_id=ID` or `... waba_id=ID`).
    pub(super) fn from_note(note: &str) -> Option<Unowned> {
        let mut fields = note.split(' ').filter_map(|f| f.split_once('='));
        let (Some(("meta_app", app)), Some((kind, id))) = (fields.next(), fields.next()) else { return None };
        let key = match kind {
            "phone_number_id" => UnownedKey::PhoneNumberId(id.into()),
            "waba_id" => UnownedKey::WabaId(id.into()),
            _ => return None,
        };
        Some(Unowned { app: app.into(), key })
    }
}

/// As the admin API's `note` shows it (and format 1 stored it).
impl fmt::Display for Unowned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            UnownedKey::PhoneNumberId(id) => write!(f, "meta_app={} phone_number_id={id}", self.app),
            UnownedKey::WabaId(id) => write!(f, "meta_app={} waba_id={id}", self.app),
        }
    }
}

/// An HTTP method stored as its name (the bytes format 1 stored as a string).
pub(super) mod method {
    use http::Method;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &Method, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(m.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Method, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Method::from_bytes(name.as_bytes()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_back_from_text_and_print_as_before() {
        for r in [DeadReason::Refused { status: 400 }, DeadReason::NoAccount] {
            assert_eq!(DeadReason::from_text(r.to_string()), r);
        }
        let gave_up = DeadReason::GaveUp { attempts: 7, after_secs: 86_400, last: "HTTP 503".into() };
        assert_eq!(gave_up.to_string(), "gave up after 7 attempts over 86400s (last: HTTP 503)");
        assert_eq!(DeadReason::from_text(gave_up.to_string()), DeadReason::Recorded(gave_up.to_string()));
        assert_eq!(gave_up.label(), "gave_up");
        let all = [
            DeadReason::Refused { status: 400 },
            gave_up,
            DeadReason::MotionRemoved { motion: "m".into() },
            DeadReason::NoAccount,
            DeadReason::Recorded("x".into()),
        ];
        assert!(all.iter().all(|r| DeadReason::LABELS.contains(&r.label())), "LABELS lists every label");
    }

    #[test]
    fn notes_read_back() {
        for u in [
            Unowned { app: "main".into(), key: UnownedKey::PhoneNumberId("106".into()) },
            Unowned { app: "main".into(), key: UnownedKey::WabaId("55".into()) },
        ] {
            assert_eq!(Unowned::from_note(&u.to_string()), Some(u));
        }
        assert_eq!(Unowned::from_note(""), None);
        assert_eq!(Unowned::from_note("meta_app=x other=1"), None);
    }
}
