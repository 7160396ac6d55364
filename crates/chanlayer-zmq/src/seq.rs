//! A receiver's sequence accounting for one topic, as plain arithmetic.
//!
//! Every message a publisher (the embedded publisher, the proxy) puts on a topic carries the
//! publisher's **epoch** (random per publisher start) and the topic's **sequence number**
//! (from 1, one per message). A receiver keeps, per subscribed topic, where that sequence
//! stands ([`SeqTracker`]) and with it:
//!
//! - delivers messages in order, once each: a message at or below the last one delivered is
//!   a duplicate (a replay of something seen, a batch that overlaps);
//! - counts a gap (messages PUB/SUB dropped on the way) when a later message arrives;
//! - takes a new epoch (a restarted publisher) as a new start: nothing is known of what the
//!   old publisher still had, so no gap is counted there.
//!
//! [`settle`] is what happens when a subscription probe is answered (see [`crate::wire`]):
//! the messages held back meanwhile (the replay of retained messages and live ones) are put
//! in order, duplicates and what was delivered before a reconnection go, and the gaps of the
//! counting window are counted.
//!
//! Sequence numbers are `u64` from 1: they do not wrap in practice, and the arithmetic here
//! saturates, so a garbage sequence number from the wire cannot overflow.

/// A position in a publisher's sequence of one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pos {
    /// The publisher's epoch (random per publisher start).
    pub epoch: u64,
    /// The sequence number.
    pub seq: u64,
}

impl Pos {
    pub const fn new(epoch: u64, seq: u64) -> Pos {
        Pos { epoch, seq }
    }
}

/// What [`SeqTracker::check_run`] says of a run of consecutive messages (a batch frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunVerdict {
    /// Messages at the front of the run that were delivered already.
    pub skip: u64,
    /// Messages missing before the first one delivered.
    pub gap: u64,
    /// The run starts a new epoch (or is the first thing seen).
    pub restart: bool,
}

/// Where one topic's sequence stands at a receiver: the last message delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SeqTracker {
    /// The last message delivered.
    pub last: Option<Pos>,
}

impl SeqTracker {
    /// Checks the run `first, first + 1, ... first + count - 1` (`count` at least 1), and
    /// moves the tracker past its end. `None` when every message of it was delivered
    /// already.
    pub fn check_run(&mut self, epoch: u64, first: u64, count: u64) -> Option<RunVerdict> {
        let end = first.saturating_add(count.max(1) - 1);
        let same = self.last.filter(|last| last.epoch == epoch);
        if same.is_some_and(|last| end <= last.seq) {
            return None;
        }
        // `last.seq + 1` cannot overflow: `end <= u64::MAX` returned above. Another epoch
        // (or none yet) starts at `first`.
        let next = same.map_or(first, |last| last.seq + 1);
        self.last = Some(Pos::new(epoch, end));
        Some(RunVerdict {
            skip: next.saturating_sub(first),
            gap: first.saturating_sub(next),
            restart: same.is_none(),
        })
    }
}

/// A message held back while a subscription probe is outstanding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Held<P> {
    pub pos: Pos,
    /// It came as the replay of a retained message (on the probe topic).
    pub replayed: bool,
    pub payload: P,
}

/// What [`settle`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settled {
    /// Where the topic's sequence stands once the held messages are delivered.
    pub tracker: SeqTracker,
    /// Messages of the counting window that never arrived.
    pub lost: u64,
    /// Held messages (after the duplicates went) that came as replays.
    pub replayed: u64,
}

