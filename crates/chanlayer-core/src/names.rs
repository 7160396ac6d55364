//! Channel and group name rules, and process-local channel names.
//!
//! - A **channel** name is `[A-Za-z0-9._-]+`, optionally followed by one `!` and
//!   `[A-Za-z0-9._-]*`. A name with `!` is *process-local*: the part up to and including the
//!   `!` routes it to the layer instance that created it with `new_channel`.
//! - A **group** name is `[A-Za-z0-9._-]+` (no `!`).
//! - Both are ASCII only and 1 to 99 characters long (Django Channels rejects 100).
//!
//! ```
//! use chanlayer_core::names;
//! assert!(names::validate_channel("chat.room-1_a").is_ok());
//! assert!(names::validate_channel("ws.k3j2!x7").is_ok());
//! assert!(names::validate_channel("a?b").is_err());
//! assert!(names::validate_group("a!b").is_err());
//! ```

use crate::error::{Error, NameKind, Result};

/// The longest valid name, in characters.
pub const MAX_NAME_LEN: usize = 99;

fn invalid(kind: NameKind, name: &str, rule: impl Into<String>) -> Error {
    Error::InvalidName {
        kind,
        name: name.to_owned(),
        rule: rule.into(),
    }
}

/// Bytes allowed anywhere in a name.
const ALLOWED: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        t[i] = c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-';
        i += 1;
    }
    t
};

/// The fast path (names are checked on every send and receive): every byte allowed, at most
/// one `!` not in first position, length in range. Anything else goes to the slow path,
/// which finds the rule broken and words the error.
fn quick_ok(name: &str, bang_allowed: bool) -> bool {
    let b = name.as_bytes();
    if b.is_empty() || b.len() > MAX_NAME_LEN {
        return false;
    }
    match b.iter().position(|&c| !ALLOWED[c as usize]) {
        None => true,
        Some(i) => {
            bang_allowed && i > 0 && b[i] == b'!' && b[i + 1..].iter().all(|&c| ALLOWED[c as usize])
        }
    }
}

fn check(kind: NameKind, name: &str, bang_allowed: bool) -> Result<()> {
    if quick_ok(name, bang_allowed) {
        return Ok(());
    }
    let chars = name.chars().count();
    let mut bangs = 0;
    let why = if name.is_empty() {
        Some("the name is empty; names are 1 to 99 characters".to_owned())
    } else if chars > MAX_NAME_LEN {
        Some(format!(
            "the name is {chars} characters long; the limit is {MAX_NAME_LEN}"
        ))
    } else {
        name.chars().enumerate().find_map(|(pos, c)| match c {
            c if c.is_ascii() && ALLOWED[c as usize] => None,
            '!' if !bang_allowed => Some(format!(
                "{kind} names cannot contain '!' (only process-local channel names do); found at position {pos}"
            )),
            '!' if pos == 0 => Some(
                "the name starts with '!'; a process-local channel name needs a prefix before '!'"
                    .to_owned(),
            ),
            '!' => {
                bangs += 1;
                (bangs > 1).then(|| format!("the name contains more than one '!' (second at position {pos}); a channel name may have at most one '!'"))
            }
            c => {
                let what = if !c.is_ascii() {
                    format!("a non-ASCII character {c:?} at position {pos}; names are ASCII only")
                } else if c.is_ascii_control() {
                    format!("a control character {c:?} at position {pos}")
                } else {
                    format!("the character {c:?} at position {pos}")
                };
                let bang = if bang_allowed {
                    " (and one '!' in a process-local channel name)"
                } else {
                    ""
                };
                Some(format!("the name contains {what}; allowed are ASCII letters, digits, '.', '_' and '-'{bang}"))
            }
        })
    };
    why.map_or(Ok(()), |why| Err(invalid(kind, name, why)))
}

/// Checks a channel name; the error names the rule it broke.
pub fn validate_channel(name: &str) -> Result<()> {
    check(NameKind::Channel, name, true)
}

/// Checks a group name; the error names the rule it broke.
pub fn validate_group(name: &str) -> Result<()> {
    check(NameKind::Group, name, false)
}

/// Checks a `new_channel` prefix (a group-style name: no `!`).
pub fn validate_prefix(prefix: &str) -> Result<()> {
    check(NameKind::Prefix, prefix, false)
}

/// `true` if the channel is process-local (contains `!`).
pub fn is_process_local(channel: &str) -> bool {
    channel.contains('!')
}

