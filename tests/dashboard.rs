//! `docs/grafana-dashboard.json` and `docs/alerts.yml` against the relay itself: every metric a
//! query names must be one the real binary exports on `/metrics`, and the alert rules (and the
//! dashboard's queries) must pass `promtool check rules`.
//!
//! No YAML or PromQL crate: the alert file is read by a line scan of its `expr:` values, and
//! metric names are picked out of each query by a small tokenizer that skips strings, label
//! matchers, ranges, grouping label lists, functions and keywords.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use support::*;

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana-dashboard.json");
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/alerts.yml");

/// Series a query may name although the relay does not export them.
const EXTERNAL: &[&str] = &[
    // Prometheus's own per-target series: 1 when the last scrape of the relay succeeded.
    "up",
];

/// Metrics the dashboard and the alerts use before the relay exports them; until then their
/// panels stay empty and their alerts silent. The change that exports one of them MUST remove
/// it from this list: the test fails while a listed name is exported, so the list cannot go
/// stale, and from then on the name is checked like every other.
const NOT_YET_EXPORTED: &[&str] = &[];

/// PromQL words that are not metric names (binary operators, modifiers, literals).
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
];

/// Aggregation operators: followed by `(` or by a `by`/`without` clause, never metric names.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// The index just past the group that opens at `b[start]` (`{…}`, `[…]`, `(…)`), skipping
/// quoted strings inside it.
fn skip_group(b: &[u8], start: usize, open: u8, close: u8) -> usize {
    let mut depth = 0usize;
    let mut i = start;
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'' | b'`') => {
                i = skip_string(b, i, q);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    b.len()
}

