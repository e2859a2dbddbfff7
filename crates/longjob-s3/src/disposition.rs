//! `Content-Disposition` values for downloads (RFC 6266 with an RFC 8187 `filename*`).

/// The `Content-Disposition` value that makes a browser save the response as `file_name`:
/// `attachment; filename="<ASCII fallback>"; filename*=UTF-8''<percent-encoded name>`.
///
/// Path separators, quotes, backslashes and control characters never reach the header: they are
/// replaced in the fallback and percent-encoded in `filename*`.
///
/// ```
/// use longjob_s3::content_disposition;
/// assert_eq!(
///     content_disposition("report 2026.zip"),
///     "attachment; filename=\"report 2026.zip\"; filename*=UTF-8''report%202026.zip"
/// );
/// ```
pub fn content_disposition(file_name: &str) -> String {
    let name: String = file_name
        .chars()
        .map(|c| {
            if c.is_control() || c == '/' || c == '\\' {
                '_'
            } else {
                c
            }
        })
        .collect();
    let name = if name.trim().is_empty() {
        "download".to_owned()
    } else {
        name
    };
    let fallback: String = name
        .chars()
        .map(|c| {
            if c.is_ascii() && c != '"' && c != '%' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::with_capacity(name.len() * 3);
    for b in name.bytes() {
        // RFC 8187 attr-char
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::content_disposition;

    #[test]
    fn plain_names_pass_through() {
        assert_eq!(
            content_disposition("a.zip"),
            "attachment; filename=\"a.zip\"; filename*=UTF-8''a.zip"
        );
    }

    #[test]
    fn unicode_quotes_and_separators_are_encoded() {
        let v = content_disposition("rapport été \"final\"/../x.zip");
        assert_eq!(
            v,
            "attachment; filename=\"rapport _t_ _final__.._x.zip\"; \
             filename*=UTF-8''rapport%20%C3%A9t%C3%A9%20%22final%22_.._x.zip"
        );
        assert!(!content_disposition("a\r\nSet-Cookie: x").contains('\n'));
    }

    #[test]
    fn an_empty_name_gets_a_default() {
        assert!(content_disposition("  ").contains("filename=\"download\""));
    }
}
