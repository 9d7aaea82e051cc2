//! The split of a Meta app's batch, routed by the fixed configuration of [`super::routing`].

use crate::meta_app::{Dest, route};

/// The input is the body of a `POST /meta/main`.
pub fn meta_app(data: &[u8]) {
    let app = super::routing::table().app("main").expect("the fuzz config has the app");
    let Ok(routed) = route(app, data) else { return };
    assert!(data.trim_ascii_start().starts_with(b"{"), "a batch that is not a JSON object routes");
    let changes_in = changes(data).expect("a batch that routes has entries and changes");
    if changes_in == 0 {
        assert!(routed.parts.is_empty(), "a batch without changes goes nowhere");
        return;
    }
    assert!(!routed.parts.is_empty(), "{changes_in} changes went nowhere");
    let mut changes_out = 0;
    for (i, (dest, part)) in routed.parts.iter().enumerate() {
        assert!(!routed.parts[..i].iter().any(|(d, _)| d.same(dest)), "one destination, two parts");
        let Some(part) = part else {
            // Forwarded as it came (with Meta's signature): only when all of it is one account's.
            assert!(routed.parts.len() == 1 && matches!(dest, Dest::Account(_)), "the whole batch went to a part");
            changes_out += changes_in;
            continue;
        };
        // Split parts are rebuilt from the changes as they came, which serde checked: valid JSON
        // (by its grammar: a number beyond f64, as Meta's `time` could be, passes through as is).
        let json = serde_json::from_str::<serde::de::IgnoredAny>(part).is_ok();
        assert!(json, "a split part is not JSON: {part}");
        changes_out += changes(part.as_bytes()).expect("a split part has entries and changes");
        // A part routes back to where it was sent, whole; splitting it again changes nothing.
        let again = route(app, part.as_bytes()).expect("a split part routes");
        match (dest, again.parts.as_slice()) {
            (Dest::Account(_), [(d, None)]) if d.same(dest) => {}
            (Dest::Unknown(_), [(d, Some(p))]) if d.same(dest) => assert_eq!(p, part, "splitting is not idempotent"),
            _ => panic!("a part for one destination routes elsewhere: {part}"),
        }
    }
    // Every change goes somewhere: once, or to each Motion of an account-level change's WABA.
    assert!(changes_out >= changes_in, "{changes_in} changes in, {changes_out} out");
}

/// How many `entry[].changes[]` a batch holds, read as [`route`] reads it: the same fields in
/// the same order (serde also reads a struct from an array, field by field), and the fields it
/// does not need skipped unchecked, invalid UTF-8 in a string included, so a batch that routes
/// need not be valid JSON.
fn changes(body: &[u8]) -> Option<usize> {
    use serde::de::IgnoredAny;
    #[derive(serde::Deserialize)]
    struct Batch {
        #[allow(dead_code)]
        object: Option<IgnoredAny>,
        #[serde(default)]
        entry: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[allow(dead_code)]
        id: Option<IgnoredAny>,
        #[allow(dead_code)]
        time: Option<IgnoredAny>,
        #[serde(default)]
        changes: Vec<IgnoredAny>,
    }
    let batch: Batch = serde_json::from_slice(body).ok()?;
    Some(batch.entry.iter().map(|e| e.changes.len()).sum())
}