/// The routing part of a process-local channel: everything up to and including `!`.
/// `None` for a normal channel.
///
/// ```
/// assert_eq!(chanlayer_core::names::routing_prefix("ws.abc!xyz"), Some("ws.abc!"));
/// assert_eq!(chanlayer_core::names::routing_prefix("plain"), None);
/// ```
pub fn routing_prefix(channel: &str) -> Option<&str> {
    channel.find('!').map(|i| &channel[..=i])
}

/// The instance id a process-local channel routes to: the text between the last `.` before
/// the `!` and the `!` (`new_channel` names are `{prefix}.{instance}!{random}`). `None` for
/// normal channels and for `!` names that do not have that shape.
///
/// ```
/// assert_eq!(chanlayer_core::names::owner_instance("ws.abc!xyz"), Some("abc"));
/// assert_eq!(chanlayer_core::names::owner_instance("abc!xyz"), None);
/// ```
pub fn owner_instance(channel: &str) -> Option<&str> {
    // Byte loops: on names this short they cost a fifth of `split_once`'s searchers, and
    // every message that arrives at an inbox is checked (ASCII `!` and `.` never sit inside
    // a multi-byte character, so the slices are on character boundaries).
    let bang = channel.bytes().position(|b| b == b'!')?;
    let dot = channel.as_bytes()[..bang]
        .iter()
        .rposition(|&b| b == b'.')?;
    channel.get(dot + 1..bang).filter(|id| !id.is_empty())
}

