//! Python's ways of writing values, for templates written against Jinja in Python:
//! `repr` and `str` when a value is printed, `json.dumps` for `tojson`, and `strftime`.
use std::fmt::Write;

use chrono::DateTime;
use minijinja::value::{Kwargs, Value as JValue, ValueKind};
use minijinja::{ErrorKind, Output, State};

/// Results inside template filters and functions.
pub(super) type JResult<T> = std::result::Result<T, minijinja::Error>;

/// Prints values the way Jinja in Python does: `True`, `None`, `['a', 1.0]`.
pub(super) fn py_formatter(out: &mut Output, state: &mut State, value: &JValue) -> JResult<()> {
    let python = match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Seq | ValueKind::Map => true,
        ValueKind::Number => !value.is_integer(),
        _ => false,
    };
    if !python {
        return minijinja::escape_formatter(out, state, value);
    }
    let mut s = String::new();
    py_repr(&mut s, value, false)?;
    out.write_str(&s)
        .map_err(|_| minijinja::Error::from(ErrorKind::WriteFailure))
}

/// Python's `repr` (`str` at the top level, where strings print bare).
pub(super) fn py_repr(out: &mut String, v: &JValue, quoted: bool) -> JResult<()> {
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number if !v.is_integer() => {
            out.push_str(&py_float(f64::try_from(v.clone())?, false))
        }
        ValueKind::String if quoted => py_str_repr(out, v.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(out, &item, true)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(out, &key, true)?;
                out.push_str(": ");
                py_repr(out, &v.get_item(&key)?, true)?;
            }
            out.push('}');
        }
        _ => out.push_str(&v.to_string()),
    }
    Ok(())
}

