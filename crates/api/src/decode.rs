//! Decoding of `POST /v1/ports` request bodies.
//!
//! Upstream decodes the body with Go's `encoding/json` into its `Spec` struct, and clients
//! (Docker, nerdctl, scripts) rely on the leniency that brings. [`decode_port_spec`] accepts
//! the same inputs:
//!
//! - only the first JSON value is read, trailing bytes are ignored;
//! - unknown keys are ignored, and key matching is ASCII case-insensitive (`"ParentPort"`);
//!   when a key occurs twice the later value wins, `null` leaves a field unchanged;
//! - a top-level `null` is an empty spec;
//! - missing fields stay empty or zero and then fail validation, naming the field.
//!
//! It is stricter in its messages only: a wrong JSON type is reported with the field name and
//! the value found, and validation errors print port numbers as numbers (upstream printed
//! `70000` as a character).

use std::fmt;

use rkport_core::PortSpec;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// Decodes and validates the body of a `POST /v1/ports` request.
///
/// Never panics, whatever the input; nesting deeper than serde_json's recursion limit is a
/// syntax error.
///
/// # Errors
/// A message for the client: invalid JSON, a field of the wrong JSON type, or the first field
/// that fails [`PortSpec::from_parts`].
pub fn decode_port_spec(body: &[u8]) -> Result<PortSpec, String> {
    let entries = match first_value(body)? {
        TopLevel::Object(entries) => entries,
        TopLevel::Null => Vec::new(),
        TopLevel::Other(kind) => {
            return Err(format!(
                "invalid request body: want a JSON object (a PortSpec), got {kind}"
            ))
        }
    };

    let fields = Fields::from_entries(entries)?;
    PortSpec::from_parts(
        &fields.proto,
        &fields.parent_ip,
        fields.parent_port,
        &fields.child_ip,
        fields.child_port,
    )
    .map_err(|e| e.to_string())
}

/// The first JSON value of a body, with object members in their original order.
enum TopLevel {
    Object(Vec<(String, Value)>),
    Null,
    Other(&'static str),
}

/// Parses the first JSON value of `body` and ignores whatever follows it.
fn first_value(body: &[u8]) -> Result<TopLevel, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err("empty request body: want a JSON PortSpec object".to_owned());
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    TopLevel::deserialize(&mut de).map_err(|e| format!("invalid JSON in request body: {e}"))
}

impl<'de> Deserialize<'de> for TopLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TopLevelVisitor)
    }
}

struct TopLevelVisitor;

