//! The Python `str` and `dict` methods that Hub chat templates call (`content.strip()`,
//! `message.get('name')`), which jinja2 offers and minijinja does not: installed as minijinja's
//! unknown-method callback. Semantics follow Python's.

use minijinja::value::{from_args, ValueKind};
use minijinja::{Error, ErrorKind, State, Value};

/// Calls `value.method(*args)` for the supported methods; `UnknownMethod` for anything else.
pub(super) fn call(
    state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let Some(text) = value.as_str() {
        return string_method(text, method, args);
    }
    if value.kind() == ValueKind::Map {
        return map_method(state, value, method, args);
    }
    Err(unknown(value, method))
}

/// `str.strip / lstrip / rstrip / startswith / endswith / upper / lower / split / replace`.
fn string_method(text: &str, method: &str, args: &[Value]) -> Result<Value, Error> {
    let strip_set = |args| -> Result<Option<Vec<char>>, Error> {
        let (chars,): (Option<&str>,) = from_args(args)?;
        Ok(chars.map(|c| c.chars().collect()))
    };
    let stripped = |text: &str, chars: Option<Vec<char>>, start: bool, end: bool| {
        let matches = |c: char| match &chars {
            Some(set) => set.contains(&c),
            None => c.is_whitespace(),
        };
        let text = if start {
            text.trim_start_matches(matches)
        } else {
            text
        };
        let text = if end {
            text.trim_end_matches(matches)
        } else {
            text
        };
        Value::from(text)
    };
    match method {
        "strip" => Ok(stripped(text, strip_set(args)?, true, true)),
        "lstrip" => Ok(stripped(text, strip_set(args)?, true, false)),
        "rstrip" => Ok(stripped(text, strip_set(args)?, false, true)),
        "startswith" => {
            let (prefix,): (&str,) = from_args(args)?;
            Ok(Value::from(text.starts_with(prefix)))
        }
        "endswith" => {
            let (suffix,): (&str,) = from_args(args)?;
            Ok(Value::from(text.ends_with(suffix)))
        }
        "upper" => {
            let () = from_args(args)?;
            Ok(Value::from(text.to_uppercase()))
        }
        "lower" => {
            let () = from_args(args)?;
            Ok(Value::from(text.to_lowercase()))
        }
        "split" => {
            let (separator,): (Option<&str>,) = from_args(args)?;
            let parts: Vec<Value> = match separator {
                None => text.split_whitespace().map(Value::from).collect(),
                Some("") => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "str.split: empty separator",
                    ))
                }
                Some(separator) => text.split(separator).map(Value::from).collect(),
            };
            Ok(Value::from(parts))
        }
        "replace" => {
            let (old, new): (&str, &str) = from_args(args)?;
            if old.is_empty() {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "str.replace: empty pattern",
                ));
            }
            Ok(Value::from(text.replace(old, new)))
        }
        _ => Err(unknown(&Value::from(text), method)),
    }
}

/// `dict.items / keys / values / get`.
fn map_method(
    state: &mut State,
    map: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    match method {
        "items" => {
            let () = from_args(args)?;
            state.apply_filter("items", std::slice::from_ref(map))
        }
        "keys" => {
            let () = from_args(args)?;
            Ok(Value::from(map.try_iter()?.collect::<Vec<_>>()))
        }
        "values" => {
            let () = from_args(args)?;
            let values: Result<Vec<Value>, Error> =
                map.try_iter()?.map(|key| map.get_item(&key)).collect();
            Ok(Value::from(values?))
        }
        "get" => {
            let (key, default): (Value, Option<Value>) = from_args(args)?;
            let found = map.get_item(&key)?;
            Ok(if found.is_undefined() {
                default.unwrap_or(Value::from(()))
            } else {
                found
            })
        }
        _ => Err(unknown(map, method)),
    }
}

/// The error for a method no template engine here provides.
fn unknown(value: &Value, method: &str) -> Error {
    Error::new(
        ErrorKind::UnknownMethod,
        format!("{} has no method named {method}", value.kind()),
    )
}
