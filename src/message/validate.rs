//! WhatsApp's limits on outbound message content (CLOUD_API.md §7, §8).
//!
//! One function, [`validate`], checks a message object in Meta's send shape.
//! The API edge calls it on request bodies; the rule loader calls it on the
//! bodies compiled from `routes.toml`, and the rule runner again after
//! rendering templates. Errors name the field in Meta's shape
//! (`interactive.action.buttons`), never echoing the content.

use serde_json::Value;

/// A content error: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

type Check = Result<(), Invalid>;

fn bad(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The message types the send endpoint knows (SPEC §7).
pub const TYPES: &[&str] = &[
    "text",
    "image",
    "video",
    "audio",
    "document",
    "sticker",
    "location",
    "contacts",
    "interactive",
    "template",
    "reaction",
];

/// Check the `kind` object of an outbound message (`obj` is the value under
/// the key named like the type).
pub fn validate(kind: &str, obj: &Value) -> Check {
    match kind {
        "text" => text(obj),
        "image" | "video" | "audio" | "document" | "sticker" => media(kind, obj),
        "location" => location(obj),
        "contacts" => contacts(obj),
        "interactive" => interactive(obj),
        "template" => template(obj),
        "reaction" => reaction(obj),
        _ => Err(bad(
            "type",
            format!(
                "unknown message type {kind:?}; use one of {}",
                TYPES.join(", ")
            ),
        )),
    }
}

fn object<'a>(field: &str, v: &'a Value) -> Result<&'a serde_json::Map<String, Value>, Invalid> {
    v.as_object().ok_or_else(|| bad(field, "must be an object"))
}

fn only_keys(field: &str, obj: &serde_json::Map<String, Value>, allowed: &[&str]) -> Check {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(bad(
            join(field, k),
            format!("unknown field; allowed here: {}", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

fn join(field: &str, key: &str) -> String {
    if field.is_empty() {
        key.to_string()
    } else {
        format!("{field}.{key}")
    }
}

/// A required string of 1..=max characters (`max` 0 = no limit).
fn string<'a>(field: &str, v: Option<&'a Value>, max: usize) -> Result<&'a str, Invalid> {
    match v {
        None | Some(Value::Null) => Err(bad(field, "is required")),
        Some(Value::String(s)) => {
            if s.trim().is_empty() {
                Err(bad(field, "must not be empty"))
            } else if max > 0 && s.chars().count() > max {
                Err(bad(field, format!("is longer than {max} characters")))
            } else {
                Ok(s)
            }
        }
        Some(_) => Err(bad(field, "must be a string")),
    }
}

fn opt_string(field: &str, v: Option<&Value>, max: usize) -> Check {
    match v {
        None | Some(Value::Null) => Ok(()),
        some => string(field, some, max).map(|_| ()),
    }
}

fn opt_bool(field: &str, v: Option<&Value>) -> Check {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(_)) => Ok(()),
        Some(_) => Err(bad(field, "must be true or false")),
    }
}

fn url(field: &str, v: Option<&Value>) -> Check {
    let s = string(field, v, 2000)?;
    if s.starts_with("https://") || s.starts_with("http://") {
        Ok(())
    } else {
        Err(bad(field, "must be an http(s) URL"))
    }
}

fn text(obj: &Value) -> Check {
    let o = object("text", obj)?;
    only_keys("text", o, &["body", "preview_url"])?;
    string("text.body", o.get("body"), 4096)?;
    opt_bool("text.preview_url", o.get("preview_url"))
}

fn media(kind: &str, obj: &Value) -> Check {
    let o = object(kind, obj)?;
    let mut allowed = vec!["id", "link"];
    match kind {
        "image" | "video" => allowed.push("caption"),
        "document" => allowed.extend(["caption", "filename"]),
        "audio" => allowed.push("voice"),
        _ => {}
    }
    only_keys(kind, o, &allowed)?;
    match (o.get("id"), o.get("link")) {
        (Some(_), Some(_)) => return Err(bad(kind, "give either id or link, not both")),
        (None, None) => return Err(bad(join(kind, "link"), "is required (or id)")),
        (Some(id), None) => {
            string(&join(kind, "id"), Some(id), 256)?;
        }
        (None, Some(link)) => url(&join(kind, "link"), Some(link))?,
    }
    opt_string(&join(kind, "caption"), o.get("caption"), 1024)?;
    opt_string(&join(kind, "filename"), o.get("filename"), 240)?;
    opt_bool(&join(kind, "voice"), o.get("voice"))
}

