//! The TOML shape of `routes.toml` (SPEC §5). Unknown keys are errors; spans
//! are kept on everything checked after parsing so that late errors still
//! point at `FILE:LINE:COL`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use crate::domain::Strings;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    pub consent: Option<Spanned<ConsentIn>>,
    #[serde(default)]
    pub rule: Vec<Spanned<RuleIn>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentIn {
    pub opt_out: Option<Strings>,
    pub opt_in: Option<Strings>,
    pub opt_out_reply: Option<Spanned<String>>,
    pub opt_in_reply: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleIn {
    pub name: Spanned<String>,
    pub when: Option<Spanned<WhenIn>>,
    pub set_state: Option<Spanned<String>>,
    pub set: Option<BTreeMap<String, Spanned<String>>>,
    #[serde(default)]
    pub mark_read: bool,
    #[serde(default)]
    pub typing: bool,
    #[serde(default)]
    pub send: Vec<Spanned<SendIn>>,
    pub forward: Option<Spanned<Strings>>,
    #[serde(default)]
    pub handoff: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhenIn {
    pub account: Option<Strings>,
    pub from: Option<Spanned<Strings>>,
    #[serde(rename = "type")]
    pub kind: Option<Spanned<Strings>>,
    pub text: Option<Strings>,
    pub contains: Option<Strings>,
    pub regex: Option<Spanned<Strings>>,
    pub button: Option<Strings>,
    pub list: Option<Strings>,
    pub state: Option<Strings>,
    pub new_conversation: Option<bool>,
    pub reply_to_tag: Option<Strings>,
}

/// One `send` entry in its authoring shape; which keys a type allows is
/// checked when compiling.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub body: Option<String>,
    pub preview_url: Option<bool>,
    pub link: Option<String>,
    pub media_id: Option<String>,
    pub caption: Option<String>,
    pub filename: Option<String>,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
    pub name: Option<String>,
    pub address: Option<String>,
    pub header: Option<String>,
    pub footer: Option<String>,
    pub buttons: Option<Vec<ButtonIn>>,
    pub button: Option<String>,
    pub sections: Option<Vec<SectionIn>>,
    pub display_text: Option<String>,
    pub url: Option<String>,
    pub language: Option<String>,
    pub body_params: Option<Vec<String>>,
    pub components: Option<serde_json::Value>,
    pub emoji: Option<String>,
    #[serde(default)]
    pub quote: bool,
}

impl SendIn {
    /// The keys this entry sets, besides `type` and `quote`.
    pub fn keys(&self) -> Vec<&'static str> {
        let mut k = Vec::new();
        macro_rules! has {
            ($($f:ident),*) => { $( if self.$f.is_some() { k.push(stringify!($f)); } )* };
        }
        has!(
            body,
            preview_url,
            link,
            media_id,
            caption,
            filename,
            latitude,
            longitude,
            name,
            address,
            header,
            footer,
            buttons,
            button,
            sections,
            display_text,
            url,
            language,
            body_params,
            components,
            emoji
        );
        k
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ButtonIn {
    pub id: String,
    pub title: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SectionIn {
    pub title: Option<String>,
    pub rows: Vec<RowIn>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowIn {
    pub id: String,
    pub title: String,
    pub description: Option<String>,
}
