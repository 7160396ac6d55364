//! The local group registry: which channels belong to which groups, with expiry.
//!
//! A membership lives for `group_expiry` after the last `group_add` that refreshed it
//! (Django Channels semantics). Core's `TransportLayer` keeps two per instance (local
//! members, normal-channel memberships), binds a group at the transport when it has no live
//! member yet and unbinds it when [`GroupRegistry::discard`] reports the last one gone, and
//! unbinds expired memberships at [`GroupRegistry::next_expiry`].

use std::collections::BTreeMap;

use hashbrown::hash_map::EntryRef;
use hashbrown::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The members of one group, in name order, with the instant each membership expires.
/// Names are shared (`Arc<str>`): handing out the member list per group message costs a
/// reference count per member, not a copy of its name.
type Members = BTreeMap<Arc<str>, Instant>;

/// The expiry of a [pinned](GroupRegistry::pin) membership: a century after the first use
/// (memberships that merely last long, such as a `group_expiry` too large to add to the
/// clock, end before it).
static FOREVER: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(|| {
    let now = Instant::now();
    now.checked_add(Duration::from_secs(86_400 * 365 * 100))
        .unwrap_or(now + Duration::from_secs(86_400 * 365 * 31))
});

/// Group memberships with expiry (an empty registry is `default()`). See the module docs.
#[derive(Debug, Default)]
pub struct GroupRegistry {
    groups: Mutex<HashMap<String, Members>>,
}

