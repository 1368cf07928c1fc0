//! The conversations, kept compact: a million open windows are a million
//! entries, so an entry is what every conversation needs and no more.
//!
//! Each conversation is one 72-byte [`Node`] in its shard's vector of
//! nodes, found through a hash table of 4-byte positions (a
//! `DashMap<key, Box<value>>` bucket was 32 bytes, and a table is half
//! empty right after it grows). A
//! phone-number contact is kept as a number, a profile name of up to 24
//! bytes inline; the fields few conversations use (rule state, vars,
//! handoff, consent, a text contact id, a window Meta closed early, history
//! not yet archived) live in one [`Extra`] box that exists only while one
//! of them is set. Measured on `State` alone (1,000,000 inbound messages
//! from as many contacts, dedupe included): 456 → 184 bytes per open window.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::hash::BuildHasher;

use compact_str::CompactString;
use foldhash::fast::RandomState;
use hashbrown::HashTable;
use parking_lot::RwLock;

use super::conversations::{Conversation, RECENT, Recent};
use super::window::{WINDOW_MS, Window};
use crate::domain::Millis;

/// Shards of the table (independent locks).
const SHARDS: usize = 64;
/// Bits of a [`ConvTable::position`] that name the slot; the others (6)
/// name the shard.
const SLOT_BITS: u32 = 26;
/// `Node::last_inbound` of a conversation that never had a window.
const NO_WINDOW: Millis = Millis::MIN;

/// A contact id as the table compares and hashes it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Key<'a> {
    /// All digits, no leading zero, at most 19 digits: a phone number.
    Digits(u64),
    Text(&'a str),
}

impl<'a> Key<'a> {
    fn of(contact: &'a str) -> Self {
        let b = contact.as_bytes();
        if (1..=19).contains(&b.len()) && b[0] != b'0' && b.iter().all(u8::is_ascii_digit) {
            let n = b.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            Key::Digits(n)
        } else {
            Key::Text(contact)
        }
    }
}

/// The rarely used part of a conversation (see the module docs).
#[derive(Debug, Default, Clone)]
pub struct Extra {
    /// The contact id when it is not a phone number (e.g. a BSUID).
    contact: Option<Box<str>>,
    pub state: String,
    pub vars: BTreeMap<String, String>,
    pub handoff_until: Option<Millis>,
    pub opted_out: bool,
    pub consent_at: Option<Millis>,
    /// The end of a window Meta closed early (131047); otherwise a window
    /// ends 24 h after its last inbound message.
    expires: Option<Millis>,
    /// History entries not yet archived, oldest first.
    pub recent: VecDeque<Recent>,
    /// The contact's WhatsApp username, when they adopted one.
    pub username: Option<Box<str>>,
    /// Marketing messages stopped in the contact's WhatsApp settings.
    pub marketing_opt_out: bool,
}

impl Extra {
    fn is_empty(&self) -> bool {
        self.contact.is_none()
            && self.state.is_empty()
            && self.vars.is_empty()
            && self.handoff_until.is_none()
            && !self.opted_out
            && self.consent_at.is_none()
            && self.expires.is_none()
            && self.recent.is_empty()
            && self.username.is_none()
            && !self.marketing_opt_out
    }
}

/// A BSUID of the usual form (two capital letters, a dot, 1 to 20
/// digits: Meta's are `CC.` + 20 digits) in 10 bytes; all zero for none.
///
/// The digit strings are numbered by length, then value (the 10 of one
/// digit first, so leading zeros survive): under 1.12 × 10^20 of them,
/// 67 bits; with the 676 letter pairs and the zero for "none", 77 bits.
/// Kept in the node it costs 10 bytes a contact; in the name's string
/// (23 characters after the name) it made nearly every contact's name a
/// 32-byte heap string.
type PackedBsuid = [u8; 10];

/// Digit strings shorter than `len` digits (of 1 digit or more).
fn shorter_than(len: u32) -> u128 {
    (10u128.pow(len) - 10) / 9
}

