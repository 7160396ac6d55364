//! End-to-end loss accounting by origin (dedicated mode), as plain arithmetic.
//!
//! Through a proxy, each sender numbers its own messages per topic (an [`Origin`]: a random
//! id per sender and topic, and a sequence number from 1), and the proxy passes the numbers
//! on. The proxy's own `(epoch, seq)` still orders a topic's messages (see [`crate::seq`]),
//! but a proxy restart starts its numbers over, so a gap across a restart cannot be seen
//! in them. The sender's numbers go on, so a receiver counts losses by origin instead:
//!
//! - [`OriginTracker`] keeps, per subscribed topic, the last number of each origin it has
//!   accounted for. A message of a known origin with a higher number means the ones between
//!   never arrived, wherever they were lost (the sender's queue to a proxy that died, inside
//!   the old proxy, a subscriber's queue at the proxy, a reconnection the replay could not
//!   fill).
//! - The proxy's welcome says, for each origin it knows on the topic, the last number it
//!   published: a new subscriber starts there for those ([`OriginTracker::welcome`]).
//! - An origin first seen after the welcome (and not in it) began publishing on the topic
//!   after this subscription: what it published since it began ([`Origin::first`]) and did
//!   not arrive is lost too. Before the welcome, or when the tracker has forgotten origins
//!   (see [`MAX_ORIGINS`]), a new origin only sets where counting starts.
//!
//! Origin id 0 is a message without an origin (a sender that is not a chanlayer layer): not
//! counted.

use hashbrown::HashMap;

use crate::wire::Origin;

/// Origins remembered per topic; beyond it the least recently seen half is forgotten (and
/// the tracker stops counting the early losses of origins it then meets for the first
/// time, since a forgotten one could be among them).
pub(crate) const MAX_ORIGINS: usize = 4096;

/// Per topic: the last sequence number accounted for of each origin.
#[derive(Debug, Default)]
pub(crate) struct OriginTracker {
    /// Origin id -> (last sequence number, when last seen in `tick`s).
    last: HashMap<u64, (u64, u64)>,
    tick: u64,
    /// A welcome listed every origin known before it, and none was forgotten since: an
    /// origin met for the first time began after the subscription.
    complete: bool,
}

impl OriginTracker {
    /// The proxy's welcome: `table` has the last number published of every origin it knows
    /// on the topic. Origins known here already keep their number (the messages between
    /// are this subscriber's to count).
    pub fn welcome(&mut self, table: &[(u64, u64)]) {
        for &(id, last) in table.iter().filter(|(id, _)| *id != 0) {
            self.tick += 1;
            self.last.entry(id).or_insert((last, self.tick));
        }
        self.complete = true;
        self.bound();
    }

    /// Accounts for `count` delivered messages of `origin` (numbers `origin.seq` ..
    /// `origin.seq + count - 1`); `fresh` if they were published after this subscription's
    /// welcome. Returns how many of the origin's messages before them never arrived.
    pub fn deliver(&mut self, origin: Origin, count: u64, fresh: bool) -> u64 {
        if origin.id == 0 {
            return 0;
        }
        self.tick += 1;
        let end = origin.seq.saturating_add(count.max(1) - 1);
        match self.last.get_mut(&origin.id) {
            Some((last, seen)) => {
                *seen = self.tick;
                if end <= *last {
                    return 0; // numbers accounted for already (a replay, an overlap)
                }
                let gap = origin.seq.saturating_sub(last.saturating_add(1));
                *last = end;
                gap
            }
            None => {
                let gap = if fresh && self.complete {
                    origin.seq.saturating_sub(origin.first)
                } else {
                    0
                };
                self.last.insert(origin.id, (end, self.tick));
                self.bound();
                gap
            }
        }
    }

