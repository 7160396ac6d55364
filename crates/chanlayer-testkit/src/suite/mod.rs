//! The conformance suite: one public async function per behaviour. Each takes a [`Ctx`]
//! (namespace plus instance factory) and panics on failure.
//!
//! [`Ctx`]: crate::Ctx

mod capacity;
mod channels;
mod delivery;
mod expiry;
mod groups;
mod lifecycle;
mod messages;
mod names;

pub use capacity::*;
pub use channels::*;
pub use delivery::*;
pub use expiry::*;
pub use groups::*;
pub use lifecycle::*;
pub use messages::*;
pub use names::*;
