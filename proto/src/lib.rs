//! The event envelope every tidemark log holds: fields, schema version, canonical
//! checksums, encoding and decoding.
//!
//! An [`Event`] is one JSON object. Readers refuse a schema version they do not know
//! ([`DecodeError::UnknownVersion`]) instead of guessing. Checksums are `blake3:<hex>` of
//! the item's canonical content: the bytes for files, canonical JSON (sorted keys, no
//! insignificant whitespace, ignored fields removed) for structured items.
#![deny(missing_docs)]

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The schema version this build writes and the only one it reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Prefix of every checksum string.
pub const CHECKSUM_PREFIX: &str = "blake3:";

/// What an event does to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The item is new or its content changed.
    Upsert,
    /// The item is no longer listed by the source.
    Delete,
}

impl Op {
    /// The lowercase name used in the log and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Upsert => "upsert",
            Op::Delete => "delete",
        }
    }
}

/// Content carried inline in the event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Body {
    /// A structured item (API resource), as the source returned it minus ignored fields.
    Json(Value),
    /// File bytes, base64 in the log; only below the pipeline's `inline_limit`.
    #[serde(with = "base64_bytes")]
    Base64(Vec<u8>),
}

/// Where the projector reads bytes that were not inlined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    /// Size in bytes when the scanner hashed it.
    pub size: u64,
    /// Source locator: for directory sources, the absolute path of the file.
    pub locator: String,
}

/// A reference from one item to another, rewritten to target ids before writing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ref {
    /// Kind of the referenced item.
    pub kind: String,
    /// Source key of the referenced item.
    pub key: String,
    /// JSON pointer of the field holding the reference.
    pub path: String,
}

/// One record of the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub v: u32,
    /// Pipeline that produced the event.
    pub pipeline: String,
    /// Partition of the log the event sits in; assigned by the log (always 0 for sled).
    #[serde(default)]
    pub partition: u32,
    /// Position in its partition; assigned by the log on append, never by the writer.
    #[serde(default)]
    pub offset: u64,
    /// Resource kind: `file`, `dir`, or an API resource kind.
    pub kind: String,
    /// Stable identity of the item in the source (relative path, source id).
    pub key: String,
    /// Upsert or delete.
    pub op: Op,
    /// `blake3:<hex>` of the canonical content; empty for deletes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub checksum: String,
    /// Permission bits for files and directories (the executable bit is part of the mirror),
    /// with the setuid, setgid and sticky bits (`mode & 0o7777`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Natural key used to adopt an existing target item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// References to other items.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refs: Vec<Ref>,
    /// Inline content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Body>,
    /// Out-of-line content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<Blob>,
    /// A file's or directory's modification time in the source, in nanoseconds since the
    /// Unix epoch; the target gives it to what it writes (to a directory once the batch's
    /// changes to its entries are made). Part of the version ([`item_version`]), so a
    /// `touch` is an event, which the target applies by setting the time alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime_ns: Option<i64>,
    /// When the scanner saw the change (UTC); drives lag in seconds.
    pub observed_at: DateTime<Utc>,
    /// Id of the scan that produced the event.
    pub scan: String,
}

/// Why a record could not be read as an event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The record is not JSON or does not have the event's shape.
    #[error("not a tidemark event: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The record has no integer `v` field.
    #[error("not a tidemark event: no schema version field `v`")]
    MissingVersion,
    /// The record was written by a schema this build does not know.
    #[error("event schema version {found} is not supported (this build reads version {supported}); upgrade tidemark to read this log")]
    UnknownVersion {
        /// Version found in the record.
        found: u64,
        /// Version this build reads.
        supported: u32,
    },
}

impl Event {
    /// Encodes the event as one JSON object.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an Event always serializes")
    }

    /// Decodes one record, refusing unknown schema versions.
    pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
        let value: Value = serde_json::from_slice(bytes)?;
        match value.get("v").and_then(Value::as_u64) {
            None => Err(DecodeError::MissingVersion),
            Some(v) if v != u64::from(SCHEMA_VERSION) => Err(DecodeError::UnknownVersion {
                found: v,
                supported: SCHEMA_VERSION,
            }),
            Some(_) => Ok(serde_json::from_value(value)?),
        }
    }

    /// The identity an applied-state record is kept under: kind and key.
    pub fn identity(&self) -> String {
        item_identity(&self.kind, &self.key)
    }

    /// What "already applied" compares: the checksum, plus the mode and the modification
    /// time when the event has them ([`item_version`]).
    pub fn version(&self) -> String {
        item_version(&self.checksum, self.mode, self.mtime_ns)
    }
}

