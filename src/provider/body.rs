//! Reading request bodies the way providers write them: forms, `multipart/form-data` (what
//! `curl --form` sends, as in Kaleyra's examples) and the media type of a `Content-Type`.

use std::collections::HashMap;

/// Whether a Content-Type names a form body (parameters like `charset` ignored).
pub(crate) fn is_form(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/x-www-form-urlencoded")
    })
}

/// The lower-cased media type of a `Content-Type` ("" when absent).
pub(crate) fn media_type(content_type: Option<&str>) -> String {
    content_type.unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// The text fields of a form or `multipart/form-data` body (an absent Content-Type is read as a
/// form); None for any other type.
pub(crate) fn fields(content_type: Option<&str>, body: &[u8]) -> Option<HashMap<String, String>> {
    match media_type(content_type).as_str() {
        "application/x-www-form-urlencoded" | "" => Some(form_urlencoded::parse(body).into_owned().collect()),
        "multipart/form-data" => multipart_fields(content_type?, body),
        _ => None,
    }
}

/// The text fields of a `multipart/form-data` body (what `curl --form` sends, as in Kaleyra's
/// examples). Only names and values are read; file parts are skipped by their `filename`.
fn multipart_fields(content_type: &str, body: &[u8]) -> Option<HashMap<String, String>> {
    let boundary = content_type.split(';').find_map(|p| p.trim().strip_prefix("boundary="))?.trim_matches('"');
    let delim = format!("--{boundary}");
    let text = String::from_utf8_lossy(body);
    let mut out = HashMap::new();
    for part in text.split(delim.as_str()).skip(1) {
        let Some((head, value)) = part.split_once("\r\n\r\n") else { continue };
        let disp = head.lines().find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))?;
        if disp.contains("filename=") {
            continue;
        }
        let Some(name) = disp.split(';').find_map(|p| p.trim().strip_prefix("name=")) else { continue };
        out.insert(name.trim_matches('"').to_string(), value.strip_suffix("\r\n").unwrap_or(value).to_string());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_multipart() {
        assert!(is_form(Some("Application/X-WWW-Form-Urlencoded; charset=utf-8")));
        assert!(!is_form(Some("application/json")) && !is_form(None));
        let mp = "multipart/form-data; boundary=XyZ";
        let body = "--XyZ\r\nContent-Disposition: form-data; name=\"to\"\r\n\r\n+1650\r\n--XyZ\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a\"\r\n\r\nx\r\n--XyZ--\r\n";
        let f = fields(Some(mp), body.as_bytes()).unwrap();
        assert_eq!(f.get("to").map(String::as_str), Some("+1650"));
        assert!(!f.contains_key("f"), "file parts are skipped");
        assert_eq!(fields(None, b"a=1").unwrap()["a"], "1");
        assert_eq!(fields(Some("application/json"), b"{}"), None);
    }
}
