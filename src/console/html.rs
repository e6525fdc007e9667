//! HTML for the console's pages: the one escape function every user-supplied string goes
//! through, the page frame, times, charts, and the one renderer of a usage row (where a
//! cost column is added once prices exist).

use std::fmt::{self, Display, Write as _};

use crate::core::admin::UsageRow;

/// `text` escaped for HTML text and quoted attribute values: `&`, `<`, `>`, `"` and `'`.
/// Every string that did not come from this file goes through it.
pub struct Esc<'a>(pub &'a str);

impl Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..at])?;
            f.write_str(match rest.as_bytes()[at] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[at + 1..];
        }
        f.write_str(rest)
    }
}

/// Shorthand for [`Esc`].
pub fn esc(text: &str) -> Esc<'_> {
    Esc(text)
}

/// `value` for a query string (a link's `href`), then escaped by the caller as any text.
pub fn query_value(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// Which navigation a page shows.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    None,
    Admin(&'static str),
    Holder,
}

const ADMIN_LINKS: [(&str, &str); 8] = [
    ("overview", "Overview"),
    ("users", "Users"),
    ("keys", "Keys"),
    ("usage", "Usage"),
    ("calls", "Call log"),
    ("models", "Models & prices"),
    ("alerts", "Alerts"),
    ("audit", "Audit log"),
];

/// A whole page: `body` is HTML already escaped where needed. `csrf` is the session's
/// token, for the sign-out form.
pub fn page(title: &str, nav: Nav, csrf: Option<&str>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 2048);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · step3-gateway console</title>\
         <link rel=\"stylesheet\" href=\"/console/assets/console.css\">\
         <script src=\"/console/assets/console.js\" defer></script></head><body>\
         <header><a class=\"brand\" href=\"/console\">step3-gateway</a>",
        esc(title)
    );
    match nav {
        Nav::None => {}
        Nav::Admin(current) => {
            out.push_str("<nav aria-label=\"Console\"><ul>");
            for (slug, label) in ADMIN_LINKS {
                let here = if slug == current {
                    " aria-current=\"page\""
                } else {
                    ""
                };
                let _ = write!(
                    out,
                    "<li><a href=\"/console/{slug}\"{here}>{label}</a></li>"
                );
            }
            out.push_str("</ul></nav>");
        }
        Nav::Holder => out.push_str(
            "<nav aria-label=\"Console\"><ul><li><a href=\"/console/me\" aria-current=\"page\">My key</a></li></ul></nav>",
        ),
    }
    if let Some(csrf) = csrf {
        let _ = write!(
            out,
            "<form method=\"post\" action=\"/console/sign-out\" class=\"sign-out\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button type=\"submit\">Sign out</button></form>",
            esc(csrf)
        );
    }
    let _ = write!(
        out,
        "</header><main><h1>{}</h1>{body}</main></body></html>",
        esc(title)
    );
    out
}

/// The hidden CSRF field every changing form carries.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(csrf)
    )
}

/// Seconds since the epoch as `2026-12-05 07:01:16 UTC`.
pub fn time(secs: i64) -> String {
    let at =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    let text = humantime::format_rfc3339_seconds(at).to_string();
    format!("{} UTC", text.trim_end_matches('Z').replacen('T', " ", 1))
}

/// An optional limit: the number, or "none".
pub fn limit(value: Option<u64>) -> String {
    value.map_or_else(|| "none".to_owned(), |v| v.to_string())
}

/// Columns of a usage row, in the order of [`usage_cells`].
pub const USAGE_HEADERS: [&str; 9] = [
    "Period",
    "Model",
    "Version",
    "Requests",
    "Errors",
    "Prompt tokens",
    "Completion tokens",
    "Images",
    "Cost",
];

/// The one rendering of a usage row, in the table and (as text) in the CSV export.
pub fn usage_cells(row: &UsageRow) -> [String; 9] {
    [
        time(row.start),
        row.model.clone(),
        row.version.clone(),
        row.requests.to_string(),
        row.errors.to_string(),
        row.prompt_tokens.to_string(),
        row.completion_tokens.to_string(),
        row.images.to_string(),
        row.cost.to_string(),
    ]
}

/// A table with `headers`, each row's cells escaped.
pub fn table(caption: &str, headers: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let mut out = format!(
        "<div class=\"scroll\"><table><caption>{}</caption><thead><tr>",
        esc(caption)
    );
    for h in headers {
        let _ = write!(out, "<th scope=\"col\">{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>");
    let mut any = false;
    for row in rows {
        any = true;
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{}</td>", esc(&cell));
        }
        out.push_str("</tr>");
    }
    if !any {
        let _ = write!(
            out,
            "<tr><td colspan=\"{}\">Nothing yet.</td></tr>",
            headers.len()
        );
    }
    out.push_str("</tbody></table></div>");
    out
}

/// A bar chart as SVG (presentation attributes only, so the CSP needs no inline style),
/// each bar titled with its label and value; the numbers are in the table beside it.
pub fn bar_chart(label: &str, points: &[(String, u64)]) -> String {
    const WIDTH: f64 = 600.0;
    const HEIGHT: f64 = 160.0;
    let max = points.iter().map(|p| p.1).max().unwrap_or(0).max(1) as f64;
    let step = WIDTH / points.len().max(1) as f64;
    let mut out = format!(
        "<figure class=\"chart\"><svg role=\"img\" aria-label=\"{}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" preserveAspectRatio=\"none\">",
        esc(label)
    );
    for (i, (name, value)) in points.iter().enumerate() {
        let h = (*value as f64 * (HEIGHT - 10.0) / max).round();
        let _ = write!(
            out,
            "<rect class=\"bar\" x=\"{:.2}\" y=\"{}\" width=\"{:.2}\" height=\"{h}\"><title>{}: {value}</title></rect>",
            i as f64 * step,
            HEIGHT - h,
            (step * 0.85).max(0.5),
            esc(name)
        );
    }
    let _ = write!(
        out,
        "</svg><figcaption>{}</figcaption></figure>",
        esc(label)
    );
    out
}

/// A CSV field: quoted when it holds a comma, a quote or a line break; a leading `=`, `+`,
/// `-` or `@` is defused so that a spreadsheet does not run it as a formula.
pub fn csv_field(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@']) {
        format!("'{text}")
    } else {
        text.to_owned()
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\"").to_string(),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(esc("plain").to_string(), "plain");
        assert_eq!(esc("").to_string(), "");
        assert_eq!(esc("é<").to_string(), "é&lt;");
    }

    #[test]
    fn tables_and_charts_escape_their_labels() {
        let html = table(
            "<b>",
            &["<i>"],
            std::iter::once(vec!["<script>x</script>".to_owned()]),
        );
        assert!(!html.contains("<script>") && !html.contains("<b>") && !html.contains("<i>"));
        let svg = bar_chart("<x>", &[("<y>".into(), 3)]);
        assert!(!svg.contains("<x>") && !svg.contains("<y>"));
    }

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=1+1"), "'=1+1");
        assert_eq!(csv_field("plain"), "plain");
    }

    #[test]
    fn times_read_as_utc() {
        assert_eq!(time(0), "1970-01-01 00:00:00 UTC");
    }
}
