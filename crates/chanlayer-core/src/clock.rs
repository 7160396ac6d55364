//! A cheap wall clock for the per-message paths.
//!
//! Every send stamps its envelope (`sent_at_ms`, the id, `expires_at_ms`) and every
//! `receive` checks the expiry of what it takes. Reading the system clock costs 20 – 40 ns
//! (measured 37 ns on the 2-core benchmark machine), a few per cent of a small message's
//! whole path. [`recent_ms`] reads a value that a helper thread refreshes every
//! [`TICK`] while someone asks for it:
//!
//! - **Bounded error.** The value is at most one tick plus the helper's scheduling delay
//!   behind the system clock (a few milliseconds on a loaded machine); expiry is set in
//!   seconds, so a message expires at most that much late.
//! - **No cost when idle.** The helper stops refreshing and parks after a tick in which
//!   nobody read the value; the next reader gets the system clock itself (so the value is
//!   never stale after a pause) and wakes the helper.
//! - **No helper, no problem.** If the thread cannot be started, every read is the system
//!   clock.
//!
//! [`now_ms`] stays the exact clock for everything else.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How often the helper refreshes the value while it is read.
pub const TICK: Duration = Duration::from_millis(1);

/// The last value the helper stored; 0 while it is not refreshing (then readers read the
/// system clock).
static RECENT: AtomicU64 = AtomicU64::new(0);
/// Set by readers, cleared by the helper every tick: whether anyone read since.
static READ: AtomicBool = AtomicBool::new(false);
/// The helper thread; `None` if it could not be started.
static HELPER: OnceLock<Option<std::thread::Thread>> = OnceLock::new();

/// Milliseconds since the Unix epoch, at most one [`TICK`] plus scheduling delay old (see
/// the module docs).
pub fn recent_ms() -> u64 {
    let v = RECENT.load(Ordering::Acquire);
    if v != 0 {
        if !READ.load(Ordering::Relaxed) {
            READ.store(true, Ordering::Relaxed);
        }
        return v;
    }
    let now = now_ms();
    READ.store(true, Ordering::Relaxed);
    if let Some(helper) = HELPER.get_or_init(start_helper) {
        helper.unpark();
    }
    now
}

fn start_helper() -> Option<std::thread::Thread> {
    let spawned = std::thread::Builder::new()
        .name("chanlayer-clock".into())
        .spawn(helper);
    let failed = |e: &std::io::Error| tracing::warn!(error = %e, "could not start the clock thread; reading the system clock per message");
    spawned.inspect_err(failed).ok().map(|h| h.thread().clone())
}

fn helper() {
    loop {
        RECENT.store(now_ms(), Ordering::Release);
        std::thread::sleep(TICK);
        if !READ.swap(false, Ordering::Relaxed) {
            // Nobody read during the last tick: stop refreshing until a reader comes back.
            RECENT.store(0, Ordering::Release);
            // A reader that saw 0 sets READ before it unparks; one that came between the
            // swap and the store above may have seen the old value, which is one tick old.
            if !READ.load(Ordering::Relaxed) {
                std::thread::park();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_is_close_to_the_system_clock_and_moves() {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let first = recent_ms();
        let mut saw_helper = false;
        loop {
            let before = now_ms();
            let r = recent_ms();
            let after = now_ms();
            // Never ahead of the system clock, and behind it by little (a loaded CI machine
            // may delay the helper; 1 s is far beyond that and far below any expiry).
            assert!(r <= after, "recent {r} is ahead of the clock {after}");
            assert!(
                before.saturating_sub(r) < 1000,
                "recent {r} is {}ms behind",
                before - r
            );
            saw_helper |= RECENT.load(Ordering::Acquire) != 0;
            if saw_helper && r > first {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "recent_ms did not move past {first} (helper running: {saw_helper})"
            );
            std::thread::yield_now();
        }
    }
}
