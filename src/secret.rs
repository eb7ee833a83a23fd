//! Values that must never be printed.
//!
//! Every value fetched from a backend is held in a [`Secret`]. Its `Debug`
//! prints `Secret(***)` and it has no `Display`, so a value cannot reach a log
//! line, an error message or a panic message by accident; code that needs the
//! value calls [`Secret::expose`] and takes responsibility for where it goes.

use std::fmt;

use serde_json::Value;

/// A fetched value: a string, or structured data (a map for prefix reads and
/// parsed documents, a list for SSM `StringList`).
#[derive(Clone, PartialEq, Default)]
pub struct Secret(Value);

impl Secret {
    /// Wraps a value.
    pub fn new(value: Value) -> Self {
        Secret(value)
    }

    /// A string value.
    pub fn string(s: impl Into<String>) -> Self {
        Secret(Value::String(s.into()))
    }

    /// The value itself: the caller answers for where it goes.
    pub fn expose(&self) -> &Value {
        &self.0
    }

    /// The value itself, unwrapped: the caller answers for where it goes.
    pub fn into_exposed(self) -> Value {
        self.0
    }

    /// What kind of value this is and how large, for `check` and logs.
    pub fn describe(&self) -> String {
        describe(&self.0)
    }

    /// The value as text: strings as they are, numbers and booleans printed,
    /// maps and lists as compact JSON, null as the empty string.
    pub fn to_text(&self) -> String {
        to_text(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The shape of a value without its content: `string, 12 chars`, `map, 3 keys`.
pub fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(_) => "boolean".to_string(),
        Value::Number(_) => "number".to_string(),
        Value::String(s) => format!("string, {} chars", s.chars().count()),
        Value::Array(a) => format!("list, {} items", a.len()),
        Value::Object(o) => format!("map, {} keys", o.len()),
    }
}

/// A value as text: strings as they are, numbers and booleans printed,
/// maps and lists as compact JSON, null as the empty string.
pub fn to_text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Array(_) | Value::Object(_) => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::string("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(
            format!("{:?}", Some(vec![s.clone()])),
            "Some([Secret(***)])"
        );
        assert_eq!(s.describe(), "string, 7 chars");
        assert_eq!(s.to_text(), "hunter2");
    }

    #[test]
    fn text_of_structured_values() {
        let v = Secret::new(serde_json::json!({"b": 1, "a": [true, null]}));
        assert_eq!(v.to_text(), r#"{"a":[true,null],"b":1}"#);
        assert_eq!(v.describe(), "map, 2 keys");
        assert_eq!(Secret::new(Value::Null).to_text(), "");
    }
}