/// `id` packed, if it has the usual form.
fn pack_bsuid(id: &str) -> Option<PackedBsuid> {
    let b = id.as_bytes();
    let digits = b.get(3..).filter(|d| (1..=20).contains(&d.len()))?;
    if !(b[0].is_ascii_uppercase()
        && b[1].is_ascii_uppercase()
        && b[2] == b'.'
        && digits.iter().all(u8::is_ascii_digit))
    {
        return None;
    }
    let value = digits
        .iter()
        .fold(0u128, |v, d| v * 10 + u128::from(d - b'0'));
    let letters = u128::from(b[0] - b'A') * 26 + u128::from(b[1] - b'A');
    let code = 1 + letters + 676 * (shorter_than(digits.len() as u32) + value);
    let mut packed = PackedBsuid::default();
    packed.copy_from_slice(&code.to_le_bytes()[..10]);
    Some(packed)
}

/// The BSUID `packed` holds, if any.
fn unpack_bsuid(packed: &PackedBsuid) -> Option<CompactString> {
    let mut bytes = [0u8; 16];
    bytes[..10].copy_from_slice(packed);
    let code = u128::from_le_bytes(bytes).checked_sub(1)?;
    let (letters, index) = ((code % 676) as u32, code / 676);
    let len = (1..20).find(|&l| index < shorter_than(l + 1)).unwrap_or(20);
    let value = index - shorter_than(len);
    let mut id = CompactString::default();
    for letter in [letters / 26, letters % 26] {
        id.push(char::from(b'A' + letter as u8));
    }
    id.push('.');
    let _ = write!(id, "{value:0width$}", width = len as usize);
    Some(id)
}

/// One conversation (72 bytes).
#[derive(Debug)]
pub struct Node {
    /// The contact as a number, or 0 when it is text (`Extra::contact`).
    digits: u64,
    /// The window's last inbound message; [`NO_WINDOW`] if none.
    last_inbound: Millis,
    pub last_activity: Millis,
    name: Option<CompactString>,
    extra: Option<Box<Extra>>,
    /// Entries ever added to the history (journal deltas are numbered by it).
    recent_seq: u32,
    pub account: u16,
    /// The contact's BSUID when it has the usual form (others go in `name`).
    bsuid: PackedBsuid,
}

impl Node {
    fn new(account: u16, key: Key<'_>) -> Self {
        let mut node = Node {
            digits: 0,
            last_inbound: NO_WINDOW,
            last_activity: 0,
            name: None,
            extra: None,
            recent_seq: 0,
            account,
            bsuid: PackedBsuid::default(),
        };
        match key {
            Key::Digits(n) => node.digits = n,
            Key::Text(s) => node.extra_mut().contact = Some(s.into()),
        }
        node
    }

