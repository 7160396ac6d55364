//! The local inbox: per-instance bounded queues, one per channel, with waiting receivers.
//!
//! Every backend hands what arrives from its broker to a [`LocalInbox`]; the inbox
//! demultiplexes it to channels (`prefix!local` channels of this instance, and normal
//! channels it reads), enforces capacity exactly, drops expired messages on receive (counted),
//! and wakes receivers. [`LocalInbox::take`] is cancellation-safe: a message leaves its queue
//! only in the same step that returns it, so a dropped receive future loses nothing.

use std::collections::VecDeque;

use hashbrown::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

pub use crate::signal::CloseSignal;

use crate::clock::{now_ms, recent_ms};
use crate::config::LayerOptions;
use crate::envelope::{Destination, Envelope};
use crate::error::{Error, Result};
use crate::groups::GroupRegistry;
use crate::stats::Stats;

/// A queued message and whether it was handed out before.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The message.
    pub envelope: Envelope,
    /// `true` if it was delivered before and came back (nack, or unacked and dropped).
    pub redelivered: bool,
    /// Arrival order in this inbox: requeued entries go back in this order.
    pub seq: u64,
}

#[derive(Default)]
struct Slot {
    queue: VecDeque<Entry>,
    notify: Arc<Notify>,
    waiters: usize,
}

impl Slot {
    /// Wakes the receivers waiting on this channel (the caller holds the inbox lock).
    fn wake(&self) {
        if self.waiters > 0 {
            self.notify.notify_waiters();
        }
    }
}

/// Below this many slots, empty slots are never swept.
const SWEEP_MIN: usize = 1024;

/// The channel map plus the size at which empty slots are next swept. Empty slots are kept
/// (a busy channel that drains and refills would otherwise re-create its slot for every
/// message) and swept when the map has doubled since the last sweep: amortised O(1), and
/// memory stays within twice the live channels.
#[derive(Default)]
struct Channels {
    map: HashMap<String, Slot>,
    /// At least [`SWEEP_MIN`] from the first [`slot`](Self::slot) on (which, at 0, sweeps the
    /// empty map and sets it).
    sweep_at: usize,
    next_seq: u64,
    /// Messages waiting here.
    depth: i64,
}

impl Channels {
    fn slot(&mut self, channel: &str) -> &mut Slot {
        if self.map.len() >= self.sweep_at {
            self.map.retain(|_, s| !s.queue.is_empty() || s.waiters > 0);
            self.sweep_at = (self.map.len() * 2).max(SWEEP_MIN);
        }
        // One hash and lookup; the name is copied only when the slot is new.
        self.map.entry_ref(channel).or_default()
    }

    /// Pops the next live entry of `channel`, counting expired ones it skips.
    /// `now` is read before the lock is taken, to keep the critical section short.
    fn pop_live(&mut self, channel: &str, now: u64, expired: &mut u64) -> Option<Entry> {
        let slot = self.map.get_mut(channel)?;
        let found = loop {
            match slot.queue.pop_front() {
                Some(e) if e.envelope.is_expired_at(now) => *expired += 1,
                next => break next,
            }
        };
        self.depth -= *expired as i64 + i64::from(found.is_some());
        found
    }
}

/// Per-channel bounded queues with waiting receivers (an empty one is `default()`). See
/// the module docs.
#[derive(Default)]
pub struct LocalInbox {
    channels: Mutex<Channels>,
}

impl std::fmt::Debug for LocalInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalInbox")
            .field("channels", &self.lock().map.len())
            .finish()
    }
}

/// Counts one waiting receiver on a slot for as long as it lives (a cancelled receive
/// uncounts itself on drop).
struct Waiter<'a> {
    inbox: &'a LocalInbox,
    channel: &'a str,
    notify: Arc<Notify>,
    armed: bool,
}

impl Waiter<'_> {
    /// Uncounts this waiter, once. The slot may have been removed and recreated (close,
    /// flush); only the one it registered with counts it.
    fn unregister(&mut self, map: &mut Channels) {
        if std::mem::take(&mut self.armed) {
            if let Some(slot) = map.map.get_mut(self.channel) {
                if Arc::ptr_eq(&slot.notify, &self.notify) {
                    slot.waiters -= 1;
                }
            }
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.armed {
            let inbox = self.inbox;
            self.unregister(&mut inbox.lock());
        }
    }
}

