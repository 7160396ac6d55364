//! The name-check cache of [`TransportLayer`](crate::toolkit::TransportLayer): a stream of
//! sends to one channel (or receives from one) checks the name, works out its kind and
//! finds its owner once per thread and layer instance, not once per message.

use std::sync::atomic::AtomicU64;

use crate::names::Naming;
use crate::telemetry::Kind;

/// Layer instance serials for [`known`]: never 0, never reused in a process.
pub(crate) static SERIALS: AtomicU64 = AtomicU64::new(1);

/// Which name check the cache remembers: its slot.
#[derive(Clone, Copy)]
pub(crate) enum Check {
    Send = 0,
    Receive = 1,
}

/// Where a message to a channel goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// A normal channel: the transport's.
    Normal,
    /// A process-local channel of the instance whose id is these bytes of the name.
    Owner(usize, usize),
    /// A process-local channel whose name says no owner this naming can route to.
    Nowhere,
}

impl Route {
    /// The route of `channel` (of kind `kind`, `Local` or `Normal`) under `naming`.
    pub fn of(naming: Naming, channel: &str, kind: Kind) -> Route {
        if kind != Kind::Local {
            return Route::Normal;
        }
        match naming.owner(channel) {
            Some(id) => {
                let start = id.as_ptr() as usize - channel.as_ptr() as usize;
                Route::Owner(start, start + id.len())
            }
            None => Route::Nowhere,
        }
    }

    /// The owner's id in `channel` (the name this route was worked out for): `Some(None)`
    /// for a normal channel, `None` for one with no owner to route to.
    #[inline]
    pub fn owner(self, channel: &str) -> Option<Option<&str>> {
        match self {
            Route::Normal => Some(None),
            Route::Owner(a, b) => channel.get(a..b).map(Some),
            Route::Nowhere => None,
        }
    }
}

/// What a passed check found out about its channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Known {
    /// `Local` or `Normal`.
    pub kind: Kind,
    /// Where a send goes (receives do not use it).
    pub route: Route,
}

thread_local! {
    /// The channel each thread last checked for a send and for a receive, on which layer
    /// instance (serial 0: none), and what the check found.
    static CHECKED: std::cell::RefCell<[(u64, String, Known); 2]> = std::cell::RefCell::new(
        std::array::from_fn(|_| (0, String::new(), Known { kind: Kind::Normal, route: Route::Normal })),
    );
}

/// What this thread found when it last passed check `which` for `channel` on layer
/// instance `serial`; `None` if it did not (then check, and [`remember`]).
#[inline]
pub(crate) fn known(serial: u64, channel: &str, which: Check) -> Option<Known> {
    CHECKED
        .try_with(|c| {
            let (s, name, known) = &c.borrow()[which as usize];
            (*s == serial && name == channel).then_some(*known)
        })
        .ok()
        .flatten()
}

/// Remembers that `channel` passed check `which` on instance `serial`, with what it found.
/// Only a check that passed is remembered.
pub(crate) fn remember(serial: u64, channel: &str, which: Check, known: Known) {
    let _ = CHECKED.try_with(|c| {
        let (s, name, k) = &mut c.borrow_mut()[which as usize];
        *s = serial;
        name.clear();
        name.push_str(channel);
        *k = known;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_names_the_owner_inside_the_channel_name() {
        let layer = Naming::Layer;
        let r = Route::of(layer, "app.abc!xyz", Kind::Local);
        assert_eq!(r, Route::Owner(4, 7));
        assert_eq!(r.owner("app.abc!xyz"), Some(Some("abc")));
        assert_eq!(
            Route::of(layer, "jobs", Kind::Normal).owner("jobs"),
            Some(None)
        );
        // `!` with no `.{instance}` before it: nobody to route to.
        assert_eq!(Route::of(layer, "abc!xyz", Kind::Local), Route::Nowhere);
        assert_eq!(Route::Nowhere.owner("abc!xyz"), None);
        let rabbit = Naming::ChannelsRabbitmq;
        assert_eq!(
            Route::of(rabbit, "q.abc!xyz", Kind::Local).owner("q.abc!xyz"),
            Some(Some("q.abc"))
        );
    }

    #[test]
    fn only_the_same_instance_and_channel_hit() {
        let k = Known {
            kind: Kind::Local,
            route: Route::Owner(4, 7),
        };
        assert_eq!(known(9001, "app.abc!xyz", Check::Send), None);
        remember(9001, "app.abc!xyz", Check::Send, k);
        assert_eq!(known(9001, "app.abc!xyz", Check::Send), Some(k));
        assert_eq!(known(9002, "app.abc!xyz", Check::Send), None);
        assert_eq!(known(9001, "app.abc!xyw", Check::Send), None);
        assert_eq!(known(9001, "app.abc!xyz", Check::Receive), None);
        remember(9001, "other", Check::Send, k);
        assert_eq!(known(9001, "app.abc!xyz", Check::Send), None);
    }
}
