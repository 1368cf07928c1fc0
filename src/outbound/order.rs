//! Record ids in creation order, for listing (`GET /v1/messages`).
//!
//! The router's ids are `msg_` and 32 lowercase hex digits of a UUID (v7:
//! they sort by time, so string order is creation order). Such an id is
//! kept as its number: a comparison is one integer compare, and an insert
//! copies 16 bytes instead of allocating a string (every send inserts
//! one, every archived record removes one). An id of any other form —
//! none is made today, but records come from journals and other routers —
//! is kept by its string, and listing merges the two in string order, so
//! the order is exactly that of the ids as strings.

use std::collections::BTreeSet;
use std::ops::Bound;

use crate::ids::MessageId;

const PREFIX: &str = "msg_";

#[derive(Debug, Default)]
pub struct Order {
    numbers: BTreeSet<u128>,
    other: BTreeSet<MessageId>,
}

/// The number of an id of the router's form; `None` for any other string
/// (uppercase digits too: they would sort differently as strings).
fn number(id: &str) -> Option<u128> {
    let hex = id.strip_prefix(PREFIX)?;
    if hex.len() != 32 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u128::from_str_radix(hex, 16).ok()
}

fn id_of(n: u128) -> MessageId {
    MessageId::from(format!("{PREFIX}{n:032x}"))
}

impl Order {
    pub fn insert(&mut self, id: &str) {
        match number(id) {
            Some(n) => {
                self.numbers.insert(n);
            }
            None => {
                self.other.insert(MessageId::from(id));
            }
        }
    }

    pub fn remove(&mut self, id: &str) {
        match number(id) {
            Some(n) => {
                self.numbers.remove(&n);
            }
            None => {
                self.other.remove(id);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.numbers.len() + self.other.len()
    }

    /// The ids that sort below `cursor` (all without one), newest first.
    pub fn newest_below<'a>(
        &'a self,
        cursor: Option<&'a str>,
    ) -> impl Iterator<Item = MessageId> + 'a {
        let upper = match cursor {
            None => Bound::Unbounded,
            Some(c) => Bound::Excluded(c),
        };
        // A cursor of the router's form bounds the numbers directly; any
        // other string is compared with each id's text (a cursor is an id
        // of an earlier page, so that path is for odd requests only).
        let numeric = cursor.map(number);
        let numbers: Box<dyn Iterator<Item = MessageId> + 'a> = match numeric {
            None => Box::new(self.numbers.iter().rev().map(|&n| id_of(n))),
            Some(Some(n)) => Box::new(self.numbers.range(..n).rev().map(|&n| id_of(n))),
            Some(None) => {
                let c = cursor.unwrap_or_default();
                Box::new(
                    self.numbers
                        .iter()
                        .rev()
                        .map(|&n| id_of(n))
                        .filter(move |id| id.as_str() < c),
                )
            }
        };
        let mut numbers = numbers.peekable();
        let mut other = self
            .other
            .range::<str, _>((Bound::Unbounded, upper))
            .rev()
            .peekable();
        std::iter::from_fn(move || match (numbers.peek(), other.peek()) {
            (Some(a), Some(b)) if a.as_str() < b.as_str() => other.next().cloned(),
            (Some(_), _) => numbers.next(),
            (None, _) => other.next().cloned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(o: &Order, cursor: Option<&str>) -> Vec<String> {
        o.newest_below(cursor).map(MessageId::into_string).collect()
    }

    /// Whatever the ids' form, the listing is their string order, newest
    /// first, below any cursor — the same as a set of strings gives.
    #[test]
    fn lists_in_string_order_whatever_the_form() {
        let ids = [
            format!("msg_{:032x}", 5u128),
            format!("msg_{:032x}", 7u128),
            format!("msg_{:032x}", u128::MAX),
            format!("msg_{:032x}", 1u128 << 100),
            "msg_0000old".to_string(),
            "msg_00000000000000000000000000000006".to_string(),
            "msg_0000000000000000000000000000000A".to_string(),
            "a-foreign-id".to_string(),
            "zzz".to_string(),
            "msg_".to_string(),
        ];
        let mut o = Order::default();
        let mut strings = BTreeSet::new();
        for id in &ids {
            o.insert(id);
            strings.insert(id.clone());
        }
        assert_eq!(o.len(), ids.len());
        assert_eq!(o.other.len(), 5, "the ids not of the router's form");
        let mut cursors: Vec<Option<&str>> = vec![None, Some(""), Some("msg_0"), Some("msg_1")];
        cursors.extend(ids.iter().map(|s| Some(s.as_str())));
        for cursor in cursors {
            let want: Vec<String> = strings
                .iter()
                .rev()
                .filter(|s| cursor.is_none_or(|c| s.as_str() < c))
                .cloned()
                .collect();
            assert_eq!(listed(&o, cursor), want, "below {cursor:?}");
        }
        for id in &ids {
            o.remove(id);
        }
        assert_eq!(o.len(), 0);
    }

    #[test]
    fn generated_and_derived_ids_are_kept_as_numbers() {
        let mut o = Order::default();
        let a = MessageId::generate();
        let b = MessageId::derived(1_700_000_000_000, "wamid.x");
        o.insert(&a);
        o.insert(&b);
        assert_eq!(o.numbers.len(), 2);
        assert!(o.other.is_empty());
        let mut want = vec![a.into_string(), b.into_string()];
        want.sort();
        want.reverse();
        assert_eq!(listed(&o, None), want);
    }
}