fn coordinate(field: &str, v: Option<&Value>, limit: f64) -> Check {
    let n = match v {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        None | Some(Value::Null) => return Err(bad(field, "is required")),
        _ => None,
    };
    match n {
        Some(n) if n.is_finite() && n.abs() <= limit => Ok(()),
        _ => Err(bad(
            field,
            format!("must be a number between -{limit} and {limit}"),
        )),
    }
}

fn location(obj: &Value) -> Check {
    let o = object("location", obj)?;
    only_keys("location", o, &["latitude", "longitude", "name", "address"])?;
    coordinate("location.latitude", o.get("latitude"), 90.0)?;
    coordinate("location.longitude", o.get("longitude"), 180.0)?;
    opt_string("location.name", o.get("name"), 1000)?;
    opt_string("location.address", o.get("address"), 1000)
}

fn contacts(obj: &Value) -> Check {
    let cards = obj
        .as_array()
        .ok_or_else(|| bad("contacts", "must be a list of contact cards"))?;
    if cards.is_empty() || cards.len() > 257 {
        return Err(bad("contacts", "must hold 1 to 257 contact cards"));
    }
    for (i, card) in cards.iter().enumerate() {
        let field = format!("contacts[{i}]");
        let c = object(&field, card)?;
        let name = c
            .get("name")
            .ok_or_else(|| bad(format!("{field}.name"), "is required"))?;
        let name = object(&format!("{field}.name"), name)?;
        string(
            &format!("{field}.name.formatted_name"),
            name.get("formatted_name"),
            0,
        )?;
    }
    Ok(())
}

fn interactive(obj: &Value) -> Check {
    let o = object("interactive", obj)?;
    only_keys(
        "interactive",
        o,
        &["type", "header", "body", "footer", "action"],
    )?;
    let kind = string("interactive.type", o.get("type"), 0)?;
    let action = o
        .get("action")
        .ok_or_else(|| bad("interactive.action", "is required"))?;
    let action = object("interactive.action", action)?;
    match o.get("body") {
        Some(b) => {
            let b = object("interactive.body", b)?;
            only_keys("interactive.body", b, &["text"])?;
            string("interactive.body.text", b.get("text"), 1024)?;
        }
        None => return Err(bad("interactive.body.text", "is required")),
    }
    if let Some(f) = o.get("footer") {
        let f = object("interactive.footer", f)?;
        only_keys("interactive.footer", f, &["text"])?;
        string("interactive.footer.text", f.get("text"), 60)?;
    }
    if let Some(h) = o.get("header") {
        header(h, kind == "list")?;
    }
    match kind {
        "button" => reply_buttons(action),
        "list" => list(action),
        "cta_url" => {
            let name = string("interactive.action.name", action.get("name"), 0)?;
            if name != "cta_url" {
                return Err(bad("interactive.action.name", "must be \"cta_url\""));
            }
            let p = action
                .get("parameters")
                .ok_or_else(|| bad("interactive.action.parameters", "is required"))?;
            let p = object("interactive.action.parameters", p)?;
            string(
                "interactive.action.parameters.display_text",
                p.get("display_text"),
                20,
            )?;
            url("interactive.action.parameters.url", p.get("url"))
        }
        "flow" => {
            let p = action
                .get("parameters")
                .ok_or_else(|| bad("interactive.action.parameters", "is required"))?;
            let p = object("interactive.action.parameters", p)?;
            string(
                "interactive.action.parameters.flow_cta",
                p.get("flow_cta"),
                20,
            )?;
            if p.get("flow_id").is_none() && p.get("flow_name").is_none() {
                return Err(bad(
                    "interactive.action.parameters.flow_id",
                    "flow_id or flow_name is required",
                ));
            }
            Ok(())
        }
        other => Err(bad(
            "interactive.type",
            format!("unsupported interactive type {other:?}; use button, list, cta_url or flow"),
        )),
    }
}