    fn key(&self) -> Key<'_> {
        match (
            self.digits,
            self.extra.as_ref().and_then(|e| e.contact.as_deref()),
        ) {
            (0, Some(s)) => Key::Text(s),
            (n, _) => Key::Digits(n),
        }
    }

    /// The contact id (wa_id or user id).
    pub fn contact(&self) -> String {
        match self.key() {
            Key::Digits(n) => n.to_string(),
            Key::Text(s) => s.to_string(),
        }
    }

    pub fn window(&self) -> Option<Window> {
        (self.last_inbound != NO_WINDOW).then(|| Window {
            last_inbound: self.last_inbound,
            expires: self
                .extra
                .as_ref()
                .and_then(|e| e.expires)
                .unwrap_or(self.last_inbound + WINDOW_MS),
        })
    }

    pub fn set_window(&mut self, w: Option<Window>) {
        match w {
            None => {
                self.last_inbound = NO_WINDOW;
                if let Some(e) = self.extra.as_mut() {
                    e.expires = None;
                }
            }
            Some(w) => {
                self.last_inbound = w.last_inbound;
                if w.expires == w.last_inbound + WINDOW_MS {
                    if let Some(e) = self.extra.as_mut() {
                        e.expires = None;
                    }
                } else {
                    self.extra_mut().expires = Some(w.expires);
                }
            }
        }
        self.tidy();
    }

    /// The profile name. `name` holds it and, after a NUL, a BSUID that
    /// does not pack into `bsuid` (none of Meta's so far): kept here it
    /// costs a few bytes where the rarely used box would cost ~200.
    pub fn name(&self) -> Option<&str> {
        let both = self.name.as_deref()?;
        let name = both.split('\0').next().unwrap_or_default();
        (!name.is_empty()).then_some(name)
    }

    /// A BSUID kept after the name (one that does not pack).
    fn spilled_user_id(&self) -> Option<&str> {
        let (_, id) = self.name.as_deref()?.split_once('\0')?;
        (!id.is_empty()).then_some(id)
    }

    /// The contact's BSUID (Meta's business-scoped user id), when known.
    pub fn user_id(&self) -> Option<CompactString> {
        unpack_bsuid(&self.bsuid).or_else(|| self.spilled_user_id().map(Into::into))
    }

    /// Whether the contact's BSUID is `id` (compared packed: nothing made).
    pub fn has_user_id(&self, id: &str) -> bool {
        match pack_bsuid(id) {
            Some(packed) => self.bsuid == packed,
            None => self.spilled_user_id() == Some(id),
        }
    }

    pub fn set_user_id(&mut self, user_id: Option<&str>) {
        let packed = user_id.and_then(pack_bsuid).unwrap_or_default();
        let spilled = user_id.filter(|_| packed == PackedBsuid::default());
        if self.bsuid == packed && self.spilled_user_id() == spilled {
            return;
        }
        self.bsuid = packed;
        let name = self.name().map(str::to_string);
        self.pack(name.as_deref(), spilled);
    }

    fn pack(&mut self, name: Option<&str>, spilled_id: Option<&str>) {
        // A NUL in a name would read as the separator.
        let name = name.map(|n| n.replace('\0', ""));
        self.name = match (name.as_deref().filter(|n| !n.is_empty()), spilled_id) {
            (None, None) => None,
            (Some(n), None) => Some(CompactString::from(n)),
            (n, Some(id)) => {
                let mut both = CompactString::from(n.unwrap_or_default());
                both.push('\0');
                both.push_str(id);
                Some(both)
            }
        };
    }

    pub fn set_name(&mut self, name: Option<&str>) {
        // Every inbound message names its sender: mostly the same name.
        if self.name() == name {
            return;
        }
        let spilled = self.spilled_user_id().map(str::to_string);
        self.pack(name, spilled.as_deref());
    }

    pub fn extra(&self) -> Option<&Extra> {
        self.extra.as_deref()
    }

    /// The rare fields, made if missing; call [`Node::tidy`] after.
    pub fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// Drop the rare fields' box when none is set.
    pub fn tidy(&mut self) {
        if self.extra.as_ref().is_some_and(|e| e.is_empty()) {
            self.extra = None;
        }
    }

    pub fn opted_out(&self) -> bool {
        self.extra.as_ref().is_some_and(|e| e.opted_out)
    }

    pub fn handoff_until(&self) -> Option<Millis> {
        self.extra.as_ref().and_then(|e| e.handoff_until)
    }

    pub fn recent_seq(&self) -> u64 {
        u64::from(self.recent_seq)
    }

    /// History entries not yet archived, oldest first.
    pub fn recent(&self) -> impl Iterator<Item = &Recent> {
        self.extra.iter().flat_map(|e| e.recent.iter())
    }

    pub fn recent_len(&self) -> usize {
        self.extra.as_ref().map_or(0, |e| e.recent.len())
    }

    /// Add `entry` to the history (the last [`RECENT`] are kept).
    pub fn push_recent(&mut self, entry: Recent) {
        let recent = &mut self.extra_mut().recent;
        if recent.len() >= RECENT {
            recent.pop_front();
        }
        recent.push_back(entry);
        self.recent_seq = self.recent_seq.saturating_add(1);
    }

    /// Forget the in-memory entries up to `seq` (archived).
    pub fn trim_archived(&mut self, seq: u64) {
        let first = self.recent_seq() + 1 - self.recent_len() as u64;
        let n = (seq + 1)
            .saturating_sub(first)
            .min(self.recent_len() as u64) as usize;
        if let Some(e) = self.extra.as_mut() {
            e.recent.drain(..n);
            if e.recent.is_empty() {
                // Give the buffer back: a million idle conversations hold none.
                e.recent = VecDeque::new();
            }
        }
        self.tidy();
    }

    /// The whole conversation (its history in memory only `with_recent`).
    pub fn to_conversation(&self, with_recent: bool) -> Conversation {
        let e = self.extra.as_deref();
        Conversation {
            name: self.name().map(str::to_string),
            state: e.map(|e| e.state.clone()).unwrap_or_default(),
            vars: e.map(|e| e.vars.clone()).unwrap_or_default(),
            handoff_until: self.handoff_until(),
            opted_out: self.opted_out(),
            consent_at: e.and_then(|e| e.consent_at),
            recent: match (with_recent, e) {
                (true, Some(e)) => e.recent.clone(),
                _ => VecDeque::new(),
            },
            recent_seq: self.recent_seq(),
            last_activity: self.last_activity,
            window: self.window(),
            user_id: self.user_id().map(Into::into),
            username: e.and_then(|e| e.username.as_deref().map(str::to_string)),
            marketing_opt_out: e.is_some_and(|e| e.marketing_opt_out),
        }
    }

    /// Take every field of `c` but its window and history.
    pub fn set_fields(&mut self, c: Conversation) {
        self.set_name(c.name.as_deref());
        self.last_activity = c.last_activity;
        let e = self.extra_mut();
        e.state = c.state;
        e.vars = c.vars;
        e.handoff_until = c.handoff_until;
        e.opted_out = c.opted_out;
        e.consent_at = c.consent_at;
        e.marketing_opt_out = c.marketing_opt_out;
        if c.username.is_some() {
            e.username = c.username.map(Into::into);
        }
        self.tidy();
        if c.user_id.is_some() {
            self.set_user_id(c.user_id.as_deref());
        }
    }

    /// Replace the history in memory (journal replay of a snapshot).
    pub fn set_recent(&mut self, recent: VecDeque<Recent>, seq: u64) {
        self.extra_mut().recent = recent;
        self.recent_seq = u32::try_from(seq).unwrap_or(u32::MAX);
        self.tidy();
    }

    pub fn set_recent_seq(&mut self, seq: u64) {
        self.recent_seq = u32::try_from(seq).unwrap_or(u32::MAX);
    }
}

