//! What Meta's account-level webhooks say that changes sending: a template
//! paused, disabled or reinstated (`message_template_status_update`), its
//! category (`template_category_update`), and a contact who stopped
//! marketing messages in their WhatsApp settings (`user_preferences`).
//!
//! Templates are known by name and language across the router's accounts
//! (one WhatsApp Business Account's templates; a router serving several
//! with the same template names would share their states).

use super::State;
use super::ops::StateOp;
use crate::domain::Millis;

/// Template statuses under which Meta refuses sends (errors 132001,
/// 132015, 132016): the router refuses them first, without a Graph call.
const UNSENDABLE: &[&str] = &[
    "PAUSED",
    "DISABLED",
    "REJECTED",
    "DELETED",
    "PENDING_DELETION",
    "ARCHIVED",
    "LOCKED",
];

/// What is known of one template.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateInfo {
    /// Meta's last status event (`APPROVED`, `PAUSED` …), upper-case.
    pub status: Option<String>,
    /// `MARKETING`, `UTILITY`, `AUTHENTICATION` …, upper-case.
    pub category: Option<String>,
}

impl TemplateInfo {
    /// Whether Meta would refuse a send of this template now.
    pub fn block(&self) -> Option<TemplateBlock> {
        let status = self.status.as_deref()?;
        if status == "PAUSED" {
            Some(TemplateBlock::Paused)
        } else if UNSENDABLE.contains(&status) {
            Some(TemplateBlock::Unavailable)
        } else {
            None
        }
    }

    /// Whether Meta said this is a marketing template.
    pub fn is_marketing(&self) -> bool {
        self.category.as_deref() == Some("MARKETING")
    }
}

/// Why a template may not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateBlock {
    Paused,
    /// Disabled, rejected, deleted, archived or locked.
    Unavailable,
}

impl State {
    /// Meta reported `status` and/or `category` of template `name` in
    /// `language` (`""`: every language of that name).
    pub fn template_update(
        &self,
        name: &str,
        language: &str,
        status: Option<&str>,
        category: Option<&str>,
    ) {
        let key = (Box::<str>::from(name), Box::<str>::from(language));
        let mut info = self.templates.entry(key).or_default();
        if let Some(s) = status {
            info.status = Some(s.to_ascii_uppercase());
        }
        if let Some(c) = category {
            info.category = Some(c.to_ascii_uppercase());
        }
        let (status, category) = (info.status.clone(), info.category.clone());
        self.log(|| StateOp::Template {
            name: name.to_string(),
            language: language.to_string(),
            status,
            category,
        });
    }

    /// Whether Meta reported any template yet.
    pub fn knows_templates(&self) -> bool {
        !self.templates.is_empty()
    }

    /// What is known of template `name` in `language` (or of every
    /// language of it); `None` at once while Meta reported no template.
    pub fn template(&self, name: &str, language: &str) -> Option<TemplateInfo> {
        if self.templates.is_empty() {
            return None;
        }
        let get = |l: &str| {
            self.templates
                .get(&(Box::<str>::from(name), Box::<str>::from(l)))
                .map(|i| i.clone())
        };
        match (get(language), get("")) {
            (Some(mut exact), Some(any)) => {
                exact.category = exact.category.or(any.category);
                Some(exact)
            }
            (a, b) => a.or(b),
        }
    }

    /// Whether Meta would refuse a send of this template now.
    pub fn template_block(&self, name: &str, language: &str) -> Option<TemplateBlock> {
        self.template(name, language)?.block()
    }

    /// Whether Meta said this template is a marketing one.
    pub fn template_is_marketing(&self, name: &str, language: &str) -> bool {
        self.template(name, language)
            .is_some_and(|t| t.is_marketing())
    }

    /// Every template known, for a snapshot.
    pub(super) fn templates_known(&self) -> Vec<(String, String, TemplateInfo)> {
        self.templates
            .iter()
            .map(|e| {
                (
                    e.key().0.to_string(),
                    e.key().1.to_string(),
                    e.value().clone(),
                )
            })
            .collect()
    }

    /// The contact stopped (`true`) or resumed marketing messages in their
    /// WhatsApp settings (`user_preferences`).
    pub fn set_marketing_stop(&self, account: u16, contact: &str, stop: bool, now: Millis) {
        self.update_conversation(account, contact, now, |c| c.marketing_opt_out = stop);
    }

    pub fn marketing_stopped(&self, account: u16, contact: &str) -> bool {
        self.conversations
            .with(account, contact, |n| {
                n.extra().is_some_and(|e| e.marketing_opt_out)
            })
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paused_templates_are_blocked_until_reinstated_in_their_language() {
        let s = State::for_test();
        s.template_update("promo", "en", Some("paused"), Some("MARKETING"));
        assert_eq!(s.template_block("promo", "en"), Some(TemplateBlock::Paused));
        assert_eq!(s.template_block("promo", "pt_BR"), None);
        assert!(s.template_is_marketing("promo", "en"));
        s.template_update("promo", "en", Some("REINSTATED"), None);
        assert_eq!(s.template_block("promo", "en"), None);
        assert!(s.template_is_marketing("promo", "en"), "the category stays");
        s.template_update("old", "", Some("DISABLED"), None);
        assert_eq!(
            s.template_block("old", "de"),
            Some(TemplateBlock::Unavailable)
        );
        assert_eq!(s.template_block("unknown", "en"), None);
    }
}
