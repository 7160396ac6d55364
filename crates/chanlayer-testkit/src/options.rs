//! Checks for the backends' option-parsing tests: a bad option value is refused with an
//! error that names the option, the value and the rule.
//!
//! ```
//! use chanlayer_core::LayerConfig;
//! use chanlayer_testkit::options::check_refused;
//! check_refused(LayerConfig::from_url, "memory://", [
//!     ("capacity", "0", "too small; use a whole number from 1 to 18446744073709551615"),
//!     ("expiry", "0s", "must be more than zero"),
//! ]);
//! ```

use std::fmt::{Debug, Display};

/// For each `(key, value, why)`, appends `key=value` to the query of `base` and asserts that
/// `parse` refuses the URL with an error containing `option {key}={value}: {why}`.
pub fn check_refused<T: Debug, E: Display>(
    parse: impl Fn(&str) -> Result<T, E>,
    base: &str,
    cases: impl IntoIterator<Item = (impl AsRef<str>, impl AsRef<str>, impl AsRef<str>)>,
) {
    let join = if base.contains('?') { '&' } else { '?' };
    let mut checked = 0;
    for (key, value, why) in cases {
        let (key, value, why) = (key.as_ref(), value.as_ref(), why.as_ref());
        let url = format!("{base}{join}{key}={value}");
        match parse(&url) {
            Ok(parsed) => panic!("{url} was accepted: {parsed:?}"),
            Err(e) => {
                let e = e.to_string();
                let want = format!("option {key}={value}: {why}");
                assert!(e.contains(&want), "{url}: {e:?} does not contain {want:?}");
            }
        }
        checked += 1;
    }
    assert!(checked > 0, "no case to check");
}