/// One shard: the nodes side by side in one vector (a removed node's slot
/// is reused), found through a hash table of their 4-byte positions.
///
/// Not a box per node: a million nodes allocated one by one during a load
/// share the allocator's pages with the load's short-lived allocations of
/// the same size, and those pages stay after the load, part used; in one
/// vector the nodes take exactly their size, and the load's pages are
/// wholly free again once it is over.
#[derive(Default)]
struct Shard {
    index: HashTable<u32>,
    nodes: Vec<Option<Node>>,
    vacant: Vec<u32>,
}

impl Shard {
    fn find(&self, hash: u64, account: u16, key: Key<'_>) -> Option<usize> {
        let nodes = &self.nodes;
        self.index
            .find(hash, |&i| {
                nodes[i as usize]
                    .as_ref()
                    .is_some_and(|n| n.account == account && n.key() == key)
            })
            .map(|&i| i as usize)
    }

    fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("indexed nodes exist")
    }

    fn node_mut(&mut self, i: usize) -> &mut Node {
        self.nodes[i].as_mut().expect("indexed nodes exist")
    }
}

/// Conversations by (account, contact): a sharded table of nodes.
pub struct ConvTable {
    shards: Box<[RwLock<Shard>]>,
    hasher: RandomState,
}

impl Default for ConvTable {
    fn default() -> Self {
        ConvTable {
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
            hasher: RandomState::default(),
        }
    }
}

impl ConvTable {
    fn hash(&self, account: u16, key: Key<'_>) -> u64 {
        match key {
            Key::Digits(n) => self.hasher.hash_one((account, n)),
            Key::Text(s) => self.hasher.hash_one((account, s)),
        }
    }

    /// The shard of a hash: bits below the 7 the table's control bytes use
    /// and far above the ones that pick a bucket.
    fn shard_index(hash: u64) -> usize {
        (hash >> 51) as usize % SHARDS
    }