impl<'de> Visitor<'de> for TopLevelVisitor {
    type Value = TopLevel;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevel, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry::<String, Value>()? {
            entries.push(entry);
        }
        Ok(TopLevel::Object(entries))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TopLevel, A::Error> {
        // Consume the array so that a syntax error inside it is still reported as such.
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(TopLevel::Other("array"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<TopLevel, E> {
        Ok(TopLevel::Null)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<TopLevel, E> {
        Ok(TopLevel::Other("bool"))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<TopLevel, E> {
        Ok(TopLevel::Other("number"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<TopLevel, E> {
        Ok(TopLevel::Other("number"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<TopLevel, E> {
        Ok(TopLevel::Other("number"))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<TopLevel, E> {
        Ok(TopLevel::Other("string"))
    }
}

/// The five `PortSpec` members, loosely typed and zero when absent, as Go's struct holds them.
#[derive(Debug, Default)]
struct Fields {
    proto: String,
    parent_ip: String,
    parent_port: i64,
    child_port: i64,
    child_ip: String,
}

impl Fields {
    /// Applies the members in order; the first wrong JSON type is the error.
    fn from_entries(entries: Vec<(String, Value)>) -> Result<Self, String> {
        let mut fields = Fields::default();
        for (key, value) in entries {
            if value.is_null() {
                continue;
            }
            match key.to_ascii_lowercase().as_str() {
                "proto" => fields.proto = string_field("proto", value)?,
                "parentip" => fields.parent_ip = string_field("parentIP", value)?,
                "parentport" => fields.parent_port = int_field("parentPort", &value)?,
                "childport" => fields.child_port = int_field("childPort", &value)?,
                "childip" => fields.child_ip = string_field("childIP", value)?,
                _ => {}
            }
        }
        Ok(fields)
    }
}

fn string_field(name: &str, value: Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(type_error(name, "a JSON string", &other)),
    }
}

/// A port member: a JSON integer that fits Go's `int`; range checks come later.
fn int_field(name: &str, value: &Value) -> Result<i64, String> {
    match value {
        Value::Number(n) if n.is_u64() && n.as_i64().is_none() => {
            Err(format!("invalid request body: {name} is out of range: {n}"))
        }
        _ => value
            .as_i64()
            .ok_or_else(|| type_error(name, "a JSON integer", value)),
    }
}

fn type_error(name: &str, want: &str, got: &Value) -> String {
    let kind = match got {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let mut shown = got.to_string();
    if shown.len() > 40 {
        let cut = (0..=40)
            .rev()
            .find(|&i| shown.is_char_boundary(i))
            .unwrap_or(0);
        shown.truncate(cut);
        shown.push_str("...");
    }
    format!("invalid request body: {name} must be {want}, got {kind} {shown}")
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use rkport_core::Proto;

    use super::*;

    #[test]
    fn decodes_a_full_spec() -> Result<(), String> {
        let spec = decode_port_spec(
            br#"{"proto":"udp","parentIP":"127.0.0.1","parentPort":18082,"childPort":82,"childIP":"10.0.2.100"}"#,
        )?;
        assert_eq!(spec.proto, Proto::Udp);
        assert_eq!(spec.parent_ip, Some(Ipv4Addr::LOCALHOST.into()));
        assert_eq!((spec.parent_port, spec.child_port), (18082, 82));
        assert_eq!(spec.child_ip, Some(Ipv4Addr::new(10, 0, 2, 100).into()));
        Ok(())
    }

    #[test]
    fn follows_go_decoder_leniency() -> Result<(), String> {
        // Case-insensitive keys, unknown keys, trailing garbage, later duplicate wins.
        let spec = decode_port_spec(
            br#" {"PROTO":"tcp","ParentPort":1,"parentport":8080,"CHILDPORT":80,"x":[1,{}]} trailing"#,
        )?;
        assert_eq!(spec, PortSpec::new(Proto::Tcp, 8080, 80));

        // null leaves the earlier value in place.
        let spec =
            decode_port_spec(br#"{"proto":"tcp","parentPort":8080,"childPort":80,"proto":null}"#)?;
        assert_eq!(spec.proto, Proto::Tcp);
        Ok(())
    }

    #[test]
    fn reports_errors_naming_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty request body"),
            (b"  \n", "empty request body"),
            (b"{\"proto\":", "invalid JSON in request body: EOF"),
            (b"[1,2]", "want a JSON object (a PortSpec), got array"),
            (b"[1,", "invalid JSON in request body"),
            (b"null", "unknown proto: \"\""),
            (b"{}", "unknown proto: \"\""),
            (br#"{"proto":"tcp"}"#, "invalid ParentPort: 0"),
            (
                br#"{"proto":"tcp","parentPort":80}"#,
                "invalid ChildPort: 0",
            ),
            (
                br#"{"proto":"tcp","parentPort":70000,"childPort":80}"#,
                "invalid ParentPort: 70000",
            ),
            (
                br#"{"proto":"tcp","parentPort":-1,"childPort":80}"#,
                "invalid ParentPort: -1",
            ),
            (
                br#"{"proto":"tcp","parentPort":"80","childPort":80}"#,
                "parentPort must be a JSON integer, got string \"80\"",
            ),
            (
                br#"{"proto":"tcp","parentPort":80,"childPort":80.5}"#,
                "childPort must be a JSON integer, got number 80.5",
            ),
            (
                br#"{"proto":"tcp","parentPort":9223372036854775808,"childPort":80}"#,
                "parentPort is out of range: 9223372036854775808",
            ),
            (
                br#"{"proto":"tcp","parentPort":99999999999999999999,"childPort":80}"#,
                "parentPort must be a JSON integer, got number 1e+20",
            ),
            (
                br#"{"proto":5}"#,
                "proto must be a JSON string, got number 5",
            ),
            (
                br#"{"proto":"tcp","childIP":"x","parentPort":1,"childPort":1}"#,
                "invalid ChildIP: \"x\"",
            ),
        ];
        for (body, want) in cases {
            let err = decode_port_spec(body).expect_err(&String::from_utf8_lossy(body));
            assert!(
                err.contains(want),
                "body {:?}: got {err:?}, want it to contain {want:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let body = format!("{{\"x\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        let err = decode_port_spec(body.as_bytes()).unwrap_err();
        assert!(err.contains("recursion limit"), "{err}");
    }
}