/// The index just past the string literal that opens at `b[start]`.
fn skip_string(b: &[u8], start: usize, quote: u8) -> usize {
    let mut i = start + 1;
    while i < b.len() && b[i] != quote {
        if b[i] == b'\\' && quote != b'`' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// The metric names a PromQL expression selects.
fn metric_names(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if matches!(c, b'"' | b'\'' | b'`') {
            i = skip_string(b, i, c);
        } else if c == b'{' {
            i = skip_group(b, i, b'{', b'}');
        } else if c == b'[' {
            i = skip_group(b, i, b'[', b']');
        } else if c == b'#' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'$' {
            // A Grafana variable outside a matcher or range.
            i += 1;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            // A number or a duration: 0.99, 1e3, 0x1f, 5m, 1h30m.
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let mut next = i;
            while next < b.len() && b[next].is_ascii_whitespace() {
                next += 1;
            }
            let followed_by_paren = b.get(next) == Some(&b'(');
            let lower = word.to_ascii_lowercase();
            if KEYWORDS.contains(&lower.as_str()) {
                if LABEL_LISTS.contains(&lower.as_str()) && followed_by_paren {
                    i = skip_group(b, next, b'(', b')');
                }
            } else if !followed_by_paren && !AGGREGATIONS.contains(&lower.as_str()) {
                out.push(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The metric a Grafana variable query reads: `label_values(METRIC{…}, label)` or
/// `query_result(EXPR)`; nothing for `label_values(label)`, `label_names()`, `metrics(…)`.
fn variable_query_names(query: &str) -> Vec<String> {
    let q = query.trim();
    let inner = |prefix: &str| q.strip_prefix(prefix).and_then(|r| r.strip_suffix(')'));
    if let Some(args) = inner("label_values(") {
        // Split at the last top-level comma: the label name follows it.
        let (mut depth, mut split) = (0i32, None);
        for (i, c) in args.char_indices() {
            match c {
                '(' | '{' | '[' => depth += 1,
                ')' | '}' | ']' => depth -= 1,
                ',' if depth == 0 => split = Some(i),
                _ => {}
            }
        }
        return split.map_or_else(Vec::new, |i| metric_names(&args[..i]));
    }
    if let Some(expr) = inner("query_result(") {
        return metric_names(expr);
    }
    Vec::new()
}

/// Every query of the dashboard: panel targets' `expr`, and the template variables' queries.
fn dashboard_queries(dashboard: &serde_json::Value) -> (Vec<String>, Vec<String>) {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(&dashboard["panels"], &mut exprs);
    let mut variables = Vec::new();
    for var in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        let query = match &var["query"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("query").and_then(|q| q.as_str()).map(str::to_string),
            _ => None,
        };
        variables.extend(query.or_else(|| var["definition"].as_str().map(str::to_string)));
    }
    (exprs, variables)
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The `expr:` values of a Prometheus rule file: plain, quoted, or block scalars (`|`, `>`).
fn alert_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let key = line.trim_start().trim_start_matches("- ");
        i += 1;
        let Some(value) = key.strip_prefix("expr:") else { continue };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let indent = indent_of(line);
            let mut block = Vec::new();
            while i < lines.len() && (lines[i].trim().is_empty() || indent_of(lines[i]) > indent) {
                block.push(lines[i].trim());
                i += 1;
            }
            out.push(block.join("\n"));
        } else if let Some(v) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            out.push(v.replace("\\\"", "\"").replace("\\\\", "\\"));
        } else if let Some(v) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            out.push(v.replace("''", "'"));
        } else {
            out.push(value.to_string());
        }
    }
    out
}

/// The series names `/metrics` can serve: `# TYPE` lines (a counter's samples end in `_total`, a
/// histogram's in `_bucket`, `_sum`, `_count`), so families with no sample yet count, plus the
/// names of the samples themselves.
fn exported(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else { continue };
            match kind {
                "counter" => {
                    names.insert(format!("{}_total", name.trim_end_matches("_total")));
                }
                "histogram" | "gaugehistogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                "summary" => {
                    for suffix in ["", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                "info" => {
                    names.insert(format!("{name}_info"));
                }
                _ => {
                    names.insert(name.to_string());
                }
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// Every metric name the dashboard and the alerts use, with where each was found.
fn used_names() -> Vec<(String, String)> {
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap())
        .expect("docs/grafana-dashboard.json is JSON");
    let (exprs, variables) = dashboard_queries(&dashboard);
    assert!(exprs.len() >= 20, "only {} panel queries found in the dashboard", exprs.len());
    let yaml = std::fs::read_to_string(ALERTS).unwrap();
    let alerts = alert_exprs(&yaml);
    let rules = yaml.lines().filter(|l| {
        let l = l.trim_start();
        l.starts_with("- alert:") || l.starts_with("- record:")
    });
    assert_eq!(
        alerts.len(),
        rules.count(),
        "every rule in docs/alerts.yml should have exactly one expr the scan found"
    );

    let mut used = Vec::new();
    for e in &exprs {
        used.extend(metric_names(e).into_iter().map(|n| (n, format!("dashboard: {e}"))));
    }
    for q in &variables {
        used.extend(variable_query_names(q).into_iter().map(|n| (n, format!("dashboard variable: {q}"))));
    }
    for e in &alerts {
        used.extend(metric_names(e).into_iter().map(|n| (n, format!("alerts.yml: {e}"))));
    }
    used
}

#[test]
fn the_query_scanner_finds_metric_names_only() {
    let names = |e: &str| metric_names(e);
    assert_eq!(
        names(r#"sum by (le, motion) (rate(a_bucket{job=~"$job", x="}by(y)"}[$__rate_interval])) / on (motion) b"#),
        ["a_bucket", "b"]
    );
    assert_eq!(names(r#"absent(up{job="whatsapp-relay"})"#), ["up"]);
    assert_eq!(names("count by (job) (count by (job, version) (m_info))"), ["m_info"]);
    assert_eq!(names("x > 0\n  and\nx - time() < 14 * 86400 and y offset 5m > bool 1e3"), ["x", "x", "y"]);
    assert_eq!(names("histogram_quantile(0.99, sum(rate(h_bucket[5m])) by (le))"), ["h_bucket"]);
    assert_eq!(variable_query_names(r#"label_values(q{job=~"$job"}, motion)"#), ["q"]);
    assert_eq!(variable_query_names("label_values(job)"), Vec::<String>::new());

    let yaml = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: a_total > 0\n        for: 1m\n      \
                - alert: B\n        expr: |\n          sum(b)\n            /\n          sum(c)\n        labels: {}\n      \
                - record: r\n        expr: \"d{x=\\\"y\\\"}\"\n";
    assert_eq!(alert_exprs(yaml), ["a_total > 0", "sum(b)\n/\nsum(c)", "d{x=\"y\"}"]);

    let text = "# HELP r_requests Requests.\n# TYPE r_requests counter\n# TYPE r_lat histogram\n\
                r_lat_bucket{le=\"1\"} 0\n# TYPE r_depth gauge\n# EOF\n";
    let set = exported(text);
    for n in ["r_requests_total", "r_lat_bucket", "r_lat_sum", "r_lat_count", "r_depth"] {
        assert!(set.contains(n), "{n} in {set:?}");
    }
    assert!(!set.contains("r_requests"), "a counter's series end in _total");
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_use_is_exported() {
    let relay = RelayProcess::start(
        r#"
[server]
http = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[storage]
path = "{DATA}"

[[motion]]
name = "acme"
url = "http://127.0.0.1:9"
  [[motion.account]]
  id = "1"
  provider = "kaleyra"
  shared_token = "dashboard-test-token"
"#,
    );
    let reply = get(&relay.admin_url("/metrics")).await;
    assert_eq!(reply.status, 200);
    let text = String::from_utf8_lossy(&reply.body).to_string();

    // A fresh relay has moved nothing to the dead letters, yet the family is described: a query
    // over a metric that has no sample yet still finds its name on /metrics.
    assert!(text.contains("# HELP whatsapp_relay_dead_letters "), "{text}");
    assert!(text.contains("# TYPE whatsapp_relay_dead_letters counter"), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("whatsapp_relay_dead_letters_total")), "{text}");

    let exported = exported(&text);
    let used = used_names();
    let mut problems = BTreeSet::new();
    for (name, place) in &used {
        if EXTERNAL.contains(&name.as_str()) {
            continue;
        }
        if NOT_YET_EXPORTED.contains(&name.as_str()) {
            if exported.contains(name) {
                problems
                    .insert(format!("{name} is exported now: remove it from NOT_YET_EXPORTED in tests/dashboard.rs"));
            }
            continue;
        }
        if !name.starts_with("whatsapp_relay_") {
            problems.insert(format!("{name} is not one of the relay's metrics (used in {place})"));
        } else if !exported.contains(name) {
            problems.insert(format!("{name} is not on the relay's /metrics (used in {place})"));
        }
    }
    let distinct: BTreeSet<&str> = used.iter().map(|(n, _)| n.as_str()).collect();
    eprintln!("dashboard and alerts use {} metrics: {distinct:?}", distinct.len());
    assert!(distinct.len() >= 15, "suspiciously few metric names found: {distinct:?}");
    assert!(problems.is_empty(), "{}\n\n/metrics:\n{text}", problems.into_iter().collect::<Vec<_>>().join("\n"));
}

/// Grafana's variables replaced by values PromQL accepts, so promtool can parse the query.
fn substitute_grafana_variables(expr: &str) -> String {
    let mut s = expr.to_string();
    for v in ["$__rate_interval", "$__interval", "$__range"] {
        s = s.replace(v, "5m");
    }
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' {
            while chars.peek().is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_') {
                chars.next();
            }
            out.push_str(".*");
        } else {
            out.push(c);
        }
    }
    out
}

fn promtool_check_rules(path: &std::path::Path) {
    let out = Command::new("promtool").arg("check").arg("rules").arg(path).output().expect("run promtool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("promtool check rules {}:\n{text}", path.display());
    assert!(out.status.success(), "promtool check rules {} failed:\n{text}", path.display());
}

#[test]
fn alert_rules_and_dashboard_queries_pass_promtool() {
    let found = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("\n{}\nSKIPPED: promtool missing (apt-get install prometheus)\n{}\n", "!".repeat(72), "!".repeat(72));
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "promtool missing (apt-get install prometheus): docs/alerts.yml cannot be checked in CI"
        );
        return;
    }
    promtool_check_rules(std::path::Path::new(ALERTS));

    // The dashboard's queries, as recording rules, so promtool parses each one.
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let (exprs, _) = dashboard_queries(&dashboard);
    let mut rules = String::from("groups:\n  - name: grafana-dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let quoted = serde_json::to_string(&substitute_grafana_variables(e)).unwrap();
        rules.push_str(&format!("      - record: dashboard_query_{i}\n        expr: {quoted}\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-queries.yml");
    std::fs::write(&path, rules).unwrap();
    promtool_check_rules(&path);
}