    fn shard(&self, hash: u64) -> &RwLock<Shard> {
        &self.shards[Self::shard_index(hash)]
    }

    /// A node's position: its shard and slot in 32 bits (`None` past 2^26
    /// nodes in one shard).
    fn encode(shard: usize, slot: usize) -> Option<u32> {
        (slot < 1 << SLOT_BITS).then_some(((shard as u32) << SLOT_BITS) | slot as u32)
    }

    /// Read one conversation.
    pub fn with<R>(&self, account: u16, contact: &str, f: impl FnOnce(&Node) -> R) -> Option<R> {
        let key = Key::of(contact);
        let hash = self.hash(account, key);
        let shard = self.shard(hash).read();
        let i = shard.find(hash, account, key)?;
        Some(f(shard.node(i)))
    }

    /// Change one conversation, if it exists.
    pub fn with_mut<R>(
        &self,
        account: u16,
        contact: &str,
        f: impl FnOnce(&mut Node) -> R,
    ) -> Option<R> {
        let key = Key::of(contact);
        let hash = self.hash(account, key);
        let mut shard = self.shard(hash).write();
        let i = shard.find(hash, account, key)?;
        Some(f(shard.node_mut(i)))
    }

    /// Change one conversation, made empty first if it does not exist.
    pub fn upsert<R>(&self, account: u16, contact: &str, f: impl FnOnce(&mut Node) -> R) -> R {
        let key = Key::of(contact);
        let hash = self.hash(account, key);
        let mut guard = self.shard(hash).write();
        if let Some(i) = guard.find(hash, account, key) {
            return f(guard.node_mut(i));
        }
        let shard = &mut *guard;
        let node = Some(Node::new(account, key));
        let i = match shard.vacant.pop() {
            Some(i) => {
                shard.nodes[i as usize] = node;
                i
            }
            None => {
                shard.nodes.push(node);
                // A shard holds far fewer than 2^32 nodes (memory ends first).
                (shard.nodes.len() - 1) as u32
            }
        };
        let nodes = &shard.nodes;
        shard.index.insert_unique(hash, i, |&j| {
            let n = nodes[j as usize].as_ref().expect("indexed nodes exist");
            self.hash(n.account, n.key())
        });
        f(shard.node_mut(i as usize))
    }

    /// Forget one conversation.
    pub fn remove(&self, account: u16, contact: &str) -> bool {
        self.take(account, contact).is_some()
    }

    /// Forget one conversation: its node and the position it had, if it
    /// existed.
    pub fn take(&self, account: u16, contact: &str) -> Option<(u32, Node)> {
        let key = Key::of(contact);
        let hash = self.hash(account, key);
        let s = Self::shard_index(hash);
        let mut guard = self.shards[s].write();
        let shard = &mut *guard;
        let nodes = &shard.nodes;
        let found = shard.index.find_entry(hash, |&i| {
            nodes[i as usize]
                .as_ref()
                .is_some_and(|n| n.account == account && n.key() == key)
        });
        let (i, _) = found.ok()?.remove();
        let node = shard.nodes[i as usize].take()?;
        if i as usize == shard.nodes.len() - 1 {
            shard.nodes.pop();
        } else {
            shard.vacant.push(i);
        }
        Some((Self::encode(s, i as usize).unwrap_or(u32::MAX), node))
    }

    /// Where a conversation's node is (its shard and slot), while it
    /// exists: a removed node's slot may later hold another. `None` past
    /// 2^26 nodes in one shard.
    pub fn position(&self, account: u16, contact: &str) -> Option<u32> {
        let key = Key::of(contact);
        let hash = self.hash(account, key);
        let s = Self::shard_index(hash);
        let i = self.shards[s].read().find(hash, account, key)?;
        Self::encode(s, i)
    }

    /// Read the node at `position`, if one is there.
    pub fn at<R>(&self, position: u32, f: impl FnOnce(&Node) -> R) -> Option<R> {
        let shard = self.shards.get((position >> SLOT_BITS) as usize)?.read();
        let slot = (position & ((1 << SLOT_BITS) - 1)) as usize;
        shard.nodes.get(slot)?.as_ref().map(f)
    }

