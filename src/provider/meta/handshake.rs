//! Meta's GET verification handshake, which any account carrying a `verify_token` answers.

use super::super::{Rejection, ct_eq};

/// Meta's GET verification handshake (`hub.mode=subscribe&hub.verify_token=...&hub.challenge=...`).
/// None when the query is not a subscribe handshake; Some(Ok(challenge)) when verify_token matches
/// (constant-time); Some(Err(403)) otherwise, also when the account has no (or an empty)
/// verify_token. The challenge is the provider's opaque string (empty if absent): serve it as
/// text/plain.
pub fn meta_handshake(query: Option<&str>, verify_token: Option<&str>) -> Option<Result<String, Rejection>> {
    let (mut mode, mut token, mut challenge) = (None, None, None);
    for (k, v) in form_urlencoded::parse(query?.as_bytes()) {
        match &*k {
            "hub.mode" => mode = Some(v),
            "hub.verify_token" => token = Some(v),
            "hub.challenge" => challenge = Some(v),
            _ => {}
        }
    }
    if mode.as_deref() != Some("subscribe") {
        return None;
    }
    let Some(token) = token else {
        return Some(Err(Rejection::forbidden("missing_token", "missing hub.verify_token")));
    };
    Some(match verify_token.filter(|t| !t.is_empty()) {
        Some(expected) if ct_eq(token.as_bytes(), expected.as_bytes()) => {
            Ok(challenge.map(|c| c.into_owned()).unwrap_or_default())
        }
        _ => Err(Rejection::forbidden("bad_token", "hub.verify_token does not match")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_handshake_cases() {
        let q = |s| Some(s);
        assert_eq!(meta_handshake(None, Some("v")), None);
        assert_eq!(meta_handshake(q("foo=bar"), Some("v")), None);
        assert_eq!(meta_handshake(q("hub.mode=unsubscribe&hub.verify_token=v"), Some("v")), None);
        assert_eq!(
            meta_handshake(q("hub.mode=subscribe&hub.verify_token=v%20t&hub.challenge=1158201444"), Some("v t")),
            Some(Ok("1158201444".into()))
        );
        let refused = |r: Option<Result<String, Rejection>>| r.unwrap().unwrap_err();
        let e = refused(meta_handshake(q("hub.mode=subscribe&hub.verify_token=w&hub.challenge=1"), Some("v")));
        assert_eq!((e.status, e.reason), (403, "bad_token"));
        let e = refused(meta_handshake(q("hub.mode=subscribe&hub.verify_token=v&hub.challenge=1"), None));
        assert_eq!((e.status, e.reason), (403, "bad_token"));
        let empty = q("hub.mode=subscribe&hub.verify_token=&hub.challenge=1");
        let e = refused(meta_handshake(empty, Some("")));
        assert_eq!((e.status, e.reason), (403, "bad_token"));
        let e = refused(meta_handshake(q("hub.mode=subscribe&hub.challenge=1"), Some("v")));
        assert_eq!((e.status, e.reason), (403, "missing_token"));
    }
}
