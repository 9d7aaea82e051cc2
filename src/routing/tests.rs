use super::*;

fn table() -> RouteTable {
    let text = r#"
[delivery]
mode = "direct"

[[motion]]
name = "acme"
url = "http://127.0.0.1:9000"
hosts = ["acme.chat.example.com"]
  [[motion.account]]
  id = "12"
  provider = "kaleyra"
  shared_token = "t"

[[motion]]
name = "globex"
url = "http://127.0.0.1:9001"
  [[motion.account]]
  id = "7"
  provider = "kaleyra"
  shared_token = "t"
"#;
    let config = crate::config::parse(std::path::Path::new("t.toml"), text).unwrap();
    RouteTable::build(&config, &Upstream::new()).unwrap()
}

/// `(motion, account, forwarded path)` of an inbound route.
fn inbound(t: &RouteTable, host: Option<&str>, path: &str) -> Option<(String, String, String)> {
    match t.lookup(host, path)? {
        Route::Inbound { motion, account, forward_at, .. } => {
            Some((motion.motion.name.clone(), account.id.clone(), path[forward_at..].to_string()))
        }
        _ => None,
    }
}

#[test]
fn prefix_routes() {
    let t = table();
    let r = inbound(&t, None, "/acme/api/whatsapp/accounts/12/notify").unwrap();
    assert_eq!(r, ("acme".into(), "12".into(), "/api/whatsapp/accounts/12/notify".into()));
    assert_eq!(inbound(&t, None, "/globex/api/whatsapp/accounts/7").unwrap().1, "7");
    // Percent-encoded ids decode once.
    assert_eq!(inbound(&t, None, "/acme/api/whatsapp/accounts/%31%32/notify").unwrap().1, "12");
}

#[test]
fn host_routes() {
    let t = table();
    let r = inbound(&t, Some("ACME.chat.example.com:443"), "/api/whatsapp/accounts/12/notify").unwrap();
    assert_eq!(r.0, "acme");
    assert_eq!(r.2, "/api/whatsapp/accounts/12/notify");
    // On its own host a Motion does not see another's accounts.
    assert!(inbound(&t, Some("acme.chat.example.com"), "/api/whatsapp/accounts/7/notify").is_none());
    assert!(inbound(&t, Some("acme.chat.example.com"), "/globex/api/whatsapp/accounts/7/notify").is_none());
}

#[test]
fn isolation_between_motions() {
    let t = table();
    assert!(inbound(&t, None, "/acme/api/whatsapp/accounts/7/notify").is_none());
    assert!(inbound(&t, None, "/globex/api/whatsapp/accounts/12/notify").is_none());
}

#[test]
fn only_account_subtrees_are_routed() {
    let t = table();
    for p in [
        "/",
        "/acme",
        "/acme/",
        "/acme/api",
        "/acme/api/whatsapp/accounts",
        "/acme/api/whatsapp/accounts/99/notify",
        "/acme/api/users",
        "/acme/admin",
        "/nobody/api/whatsapp/accounts/12/notify",
        "acme/api/whatsapp/accounts/12",
    ] {
        assert!(t.lookup(None, p).is_none(), "{p} should be 404");
    }
    assert!(matches!(t.lookup(None, "/healthz"), Some(Route::Health)));
    assert!(t.lookup(None, "/healthz/x").is_none());
}

#[test]
fn traversal_never_leaves_the_subtree() {
    let t = table();
    for p in [
        "/acme/api/whatsapp/accounts/12/../../../users",
        "/acme/api/whatsapp/accounts/12/..",
        "/acme/api/whatsapp/accounts/12/./notify",
        "/acme/api/whatsapp/accounts/12/%2e%2e/x",
        "/acme/api/whatsapp/accounts/12/%2E%2E/x",
        "/acme/api/whatsapp/accounts/12/.%2e/x",
        "/acme/api/whatsapp/accounts/12%2f..%2f7/notify",
        "/acme/api/whatsapp/accounts/12/a%2fb",
        "/acme/api/whatsapp/accounts/12/a%5c..%5cb",
        "/acme/api/whatsapp/accounts/12/a%00b",
        "/acme/api/whatsapp/accounts/%2e%2e/7/notify",
        "/acme/api/whatsapp/accounts/12/%ff",
    ] {
        assert!(t.lookup(None, p).is_none(), "{p} must not route");
    }
    // Double encoding decodes once only: `%252e%252e` is the literal segment "%2e%2e", which stays inside.
    let r = inbound(&t, None, "/acme/api/whatsapp/accounts/12/%252e%252e").unwrap();
    assert_eq!(r.2, "/api/whatsapp/accounts/12/%252e%252e");
}

#[test]
fn outbound_and_meta_routes() {
    let t = table();
    match t.lookup(None, "/acme/outbound/12/2010-04-01/Accounts/AC1/Messages.json") {
        Some(Route::Outbound { account, rest_at, .. }) => {
            assert_eq!(account.id, "12");
            assert_eq!(
                &"/acme/outbound/12/2010-04-01/Accounts/AC1/Messages.json"[rest_at..],
                "/2010-04-01/Accounts/AC1/Messages.json"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(t.lookup(None, "/acme/outbound/7/x").is_none());
    assert!(matches!(t.lookup(None, "/meta/main"), Some(Route::MetaApp { app }) if app == "main"));
}