    /// Every conversation, a shard at a time (each under its read lock).
    pub fn for_each(&self, mut f: impl FnMut(&Node)) {
        for shard in self.shards.iter() {
            for n in shard.read().nodes.iter().flatten() {
                f(n);
            }
        }
    }

    /// Change every conversation, a shard at a time.
    pub fn for_each_mut(&self, mut f: impl FnMut(&mut Node)) {
        for shard in self.shards.iter() {
            for n in shard.write().nodes.iter_mut().flatten() {
                f(n);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().index.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: &Node) -> (Option<String>, Option<String>) {
        (n.name().map(str::to_string), n.user_id().map(Into::into))
    }

    fn both(name: Option<&str>, id: Option<&str>) -> (Option<String>, Option<String>) {
        (name.map(str::to_string), id.map(str::to_string))
    }

    /// The profile name and the BSUID (packed, or after the name when it
    /// does not pack): neither disturbs the other, and neither keeps the
    /// rarely used box alive.
    #[test]
    fn name_and_bsuid_keep_apart() {
        let mut n = Node::new(1, Key::of("16315551181"));
        assert_eq!(ids(&n), both(None, None));
        n.set_user_id(Some("US.13491208655302741918"));
        assert_eq!(ids(&n), both(None, Some("US.13491208655302741918")));
        assert!(n.name.is_none(), "a Meta BSUID is packed");
        n.set_name(Some("Ana"));
        assert_eq!(ids(&n), both(Some("Ana"), Some("US.13491208655302741918")));
        for odd in ["US.A1b2C3", "US.ENT.123", "US.123456789012345678901"] {
            n.set_user_id(Some(odd));
            assert_eq!(ids(&n), both(Some("Ana"), Some(odd)));
            assert!(n.has_user_id(odd) && !n.has_user_id("US.1"));
        }
        n.set_user_id(Some("US.1"));
        assert_eq!(ids(&n), both(Some("Ana"), Some("US.1")));
        assert_eq!(n.name.as_deref(), Some("Ana"), "the spilled id is gone");
        n.set_name(Some("A\0na"));
        assert_eq!(ids(&n), both(Some("Ana"), Some("US.1")));
        n.set_name(None);
        assert_eq!(ids(&n), both(None, Some("US.1")));
        n.set_user_id(Some("GB.x"));
        n.set_name(Some("Bo"));
        assert_eq!(ids(&n), both(Some("Bo"), Some("GB.x")));
        n.set_user_id(None);
        assert_eq!(ids(&n), both(Some("Bo"), None));
        n.set_name(None);
        assert_eq!(ids(&n), both(None, None));
        assert!(n.extra().is_none());
        let c = {
            n.set_name(Some("Ana"));
            n.set_user_id(Some("US.2"));
            n.to_conversation(false)
        };
        assert_eq!(
            (c.name.as_deref(), c.user_id.as_deref()),
            (Some("Ana"), Some("US.2"))
        );
        let mut m = Node::new(1, Key::of("16315551182"));
        m.set_fields(c);
        assert_eq!(ids(&m), both(Some("Ana"), Some("US.2")));
        assert!(m.extra().is_none(), "ids alone keep no box");
    }

    /// Every BSUID of the usual form comes back as it went in (leading
    /// zeros, one to twenty digits, any letters); others do not pack.
    #[test]
    fn bsuids_pack_and_unpack_exactly() {
        let mut ids: Vec<String> = ["US.0", "US.00", "US.9", "ZZ.99999999999999999999"]
            .map(String::from)
            .to_vec();
        ids.push("AA.00000000000000000000".into());
        ids.push("US.13491208655302741918".into());
        for len in 1..=20 {
            ids.push(format!("BR.{}", "7".repeat(len)));
            ids.push(format!("GB.0{}", "5".repeat(len - 1)));
        }
        let mut seen = std::collections::HashSet::new();
        for id in &ids {
            let packed = pack_bsuid(id).unwrap_or_else(|| panic!("{id} packs"));
            assert_ne!(packed, PackedBsuid::default());
            assert!(seen.insert(packed), "{id} packs apart from the others");
            assert_eq!(unpack_bsuid(&packed).as_deref(), Some(id.as_str()));
        }
        for odd in [
            "US.",
            "us.1",
            "U.12",
            "US-1",
            "US.1a",
            "US.ENT.1",
            "US.123456789012345678901",
            "16315551181",
        ] {
            assert_eq!(pack_bsuid(odd), None, "{odd}");
        }
        assert_eq!(unpack_bsuid(&PackedBsuid::default()), None);
    }

    #[test]
    fn a_node_is_72_bytes_in_its_slot_too() {
        assert_eq!(std::mem::size_of::<Node>(), 72);
        assert_eq!(std::mem::size_of::<Option<Node>>(), 72);
    }

    #[test]
    fn removed_slots_are_reused() {
        let t = ConvTable::default();
        let slots = |t: &ConvTable| t.shards.iter().map(|s| s.read().nodes.len()).sum::<usize>();
        for i in 1..=1000 {
            t.upsert(1, &i.to_string(), |n| n.last_activity = i);
        }
        let full = slots(&t);
        for i in (3..=1000).step_by(3) {
            assert!(t.remove(1, &i.to_string()));
        }
        assert_eq!(t.len(), 667);
        for i in (3..=1000).step_by(3) {
            assert_eq!(t.with(1, &i.to_string(), |_| ()), None);
            t.upsert(1, &i.to_string(), |n| n.last_activity = -i);
        }
        assert_eq!(slots(&t), full, "the same contacts took the vacant slots");
        for i in 1..=1000 {
            let kept = t.with(1, &i.to_string(), |n| n.last_activity);
            assert_eq!(kept, Some(if i % 3 == 0 { -i } else { i }));
        }
        let mut seen = 0;
        t.for_each(|_| seen += 1);
        assert_eq!(seen, 1000);
    }

    #[test]
    fn contacts_round_trip_as_numbers_or_text() {
        let t = ConvTable::default();
        for c in [
            "15551234567",
            "0123",
            "US.1349120865530274",
            "1",
            "99999999999999999999",
            "",
        ] {
            t.upsert(1, c, |n| n.last_activity = 5);
            assert_eq!(t.with(1, c, |n| n.contact()), Some(c.to_string()), "{c:?}");
            assert_eq!(t.with(2, c, |n| n.contact()), None, "another account");
        }
        assert_eq!(t.len(), 6);
        // "0123" is text, "123" a number: two conversations.
        t.upsert(1, "123", |_| ());
        assert_eq!(t.len(), 7);
        assert!(t.remove(1, "0123"));
        assert!(!t.remove(1, "0123"));
        assert_eq!(t.with(1, "123", |n| n.contact()).as_deref(), Some("123"));
    }

    #[test]
    fn the_rare_fields_box_goes_when_nothing_is_set() {
        let t = ConvTable::default();
        t.upsert(1, "155", |n| {
            n.extra_mut().state = "menu".into();
            n.tidy();
        });
        assert!(t.with(1, "155", |n| n.extra().is_some()).unwrap());
        t.upsert(1, "155", |n| {
            n.extra_mut().state.clear();
            n.tidy();
        });
        assert!(t.with(1, "155", |n| n.extra().is_none()).unwrap());
    }

    #[test]
    fn a_window_closed_early_keeps_its_end() {
        let t = ConvTable::default();
        let w = Window {
            last_inbound: 1000,
            expires: 1000 + WINDOW_MS,
        };
        t.upsert(1, "155", |n| n.set_window(Some(w)));
        assert_eq!(t.with(1, "155", |n| n.window()).unwrap(), Some(w));
        assert!(t.with(1, "155", |n| n.extra().is_none()).unwrap());
        let closed = Window { expires: 5000, ..w };
        t.upsert(1, "155", |n| n.set_window(Some(closed)));
        assert_eq!(t.with(1, "155", |n| n.window()).unwrap(), Some(closed));
        t.upsert(1, "155", |n| n.set_window(Some(w)));
        assert!(t.with(1, "155", |n| n.extra().is_none()).unwrap());
    }
}