fn py_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `repr(float)`; `json` spells the non-finite ones differently.
fn py_float(f: f64, json: bool) -> String {
    if f.is_nan() {
        return if json { "NaN" } else { "nan" }.into();
    }
    if f.is_infinite() {
        let s = if json { "Infinity" } else { "inf" };
        return if f < 0.0 { format!("-{s}") } else { s.into() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits, as Python's repr does.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let n = digits.len() as i32;
    let sign = if f.is_sign_negative() { "-" } else { "" };
    let body = if !(-4..16).contains(&exp) {
        let frac = if n > 1 {
            format!(".{}", &digits[1..])
        } else {
            String::new()
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{}{frac}e{esign}{:02}", &digits[..1], exp.abs())
    } else if exp < 0 {
        format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
    } else if exp >= n - 1 {
        format!("{digits}{}.0", "0".repeat((exp - (n - 1)) as usize))
    } else {
        let point = (exp + 1) as usize;
        format!("{}.{}", &digits[..point], &digits[point..])
    };
    format!("{sign}{body}")
}

/// Python's `json.dumps` options, as transformers' `tojson` filter exposes them.
struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn write(&self, out: &mut String, v: &JValue, depth: usize) -> JResult<()> {
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
            ValueKind::Number => out.push_str(&py_float(f64::try_from(v.clone())?, true)),
            ValueKind::String => self.write_str(out, v.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<JValue> = v.try_iter()?.collect();
                self.write_container(out, '[', ']', &items, depth, |out, item| {
                    self.write(out, item, depth + 1)
                })?;
            }
            ValueKind::Map => {
                let mut keys = Vec::new();
                for k in v.try_iter()? {
                    keys.push((json_key(&k)?, k));
                }
                if self.sort_keys {
                    keys.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.write_container(out, '{', '}', &keys, depth, |out, (name, key)| {
                    self.write_str(out, name);
                    out.push_str(&self.key_sep);
                    self.write(out, &v.get_item(key)?, depth + 1)
                })?;
            }
            kind => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a value of kind {kind} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    fn write_container<T>(
        &self,
        out: &mut String,
        open: char,
        close: char,
        items: &[T],
        depth: usize,
        mut each: impl FnMut(&mut String, &T) -> JResult<()>,
    ) -> JResult<()> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(indent) = &self.indent {
                out.push('\n');
                out.push_str(&indent.repeat(depth + 1));
            }
            each(out, item)?;
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
        out.push(close);
        Ok(())
    }

    fn write_str(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's json turns non-string keys into strings.
fn json_key(k: &JValue) -> JResult<String> {
    Ok(match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".into(),
        ValueKind::Bool => if k.is_true() { "true" } else { "false" }.into(),
        ValueKind::Number if k.is_integer() => k.to_string(),
        ValueKind::Number => py_float(f64::try_from(k.clone())?, true),
        kind => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be strings, not {kind}"),
            ))
        }
    })
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`:
/// Python's `json.dumps`, without Jinja's HTML escaping.
pub(super) fn tojson_filter(
    value: &JValue,
    ensure_ascii: Option<JValue>,
    indent: Option<JValue>,
    separators: Option<JValue>,
    kwargs: Kwargs,
) -> JResult<JValue> {
    let pick = |pos: Option<JValue>, name: &str| -> JResult<Option<JValue>> {
        let kw: Option<JValue> = kwargs.get(name)?;
        Ok(kw.or(pos).filter(|v| !v.is_none() && !v.is_undefined()))
    };
    let ensure_ascii = pick(ensure_ascii, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match pick(indent, "indent")? {
        None => None,
        Some(v) if v.kind() == ValueKind::String => {
            Some(v.as_str().unwrap_or_default().to_string())
        }
        Some(v) => Some(" ".repeat(v.as_i64().unwrap_or(0).max(0) as usize)),
    };
    let (mut item_sep, mut key_sep) = (
        if indent.is_some() { "," } else { ", " }.to_string(),
        ": ".to_string(),
    );
    if let Some(seps) = pick(separators, "separators")? {
        let parts: Vec<JValue> = seps.try_iter()?.collect();
        if let [a, b] = parts.as_slice() {
            item_sep = a.as_str().unwrap_or(",").to_string();
            key_sep = b.as_str().unwrap_or(":").to_string();
        }
    }
    let sort_keys = pick(None, "sort_keys")?.is_some_and(|v| v.is_true());
    let opts = PyJson {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    opts.write(&mut out, value, 0)?;
    Ok(JValue::from(out))
}

/// Python's `strftime` on UTC time, for the `strftime_now` global (Python uses local time;
/// servers usually run in UTC). chrono refuses a whole format for one conversion it does not
/// know, so each is formatted alone, and an unknown one is written as it stands, as glibc does.
pub(super) fn strftime(format: &str, unix_secs: i64) -> String {
    let Some(time) = DateTime::from_timestamp(unix_secs, 0) else {
        return format.to_string();
    };
    let time = time.naive_utc();
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // One conversion, with glibc's padding flag if it has one (`%-d`: no padding).
        let mut spec = String::from('%');
        let mut conv = chars.next();
        if let Some(flag @ ('-' | '_' | '0')) = conv {
            spec.push(flag);
            conv = chars.next();
        }
        let Some(conv) = conv else {
            out.push_str(&spec);
            break;
        };
        spec.push(conv);
        // Python's `%f` is microseconds, chrono's nanoseconds; a naive time has no zone.
        let item = match conv {
            'f' => "%6f",
            'z' | 'Z' => "",
            _ => &spec,
        };
        let mut text = String::new();
        match write!(text, "{}", time.format(item)) {
            Ok(()) => out.push_str(&text),
            Err(_) => out.push_str(&spec),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::tokenizer::template::{render_template, to_jinja};

    #[test]
    fn python_json_and_repr() {
        for (f, s) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (1e-5, "1e-05"),
            (1e16, "1e+16"),
            (123456789.125, "123456789.125"),
            (-0.0001, "-0.0001"),
            (2.5e-7, "2.5e-07"),
            (1e15, "1000000000000000.0"),
        ] {
            assert_eq!(py_float(f, false), s);
        }
        let render = |src: &str, ctx: Value| render_template(src, to_jinja(&ctx)).unwrap();
        let ctx = json!({"x": {"a": [1, 2.5, null, true], "k": "é\"\n"}});
        assert_eq!(
            render("{{ x | tojson }}", ctx.clone()),
            r#"{"a": [1, 2.5, null, true], "k": "é\"\n"}"#
        );
        assert_eq!(
            render("{{ x.a | tojson(separators=(',', ':')) }}", ctx.clone()),
            "[1,2.5,null,true]"
        );
        assert_eq!(
            render("{{ x.k | tojson(ensure_ascii=true) }}", ctx.clone()),
            r#""\u00e9\"\n""#
        );
        assert_eq!(
            render("{{ x }}", ctx.clone()),
            r#"{'a': [1, 2.5, None, True], 'k': 'é"\n'}"#
        );
        assert_eq!(
            render("{{ x.a[3] }} {{ none }} {{ x.a | string }}", ctx),
            "True None [1, 2.5, None, True]"
        );
    }

    #[test]
    fn strftime_formats_utc_dates() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_721_999_109;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %-d, %H:%M:%S %j %y%%", t),
            "Friday July 26, 13:05:09 208 24%"
        );
    }

    #[test]
    fn strftime_follows_python_where_chrono_differs() {
        // Python's `datetime.strftime` on a naive time at the same instant.
        let t = 1_721_999_109;
        assert_eq!(strftime("%F %T.%f", t), "2024-07-26 13:05:09.000000");
        assert_eq!(strftime("[%z%Z] %c", t), "[] Fri Jul 26 13:05:09 2024");
        assert_eq!(strftime("%Q %:z %.3f %-", t), "%Q %:z %.3f %-");
        assert_eq!(strftime("%e|%l|%P|%_d|%u", t), "26| 1|pm|26|5");
    }
}
