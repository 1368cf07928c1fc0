//! The API body path: `api::messages::parse_send_request` on JSON objects,
//! `message::validate::validate` for every message type
//! on arbitrary JSON, and the domain parsers (`parse_phone`,
//! `parse_duration`, `parse_size`, `parse_rfc3339`) on the input text and
//! on every string in the JSON. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use wa_router::domain::{parse_duration, parse_phone, parse_rfc3339, parse_size};
use wa_router::message::validate::{TYPES, validate};

fn parsers(text: &str) {
    if let Some(digits) = parse_phone(text) {
        // Documented: digits only, 7 to 15 of them, no leading zero.
        assert!(
            (7..=15).contains(&digits.len())
                && digits.bytes().all(|b| b.is_ascii_digit())
                && !digits.starts_with('0'),
            "parse_phone({text:?}) = {digits:?}"
        );
    }
    let _ = std::hint::black_box(parse_duration(text));
    let _ = std::hint::black_box(parse_size(text));
    let _ = std::hint::black_box(parse_rfc3339(text));
}

fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    if out.len() >= 64 {
        return;
    }
    match v {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|i| strings(i, out)),
        Value::Object(map) => map.iter().for_each(|(k, i)| {
            out.push(k);
            strings(i, out)
        }),
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    parsers(&String::from_utf8_lossy(data));
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    for kind in TYPES {
        // The object itself, and the value under the type's key (the
        // send body's shape: {"type": "text", "text": {...}}).
        let _ = std::hint::black_box(validate(kind, &v));
        if let Some(inner) = v.get(kind) {
            let _ = std::hint::black_box(validate(kind, inner));
        }
    }
    // The whole send-body parser of POST /v1/messages (no state needed).
    if let Value::Object(map) = &v {
        let now = 1_795_000_000_000;
        match wa_router::api::messages::parse_send_request(map, now) {
            Ok(req) => {
                assert!(validate(req.kind.as_str(), &req.object).is_ok(), "accepted an invalid object");
                assert!(req.tags.len() <= 10 && req.tags.iter().all(|t| *t == t.to_lowercase()));
            }
            Err(e) => {
                std::hint::black_box(e.message.len());
            }
        }
    }
    if let Some(kind) = v.get("type").and_then(Value::as_str) {
        let inner = v.get(kind).unwrap_or(&v);
        if let Err(e) = validate(kind, inner) {
            std::hint::black_box((e.field, e.message));
        }
    }
    let mut found = Vec::new();
    strings(&v, &mut found);
    for s in found {
        parsers(s);
    }
});
