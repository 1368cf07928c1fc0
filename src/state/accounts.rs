//! The accounts (business numbers) the router knows: configured ones and
//! sandbox ones registered from webhooks.

use std::collections::HashMap;
use std::sync::Arc;

use super::State;
use super::ops::StateOp;
use crate::config::AccountSettings;

/// Accounts the router can hold (ids are `u16`).
pub const MAX_ACCOUNTS: usize = u16::MAX as usize;
/// Sandbox accounts registered from webhooks, at most: anyone holding the
/// sandbox app secret can make up phone number ids.
pub const MAX_SANDBOX_ACCOUNTS: usize = 1_000;

/// One business number.
#[derive(Debug)]
pub struct Account {
    pub id: u16,
    pub settings: AccountSettings,
    /// `metadata.display_phone_number` of its notifications (journaled).
    display_phone_number: parking_lot::RwLock<Option<String>>,
    /// Meta announced its throughput upgrade (journaled); read at every
    /// send start and webhook, hence an atomic.
    upgraded: std::sync::atomic::AtomicBool,
}

/// What Meta's webhooks told of a business number.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Number {
    /// `metadata.display_phone_number` of its notifications: how
    /// `phone_number_quality_update` names it.
    pub display_phone_number: Option<String>,
    /// Meta announced its throughput upgrade (1,000 messages/s).
    pub upgraded: bool,
}

impl Account {
    pub fn name(&self) -> &str {
        &self.settings.name
    }
    pub fn is_sandbox(&self) -> bool {
        self.settings.access_token.is_none()
    }

    pub fn number(&self) -> Number {
        Number {
            display_phone_number: self.display_phone_number.read().clone(),
            upgraded: self.upgraded(),
        }
    }

    fn upgraded(&self) -> bool {
        self.upgraded.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn shows(&self, display: &str) -> bool {
        self.display_phone_number.read().as_deref() == Some(display)
    }

    /// Send starts per second at most, now (see `AccountSettings::rate_for`).
    pub fn rate(&self) -> u32 {
        self.settings.rate_for(self.upgraded())
    }

    /// Sends awaiting Meta's answer at once, at most, now.
    pub fn max_in_flight(&self) -> usize {
        self.settings.max_in_flight_for(self.upgraded())
    }

    /// The least time between two send starts, now.
    pub fn spacing(&self) -> std::time::Duration {
        self.settings.spacing(self.upgraded())
    }
}

#[derive(Default)]
pub(super) struct AccountsInner {
    pub(super) list: Vec<Arc<Account>>,
    pub(super) by_name: HashMap<String, u16>,
    pub(super) by_pnid: HashMap<String, u16>,
}

impl State {
    /// Add an account; `None` when the router holds as many as it can.
    pub(super) fn add_account(&self, settings: AccountSettings) -> Option<Arc<Account>> {
        let mut inner = self.accounts.write();
        if let Some(&id) = inner.by_pnid.get(&settings.phone_number_id) {
            return Some(inner.list[id as usize].clone());
        }
        let sandboxes = inner
            .list
            .iter()
            .filter(|a| a.is_sandbox() && a.settings.name == a.settings.phone_number_id)
            .count();
        let id = u16::try_from(inner.list.len()).ok()?;
        if usize::from(id) >= MAX_ACCOUNTS
            || (settings.access_token.is_none()
                && settings.name == settings.phone_number_id
                && sandboxes >= MAX_SANDBOX_ACCOUNTS)
        {
            return None;
        }
        let account = Arc::new(Account {
            id,
            settings,
            display_phone_number: parking_lot::RwLock::default(),
            upgraded: std::sync::atomic::AtomicBool::new(false),
        });
        inner.by_name.insert(account.settings.name.clone(), id);
        inner
            .by_pnid
            .insert(account.settings.phone_number_id.clone(), id);
        inner.list.push(account.clone());
        let _ = self.new_accounts.send(account.clone());
        Some(account)
    }

    /// Register a sandbox account for a `phone_number_id` seen in a webhook;
    /// `None` past [`MAX_SANDBOX_ACCOUNTS`] (logged and counted).
    pub fn register_sandbox(&self, phone_number_id: &str) -> Option<Arc<Account>> {
        if let Some(a) = self.account_by_pnid(phone_number_id) {
            return Some(a);
        }
        let Some(account) = self.add_account(AccountSettings::sandbox(phone_number_id)) else {
            self.metrics.webhook("sandbox_account_refused");
            tracing::error!(
                phone_number_id,
                max = MAX_SANDBOX_ACCOUNTS,
                "sandbox account not registered: the router holds as many sandbox accounts as it allows; the webhook's items for it are ignored"
            );
            return None;
        };
        tracing::info!(phone_number_id, "sandbox account registered from a webhook");
        self.log(|| StateOp::Account {
            name: account.name().to_string(),
            phone_number_id: phone_number_id.to_string(),
        });
        Some(account)
    }

    pub fn accounts(&self) -> Vec<Arc<Account>> {
        self.accounts.read().list.clone()
    }

    pub fn account(&self, id: u16) -> Option<Arc<Account>> {
        self.accounts.read().list.get(id as usize).cloned()
    }

    pub fn account_by_name(&self, name: &str) -> Option<Arc<Account>> {
        let inner = self.accounts.read();
        inner
            .by_name
            .get(name)
            .map(|&id| inner.list[id as usize].clone())
    }

    pub fn account_by_pnid(&self, pnid: &str) -> Option<Arc<Account>> {
        let inner = self.accounts.read();
        inner
            .by_pnid
            .get(pnid)
            .map(|&id| inner.list[id as usize].clone())
    }

    /// The account used when a request names none.
    pub fn default_account(&self) -> Option<Arc<Account>> {
        let inner = self.accounts.read();
        inner
            .list
            .iter()
            .find(|a| a.settings.default)
            .or_else(|| inner.list.first())
            .cloned()
    }

    /// The number's `display_phone_number`, as a notification for it
    /// gives it; journaled when it is new or changed.
    pub fn note_display_number(&self, account: &Account, display: &str) {
        if display.is_empty() || account.shows(display) {
            return;
        }
        *account.display_phone_number.write() = Some(display.to_string());
        self.log(|| number_op(account, account.number()));
    }

    /// Meta announced a throughput upgrade of the number it names by its
    /// display number (`phone_number_quality_update`): the account whose
    /// notifications carry that number, if any.
    pub fn throughput_upgrade(&self, display: &str) -> Option<Arc<Account>> {
        let account = self.accounts().into_iter().find(|a| a.shows(display))?;
        if !account
            .upgraded
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            self.log(|| number_op(&account, account.number()));
        }
        Some(account)
    }

    /// A journaled [`StateOp::Number`] applied.
    pub(super) fn restore_number(&self, account: &Account, number: Number) {
        *account.display_phone_number.write() = number.display_phone_number;
        account
            .upgraded
            .store(number.upgraded, std::sync::atomic::Ordering::Relaxed);
    }

    /// Accounts whose number has more to journal than its name.
    pub(super) fn numbers(&self) -> impl Iterator<Item = StateOp> {
        self.accounts().into_iter().filter_map(|a| {
            let n = a.number();
            (n != Number::default()).then(|| number_op(&a, n))
        })
    }

    pub(super) fn account_name(&self, id: u16) -> String {
        self.account(id)
            .map(|a| a.name().to_string())
            .unwrap_or_default()
    }
}

fn number_op(account: &Account, n: Number) -> StateOp {
    StateOp::Number {
        account: account.name().to_string(),
        display_phone_number: n.display_phone_number,
        upgraded: n.upgraded,
    }
}
