//! The JSON-shaped operation set shared by every binding: put, delete, increment, insert,
//! splice text, at a path of map keys and list indexes.
//!
//! JSON form (the edge API, the wasm and FFI bindings all accept it):
//! `{"op":"put","path":P,"value":V}`, `{"op":"delete","path":P}`,
//! `{"op":"increment","path":P,"by":N}`, `{"op":"insert","path":P,"value":V}` (the last path
//! element is the list index; `-1` appends), `{"op":"splice","path":P,"index":I,"delete":D,"text":S}`.
//! `P` is an array of strings (map keys) and integers (list indexes). `V` is any JSON value;
//! one-key objects give the CRDT types: `{"$counter":N}`, `{"$text":S}`, `{"$timestamp":MS}`,
//! `{"$bytes":BASE64}`. Text indexes count Unicode code points.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Deepest nesting of values accepted in one operation, and rendered when reading JSON.
pub const MAX_DEPTH: usize = 64;

/// One step of a path: a map key or a list index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PathElem {
    /// A key in a map.
    Key(String),
    /// An index in a list (`-1` means "the end" where an operation allows it).
    Index(i64),
}

impl From<&str> for PathElem {
    fn from(s: &str) -> Self {
        PathElem::Key(s.to_owned())
    }
}

impl From<i64> for PathElem {
    fn from(i: i64) -> Self {
        PathElem::Index(i)
    }
}

/// Renders a path as JSON, for error messages.
pub fn path_to_string(path: &[PathElem]) -> String {
    serde_json::to_string(path).unwrap_or_else(|_| "<path>".into())
}

/// A typed value to write.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// JSON null.
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string (a plain register: concurrent writes pick one winner).
    Str(String),
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// A CRDT counter: concurrent increments add up.
    Counter(i64),
    /// Milliseconds since the Unix epoch.
    Timestamp(i64),
    /// A map of values.
    Map(BTreeMap<String, Value>),
    /// A list of values.
    List(Vec<Value>),
    /// Collaborative text: concurrent splices merge character by character.
    Text(String),
}

/// Why a JSON value is not a [`Value`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueError(pub String);

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ValueError {}

impl Value {
    /// Reads the JSON form (with the `$counter`, `$text`, `$timestamp`, `$bytes` objects).
    pub fn from_json(v: &serde_json::Value) -> Result<Value, ValueError> {
        Self::from_json_at(v, 0)
    }

    fn from_json_at(v: &serde_json::Value, depth: usize) -> Result<Value, ValueError> {
        use serde_json::Value as J;
        if depth > MAX_DEPTH {
            return Err(ValueError(format!(
                "value nested deeper than {MAX_DEPTH} levels"
            )));
        }
        Ok(match v {
            J::Null => Value::Null,
            J::Bool(b) => Value::Bool(*b),
            J::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Value::Int(i)
                } else if n.is_u64() {
                    return Err(ValueError(format!("integer {n} is over the i64 range")));
                } else {
                    Value::Float(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            J::String(s) => Value::Str(s.clone()),
            J::Array(items) => Value::List(
                items
                    .iter()
                    .map(|i| Self::from_json_at(i, depth + 1))
                    .collect::<Result<_, _>>()?,
            ),
            J::Object(map) => {
                if let (1, Some((k, inner))) = (map.len(), map.iter().next()) {
                    let typed = |what: &str| ValueError(format!("{k} expects {what}, got {inner}"));
                    match k.as_str() {
                        "$counter" => {
                            return inner
                                .as_i64()
                                .map(Value::Counter)
                                .ok_or_else(|| typed("an integer"));
                        }
                        "$timestamp" => {
                            return inner
                                .as_i64()
                                .map(Value::Timestamp)
                                .ok_or_else(|| typed("integer milliseconds"));
                        }
                        "$text" => {
                            return inner
                                .as_str()
                                .map(|s| Value::Text(s.into()))
                                .ok_or_else(|| typed("a string"));
                        }
                        "$bytes" => {
                            let s = inner.as_str().ok_or_else(|| typed("a base64 string"))?;
                            return base64::engine::general_purpose::STANDARD
                                .decode(s)
                                .map(Value::Bytes)
                                .map_err(|e| ValueError(format!("$bytes is not base64: {e}")));
                        }
                        _ if k.starts_with('$') => {
                            return Err(ValueError(format!(
                                "unknown typed value {k:?}; use $counter, $text, $timestamp or $bytes"
                            )));
                        }
                        _ => {}
                    }
                }
                Value::Map(
                    map.iter()
                        .map(|(k, v)| Ok((k.clone(), Self::from_json_at(v, depth + 1)?)))
                        .collect::<Result<_, ValueError>>()?,
                )
            }
        })
    }

    /// The JSON form, with the typed objects (inverse of [`Value::from_json`]).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => json!(b),
            Value::Int(i) => json!(i),
            Value::Float(f) => json!(f),
            Value::Str(s) => json!(s),
            Value::Bytes(b) => {
                json!({"$bytes": base64::engine::general_purpose::STANDARD.encode(b)})
            }
            Value::Counter(c) => json!({"$counter": c}),
            Value::Timestamp(t) => json!({"$timestamp": t}),
            Value::Text(t) => json!({"$text": t}),
            Value::Map(m) => {
                serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
            }
            Value::List(l) => serde_json::Value::Array(l.iter().map(Value::to_json).collect()),
        }
    }
}

