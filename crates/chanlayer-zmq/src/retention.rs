//! What a publisher (the proxy, the embedded publisher) keeps for late joiners, and the
//! arithmetic of its limits.
//!
//! [`Store`] holds, per topic, the last messages the hub chose to keep (see
//! [`crate::hub`] for which), each with its sequence number and whether any subscriber has
//! had it (`heard`). Three limits apply ([`Retention`]): messages per topic, age, and bytes
//! in all (the oldest go first, whatever their topic). Every call that lets messages go
//! says how many of them no subscriber ever had: the hub counts those as `dropped` (or
//! `flushed`), and `pending` is what is kept and unheard now.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashMap;

/// Where a message comes from, as the sender gave it (dedicated mode): its origin id and
/// its number on the topic. `None` for the embedded publisher's own messages.
pub(crate) type From = Option<(u64, u64)>;

/// Retention settings of a publisher (the proxy or the embedded publisher).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Messages kept per topic (0 turns retention off: no replay for late joiners).
    pub per_topic: usize,
    /// How long a message is kept.
    pub max_age: Duration,
    /// Bytes kept in all (oldest messages go first).
    pub max_bytes: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            per_topic: 1000,
            max_age: Duration::from_secs(60),
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// One kept message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Kept {
    /// Its sequence number on its topic.
    pub seq: u64,
    /// Its origin and its number there, as the sender gave them (dedicated mode).
    pub from: From,
    /// The envelope.
    pub payload: Vec<u8>,
    /// A subscriber got it (live or by replay).
    pub heard: bool,
}

/// The kept messages of every topic of one publisher. Owned by the publisher's thread.
#[derive(Debug, Default)]
pub(crate) struct Store {
    pub limits: Retention,
    topics: HashMap<Arc<[u8]>, VecDeque<Kept>>,
    /// Kept messages in arrival order: (topic, seq, when). Entries whose message left
    /// already (per-topic limit, flush) are skipped when they reach the front.
    order: VecDeque<(Arc<[u8]>, u64, Instant)>,
    /// Messages kept now.
    pub count: usize,
    /// Bytes kept now (envelopes).
    pub bytes: usize,
    /// Kept messages that no subscriber has had yet.
    pub pending: usize,
}

impl Store {
    /// An empty store with these limits.
    pub fn new(limits: Retention) -> Store {
        Store {
            limits,
            ..Store::default()
        }
    }

    /// `true` if something is kept for `topic`.
    pub fn holds(&self, topic: &[u8]) -> bool {
        self.topics.contains_key(topic)
    }

    /// Keeps a message of `topic` (retention must be on: `per_topic > 0`), then applies the
    /// limits. Returns how many messages that no subscriber had left because of it.
    pub fn keep(
        &mut self,
        topic: &Arc<[u8]>,
        seq: u64,
        from: From,
        payload: Vec<u8>,
        heard: bool,
        now: Instant,
    ) -> u64 {
        let len = payload.len();
        let per_topic = self.limits.per_topic;
        let kept = self.topics.entry(topic.clone()).or_default();
        kept.push_back(Kept {
            seq,
            from,
            payload,
            heard,
        });
        let over = kept.len().saturating_sub(per_topic);
        let gone: Vec<Kept> = kept.drain(..over).collect();
        self.count += 1;
        self.bytes += len;
        if !heard {
            self.pending += 1;
        }
        self.order.push_back((topic.clone(), seq, now));
        // (The topic keeps at least the message just kept: `per_topic` is at least 1.)
        let mut unheard = gone.iter().map(|k| self.forget(k)).sum::<u64>();
        unheard += self.evict(now);
        if self.order.len() > 2 * self.count + 1024 {
            self.compact();
        }
        unheard
    }

    /// Accounts for a kept message that leaves; 1 if no subscriber had it.
    fn forget(&mut self, k: &Kept) -> u64 {
        self.count -= 1;
        self.bytes -= k.payload.len();
        if k.heard {
            0
        } else {
            self.pending -= 1;
            1
        }
    }

    /// Lets go of messages past their age, and of the oldest while over the byte limit.
    /// Returns how many of them no subscriber had.
    pub fn evict(&mut self, now: Instant) -> u64 {
        let mut unheard = 0;
        while let Some((key, seq, at)) = self.order.front() {
            let over_bytes = self.bytes > self.limits.max_bytes;
            let too_old = now.saturating_duration_since(*at) >= self.limits.max_age;
            let live = self
                .topics
                .get(key)
                .and_then(VecDeque::front)
                .is_some_and(|k| k.seq == *seq);
            if live && !over_bytes && !too_old {
                break;
            }
            let Some((key, _, _)) = self.order.pop_front() else {
                break;
            };
            if !live {
                continue; // left already
            }
            let gone = self.topics.get_mut(&key).and_then(VecDeque::pop_front);
            if let Some(k) = gone {
                unheard += self.forget(&k);
            }
            if self.topics.get(&key).is_some_and(VecDeque::is_empty) {
                self.topics.remove(&key);
            }
        }
        unheard
    }

