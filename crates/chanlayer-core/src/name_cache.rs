//! The name-check cache of [`TransportLayer`](crate::toolkit::TransportLayer): a stream of
//! sends to one channel (or receives from one) checks the name once per thread and layer
//! instance, not once per message.

use std::sync::atomic::AtomicU64;

use crate::error::Result;

/// Layer instance serials for [`checked`]: never 0, never reused in a process.
pub(crate) static SERIALS: AtomicU64 = AtomicU64::new(1);

/// Which name check [`checked`] remembers: its slot in [`CHECKED`].
#[derive(Clone, Copy)]
pub(crate) enum Check {
    Send = 0,
    Receive = 1,
}

thread_local! {
    /// The channel each thread last checked for a send and for a receive, and on which
    /// layer instance (serial 0: none).
    static CHECKED: std::cell::RefCell<[(u64, String); 2]> = Default::default();
}

/// Runs the name check `check` unless this thread passed it last time for the same layer
/// instance and channel: a stream of sends to one channel (or receives from one) checks its
/// name once, not per message. A check that fails is not remembered.
pub(crate) fn checked(
    serial: u64,
    channel: &str,
    which: Check,
    check: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let slot = which as usize;
    let hit = CHECKED
        .try_with(|c| {
            let (s, name) = &c.borrow()[slot];
            *s == serial && name == channel
        })
        .unwrap_or(false);
    if hit {
        return Ok(());
    }
    check()?;
    let _ = CHECKED.try_with(|c| {
        let (s, name) = &mut c.borrow_mut()[slot];
        *s = serial;
        name.clear();
        name.push_str(channel);
    });
    Ok(())
}
