//! JSON log lines a collector can query without parsing Rust: one object per line with
//! `timestamp` (RFC 3339), `level`, `target`, `message`, every event field with its JSON
//! type, the fields of the enclosing spans, and `spans` (their names, outermost first).
//!
//! Why not tracing-subscriber's own JSON layer: it writes every `?field` as a Rust `Debug`
//! string (`"Some(\"x\")"`, `"[192.0.2.10]"`), leaves a declared but unrecorded field out
//! instead of `null`, and nests span fields in a list, so the node of a session line is
//! not where a query looks for it. Here:
//! - integers, floats and booleans are JSON numbers and booleans; `%field` is a string;
//! - a `?field` whose `Debug` text is a JSON array or object (see [`JsonList`]) is
//!   embedded as one; any other `Debug` text stays a string;
//! - a field declared on the event but recorded as empty (`field = None::<T>`, or
//!   `tracing::field::Empty`) is `null`;
//! - every key appears once: an event field wins over a span field of the same name, an
//!   inner span over an outer one, and a field named like a fixed key (`timestamp`,
//!   `level`, `target`, `spans`) is kept as `field.<name>`.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Keys every line has; a field of the same name is renamed `field.<name>`.
const FIXED_KEYS: [&str; 4] = ["timestamp", "level", "target", "spans"];

/// A list field that logs as a JSON array of its items' `Display` text:
/// `info!(ips = ?JsonList(&ips), ..)`. Text logs show the same array.
pub struct JsonList<'a, T>(pub &'a [T]);

impl<T: fmt::Display> fmt::Debug for JsonList<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<Value> = self
            .0
            .iter()
            .map(|item| Value::String(item.to_string()))
            .collect();
        write!(f, "{}", Value::Array(items))
    }
}

/// The event formatter of [`super::LogFormat::Json`].
pub struct JsonLines;

/// The span field formatter that goes with [`JsonLines`]: stores a span's fields as a JSON
/// object, merged as more are recorded.
pub struct JsonFields;

/// Collects fields into a JSON object.
struct Collect<'a>(&'a mut Map<String, Value>);

impl Collect<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        let name = field.name();
        let key = if FIXED_KEYS.contains(&name) {
            format!("field.{name}")
        } else {
            name.to_owned()
        };
        self.0.insert(key, value);
    }
}

impl Visit for Collect<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let number = serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number);
        self.put(field, number);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_i128(&mut self, field: &Field, value: i128) {
        let v = i64::try_from(value).map_or_else(|_| Value::String(value.to_string()), Value::from);
        self.put(field, v);
    }
    fn record_u128(&mut self, field: &Field, value: u128) {
        let v = u64::try_from(value).map_or_else(|_| Value::String(value.to_string()), Value::from);
        self.put(field, v);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, from_debug(format!("{value:?}")));
    }
}

/// `Debug` text that is a JSON array or object is embedded; anything else is a string.
fn from_debug(text: String) -> Value {
    if text.starts_with('[') || text.starts_with('{') {
        if let Ok(value @ (Value::Array(_) | Value::Object(_))) =
            serde_json::from_str::<Value>(&text)
        {
            return value;
        }
    }
    Value::String(text)
}

impl<'writer> FormatFields<'writer> for JsonFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut map = Map::new();
        fields.record(&mut Collect(&mut map));
        write!(writer, "{}", Value::Object(map))
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut map = match serde_json::from_str(&current.fields) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        };
        fields.record(&mut Collect(&mut map));
        current.fields = Value::Object(map).to_string();
        Ok(())
    }
}

impl<S> FormatEvent<S, JsonFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), Value::String(timestamp));
        line.insert("level".into(), Value::String(meta.level().to_string()));
        line.insert("target".into(), Value::String(meta.target().to_owned()));
        // Span fields first (outermost first, so inner ones overwrite), then the event's.
        let mut spans = Vec::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                spans.push(Value::String(span.name().to_owned()));
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<JsonFields>>() else {
                    continue;
                };
                if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&fields.fields) {
                    for (key, value) in map {
                        if !FIXED_KEYS.contains(&key.as_str()) {
                            line.insert(key, value);
                        }
                    }
                }
            }
        }
        let mut fields = Map::new();
        event.record(&mut Collect(&mut fields));
        for field in meta.fields() {
            let key = match field.name() {
                name if FIXED_KEYS.contains(&name) => format!("field.{name}"),
                name => name.to_owned(),
            };
            fields.entry(key).or_insert(Value::Null);
        }
        line.extend(fields);
        if !spans.is_empty() {
            line.insert("spans".into(), Value::Array(spans));
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_json_arrays_and_debug_structs_stay_strings() {
        let ips = ["192.0.2.10", "2001:db8::1"];
        assert_eq!(
            from_debug(format!("{:?}", JsonList(&ips))),
            serde_json::json!(["192.0.2.10", "2001:db8::1"])
        );
        assert_eq!(
            from_debug("Foo { a: 1 }".into()),
            Value::String("Foo { a: 1 }".into())
        );
        assert_eq!(
            from_debug("[192.0.2.10]".into()),
            Value::String("[192.0.2.10]".into())
        );
    }
}
