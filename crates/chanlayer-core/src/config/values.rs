//! Parsing option values: integers in a range, durations within bounds.

use super::*;

/// An integer type an option can be read as, with [`parse_int`] or
/// [`BackendOptions::take_int`].
pub trait ConfigInt: Copy + PartialOrd + std::fmt::Display + std::str::FromStr {}

macro_rules! config_int {
    ($($t:ty),*) => { $(impl ConfigInt for $t {})* };
}
config_int!(u8, u16, u32, u64, usize, i8, i16, i32, i64, isize);

/// Parses the value of an integer option that must lie in `range`. The one integer parser
/// of every option, shared and backend: a value that is not a whole number, and one that is
/// but lies outside `range` (or outside what `T` can hold), are errors that say which, and
/// give the allowed range. The error does not quote the value; callers name the option.
///
/// ```
/// use chanlayer_core::config::parse_int;
/// assert_eq!(parse_int::<u16>("100", 1..=u16::MAX).unwrap(), 100);
/// let e = parse_int::<usize>("99999999999999999999999", 1..=usize::MAX).unwrap_err();
/// assert!(e.to_string().contains(&format!("too large; use a whole number from 1 to {}", usize::MAX)));
/// let e = parse_int::<u16>("lots", 1..=u16::MAX).unwrap_err();
/// assert!(e.to_string().contains("not a whole number"));
/// let e = parse_int::<i32>("0", 1..=i32::MAX).unwrap_err();
/// assert!(e.to_string().contains("too small"));
/// ```
pub fn parse_int<T: ConfigInt>(value: &str, range: std::ops::RangeInclusive<T>) -> Result<T> {
    let v = value.trim();
    let digits = v.strip_prefix(['+', '-']).unwrap_or(v);
    let whole = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    let why = match v.parse::<T>() {
        _ if !whole => "not a whole number",
        Ok(n) if range.contains(&n) => return Ok(n),
        Ok(n) if n < *range.start() => "too small",
        // A whole number that `T` cannot hold: too far from zero on its side.
        Err(_) if v.starts_with('-') => "too small",
        _ => "too large",
    };
    let (lo, hi) = (range.start(), range.end());
    Err(Error::Config(format!(
        "{why}; use a whole number from {lo} to {hi}"
    )))
}

/// Why `d` is outside `range`, with the rule (`None` when it is inside).
pub(super) fn duration_outside(
    d: Duration,
    range: &std::ops::RangeInclusive<Duration>,
) -> Option<String> {
    let why = if d < *range.start() && *range.start() <= MIN_TIMEOUT {
        "must be more than zero"
    } else if d < *range.start() {
        "too short"
    } else if d > *range.end() {
        "too long"
    } else {
        return None;
    };
    let show = |d: Duration| humantime::format_duration(d).to_string();
    Some(if *range.end() == Duration::MAX {
        format!("{why}; use a duration of at least {}", show(*range.start()))
    } else {
        let (lo, hi) = (show(*range.start()), show(*range.end()));
        format!("{why}; use a duration from {lo} to {hi}")
    })
}

/// Checks the duration option `key` against `range`: the one bounds check of every
/// duration option, shared and backend (timeouts, which must be positive, use
/// `MIN_TIMEOUT..=MAX_TIMEOUT`; see [`BackendOptions::take_timeout`]). The error names the
/// option, the value and the allowed range.
///
/// ```
/// use chanlayer_core::config::{check_duration, MAX_TIMEOUT, MIN_TIMEOUT};
/// use std::time::Duration;
/// let e = check_duration("connection_timeout", Duration::ZERO, MIN_TIMEOUT..=MAX_TIMEOUT).unwrap_err();
/// assert_eq!(
///     e.to_string(),
///     "configuration error: option connection_timeout=0s: must be more than zero; use a duration from 1ms to 24days 20h 31m 23s 647ms"
/// );
/// ```
pub fn check_duration(
    key: &str,
    d: Duration,
    range: std::ops::RangeInclusive<Duration>,
) -> Result<()> {
    match duration_outside(d, &range) {
        None => Ok(()),
        Some(why) => Err(Error::Config(format!(
            "option {key}={}: {why}",
            humantime::format_duration(d)
        ))),
    }
}

/// The error for option `key` with `value`: `option key=value: why`, the value redacted
/// when the key is secret-looking ([`is_secret_key`]).
pub(super) fn option_error(key: &str, value: &str, why: Error) -> Error {
    let shown = if is_secret_key(key) { "***" } else { value };
    let why = match why {
        Error::Config(m) => m,
        other => other.to_string(),
    };
    Error::Config(format!("option {key}={shown}: {why}"))
}