fn header(h: &Value, text_only: bool) -> Check {
    let h = object("interactive.header", h)?;
    let kind = string("interactive.header.type", h.get("type"), 0)?;
    match kind {
        "text" => string("interactive.header.text", h.get("text"), 60).map(|_| ()),
        "image" | "video" | "document" if !text_only => {
            let field = format!("interactive.header.{kind}");
            let m = h
                .get(kind)
                .ok_or_else(|| bad(field.clone(), "is required"))?;
            let m = object(&field, m)?;
            match (m.get("id"), m.get("link")) {
                (Some(id), None) => string(&format!("{field}.id"), Some(id), 256).map(|_| ()),
                (None, Some(link)) => url(&format!("{field}.link"), Some(link)),
                _ => Err(bad(field, "give either id or link")),
            }
        }
        _ if text_only => Err(bad("interactive.header.type", "a list header must be text")),
        _ => Err(bad(
            "interactive.header.type",
            "must be text, image, video or document",
        )),
    }
}

fn reply_buttons(action: &serde_json::Map<String, Value>) -> Check {
    let buttons = action
        .get("buttons")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            bad(
                "interactive.action.buttons",
                "is required: a list of 1 to 3 reply buttons",
            )
        })?;
    if buttons.is_empty() || buttons.len() > 3 {
        return Err(bad(
            "interactive.action.buttons",
            format!("must hold 1 to 3 reply buttons, not {}", buttons.len()),
        ));
    }
    let mut ids = Vec::new();
    let mut titles = Vec::new();
    for (i, b) in buttons.iter().enumerate() {
        let field = format!("interactive.action.buttons[{i}]");
        let b = object(&field, b)?;
        if b.get("type").and_then(Value::as_str) != Some("reply") {
            return Err(bad(format!("{field}.type"), "must be \"reply\""));
        }
        let r = b
            .get("reply")
            .ok_or_else(|| bad(format!("{field}.reply"), "is required"))?;
        let r = object(&format!("{field}.reply"), r)?;
        let id = string(&format!("{field}.reply.id"), r.get("id"), 256)?;
        if id != id.trim() {
            return Err(bad(
                format!("{field}.reply.id"),
                "must not start or end with spaces",
            ));
        }
        let title = string(&format!("{field}.reply.title"), r.get("title"), 20)?;
        if ids.contains(&id) {
            return Err(bad(
                format!("{field}.reply.id"),
                "must be unique within the message",
            ));
        }
        if titles.contains(&title) {
            return Err(bad(
                format!("{field}.reply.title"),
                "must be unique within the message",
            ));
        }
        ids.push(id);
        titles.push(title);
    }
    Ok(())
}

fn list(action: &serde_json::Map<String, Value>) -> Check {
    string("interactive.action.button", action.get("button"), 20)?;
    let sections = action
        .get("sections")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            bad(
                "interactive.action.sections",
                "is required: a list of 1 to 10 sections",
            )
        })?;
    if sections.is_empty() || sections.len() > 10 {
        return Err(bad(
            "interactive.action.sections",
            format!("must hold 1 to 10 sections, not {}", sections.len()),
        ));
    }
    let mut ids = Vec::new();
    for (i, s) in sections.iter().enumerate() {
        let field = format!("interactive.action.sections[{i}]");
        let s = object(&field, s)?;
        if sections.len() > 1 || s.get("title").is_some() {
            string(&format!("{field}.title"), s.get("title"), 24)?;
        }
        let rows = s
            .get("rows")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(format!("{field}.rows"), "is required"))?;
        if rows.is_empty() {
            return Err(bad(format!("{field}.rows"), "must hold at least one row"));
        }
        for (j, r) in rows.iter().enumerate() {
            let rf = format!("{field}.rows[{j}]");
            let r = object(&rf, r)?;
            let id = string(&format!("{rf}.id"), r.get("id"), 200)?;
            string(&format!("{rf}.title"), r.get("title"), 24)?;
            opt_string(&format!("{rf}.description"), r.get("description"), 72)?;
            if ids.contains(&id) {
                return Err(bad(format!("{rf}.id"), "must be unique within the message"));
            }
            ids.push(id);
        }
    }
    if ids.len() > 10 {
        return Err(bad(
            "interactive.action.sections",
            format!("a list holds at most 10 rows in total, not {}", ids.len()),
        ));
    }
    Ok(())
}

fn template(obj: &Value) -> Check {
    let o = object("template", obj)?;
    only_keys("template", o, &["name", "language", "components"])?;
    let name = string("template.name", o.get("name"), 512)?;
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(bad(
            "template.name",
            "must be lower-case letters, digits and _",
        ));
    }
    let lang = o
        .get("language")
        .ok_or_else(|| bad("template.language.code", "is required"))?;
    let lang = object("template.language", lang)?;
    string("template.language.code", lang.get("code"), 20)?;
    match o.get("components") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(items)) => {
            for (i, c) in items.iter().enumerate() {
                let c = object(&format!("template.components[{i}]"), c)?;
                string(&format!("template.components[{i}].type"), c.get("type"), 0)?;
            }
            Ok(())
        }
        Some(_) => Err(bad("template.components", "must be a list")),
    }
}