impl GroupRegistry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Members>> {
        crate::toolkit::lock(&self.groups)
    }

    /// Adds or refreshes a membership that lasts `expiry`. Returns `true` if the group had no
    /// live member before (the first local member).
    pub fn add(&self, group: &str, channel: &str, expiry: Duration) -> bool {
        let now = Instant::now();
        let until = now
            .checked_add(expiry)
            .unwrap_or(now + Duration::from_secs(86_400 * 365 * 30))
            .min(*FOREVER - Duration::from_secs(1));
        self.add_until(group, channel, now, until)
    }

    /// Adds a membership that never expires (layer-internal ones, such as the
    /// [`inspect`](crate::inspect) responder's): [`next_expiry`](Self::next_expiry) does not
    /// count it and [`clear`](Self::clear) keeps it; only [`discard`](Self::discard) ends it.
    /// Returns `true` if the group had no live member before.
    pub fn pin(&self, group: &str, channel: &str) -> bool {
        self.add_until(group, channel, Instant::now(), *FOREVER)
    }

    fn add_until(&self, group: &str, channel: &str, now: Instant, until: Instant) -> bool {
        let mut map = self.lock();
        let members = map.entry(group.to_owned()).or_default();
        members.retain(|_, t| *t > now);
        let first = members.is_empty();
        match members.get_mut(channel) {
            Some(t) => *t = until,
            None => {
                members.insert(Arc::from(channel), until);
            }
        }
        first
    }

    /// Removes a membership. Returns `true` if that left the group with no live member
    /// (the last local member went).
    pub fn discard(&self, group: &str, channel: &str) -> bool {
        let mut map = self.lock();
        let was = (map.get_mut(group)).is_some_and(|m| m.remove(channel).is_some());
        let gone = Self::live(&mut map, group).is_none();
        was && gone
    }

    /// The live members of `group` in `map`, once the expired ones are removed; `None`, and
    /// the group removed, when there are none.
    fn live<'a>(map: &'a mut HashMap<String, Members>, group: &str) -> Option<&'a mut Members> {
        let EntryRef::Occupied(mut members) = map.entry_ref(group) else {
            return None;
        };
        let now = Instant::now();
        members.get_mut().retain(|_, t| *t > now);
        if members.get().is_empty() {
            members.remove();
            return None;
        }
        Some(members.into_mut())
    }

    /// `true` if `group` has a live member (no allocation: the hot-path filter for group
    /// traffic that is not for this instance).
    pub fn has_members(&self, group: &str) -> bool {
        let now = Instant::now();
        self.lock()
            .get(group)
            .is_some_and(|members| members.values().any(|t| *t > now))
    }

    /// The live members of `group`, sorted. Expired memberships are removed.
    pub fn members(&self, group: &str) -> Vec<Arc<str>> {
        let mut map = self.lock();
        let live = Self::live(&mut map, group);
        live.map_or_else(Vec::new, |members| members.keys().cloned().collect())
    }

    /// Removes expired memberships; returns each `(group, channel)` that expired.
    pub fn prune_expired(&self) -> Vec<(String, String)> {
        let now = Instant::now();
        self.remove_unless(|t| t > now)
    }

    /// Removes every membership but the [pinned](Self::pin) ones; returns each
    /// `(group, channel)` membership it removed (a group may still have a pinned member:
    /// see [`has_members`](Self::has_members)).
    pub fn clear(&self) -> Vec<(String, String)> {
        let pinned = *FOREVER;
        self.remove_unless(|t| t >= pinned)
    }

    /// Removes the memberships whose expiry fails `keep`; returns each `(group, channel)`.
    fn remove_unless(&self, keep: impl Fn(Instant) -> bool) -> Vec<(String, String)> {
        let mut removed = Vec::new();
        self.lock().retain(|g, members| {
            members.retain(|c, t| {
                let kept = keep(*t);
                if !kept {
                    removed.push((g.clone(), c.to_string()));
                }
                kept
            });
            !members.is_empty()
        });
        removed
    }

    /// The earliest instant a membership expires, if there is one ([pinned](Self::pin)
    /// memberships never do).
    pub fn next_expiry(&self) -> Option<Instant> {
        let pinned = *FOREVER;
        self.lock()
            .values()
            .flat_map(|members| members.values().copied())
            .filter(|t| *t < pinned)
            .min()
    }

    /// Every live `(group, channel)` membership.
    pub fn pairs(&self) -> Vec<(String, String)> {
        let now = Instant::now();
        let map = self.lock();
        let live = map.iter().flat_map(|(g, members)| {
            let live = members.iter().filter(move |(_, t)| **t > now);
            live.map(move |(c, _)| (g.clone(), c.to_string()))
        });
        live.collect()
    }

    /// `true` if `channel` is a live member of `group`.
    pub fn is_member(&self, group: &str, channel: &str) -> bool {
        let now = Instant::now();
        self.lock()
            .get(group)
            .and_then(|m| m.get(channel))
            .is_some_and(|t| *t > now)
    }

    /// Groups with at least one membership (live or not yet pruned).
    pub fn groups(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_and_last() {
        let r = GroupRegistry::default();
        assert!(r.add("g", "a", Duration::from_secs(60)));
        assert!(!r.add("g", "b", Duration::from_secs(60)));
        assert!(!r.add("g", "a", Duration::from_secs(60)));
        assert!(!r.add("g", "0", Duration::from_secs(60)));
        assert!(!r.discard("g", "0"));
        let members: Vec<String> = r.members("g").iter().map(|m| m.to_string()).collect();
        assert_eq!(members, vec!["a", "b"], "sorted, one entry per channel");
        assert!(!r.discard("g", "a"));
        assert!(!r.discard("g", "zzz"));
        assert!(r.discard("g", "b"));
        assert!(!r.discard("g", "b"));
        assert!(r.members("g").is_empty());
    }

    #[test]
    fn expiry() {
        let r = GroupRegistry::default();
        r.add("g", "a", Duration::ZERO);
        assert!(r.members("g").is_empty());
        r.add("g", "b", Duration::ZERO);
        assert_eq!(r.prune_expired(), vec![("g".to_string(), "b".to_string())]);
    }

    #[test]
    fn pairs_expire_one_by_one() {
        let r = GroupRegistry::default();
        r.add("s", "short", Duration::ZERO);
        r.add("g", "long", Duration::from_secs(60));
        r.add("h", "long", Duration::from_secs(60));
        assert!(r.next_expiry().is_some_and(|t| t <= Instant::now()));
        assert_eq!(
            r.prune_expired(),
            vec![("s".to_string(), "short".to_string())]
        );
        assert!(r.is_member("g", "long"));
        assert!(!r.is_member("s", "short"));
        let mut pairs = r.pairs();
        pairs.sort();
        assert_eq!(
            pairs,
            vec![
                ("g".to_string(), "long".to_string()),
                ("h".to_string(), "long".to_string())
            ]
        );
        let mut cleared = r.clear();
        cleared.sort();
        assert_eq!(cleared, pairs);
        assert!(r.next_expiry().is_none());
    }

    #[test]
    fn pinned_memberships_never_expire_and_survive_clear() {
        let r = GroupRegistry::default();
        assert!(r.pin("inspect", "me"), "the group's first member");
        assert!(!r.add("inspect", "user", Duration::from_secs(60)));
        assert!(
            r.add("g", "x", Duration::MAX),
            "even the longest expiry is not a pin"
        );
        let next = r
            .next_expiry()
            .expect("the two unpinned memberships expire");
        assert!(next < *FOREVER, "{next:?}");
        let mut cleared = r.clear();
        cleared.sort();
        assert_eq!(
            cleared,
            vec![
                ("g".to_string(), "x".to_string()),
                ("inspect".to_string(), "user".to_string())
            ]
        );
        assert!(r.is_member("inspect", "me"));
        assert!(
            r.next_expiry().is_none(),
            "a pinned membership never expires"
        );
        assert!(r.prune_expired().is_empty());
        assert!(r.discard("inspect", "me"), "discard ends it");
        assert!(r.groups().is_empty());
    }
}