impl Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let j = serde_json::Value::deserialize(d)?;
        Value::from_json(&j).map_err(serde::de::Error::custom)
    }
}

/// One operation on a document. All operations of one call make one atomic change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Op {
    /// Sets a map key or replaces a list element.
    Put {
        /// Where.
        path: Vec<PathElem>,
        /// What.
        value: Value,
    },
    /// Removes a map key or a list element.
    Delete {
        /// Where.
        path: Vec<PathElem>,
    },
    /// Adds to a counter.
    Increment {
        /// The counter.
        path: Vec<PathElem>,
        /// How much (may be negative).
        by: i64,
    },
    /// Inserts into a list; the last path element is the index, `-1` appends.
    Insert {
        /// The list and the index.
        path: Vec<PathElem>,
        /// What.
        value: Value,
    },
    /// Splices collaborative text: deletes `delete` code points at `index`, then inserts `text`.
    Splice {
        /// The text object.
        path: Vec<PathElem>,
        /// Where, in Unicode code points.
        index: usize,
        /// How many code points to delete.
        #[serde(default)]
        delete: usize,
        /// What to insert.
        #[serde(default)]
        text: String,
    },
}

impl Op {
    /// Parses a JSON array of operations, or an object `{"ops": [...]}`.
    pub fn list_from_json(json: &str) -> Result<Vec<Op>, ValueError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            ops: Vec<Op>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Body(Body),
            List(Vec<Op>),
        }
        // Parse twice only on error, to give the precise message of the likely form.
        match serde_json::from_str::<Either>(json) {
            Ok(Either::Body(b)) => Ok(b.ops),
            Ok(Either::List(l)) => Ok(l),
            Err(_) => {
                let e = match serde_json::from_str::<serde_json::Value>(json) {
                    Ok(serde_json::Value::Array(_)) => serde_json::from_str::<Vec<Op>>(json).err(),
                    _ => serde_json::from_str::<Body>(json).err(),
                };
                Err(ValueError(e.map_or_else(
                    || "invalid operations".to_owned(),
                    |e| e.to_string(),
                )))
            }
        }
    }

    /// The operation's path.
    pub fn path(&self) -> &[PathElem] {
        match self {
            Op::Put { path, .. }
            | Op::Delete { path }
            | Op::Increment { path, .. }
            | Op::Insert { path, .. }
            | Op::Splice { path, .. } => path,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn ops_parse_from_the_documented_json() {
        let ops = Op::list_from_json(
            r#"{"ops":[
            {"op":"put","path":["a",0,"b"],"value":{"x":[1,2.5,null,true,"s"]}},
            {"op":"put","path":["c"],"value":{"$counter":3}},
            {"op":"delete","path":["a"]},
            {"op":"increment","path":["c"],"by":-2},
            {"op":"insert","path":["l",-1],"value":{"$timestamp":5}},
            {"op":"splice","path":["t"],"index":1,"delete":2,"text":"hé"},
            {"op":"put","path":["b"],"value":{"$bytes":"AAEC"}}
        ]}"#,
        )
        .unwrap();
        assert_eq!(ops.len(), 7);
        assert_eq!(
            ops[1],
            Op::Put {
                path: vec!["c".into()],
                value: Value::Counter(3)
            }
        );
        assert_eq!(
            ops[6],
            Op::Put {
                path: vec!["b".into()],
                value: Value::Bytes(vec![0, 1, 2])
            }
        );
        assert_eq!(ops[0].path(), &[PathElem::from("a"), 0.into(), "b".into()]);
    }

    #[test]
    fn bad_ops_say_what_is_wrong() {
        for (body, needle) in [
            (r#"{"ops":[{"op":"frob","path":[]}]}"#, "frob"),
            (
                r#"{"ops":[{"op":"put","path":[{}],"value":1}]}"#,
                "untagged",
            ),
            (
                r#"{"ops":[{"op":"put","path":["a"],"value":{"$counter":"x"}}]}"#,
                "$counter",
            ),
            (
                r#"{"ops":[{"op":"put","path":["a"],"value":{"$nope":1}}]}"#,
                "$nope",
            ),
            (
                r#"{"ops":[{"op":"put","path":["a"],"value":18446744073709551615}]}"#,
                "i64",
            ),
            (r#"{"ops":[{"op":"put","path":["a"]}]}"#, "value"),
            (r#"[1]"#, "invalid"),
            (r#"{"ops":[],"extra":1}"#, "extra"),
            ("nonsense", "expected"),
        ] {
            let err = Op::list_from_json(body).unwrap_err().0;
            assert!(err.contains(needle), "{body}: {err}");
        }
    }

    #[test]
    fn typed_values_round_trip_through_json() {
        let v = json!({"a": {"$counter": 1}, "b": {"$text": "hi"}, "c": [{"$timestamp": 9}, {"$bytes": "AQ=="}], "d": 1.5});
        let parsed = Value::from_json(&v).unwrap();
        assert_eq!(parsed.to_json(), v);
    }

    #[test]
    fn deep_values_are_refused() {
        let mut v = json!(1);
        for _ in 0..(MAX_DEPTH + 2) {
            v = json!([v]);
        }
        assert!(Value::from_json(&v).unwrap_err().0.contains("deeper"));
    }
}