    /// Forgets the least recently seen half when there are too many.
    fn bound(&mut self) {
        if self.last.len() <= MAX_ORIGINS {
            return;
        }
        let mut seen: Vec<u64> = self.last.values().map(|&(_, t)| t).collect();
        let mid = seen.len() / 2;
        let cut = *seen.select_nth_unstable(mid).1;
        self.last.retain(|_, &mut (_, t)| t > cut);
        self.complete = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(id: u64, seq: u64, first: u64) -> Origin {
        Origin { id, seq, first }
    }

    enum Step {
        /// The proxy's welcome with its table.
        Welcome(&'static [(u64, u64)]),
        /// Messages delivered: (origin, count, fresh), and what is counted lost.
        Deliver(Origin, u64, bool, u64),
    }
    use Step::*;

    #[test]
    fn losses_by_origin() {
        let cases: &[(&str, &[Step])] = &[
            (
                "in order, one origin",
                &[Welcome(&[]), Deliver(o(1, 1, 1), 1, true, 0), Deliver(o(1, 2, 1), 1, true, 0), Deliver(o(1, 3, 1), 3, true, 0)],
            ),
            (
                "a gap in one origin",
                &[Welcome(&[(1, 10)]), Deliver(o(1, 11, 1), 1, true, 0), Deliver(o(1, 15, 1), 1, true, 3)],
            ),
            (
                "origins interleave: each counts its own",
                &[
                    Welcome(&[(1, 10), (2, 100)]),
                    Deliver(o(1, 11, 1), 1, true, 0),
                    Deliver(o(2, 103, 50), 1, true, 2),
                    Deliver(o(1, 12, 1), 1, true, 0),
                    Deliver(o(2, 104, 50), 1, true, 0),
                ],
            ),
            (
                "a proxy restart: the origin's numbers go on, the gap is counted",
                &[
                    Welcome(&[]),
                    Deliver(o(1, 1, 1), 500, true, 0),
                    // The new proxy first saw this origin at 731 (500-730 died with the old one).
                    Welcome(&[(1, 740)]),
                    Deliver(o(1, 731, 731), 10, false, 230),
                    Deliver(o(1, 741, 731), 1, true, 0),
                ],
            ),
            (
                "duplicates and replays of what was counted",
                &[Welcome(&[(1, 5)]), Deliver(o(1, 3, 1), 3, false, 0), Deliver(o(1, 6, 1), 1, true, 0), Deliver(o(1, 6, 1), 1, true, 0), Deliver(o(1, 4, 1), 2, true, 0)],
            ),
            (
                "an overlapping run counts only what is new",
                &[Welcome(&[]), Deliver(o(1, 1, 1), 5, true, 0), Deliver(o(1, 4, 1), 4, true, 0), Deliver(o(1, 9, 1), 1, true, 1)],
            ),
            (
                "a new origin after the welcome: what it published before the first that arrived is lost",
                &[Welcome(&[(1, 3)]), Deliver(o(2, 4, 1), 1, true, 3)],
            ),
            (
                "replays (published before the welcome) of an origin the table lists",
                &[Welcome(&[(2, 41)]), Deliver(o(2, 39, 1), 3, false, 0), Deliver(o(2, 42, 1), 1, true, 0)],
            ),
            (
                "a replay of an origin the table does not list: counting starts there",
                &[Welcome(&[]), Deliver(o(2, 40, 1), 1, false, 0), Deliver(o(2, 41, 1), 1, true, 0), Deliver(o(2, 43, 1), 1, true, 1)],
            ),
            (
                "a new origin with no welcome (a publisher that does not answer): counting starts there",
                &[Deliver(o(3, 40, 1), 1, true, 0), Deliver(o(3, 42, 1), 1, true, 1)],
            ),
            (
                "an origin the proxy began to follow late: counted from its first",
                &[Welcome(&[]), Deliver(o(4, 90, 88), 1, true, 2)],
            ),
            (
                "origin 0 is not counted",
                &[Welcome(&[(0, 5)]), Deliver(o(0, 9, 1), 1, true, 0), Deliver(o(0, 1, 1), 1, true, 0)],
            ),
            (
                "the end of the number space",
                &[Welcome(&[(1, u64::MAX - 3)]), Deliver(o(1, u64::MAX - 1, 1), 5, true, 1), Deliver(o(1, u64::MAX, 1), 1, true, 0)],
            ),
        ];
        for (name, steps) in cases {
            let mut t = OriginTracker::default();
            for (i, step) in steps.iter().enumerate() {
                match step {
                    Welcome(table) => t.welcome(table),
                    Deliver(origin, count, fresh, lost) => {
                        assert_eq!(
                            t.deliver(*origin, *count, *fresh),
                            *lost,
                            "{name}, step {i}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn too_many_origins_forgets_the_oldest_half_and_stops_counting_new_ones_early_losses() {
        let mut t = OriginTracker::default();
        t.welcome(&[]);
        for id in 1..=MAX_ORIGINS as u64 {
            assert_eq!(
                t.deliver(o(id, 5, 1), 1, true),
                4,
                "each began after the welcome"
            );
        }
        assert_eq!(t.last.len(), MAX_ORIGINS);
        // Origin 1 is seen again: it is the most recent now.
        assert_eq!(t.deliver(o(1, 6, 1), 1, true), 0);
        assert_eq!(t.deliver(o(100_000, 5, 1), 1, true), 4, "still complete");
        assert!(t.last.len() <= MAX_ORIGINS / 2 + 2, "{}", t.last.len());
        assert_eq!(t.deliver(o(1, 8, 1), 1, true), 1, "origin 1 was kept");
        assert_eq!(
            t.deliver(o(2, 9, 1), 1, true),
            0,
            "origin 2 was forgotten: no longer counted from its first"
        );
    }
}