/// The state key of an item: `kind` and `key` joined by a NUL byte, which neither holds.
pub fn item_identity(kind: &str, key: &str) -> String {
    format!("{kind}\0{key}")
}

/// Content checksum and permission bits as one comparable string.
pub fn content_version(checksum: &str, mode: Option<u32>) -> String {
    match mode {
        Some(mode) => format!("{checksum}+{mode:o}"),
        None => checksum.to_owned(),
    }
}

/// An item's version: [`content_version`], then `@` and the modification time when there
/// is one (files of a directory source). Versions written before files carried a time
/// have no `@` part; they differ from the same file's version now, which applies the time.
pub fn item_version(checksum: &str, mode: Option<u32>, mtime_ns: Option<i64>) -> String {
    let content = content_version(checksum, mode);
    match mtime_ns {
        Some(ns) => format!("{content}@{ns}"),
        None => content,
    }
}

/// The checksum part of a version made by [`item_version`] (or [`content_version`]).
/// Checksums are `algorithm:hex`, so neither `+` nor `@` occurs in one.
pub fn version_checksum(version: &str) -> &str {
    version.split(['+', '@']).next().unwrap_or(version)
}

/// The modification time part of a version made by [`item_version`], if it has one.
pub fn version_mtime(version: &str) -> Option<i64> {
    version.rsplit_once('@').and_then(|(_, ns)| ns.parse().ok())
}

/// Streaming checksum over bytes, for files too large to hold.
#[derive(Default)]
pub struct ChecksumWriter(blake3::Hasher);

impl ChecksumWriter {
    /// Starts an empty checksum.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    /// The `blake3:<hex>` string of everything added.
    pub fn finish(&self) -> String {
        format!("{CHECKSUM_PREFIX}{}", self.0.finalize().to_hex())
    }
}

/// `blake3:<hex>` of bytes.
pub fn checksum_bytes(bytes: &[u8]) -> String {
    let mut w = ChecksumWriter::new();
    w.update(bytes);
    w.finish()
}

/// Removes the fields at the given JSON pointers (missing ones are ignored).
pub fn strip_fields(value: &mut Value, pointers: &[String]) {
    for pointer in pointers {
        let Some((parent, last)) = pointer.rsplit_once('/') else {
            continue;
        };
        let last = last.replace("~1", "/").replace("~0", "~");
        match value.pointer_mut(parent) {
            Some(Value::Object(map)) => {
                map.remove(&last);
            }
            Some(Value::Array(items)) => {
                if let Ok(i) = last.parse::<usize>() {
                    if i < items.len() {
                        items.remove(i);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Canonical JSON: object keys sorted, no insignificant whitespace. `false`, `0` and `""`
/// are values and are kept.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    fn write(value: &Value, out: &mut Vec<u8>) {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push(b'{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend(serde_json::to_vec(k).expect("a string serializes"));
                    out.push(b':');
                    write(&map[k], out);
                }
                out.push(b'}');
            }
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write(item, out);
                }
                out.push(b']');
            }
            scalar => out.extend(serde_json::to_vec(scalar).expect("a scalar serializes")),
        }
    }
    let mut out = Vec::new();
    write(value, &mut out);
    out
}

/// Checksum of a structured item: canonical JSON after removing ignored fields.
pub fn checksum_json(value: &Value, ignored: &[String]) -> String {
    if ignored.is_empty() {
        return checksum_bytes(&canonical_json(value));
    }
    let mut value = value.clone();
    strip_fields(&mut value, ignored);
    checksum_bytes(&canonical_json(&value))
}

/// Keys for file paths: a path that is valid UTF-8 is its own key, except that `%` is
/// written `%25`; every byte that is not part of valid UTF-8 is written `%XX`. The
/// encoding is lossless, so non-UTF-8 names survive the trip through the JSON log.
pub mod pathkey {
    /// Encodes raw path bytes (Unix) as a key.
    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len());
        for chunk in bytes.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c == '%' {
                    out.push_str("%25");
                } else {
                    out.push(c);
                }
            }
            for b in chunk.invalid() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    /// Decodes a key back to raw path bytes; `None` when the key is not a valid encoding.
    pub fn decode(key: &str) -> Option<Vec<u8>> {
        let bytes = key.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = key.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        Some(out)
    }
}

mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

/// Size of the content an item carries: inline file bytes or the blob's size (0 for
/// structured bodies and deletes).
pub fn content_len(body: Option<&Body>, blob: Option<&Blob>) -> u64 {
    match (body, blob) {
        (Some(Body::Base64(b)), _) => b.len() as u64,
        (_, Some(blob)) => blob.size,
        _ => 0,
    }
}