const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Lower-case base32 (RFC 4648 alphabet, no padding) of the low `bits` bits of `value`.
pub(crate) fn base32(value: u128, bits: u32) -> String {
    let digits = bits.div_ceil(5);
    (0..digits)
        .rev()
        .map(|i| ALPHABET[((value >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// A fresh random instance id: 64 bits from the operating system's CSPRNG-seeded generator,
/// 13 base32 characters.
pub fn new_instance_id() -> String {
    base32(u128::from(rand::random::<u64>()), 64)
}

/// Builds a new process-local channel name `{prefix}.{instance}!{random}` with 128 random
/// bits, after checking the prefix and the resulting length.
pub fn new_channel_name(prefix: &str, instance: &str) -> Result<String> {
    validate_prefix(prefix)?;
    let random = base32(rand::random::<u128>(), 128);
    let name = format!("{prefix}.{instance}!{random}");
    if name.len() > MAX_NAME_LEN {
        let room = MAX_NAME_LEN - (name.len() - prefix.len());
        return Err(invalid(
            NameKind::Prefix,
            prefix,
            format!(
                "the prefix is {} characters long; with the instance id and random part the channel name would exceed {MAX_NAME_LEN} characters, so the prefix may be at most {room}",
                prefix.len()
            ),
        ));
    }
    Ok(name)
}

/// How a layer instance names its process-local channels, and how a channel name routes to
/// the instance that owns it. A transport chooses one ([`Transport::naming`]); every
/// instance of one deployment must use the same.
///
/// ```
/// use chanlayer_core::names::Naming;
/// let n = Naming::ChannelsRabbitmq;
/// let id = n.new_instance_id();
/// assert!(id.starts_with("channels_") && id.len() == 21);
/// let ch = n.new_channel("ignored", &id).unwrap();
/// assert_eq!(n.owner(&ch), Some(id.as_str()));
/// assert_eq!(Naming::Layer.owner("ws.k3j2!x7"), Some("k3j2"));
/// ```
///
/// [`Transport::naming`]: crate::toolkit::Transport::naming
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Naming {
    /// chanlayer's own: `{prefix}.{instance}!{random}`, the instance a 13-character base32
    /// id, the random part 128 bits ([`new_channel_name`], [`owner_instance`]).
    #[default]
    Layer,
    /// Django `channels_rabbitmq`'s: `{instance}!{12 letters}`, the instance (which is also
    /// its queue's name) `channels_` and 12 random ASCII letters. The prefix given to
    /// `new_channel` is not part of the name, as there.
    ChannelsRabbitmq,
}

impl Naming {
    /// A fresh instance id.
    pub fn new_instance_id(self) -> String {
        match self {
            Naming::Layer => new_instance_id(),
            Naming::ChannelsRabbitmq => format!("channels_{}", random_letters(12)),
        }
    }

    /// A new process-local channel name of instance `instance`. `prefix` is checked either
    /// way (an invalid one is an error on every wire).
    pub fn new_channel(self, prefix: &str, instance: &str) -> Result<String> {
        match self {
            Naming::Layer => new_channel_name(prefix, instance),
            Naming::ChannelsRabbitmq => {
                validate_prefix(prefix)?;
                Ok(format!("{instance}!{}", random_letters(12)))
            }
        }
    }

    /// The instance that owns process-local channel `channel`; `None` for a normal channel
    /// or a `!` name this naming cannot route.
    pub fn owner(self, channel: &str) -> Option<&str> {
        match self {
            Naming::Layer => owner_instance(channel),
            Naming::ChannelsRabbitmq => {
                let (head, _) = channel.split_once('!')?;
                (!head.is_empty()).then_some(head)
            }
        }
    }

    /// Checks that instance `instance` may receive from `channel`: a valid name, and for a
    /// process-local channel, one this instance owns (`Error::NotOwner` otherwise).
    pub fn check_receiver(self, channel: &str, instance: &str) -> Result<()> {
        validate_channel(channel)?;
        if is_process_local(channel) && self.owner(channel) != Some(instance) {
            return Err(crate::Error::NotOwner {
                channel: channel.to_owned(),
            });
        }
        Ok(())
    }
}

/// `n` random ASCII letters (`A-Za-z`), as Python's `random.choice(string.ascii_letters)`.
fn random_letters(n: usize) -> String {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    (0..n)
        .map(|_| LETTERS[rand::random_range(0..LETTERS.len())] as char)
        .collect()
}

/// The names a broker-backed transport gives the objects of one layer instance, the same
/// on AMQP (queues and the groups exchange) and Kafka (topics): every name starts with the
/// layer's prefix, so applications with different prefixes on one broker never share one.
///
/// ```
/// use chanlayer_core::names::BrokerNames;
/// let n = BrokerNames::new("app", "app.groups", "k3j2");
/// assert_eq!(n.inbox, "app.inbox.k3j2");
/// assert_eq!(n.inbox_of("x7"), "app.inbox.x7");
/// assert_eq!(n.channel("jobs"), "app.channel.jobs");
/// ```
#[derive(Debug, Clone)]
pub struct BrokerNames {
    prefix: String,
    /// Where group messages go (the groups exchange or topic).
    pub groups: String,
    /// This instance's inbox, where its process-local channels' messages arrive.
    pub inbox: String,
}

impl BrokerNames {
    /// The names for instance `instance` of a layer with prefix `prefix`, whose group
    /// messages go through `groups`.
    pub fn new(prefix: &str, groups: &str, instance: &str) -> Self {
        BrokerNames {
            prefix: prefix.to_owned(),
            groups: groups.to_owned(),
            inbox: inbox_name(prefix, instance),
        }
    }

    /// The inbox of the instance `instance` (the owner of process-local channels with that id).
    pub fn inbox_of(&self, instance: &str) -> String {
        inbox_name(&self.prefix, instance)
    }

    /// The queue or topic of normal channel `channel` (on Kafka also its consumer group).
    pub fn channel(&self, channel: &str) -> String {
        format!("{}.channel.{channel}", self.prefix)
    }
}

/// The inbox of instance `instance` of a layer with prefix `prefix`: `{prefix}.inbox.{instance}`.
pub fn inbox_name(prefix: &str, instance: &str) -> String {
    format!("{prefix}.inbox.{instance}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_names_of_different_prefixes_stay_apart() {
        let a = BrokerNames::new("app1", "app1.groups", "abc");
        let b = BrokerNames::new("app2", "app2.groups", "abc");
        assert_ne!(a.inbox, b.inbox);
        assert_ne!(a.channel("jobs"), b.channel("jobs"));
        assert_eq!(a.channel("jobs"), "app1.channel.jobs");
        assert_eq!(a.inbox_of("xyz"), "app1.inbox.xyz");
        // A channel can't be named like an inbox: channel queues have their own segment.
        assert_ne!(a.channel("inbox.abc"), a.inbox);
    }

    #[test]
    fn rules() {
        assert!(validate_channel("a").is_ok());
        assert!(validate_channel("a!").is_ok());
        assert!(validate_channel(&"a".repeat(99)).is_ok());
        assert!(validate_channel(&"a".repeat(100)).is_err());
        assert!(validate_channel("!a").is_err());
        assert!(validate_channel("a!b!c").is_err());
        assert!(validate_channel("é").is_err());
        assert!(validate_channel("a\n").is_err());
        assert!(validate_group("a!").is_err());
    }

    #[test]
    fn channel_names_have_owner() {
        let id = new_instance_id();
        assert_eq!(id.len(), 13);
        let n = new_channel_name("ws", &id).unwrap();
        assert!(validate_channel(&n).is_ok());
        assert_eq!(owner_instance(&n), Some(id.as_str()));
        assert_eq!(n.len(), 2 + 1 + 13 + 1 + 26);
        assert!(new_channel_name(&"p".repeat(58), &id).is_ok());
        let err = new_channel_name(&"p".repeat(59), &id).unwrap_err();
        assert!(err.to_string().contains("at most 58"), "{err}");
    }
}