/// Ends a probe: orders `held` for delivery (in place: what remains is delivered in that
/// order), drops duplicates and what was delivered before, and counts what is missing.
///
/// - `welcome` is the publisher's answer: its epoch and the topic's sequence number when it
///   answered (`None`: no answer came, the probe was given up).
/// - `floor` is what was delivered before the connection broke (a re-probe after a
///   reconnection), `None` for a first subscription.
///
/// The counting window: after a reconnection to the same publisher (the floor's epoch is
/// the welcome's), everything after the floor up to the welcome and the held messages;
/// otherwise only what was published after the welcome (what came before it was published
/// before this subscription, or by a previous publisher). Messages of the floor's epoch
/// that are still on their way after a restart are delivered first, their gaps counted.
pub(crate) fn settle<P>(
    held: &mut Vec<Held<P>>,
    welcome: Option<Pos>,
    floor: Option<Pos>,
) -> Settled {
    let floor_epoch = floor.map(|f| f.epoch);
    let final_epoch = welcome
        .map(|w| w.epoch)
        .or_else(|| {
            held.iter()
                .map(|h| h.pos.epoch)
                .find(|&e| Some(e) != floor_epoch)
        })
        .or(floor_epoch);
    // The floor's epoch first (late arrivals of a previous publisher), the final one last.
    let rank = |e: u64| match Some(e) {
        e if e == final_epoch => 2u8,
        e if e == floor_epoch => 0,
        _ => 1,
    };
    held.sort_by_key(|h| (rank(h.pos.epoch), h.pos.epoch, h.pos.seq));
    held.dedup_by_key(|h| h.pos);
    held.retain(|h| floor.is_none_or(|f| h.pos.epoch != f.epoch || h.pos.seq > f.seq));
    let replayed = held.iter().filter(|h| h.replayed).count() as u64;

    let mut lost = 0u64;
    // Gaps among the floor epoch's late arrivals (when the final epoch is another one).
    if let Some(f) = floor.filter(|f| Some(f.epoch) != final_epoch) {
        let mut next = f.seq.saturating_add(1);
        for h in held.iter().filter(|h| h.pos.epoch == f.epoch) {
            lost += h.pos.seq.saturating_sub(next);
            next = h.pos.seq.saturating_add(1);
        }
    }
    let mut tracker = SeqTracker::default();
    if let Some(epoch) = final_epoch {
        let same = floor.filter(|f| f.epoch == epoch);
        let welcome_seq = welcome.filter(|w| w.epoch == epoch).map(|w| w.seq);
        // The first sequence number the window counts, and how far it reaches at least.
        let (mut next, reach) = match (same, welcome_seq) {
            (Some(f), w) => (Some(f.seq.saturating_add(1)), w),
            (None, Some(w)) => (Some(w.saturating_add(1)), None),
            (None, None) => (None, None),
        };
        let mut last = same.map(|f| f.seq).max(welcome_seq);
        for h in held.iter().filter(|h| h.pos.epoch == epoch) {
            let seq = h.pos.seq;
            // No welcome and no floor: the first message is where counting starts.
            let n = next.unwrap_or(seq);
            if seq >= n {
                lost += seq - n;
                next = Some(seq.saturating_add(1));
            }
            last = last.max(Some(seq));
        }
        if let (Some(n), Some(r)) = (next, reach) {
            if r >= n {
                lost += r - n + 1;
            }
        }
        tracker.last = last.map(|l| Pos::new(epoch, l));
    }
    Settled {
        tracker,
        lost,
        replayed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: u64 = 7;
    const E2: u64 = 8;

    /// What [`SeqTracker::check_run`] says of a run of one message.
    #[derive(Debug, PartialEq)]
    enum Verdict {
        Deliver { gap: u64 },
        Duplicate,
        Restart,
    }

    #[test]
    fn check_one_message_at_a_time() {
        use Verdict::*;
        let check = |t: &mut SeqTracker, epoch, seq| match t.check_run(epoch, seq, 1) {
            None => Duplicate,
            Some(RunVerdict { restart: true, .. }) => Restart,
            Some(RunVerdict { gap, .. }) => Deliver { gap },
        };
        // (epoch, seq) in arrival order, with what the tracker says of each.
        /// A scenario: its name, and (epoch, seq) in arrival order with the verdict of each.
        type Steps = &'static [((u64, u64), Verdict)];
        let cases: &[(&str, Steps)] = &[
            (
                "in order",
                &[
                    ((E, 1), Restart),
                    ((E, 2), Deliver { gap: 0 }),
                    ((E, 3), Deliver { gap: 0 }),
                ],
            ),
            (
                "gaps",
                &[
                    ((E, 1), Restart),
                    ((E, 4), Deliver { gap: 2 }),
                    ((E, 5), Deliver { gap: 0 }),
                    ((E, 105), Deliver { gap: 99 }),
                ],
            ),
            (
                "duplicates and late arrivals",
                &[
                    ((E, 1), Restart),
                    ((E, 3), Deliver { gap: 1 }),
                    ((E, 3), Duplicate),
                    ((E, 2), Duplicate),
                    ((E, 1), Duplicate),
                    ((E, 4), Deliver { gap: 0 }),
                ],
            ),
            (
                "a new epoch starts over, no gap counted",
                &[
                    ((E, 10), Restart),
                    ((E, 11), Deliver { gap: 0 }),
                    ((E2, 1), Restart),
                    ((E2, 2), Deliver { gap: 0 }),
                    ((E, 12), Restart),
                ],
            ),
            (
                "first message anywhere in the sequence",
                &[((E, 500), Restart), ((E, 501), Deliver { gap: 0 })],
            ),
            (
                "the end of the sequence space",
                &[
                    ((E, u64::MAX - 2), Restart),
                    ((E, u64::MAX), Deliver { gap: 1 }),
                    ((E, u64::MAX), Duplicate),
                    ((E, 0), Duplicate),
                ],
            ),
        ];
        for (name, steps) in cases {
            let mut t = SeqTracker::default();
            for (i, ((epoch, seq), want)) in steps.iter().enumerate() {
                assert_eq!(check(&mut t, *epoch, *seq), *want, "{name}, step {i}");
            }
        }
    }

    #[test]
    fn check_runs() {
        let rv = |skip, gap, restart| Some(RunVerdict { skip, gap, restart });
        /// (name, the tracker's last, the run (epoch, first, count), the verdict, the
        /// tracker's last afterwards)
        type Case = (
            &'static str,
            Option<(u64, u64)>,
            (u64, u64, u64),
            Option<RunVerdict>,
            (u64, u64),
        );
        let cases: &[Case] = &[
            ("first run", None, (E, 1, 3), rv(0, 0, true), (E, 3)),
            (
                "right after",
                Some((E, 3)),
                (E, 4, 3),
                rv(0, 0, false),
                (E, 6),
            ),
            (
                "a gap before",
                Some((E, 3)),
                (E, 6, 2),
                rv(0, 2, false),
                (E, 7),
            ),
            ("overlaps", Some((E, 5)), (E, 3, 5), rv(3, 0, false), (E, 7)),
            ("all seen", Some((E, 9)), (E, 3, 5), None, (E, 9)),
            ("ends on the last", Some((E, 7)), (E, 3, 5), None, (E, 7)),
            (
                "new epoch",
                Some((E, 9)),
                (E2, 1, 2),
                rv(0, 0, true),
                (E2, 2),
            ),
            (
                "count 0 is one",
                Some((E, 1)),
                (E, 2, 0),
                rv(0, 0, false),
                (E, 2),
            ),
            (
                "does not overflow",
                Some((E, 1)),
                (E, u64::MAX, 5),
                rv(0, u64::MAX - 2, false),
                (E, u64::MAX),
            ),
        ];
        for (name, last, (epoch, first, count), want, after) in cases {
            let mut t = SeqTracker {
                last: last.map(|(e, s)| Pos::new(e, s)),
            };
            assert_eq!(t.check_run(*epoch, *first, *count), *want, "{name}");
            assert_eq!(
                t.last,
                Some(Pos::new(after.0, after.1)),
                "{name}: afterwards"
            );
        }
    }

    /// Held messages as (epoch, seq, replayed), payload = seq.
    fn held(items: &[(u64, u64, bool)]) -> Vec<Held<u64>> {
        items
            .iter()
            .map(|&(e, s, r)| Held {
                pos: Pos::new(e, s),
                replayed: r,
                payload: s,
            })
            .collect()
    }

    #[test]
    fn settle_a_probe() {
        struct Case {
            name: &'static str,
            held: &'static [(u64, u64, bool)],
            welcome: Option<(u64, u64)>,
            floor: Option<(u64, u64)>,
            /// (epoch, seq) delivered, in order.
            delivered: &'static [(u64, u64)],
            lost: u64,
            replayed: u64,
            last: Option<(u64, u64)>,
        }
        let cases = [
            Case {
                name: "nothing held, a fresh topic",
                held: &[],
                welcome: Some((E, 0)),
                floor: None,
                delivered: &[],
                lost: 0,
                replayed: 0,
                last: Some((E, 0)),
            },
            Case {
                name: "replay and live, out of order, with a duplicate",
                held: &[
                    (E, 5, false),
                    (E, 2, true),
                    (E, 3, true),
                    (E, 3, false),
                    (E, 4, false),
                ],
                welcome: Some((E, 3)),
                floor: None,
                delivered: &[(E, 2), (E, 3), (E, 4), (E, 5)],
                lost: 0,
                replayed: 2, // the first copy of 3 (the replay) is kept
                last: Some((E, 5)),
            },
            Case {
                name: "first subscription: gaps before the welcome are not ours, after it they are",
                held: &[(E, 2, true), (E, 4, true), (E, 7, false), (E, 9, false)],
                welcome: Some((E, 5)),
                floor: None,
                delivered: &[(E, 2), (E, 4), (E, 7), (E, 9)],
                lost: 2, // 6 and 8
                replayed: 2,
                last: Some((E, 9)),
            },
            Case {
                name: "reconnection, the replay fills the gap",
                held: &[(E, 9, true), (E, 10, true), (E, 11, true), (E, 12, false)],
                welcome: Some((E, 11)),
                floor: Some((E, 10)),
                delivered: &[(E, 11), (E, 12)],
                lost: 0,
                replayed: 1,
                last: Some((E, 12)),
            },
            Case {
                name: "reconnection, retention could not fill all of it",
                held: &[(E, 15, true), (E, 16, true)],
                welcome: Some((E, 18)),
                floor: Some((E, 10)),
                delivered: &[(E, 15), (E, 16)],
                lost: 6, // 11-14, 17, 18
                replayed: 2,
                last: Some((E, 18)),
            },
            Case {
                name: "reconnection, nothing retained (a group)",
                held: &[(E, 31, false)],
                welcome: Some((E, 30)),
                floor: Some((E, 20)),
                delivered: &[(E, 31)],
                lost: 10,
                replayed: 0,
                last: Some((E, 31)),
            },
            Case {
                name: "a restarted publisher: a new epoch, nothing counted across",
                held: &[(E2, 1, true), (E2, 2, true), (E2, 4, false)],
                welcome: Some((E2, 2)),
                floor: Some((E, 500)),
                delivered: &[(E2, 1), (E2, 2), (E2, 4)],
                lost: 1, // 3, after the welcome
                replayed: 2,
                last: Some((E2, 4)),
            },
            Case {
                name: "late arrivals of the old epoch go first, their gaps counted",
                held: &[
                    (E2, 1, true),
                    (E, 503, false),
                    (E, 501, false),
                    (E, 499, false),
                ],
                welcome: Some((E2, 1)),
                floor: Some((E, 500)),
                delivered: &[(E, 501), (E, 503), (E2, 1)],
                lost: 1, // 502
                replayed: 1,
                last: Some((E2, 1)),
            },
            Case {
                name: "no answer: deliver what came, count nothing before the first",
                held: &[(E, 40, false), (E, 42, false)],
                welcome: None,
                floor: None,
                delivered: &[(E, 40), (E, 42)],
                lost: 1,
                replayed: 0,
                last: Some((E, 42)),
            },
            Case {
                name: "no answer after a reconnection: count from the floor",
                held: &[(E, 13, false)],
                welcome: None,
                floor: Some((E, 10)),
                delivered: &[(E, 13)],
                lost: 2,
                replayed: 0,
                last: Some((E, 13)),
            },
            Case {
                name: "no answer, nothing held: stay at the floor",
                held: &[],
                welcome: None,
                floor: Some((E, 10)),
                delivered: &[],
                lost: 0,
                replayed: 0,
                last: Some((E, 10)),
            },
            Case {
                name: "nothing at all",
                held: &[],
                welcome: None,
                floor: None,
                delivered: &[],
                lost: 0,
                replayed: 0,
                last: None,
            },
            Case {
                name: "garbage sequence numbers do not overflow",
                held: &[(E, u64::MAX, false), (E, u64::MAX, true)],
                welcome: Some((E, u64::MAX - 1)),
                floor: Some((E, u64::MAX - 3)),
                delivered: &[(E, u64::MAX)],
                lost: 2,
                replayed: 0,
                last: Some((E, u64::MAX)),
            },
        ];
        for c in cases {
            let mut h = held(c.held);
            let s = settle(
                &mut h,
                c.welcome.map(|(e, s)| Pos::new(e, s)),
                c.floor.map(|(e, s)| Pos::new(e, s)),
            );
            let got: Vec<(u64, u64)> = h.iter().map(|h| (h.pos.epoch, h.pos.seq)).collect();
            assert_eq!(got, c.delivered, "{}: delivered", c.name);
            assert_eq!(s.lost, c.lost, "{}: lost", c.name);
            assert_eq!(s.replayed, c.replayed, "{}: replayed", c.name);
            assert_eq!(
                s.tracker.last,
                c.last.map(|(e, s)| Pos::new(e, s)),
                "{}: where the sequence stands",
                c.name
            );
        }
    }
}