    /// Drops the order entries of messages that left already.
    fn compact(&mut self) {
        let topics = &self.topics;
        self.order.retain(|(key, seq, _)| {
            topics
                .get(key)
                .is_some_and(|kept| kept.binary_search_by_key(seq, |k| k.seq).is_ok())
        });
    }

    /// Lets go of everything kept for the topics `which` selects. Returns how many of them
    /// no subscriber had.
    pub fn flush(&mut self, which: impl Fn(&[u8]) -> bool) -> u64 {
        let gone: Vec<_> = self.topics.extract_if(|topic, _| which(topic)).collect();
        gone.iter()
            .flat_map(|(_, kept)| kept)
            .map(|k| self.forget(k))
            .sum()
    }

    /// Lets go of everything (the publisher stops). Returns how many of them no subscriber
    /// had.
    pub fn clear(&mut self) -> u64 {
        let unheard = self.pending as u64;
        *self = Store::new(self.limits);
        unheard
    }

    /// Hands the messages kept for `topic`, oldest first, to `send` until it returns
    /// `false`; each one handed over counts as heard. Returns (handed over, of which heard
    /// for the first time).
    pub fn replay(&mut self, topic: &[u8], mut send: impl FnMut(&Kept) -> bool) -> (u64, u64) {
        let (mut sent, mut first_time) = (0u64, 0u64);
        for k in self.topics.get_mut(topic).into_iter().flatten() {
            if !send(k) {
                break;
            }
            sent += 1;
            if !k.heard {
                k.heard = true;
                first_time += 1;
            }
        }
        self.pending -= first_time as usize;
        (sent, first_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sequence numbers kept for `topic`, oldest first.
    fn kept_seqs(store: &Store, topic: &[u8]) -> Vec<u64> {
        store
            .topics
            .get(topic)
            .map(|kept| kept.iter().map(|k| k.seq).collect())
            .unwrap_or_default()
    }

    fn topic(name: &str) -> Arc<[u8]> {
        Arc::from(name.as_bytes())
    }

    /// One step of a retention scenario.
    enum Step {
        /// Keep a message: (topic, seq, bytes, heard, at seconds).
        Keep(&'static str, u64, usize, bool, u64),
        /// Time passes: evict at this many seconds.
        Tick(u64),
        /// Replay a topic to a new subscriber (all of it).
        Replay(&'static str),
        /// Flush topics whose name starts with this.
        Flush(&'static str),
    }
    use Step::*;

    struct Case {
        name: &'static str,
        limits: Retention,
        steps: &'static [Step],
        /// Unheard messages that left, per step.
        unheard: &'static [u64],
        /// What is kept at the end: (topic, seqs).
        kept: &'static [(&'static str, &'static [u64])],
        /// (count, bytes, pending) at the end.
        totals: (usize, usize, usize),
    }

    fn limits(per_topic: usize, max_age_s: u64, max_bytes: usize) -> Retention {
        Retention {
            per_topic,
            max_age: Duration::from_secs(max_age_s),
            max_bytes,
        }
    }

    #[test]
    fn retention_limits_and_eviction() {
        let cases = [
            Case {
                name: "within every limit",
                limits: limits(3, 60, 1000),
                steps: &[
                    Keep("a", 1, 10, false, 0),
                    Keep("a", 2, 10, true, 0),
                    Keep("b", 1, 10, false, 0),
                ],
                unheard: &[0, 0, 0],
                kept: &[("a", &[1, 2]), ("b", &[1])],
                totals: (3, 30, 2),
            },
            Case {
                name: "per topic: the oldest of that topic goes",
                limits: limits(2, 60, 1000),
                steps: &[
                    Keep("a", 1, 10, false, 0),
                    Keep("b", 1, 10, false, 0),
                    Keep("a", 2, 10, true, 0),
                    Keep("a", 3, 10, false, 0), // a1 (unheard) goes
                    Keep("a", 4, 10, false, 0), // a2 (heard) goes
                ],
                unheard: &[0, 0, 0, 1, 0],
                kept: &[("a", &[3, 4]), ("b", &[1])],
                totals: (3, 30, 3),
            },
            Case {
                name: "bytes in all: the oldest go, whatever their topic",
                limits: limits(100, 60, 25),
                steps: &[
                    Keep("a", 1, 10, false, 0),
                    Keep("b", 1, 10, true, 0),
                    Keep("c", 1, 10, false, 0), // 30 > 25: a1 goes
                    Keep("c", 2, 20, false, 0), // 40 > 25: b1 (heard) and c1 go
                ],
                unheard: &[0, 0, 1, 1],
                kept: &[("c", &[2])],
                totals: (1, 20, 1),
            },
            Case {
                name: "age: what is older than max_age goes at the next tick or keep",
                limits: limits(100, 10, 1000),
                steps: &[
                    Keep("a", 1, 10, false, 0),
                    Keep("a", 2, 10, true, 5),
                    Tick(9),
                    Tick(10),                    // a1 is 10 s old
                    Keep("b", 1, 10, false, 15), // a2 is 10 s old
                    Tick(100),
                ],
                unheard: &[0, 0, 0, 1, 0, 1],
                kept: &[],
                totals: (0, 0, 0),
            },
            Case {
                name: "a replay makes messages heard: they leave uncounted",
                limits: limits(2, 60, 1000),
                steps: &[
                    Keep("a", 1, 10, false, 0),
                    Keep("a", 2, 10, false, 0),
                    Replay("a"),
                    Keep("a", 3, 10, false, 0),
                    Keep("a", 4, 10, false, 0),
                    Tick(60),
                ],
                unheard: &[0, 0, 0, 0, 0, 2],
                kept: &[],
                totals: (0, 0, 0),
            },
            Case {
                name: "flush lets go of the chosen topics only",
                limits: limits(10, 60, 1000),
                steps: &[
                    Keep("app:a", 1, 10, false, 0),
                    Keep("app:a", 2, 10, true, 0),
                    Keep("other:a", 1, 10, false, 0),
                    Flush("app:"),
                    Keep("app:a", 3, 10, false, 0),
                    Tick(30),
                ],
                unheard: &[0, 0, 0, 1, 0, 0],
                kept: &[("app:a", &[3]), ("other:a", &[1])],
                totals: (2, 20, 2),
            },
            Case {
                name: "per_topic 1 keeps the latest only",
                limits: limits(1, 60, 1000),
                steps: &[
                    Keep("a", 1, 10, false, 0),
                    Keep("a", 2, 10, false, 0),
                    Keep("a", 3, 10, false, 0),
                ],
                unheard: &[0, 1, 1],
                kept: &[("a", &[3])],
                totals: (1, 10, 1),
            },
            Case {
                name: "a message larger than max_bytes goes at once",
                limits: limits(10, 60, 5),
                steps: &[Keep("a", 1, 10, false, 0)],
                unheard: &[1],
                kept: &[],
                totals: (0, 0, 0),
            },
        ];
        for c in cases {
            let start = Instant::now();
            let at = |s: u64| start + Duration::from_secs(s);
            let mut store = Store::new(c.limits);
            let mut unheard = Vec::new();
            for step in c.steps {
                unheard.push(match *step {
                    Keep(t, seq, len, heard, s) => {
                        store.keep(&topic(t), seq, None, vec![0; len], heard, at(s))
                    }
                    Tick(s) => store.evict(at(s)),
                    Replay(t) => {
                        let before = store.pending;
                        let (sent, first) = store.replay(t.as_bytes(), |_| true);
                        assert_eq!(before - store.pending, first as usize, "{}", c.name);
                        assert!(sent >= first, "{}", c.name);
                        0
                    }
                    Flush(p) => store.flush(|k| k.starts_with(p.as_bytes())),
                });
            }
            assert_eq!(
                unheard, c.unheard,
                "{}: unheard messages that left, per step",
                c.name
            );
            for (t, seqs) in c.kept {
                assert_eq!(
                    kept_seqs(&store, t.as_bytes()),
                    *seqs,
                    "{}: kept for {t}",
                    c.name
                );
                assert!(store.holds(t.as_bytes()), "{}", c.name);
            }
            let kept_topics = c.kept.len();
            assert_eq!(
                store.topics.len(),
                kept_topics,
                "{}: no empty topic entries",
                c.name
            );
            assert_eq!(
                (store.count, store.bytes, store.pending),
                c.totals,
                "{}: count, bytes, pending",
                c.name
            );
        }
    }

    #[test]
    fn a_replay_stops_where_the_socket_refuses() {
        let mut store = Store::new(limits(10, 60, 1000));
        let now = Instant::now();
        for seq in 1..=4 {
            store.keep(&topic("a"), seq, None, vec![1], false, now);
        }
        let mut n = 0;
        assert_eq!(
            store.replay(b"a", |_| {
                n += 1;
                n <= 2
            }),
            (2, 2)
        );
        assert_eq!(store.pending, 2);
        assert_eq!(
            store.replay(b"a", |_| true),
            (4, 2),
            "all four, two heard now"
        );
        assert_eq!(store.replay(b"none", |_| true), (0, 0));
        assert_eq!(store.pending, 0, "every message was heard");
    }

    #[test]
    fn clear_counts_the_unheard() {
        let mut store = Store::new(limits(10, 60, 1000));
        let now = Instant::now();
        store.keep(&topic("a"), 1, None, vec![1], true, now);
        store.keep(&topic("a"), 2, None, vec![1], false, now);
        store.keep(&topic("b"), 1, None, vec![1], false, now);
        assert_eq!(store.clear(), 2);
        assert_eq!((store.count, store.bytes, store.pending), (0, 0, 0));
        assert!(!store.holds(b"a"));
        assert_eq!(store.clear(), 0);
    }

    #[test]
    fn the_order_queue_stays_bounded() {
        // Per-topic eviction leaves stale order entries behind; they are compacted.
        let mut store = Store::new(limits(1, 3600, usize::MAX));
        let now = Instant::now();
        for seq in 1..=10_000 {
            store.keep(&topic("a"), seq, None, vec![1], true, now);
        }
        assert_eq!(store.count, 1);
        assert!(
            store.order.len() <= 2 * store.count + 1024 + 1,
            "{}",
            store.order.len()
        );
    }
}