fn reaction(obj: &Value) -> Check {
    let o = object("reaction", obj)?;
    only_keys("reaction", o, &["message_id", "emoji"])?;
    string("reaction.message_id", o.get("message_id"), 0)?;
    match o.get("emoji") {
        Some(Value::String(e)) if e.chars().count() <= 10 => Ok(()),
        None => Err(bad(
            "reaction.emoji",
            "is required (\"\" removes a reaction)",
        )),
        _ => Err(bad("reaction.emoji", "must be one emoji")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn buttons(n: usize) -> Value {
        let b: Vec<Value> = (0..n).map(|i| json!({"type": "reply", "reply": {"id": format!("b{i}"), "title": format!("Option {i}")}})).collect();
        json!({"type": "button", "body": {"text": "Pick"}, "action": {"buttons": b}})
    }

    #[test]
    fn reply_buttons_are_one_to_three() {
        assert!(validate("interactive", &buttons(3)).is_ok());
        let err = validate("interactive", &buttons(4)).unwrap_err();
        assert_eq!(err.field, "interactive.action.buttons");
        assert!(validate("interactive", &buttons(0)).is_err());
    }

    #[test]
    fn button_titles_are_limited_and_unique() {
        let mut v = buttons(2);
        v["action"]["buttons"][1]["reply"]["title"] = json!("x".repeat(21));
        assert_eq!(
            validate("interactive", &v).unwrap_err().field,
            "interactive.action.buttons[1].reply.title"
        );
        v["action"]["buttons"][1]["reply"]["title"] = json!("Option 0");
        assert!(
            validate("interactive", &v)
                .unwrap_err()
                .message
                .contains("unique")
        );
    }

    #[test]
    fn text_length_is_limited() {
        assert!(validate("text", &json!({"body": "hi"})).is_ok());
        assert_eq!(
            validate("text", &json!({"body": "é".repeat(4097)}))
                .unwrap_err()
                .field,
            "text.body"
        );
        assert_eq!(
            validate("text", &json!({"body": ""})).unwrap_err().field,
            "text.body"
        );
        assert_eq!(
            validate("text", &json!({"body": "x", "colour": 1}))
                .unwrap_err()
                .field,
            "text.colour"
        );
    }

    #[test]
    fn list_rows_total_at_most_ten() {
        let rows: Vec<Value> = (0..6)
            .map(|i| json!({"id": format!("r{i}"), "title": "Row"}))
            .collect();
        let v = json!({"type": "list", "body": {"text": "Menu"}, "action": {"button": "Open", "sections": [
            {"title": "A", "rows": rows.clone()}, {"title": "B", "rows": rows.iter().map(|r| { let mut r = r.clone(); r["id"] = json!(format!("{}b", r["id"].as_str().unwrap())); r }).collect::<Vec<_>>()}
        ]}});
        assert!(
            validate("interactive", &v)
                .unwrap_err()
                .message
                .contains("at most 10 rows")
        );
    }

    #[test]
    fn media_needs_id_or_link_and_captions_only_where_allowed() {
        assert!(
            validate(
                "image",
                &json!({"link": "https://x.test/a.jpg", "caption": "c"})
            )
            .is_ok()
        );
        assert!(validate("image", &json!({})).is_err());
        assert_eq!(
            validate("audio", &json!({"id": "1", "caption": "c"}))
                .unwrap_err()
                .field,
            "audio.caption"
        );
        assert!(validate("document", &json!({"id": "1", "filename": "a.pdf"})).is_ok());
    }

    #[test]
    fn templates_and_locations() {
        assert!(
            validate(
                "template",
                &json!({"name": "hello_world", "language": {"code": "en_US"}})
            )
            .is_ok()
        );
        assert_eq!(
            validate("template", &json!({"name": "Hello"}))
                .unwrap_err()
                .field,
            "template.name"
        );
        assert!(validate("location", &json!({"latitude": "38.9", "longitude": -77.0})).is_ok());
        assert_eq!(
            validate("location", &json!({"latitude": 91, "longitude": 0}))
                .unwrap_err()
                .field,
            "location.latitude"
        );
    }
}