impl LocalInbox {
    fn lock(&self) -> MutexGuard<'_, Channels> {
        crate::toolkit::lock(&self.channels)
    }

    /// How many messages wait here (every channel, live or expired).
    pub fn depth(&self) -> i64 {
        self.lock().depth
    }

    /// Appends to `channel` unless it already holds `capacity` live messages
    /// (`Err(ChannelFull)`; expired ones are purged first and counted as expired).
    pub fn push(
        &self,
        channel: &str,
        envelope: Envelope,
        capacity: usize,
        stats: &Stats,
    ) -> Result<()> {
        let full = Self::push_run(&mut self.lock(), channel, [envelope], capacity, stats);
        (full == 0).then_some(()).ok_or_else(|| Error::ChannelFull {
            channel: channel.to_owned(),
            capacity,
        })
    }

    /// Appends the envelopes of `run` to `channel` in order, each unless the channel holds
    /// `capacity` live entries (expired ones are purged first, counted as expired), and
    /// wakes its receivers once if any went in. Returns how many did not fit.
    fn push_run(
        map: &mut Channels,
        channel: &str,
        run: impl IntoIterator<Item = Envelope>,
        capacity: usize,
        stats: &Stats,
    ) -> u64 {
        let (mut seq, mut moved, mut full, mut pushed) = (map.next_seq, 0, 0, false);
        let slot = map.slot(channel);
        for envelope in run {
            if slot.queue.len() >= capacity {
                let now = now_ms();
                let before = slot.queue.len();
                slot.queue.retain(|e| !e.envelope.is_expired_at(now));
                let purged = before - slot.queue.len();
                moved -= purged as i64;
                stats.record_expired(purged as u64);
            }
            if slot.queue.len() < capacity {
                slot.queue.push_back(Entry {
                    envelope,
                    redelivered: false,
                    seq,
                });
                (moved, pushed) = (moved + 1, true);
            } else {
                full += 1;
            }
            seq += 1;
        }
        if pushed {
            slot.wake();
        }
        map.next_seq = seq;
        map.depth += moved;
        full
    }

    /// Puts an entry back at the head of `channel` (a nack or an unacked drop), ignoring
    /// capacity: it was already counted once. Several requeued entries line up at the head in
    /// their original arrival order, whatever order they come back in.
    pub fn requeue_front(&self, channel: &str, mut entry: Entry) {
        entry.redelivered = true;
        let mut map = self.lock();
        let slot = map.slot(channel);
        let pos = slot
            .queue
            .iter()
            .take_while(|e| e.redelivered && e.seq < entry.seq)
            .count();
        slot.queue.insert(pos, entry);
        slot.wake();
        map.depth += 1;
    }

    /// Takes the next live message from `channel` without waiting.
    pub fn try_take(&self, channel: &str, stats: &Stats) -> Option<Entry> {
        let mut expired = 0;
        let now = recent_ms();
        let found = self.lock().pop_live(channel, now, &mut expired);
        stats.record_expired(expired);
        found
    }

    /// Waits for the next live message on `channel`. `Err(Closed)` when `closed` fires.
    /// Cancellation-safe: the message leaves its queue in the same locked step that returns
    /// it; a future dropped before that step took nothing.
    ///
    /// Spends one unit of the task's tokio budget, as tokio's own channels do: a loop whose
    /// every take finds a message ready still yields to the runtime now and then, so it
    /// cannot starve the timers and the other tasks of its worker thread.
    pub async fn take(&self, channel: &str, stats: &Stats, closed: &CloseSignal) -> Result<Entry> {
        tokio::task::consume_budget().await;
        closed.check()?;
        let close = closed.closed();
        tokio::pin!(close);
        let mut waiter: Option<Waiter<'_>> = None;
        loop {
            // One lock: take a message, or register as a waiter and create the `Notified` to
            // wait on. Pushes call `notify_waiters` under this lock, and it wakes every
            // `Notified` created before the call, so one created here misses no later push.
            let mut expired = 0;
            let now = recent_ms();
            let notified = {
                let mut map = self.lock();
                if let Some(e) = map.pop_live(channel, now, &mut expired) {
                    if let Some(w) = waiter.as_mut() {
                        w.unregister(&mut map);
                    }
                    drop(map);
                    stats.record_expired(expired);
                    return Ok(e);
                }
                let w = waiter.get_or_insert_with(|| {
                    let slot = map.slot(channel);
                    slot.waiters += 1;
                    Waiter {
                        inbox: self,
                        channel,
                        notify: slot.notify.clone(),
                        armed: true,
                    }
                });
                w.notify.notified()
            };
            stats.record_expired(expired);
            closed.check()?;
            tokio::select! {
                _ = notified => {}
                _ = &mut close => return Err(Error::Closed),
            }
        }
    }

    /// Waits up to `timeout` for the first message, then takes up to `max` in all without
    /// waiting. Empty if nothing came in time. Cancellation-safe.
    pub async fn take_batch(
        &self,
        channel: &str,
        max: usize,
        timeout: Duration,
        stats: &Stats,
        closed: &CloseSignal,
    ) -> Result<Vec<Entry>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let taking = tokio::time::timeout(timeout, self.take(channel, stats, closed));
        let Ok(first) = taking.await else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(max.min(1024));
        out.push(first?);
        out.extend(std::iter::from_fn(|| self.try_take(channel, stats)).take(max - 1));
        Ok(out)
    }

    /// Drops every queued message (flush). Waiting receivers keep waiting.
    pub fn clear(&self) {
        let mut dropped = 0;
        let mut map = self.lock();
        map.map.retain(|_, s| {
            dropped += s.queue.len() as i64;
            s.queue.clear();
            s.waiters > 0
        });
        map.depth -= dropped;
    }

    /// Delivers every envelope of `envelopes` in order (to its channel, or for a group
    /// envelope, one copy to each live local member in `groups`), taking the lock once for
    /// each run of envelopes for one channel (a transport thread that read a burst hands it
    /// over in one go). A full channel drops its message and counts it in `dropped_full`; a
    /// full group member is counted as in [`fan_out`](Self::fan_out).
    pub fn deliver_all(
        &self,
        envelopes: &mut Vec<Envelope>,
        groups: &GroupRegistry,
        options: &LayerOptions,
        stats: &Stats,
    ) {
        let mut it = envelopes.drain(..).peekable();
        while let Some(mut first) = it.next() {
            // The queue a message goes to is its address: the name moves out of the envelope.
            let name = std::mem::take(&mut first.destination);
            if first.kind == Destination::Group {
                self.fan_out(&name, first, groups.members(&name), options, stats);
                continue;
            }
            // A run of envelopes for one channel: one lock, one lookup, one wake-up.
            let capacity = options.capacity_for(&name);
            let rest = std::iter::from_fn(|| {
                let mut e =
                    it.next_if(|e| e.kind == Destination::Channel && e.destination == name)?;
                e.destination = String::new();
                Some(e)
            });
            let run = std::iter::once(first).chain(rest);
            let dropped = Self::push_run(&mut self.lock(), &name, run, capacity, stats);
            for _ in 0..dropped {
                stats.record_dropped_full(&name);
            }
        }
    }

    /// Pushes one copy of a group envelope to each of `members`; a full member is skipped and
    /// counted (`group_send` never fails for capacity). The copies are made before the lock
    /// is taken, and the lock is taken once for all members.
    pub fn fan_out(
        &self,
        group: &str,
        envelope: Envelope,
        members: Vec<Arc<str>>,
        options: &LayerOptions,
        stats: &Stats,
    ) {
        // `repeat_n` clones all but the last copy, which is `envelope` itself.
        let copies: Vec<(usize, Envelope)> = (members.iter())
            .map(|member| options.capacity_for(member))
            .zip(std::iter::repeat_n(envelope, members.len()))
            .collect();
        let mut map = self.lock();
        let full: Vec<&Arc<str>> = (members.iter().zip(copies))
            .filter_map(|(member, (capacity, copy))| {
                let full = Self::push_run(&mut map, member, [copy], capacity, stats);
                (full > 0).then_some(member)
            })
            .collect();
        drop(map);
        for member in full {
            stats.record_group_member_full(group, member);
        }
    }
}

#[cfg(test)]
#[path = "inbox_tests.rs"]
mod tests;