/// Base64 of bytes, as [`Body::Base64`] writes it (exported for tools and tests).
pub fn base64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn sample() -> Event {
        Event {
            v: SCHEMA_VERSION,
            pipeline: "p".into(),
            partition: 0,
            offset: 7,
            kind: "file".into(),
            key: "a/b.txt".into(),
            op: Op::Upsert,
            checksum: checksum_bytes(b"hello"),
            mode: Some(0o755),
            name: None,
            refs: vec![],
            body: Some(Body::Base64(b"hello".to_vec())),
            blob: None,
            mtime_ns: None,
            observed_at: Utc::now(),
            scan: "s1".into(),
        }
    }

    #[test]
    fn round_trips() {
        let e = sample();
        assert_eq!(Event::decode(&e.encode()).unwrap(), e);
    }

    #[test]
    fn refuses_unknown_version_with_clear_error() {
        let mut v: Value = serde_json::from_slice(&sample().encode()).unwrap();
        v["v"] = json!(99);
        let err = Event::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(err, DecodeError::UnknownVersion { found: 99, .. }));
        assert!(err.to_string().contains("version 99 is not supported"));
    }

    #[test]
    fn refuses_missing_version() {
        assert!(matches!(
            Event::decode(br#"{"kind":"file"}"#),
            Err(DecodeError::MissingVersion)
        ));
    }

    #[test]
    fn checksum_is_blake3_hex() {
        assert_eq!(
            checksum_bytes(b""),
            "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn canonical_json_ignores_key_order_and_whitespace_but_keeps_falsy_values() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"y": false, "x": ""}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":"","y":false},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), br#"{"a":{"x":"","y":false},"b":1}"#);
        assert_eq!(checksum_json(&a, &[]), checksum_json(&b, &[]));
        let c: Value = serde_json::from_str(r#"{"b": 1, "a": {"x": ""}}"#).unwrap();
        assert_ne!(checksum_json(&a, &[]), checksum_json(&c, &[]));
    }

    #[test]
    fn ignored_fields_do_not_change_the_checksum() {
        let a = json!({"id": 1, "title": "t", "meta": {"updatedAt": "x"}});
        let b = json!({"id": 2, "title": "t", "meta": {"updatedAt": "y"}});
        let ignored = vec!["/id".to_string(), "/meta/updatedAt".to_string()];
        assert_eq!(checksum_json(&a, &ignored), checksum_json(&b, &ignored));
        assert_ne!(checksum_json(&a, &[]), checksum_json(&b, &[]));
    }

    #[test]
    fn a_new_modification_time_is_a_new_version_with_the_same_checksum() {
        let c = checksum_bytes(b"x");
        let touched = item_version(&c, Some(0o644), Some(2_000_000_000_000_000_001));
        assert_ne!(touched, item_version(&c, Some(0o644), Some(1_000_000_000)));
        assert_ne!(touched, content_version(&c, Some(0o644)));
        assert_eq!(
            item_version(&c, Some(0o644), None),
            content_version(&c, Some(0o644))
        );
        assert_eq!(version_checksum(&touched), c);
        assert_eq!(version_checksum(&content_version(&c, None)), c);
        assert_eq!(version_checksum(&item_version(&c, None, Some(-5))), c);
        assert_eq!(
            version_mtime(&item_version(&c, Some(0o755), Some(-5))),
            Some(-5)
        );
        assert_eq!(version_mtime(&content_version(&c, Some(0o755))), None);
    }

    #[test]
    fn pathkey_keeps_plain_names_and_round_trips_odd_ones() {
        assert_eq!(
            pathkey::encode("dir/naïve ✓.txt".as_bytes()),
            "dir/naïve ✓.txt"
        );
        assert_eq!(pathkey::encode(b"100%"), "100%25");
        assert_eq!(pathkey::encode(b"bad\xffname"), "bad%FFname");
        assert_eq!(pathkey::decode("bad%FFname").unwrap(), b"bad\xffname");
        assert_eq!(pathkey::decode("broken%Z"), None);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Event::decode(&bytes);
        }

        #[test]
        fn pathkey_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(pathkey::decode(&pathkey::encode(&bytes)).unwrap(), bytes);
        }

        #[test]
        fn canonical_json_is_valid_json(s in "[a-z]{0,5}", n in any::<i64>(), b in any::<bool>()) {
            let v = json!({"s": s, "n": n, "b": b, "arr": [n, s]});
            let back: Value = serde_json::from_slice(&canonical_json(&v)).unwrap();
            prop_assert_eq!(back, v);
        }
    }
}
