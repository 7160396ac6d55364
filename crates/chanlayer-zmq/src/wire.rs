//! The wire format: topics, the meta frame, and the control frames.
//!
//! ZeroMQ SUB sockets match the first frame of a message by **prefix**, so a subscription to
//! `ch1` would also receive `ch11`. Every chanlayer topic therefore ends with a NUL byte,
//! which no channel, group, prefix or instance name can contain: `c:app:ch1\0` is not a
//! prefix of `c:app:ch11\0`. The first two bytes keep the kinds apart, so a channel and a
//! group of the same name never see each other's messages.
//!
//! | topic | carries |
//! |---|---|
//! | `c:{prefix}:{channel}\0` | a normal channel (every subscriber gets every message) |
//! | `g:{prefix}:{group}\0` | a group (each subscribing instance fans out to its members) |
//! | `i:{prefix}:{instance}\0` | the process-local (`!`) channels of one layer instance |
//! | `h:{instance}.{n}\0{topic}` | a subscription probe: the answer (replay + welcome) |
//! | `x:mark\0` | control, sender to proxy only: a barrier (and flush) |
//!
//! Messages from the publisher (the proxy or the embedded publisher) to subscribers:
//!
//! ```text
//! data:     [topic, meta(DATA, epoch, seq), envelope]      seq counts per topic from 1
//! batch:    [topic, meta(BATCH, epoch, seq), items]        consecutive messages of the
//!                                                          topic, seq, seq+1, ...
//! welcome:  [probe, meta(WELCOME, epoch, seq)]             seq = the topic's current seq
//! welcome:  [probe, meta(WELCOME, epoch, seq), origins]    the proxy's (see below)
//! replay:   [probe, meta(DATA, epoch, seq), envelope]      retained messages, before welcome
//! mark:     [inbox topic, meta(MARK, epoch, token)]        the answer to a control mark
//! ```
//!
//! Messages from senders to the proxy (dedicated mode):
//!
//! ```text
//! data:     [topic, meta(DATA, origin, oseq), envelope]
//! batch:    [topic, meta(BATCH, origin, oseq), items]      items oseq, oseq+1, ...
//! data:     [topic, envelope]                              no origin (not counted)
//! control:  [b"x:mark\0", reply topic, token (8 bytes LE), flush prefix (may be empty)]
//! ```
//!
//! **Origins** (dedicated mode). Each sender numbers its own messages per topic: `origin` is
//! a random id the sender picks for the topic, `oseq` counts that sender's messages of the
//! topic from 1. The proxy passes both on in a longer meta frame ([`meta_stamped`]: the
//! proxy's `(epoch, seq)`, then the [`Origin`]), and its welcome carries, for each origin
//! it knows on the topic, the last `oseq` it published ([`origin_table`]). A receiver counts
//! losses by origin: a gap in an origin's `oseq` is messages of that sender it never got,
//! wherever they were lost, and the count survives a proxy restart (a new epoch), because
//! the sender's numbers go on where the proxy's start over.
//!
//! `items` is a **batch**: each envelope preceded by its length (u32 little-endian). Under
//! load a sender or publisher finds several messages of one topic queued one after the
//! other; it sends them as one ZeroMQ message, so the per-message costs of ZeroMQ (the
//! subscription match, the pipes, the I/O thread) are paid once per batch. A batch holds at
//! most [`BATCH_MAX_BYTES`] of items, each at most [`BATCH_ITEM_MAX`] bytes; a larger
//! envelope always travels alone, and a message with nothing queued behind it travels alone
//! as `data` (no added latency: a batch is what is queued already, nothing waits for more).
//!
//! The meta frame is 17 bytes: a kind byte, the publisher's epoch (random per publisher
//! start, u64 little-endian) and a sequence number (u64 little-endian). Receivers use
//! `(epoch, seq)` to put a replay and live messages in order without duplicates, and to count
//! messages that PUB/SUB dropped (a gap in a topic's sequence). The proxy's meta frames are
//! [`STAMPED_META_LEN`] bytes: the same, then the message's [`Origin`]; receivers then count
//! losses by origin instead.

/// Topic kind byte of a normal channel.
pub const CHANNEL: u8 = b'c';
/// Topic kind byte of a group.
pub const GROUP: u8 = b'g';
/// Topic kind byte of an instance inbox (process-local channels).
pub const INBOX: u8 = b'i';
/// Topic kind byte of a subscription probe.
pub const PROBE: u8 = b'h';

/// The first frame of a control message to the proxy.
pub const MARK_CONTROL: &[u8] = b"x:mark\0";

/// Meta kind: a message (live or replayed).
pub const META_DATA: u8 = 1;
/// Meta kind: the answer to a subscription probe.
pub const META_WELCOME: u8 = 2;
/// Meta kind: the answer to a control mark (barrier).
pub const META_MARK: u8 = 3;
/// Meta kind: a batch of consecutive messages of the topic (see [`batch_items`]).
pub const META_BATCH: u8 = 4;
/// Length of the meta frame.
pub const META_LEN: usize = 17;
/// Length of the meta frame with an [`Origin`] (from the proxy).
pub const STAMPED_META_LEN: usize = META_LEN + 24;

/// The kind of a data topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// `c:`: a normal channel.
    Channel,
    /// `g:`: a group.
    Group,
    /// `i:`: an instance inbox.
    Inbox,
}

fn topic(kind: u8, prefix: &str, name: &str) -> Vec<u8> {
    let mut t = Vec::with_capacity(prefix.len() + name.len() + 4);
    topic_into(&mut t, kind, prefix, name);
    t
}

/// The topic of kind `kind` ([`CHANNEL`], [`GROUP`], [`INBOX`]) for `name` under `prefix`,
/// appended to `t`.
pub fn topic_into(t: &mut Vec<u8>, kind: u8, prefix: &str, name: &str) {
    t.push(kind);
    t.push(b':');
    t.extend_from_slice(prefix.as_bytes());
    t.push(b':');
    t.extend_from_slice(name.as_bytes());
    t.push(0);
}

/// The topic of normal channel `channel` under `prefix`.
///
/// ```
/// assert_eq!(chanlayer_zmq::wire::channel_topic("app", "ch1"), b"c:app:ch1\0");
/// ```
pub fn channel_topic(prefix: &str, channel: &str) -> Vec<u8> {
    topic(CHANNEL, prefix, channel)
}

/// The topic of group `group` under `prefix`.
pub fn group_topic(prefix: &str, group: &str) -> Vec<u8> {
    topic(GROUP, prefix, group)
}

/// The inbox topic of layer instance `instance` under `prefix` (its process-local channels).
pub fn inbox_topic(prefix: &str, instance: &str) -> Vec<u8> {
    topic(INBOX, prefix, instance)
}

/// The probe topic a subscriber uses to ask for the replay and welcome of `topic`.
pub fn probe_topic(instance: &str, n: u64, topic: &[u8]) -> Vec<u8> {
    let head = format!("{}:{instance}.{n}\0", PROBE as char);
    [head.as_bytes(), topic].concat()
}

/// The topic a probe asks about, if `probe` is a well-formed probe of a data topic.
pub fn parse_probe(probe: &[u8]) -> Option<&[u8]> {
    let rest = probe.strip_prefix(b"h:")?;
    let nul = rest.iter().position(|&b| b == 0)?;
    let topic = &rest[nul + 1..];
    let named = nul > 0 && rest[..nul].iter().copied().all(name_byte);
    (named && data_topic_kind(topic).is_some()).then_some(topic)
}

fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-' || b == b'!'
}

/// The kind of a well-formed data topic (`c:`, `g:` or `i:`, a prefix, a name, one
/// terminating NUL), or `None`.
pub fn data_topic_kind(topic: &[u8]) -> Option<TopicKind> {
    let kind = match topic.first()? {
        b'c' => TopicKind::Channel,
        b'g' => TopicKind::Group,
        b'i' => TopicKind::Inbox,
        _ => return None,
    };
    let body = topic.get(2..)?.strip_suffix(b"\0")?;
    let colon = body.iter().position(|&b| b == b':')?;
    let name = |s: &[u8]| !s.is_empty() && s.iter().copied().all(name_byte);
    (topic[1] == b':' && name(&body[..colon]) && name(&body[colon + 1..])).then_some(kind)
}

/// `true` if `topic` is a data topic whose prefix is `prefix` and whose kind is `c:` or `i:`
/// (what a flush of `prefix` clears from a publisher's retention).
pub fn flushable_under(topic: &[u8], prefix: &[u8]) -> bool {
    matches!(topic.first(), Some(b'c' | b'i'))
        && topic.get(1) == Some(&b':')
        && topic
            .get(2..)
            .is_some_and(|rest| rest.starts_with(prefix) && rest.get(prefix.len()) == Some(&b':'))
}

/// A meta frame.
pub fn meta(kind: u8, epoch: u64, seq: u64) -> [u8; META_LEN] {
    let mut m = [0u8; META_LEN];
    m[0] = kind;
    m[1..9].copy_from_slice(&epoch.to_le_bytes());
    m[9..17].copy_from_slice(&seq.to_le_bytes());
    m
}

/// Where a message comes from, end to end (dedicated mode): the sender's own numbering of
/// its messages on the topic, which a proxy restart does not reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Origin {
    /// The sender's random id for the topic; 0 is no origin (a message the proxy got
    /// without one), which receivers do not count.
    pub id: u64,
    /// The sender's sequence number of the message on the topic, from 1 (of the first
    /// message of a batch; the others follow).
    pub seq: u64,
    /// The first `seq` of this origin the proxy published on the topic since it began to
    /// follow the origin: what came before it was published before the proxy's time.
    pub first: u64,
}

impl Origin {
    /// The origin of the message `n` places after this one (the items of a batch follow
    /// their first).
    pub(crate) fn after(self, n: u64) -> Origin {
        let seq = self.seq.saturating_add(n);
        Origin { seq, ..self }
    }
}

/// A meta frame with an origin ([`STAMPED_META_LEN`] bytes).
pub fn meta_stamped(kind: u8, epoch: u64, seq: u64, origin: Origin) -> [u8; STAMPED_META_LEN] {
    let mut m = [0u8; STAMPED_META_LEN];
    m[..META_LEN].copy_from_slice(&meta(kind, epoch, seq));
    m[17..25].copy_from_slice(&origin.id.to_le_bytes());
    m[25..33].copy_from_slice(&origin.seq.to_le_bytes());
    m[33..41].copy_from_slice(&origin.first.to_le_bytes());
    m
}

fn u64_at(frame: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = frame.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// Reads a meta frame, with or without an origin: `(kind, epoch, seq)`.
pub fn parse_meta(frame: &[u8]) -> Option<(u8, u64, u64)> {
    let kind = *frame.first()?;
    let known = (META_DATA..=META_BATCH).contains(&kind);
    if !known || !matches!(frame.len(), META_LEN | STAMPED_META_LEN) {
        return None;
    }
    Some((kind, u64_at(frame, 1)?, u64_at(frame, 9)?))
}

/// The origin of a meta frame that has one ([`meta_stamped`]); `None` for a plain one.
pub fn parse_origin(frame: &[u8]) -> Option<Origin> {
    if frame.len() != STAMPED_META_LEN {
        return None;
    }
    Some(Origin {
        id: u64_at(frame, 17)?,
        seq: u64_at(frame, 25)?,
        first: u64_at(frame, 33)?,
    })
}

/// The origin table of a proxy's welcome: for each origin id, the last sequence number the
/// proxy published of it on the topic (16 bytes each, little-endian).
pub fn origin_table(entries: &[(u64, u64)]) -> Vec<u8> {
    let pairs = entries
        .iter()
        .map(|(id, last)| [id.to_le_bytes(), last.to_le_bytes()]);
    pairs.flatten().flatten().collect()
}

/// Reads an origin table; `None` if its length is not a whole number of entries.
pub fn parse_origin_table(frame: &[u8]) -> Option<Vec<(u64, u64)>> {
    if frame.len() % 16 != 0 {
        return None;
    }
    frame
        .chunks_exact(16)
        .map(|c| Some((u64_at(c, 0)?, u64_at(c, 8)?)))
        .collect()
}

/// The largest envelope that goes into a batch; a larger one travels alone (copying it into
/// a batch would cost more than the per-message overhead a batch saves).
pub const BATCH_ITEM_MAX: usize = 16 * 1024;
/// The most item bytes (with their length prefixes) one batch carries.
pub const BATCH_MAX_BYTES: usize = 128 * 1024;

/// Appends one item (its length, then its bytes) to a batch body. Items are at most
/// [`BATCH_ITEM_MAX`] bytes, so the length always fits.
pub fn batch_push(body: &mut Vec<u8>, item: &[u8]) {
    let len = u32::try_from(item.len()).unwrap_or(u32::MAX);
    body.extend_from_slice(&len.to_le_bytes());
    body.extend_from_slice(item);
}

/// Splits a batch body into its items; `None` if it is empty, or a length runs past the end.
pub fn batch_items(body: &[u8]) -> Option<Vec<&[u8]>> {
    let mut items = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
        let (item, tail) = tail.split_at_checked(len)?;
        items.push(item);
        rest = tail;
    }
    (!items.is_empty()).then_some(items)
}

/// Reads a control mark's frames after the first: `(reply topic, token, flush prefix)`.
pub fn parse_mark_control<'a>(frames: &[&'a [u8]]) -> Option<(&'a [u8], u64, &'a [u8])> {
    let [reply, token, prefix] = frames else {
        return None;
    };
    data_topic_kind(reply)?;
    let token: [u8; 8] = (*token).try_into().ok()?;
    let named = prefix.iter().copied().all(name_byte);
    named.then_some((reply, u64::from_le_bytes(token), prefix))
}

/// A topic as [`display`] shows it, formatted only when it is shown (per-message paths
/// name their topic for errors that rarely happen).
pub struct Shown<'a>(pub &'a [u8]);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for &b in self.0.iter().take(256) {
            match b {
                0 => f.write_str("\\0")?,
                b if b.is_ascii_graphic() => write!(f, "{}", b as char)?,
                b => write!(f, "\\x{b:02x}")?,
            }
        }
        Ok(())
    }
}

/// A topic or probe for logs: the bytes with the NULs shown as `\0`.
pub fn display(topic: &[u8]) -> String {
    Shown(topic).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_never_prefix_collide() {
        let a = channel_topic("p", "ch1");
        let b = channel_topic("p", "ch11");
        assert!(!b.starts_with(&a) && !a.starts_with(&b));
        let c = channel_topic("p", "x");
        let g = group_topic("p", "x");
        let i = inbox_topic("p", "x");
        for (x, y) in [(&c, &g), (&c, &i), (&g, &i)] {
            assert!(!x.starts_with(y) && !y.starts_with(x));
        }
        // Another prefix never matches either.
        assert!(!channel_topic("p2", "x").starts_with(&channel_topic("p", "x")));
    }

    #[test]
    fn topics_written_into_a_buffer_are_the_same_bytes() {
        let mut out = b"old".to_vec();
        out.clear();
        topic_into(&mut out, CHANNEL, "p", "ch1");
        assert_eq!(out, channel_topic("p", "ch1"));
        out.clear();
        topic_into(&mut out, INBOX, "p", "inst");
        assert_eq!(out, inbox_topic("p", "inst"));
    }

    #[test]
    fn kinds_and_probes() {
        assert_eq!(
            data_topic_kind(&channel_topic("p", "a.b")),
            Some(TopicKind::Channel)
        );
        assert_eq!(
            data_topic_kind(&group_topic("p", "g")),
            Some(TopicKind::Group)
        );
        assert_eq!(
            data_topic_kind(&inbox_topic("p", "i")),
            Some(TopicKind::Inbox)
        );
        for bad in [
            &b""[..],
            b"c",
            b"c:p:x",
            b"c:p:x\0junk\0",
            b"c::x\0",
            b"c:p:\0",
            b"z:p:x\0",
            b"c:px\0",
            b"c:p:x y\0",
            b"cXp:x\0",
        ] {
            assert_eq!(data_topic_kind(bad), None, "{}", display(bad));
        }
        let t = channel_topic("p", "x");
        let probe = probe_topic("inst", 7, &t);
        assert_eq!(parse_probe(&probe), Some(&t[..]));
        assert_eq!(parse_probe(b"h:\0c:p:x\0"), None);
        assert_eq!(parse_probe(b"h:a.1\0c:p:x"), None);
        assert!(probe.starts_with(b"h:inst.7\0"));
    }

    #[test]
    fn origins_round_trip() {
        let o = Origin {
            id: 5,
            seq: 9,
            first: 3,
        };
        let m = meta_stamped(META_BATCH, 42, 7, o);
        assert_eq!(parse_meta(&m), Some((META_BATCH, 42, 7)));
        assert_eq!(parse_origin(&m), Some(o));
        assert_eq!(parse_origin(&meta(META_DATA, 42, 7)), None, "a plain meta");
        assert_eq!(parse_meta(&m[..40]), None);
        let t = origin_table(&[(1, 2), (u64::MAX, 0)]);
        assert_eq!(parse_origin_table(&t), Some(vec![(1, 2), (u64::MAX, 0)]));
        assert_eq!(parse_origin_table(&t[..15]), None);
        assert_eq!(parse_origin_table(b""), Some(vec![]));
    }

    #[test]
    fn meta_round_trip() {
        let m = meta(META_WELCOME, 42, 7);
        assert_eq!(parse_meta(&m), Some((META_WELCOME, 42, 7)));
        assert_eq!(parse_meta(&m[..16]), None);
        let mut bad = m;
        bad[0] = 9;
        assert_eq!(parse_meta(&bad), None);
    }

    #[test]
    fn batches_round_trip_and_reject_truncation() {
        let mut body = Vec::new();
        for item in [&b"one"[..], b"", b"three"] {
            batch_push(&mut body, item);
        }
        assert_eq!(
            batch_items(&body),
            Some(vec![&b"one"[..], &b""[..], &b"three"[..]])
        );
        for cut in 1..body.len() {
            if cut == 7 || cut == 11 {
                continue; // a whole number of items
            }
            assert_eq!(batch_items(&body[..cut]), None, "cut at {cut}");
        }
        assert_eq!(batch_items(b""), None);
        assert_eq!(batch_items(&[0xff, 0xff, 0xff, 0xff, 1]), None);
        let m = meta(META_BATCH, 1, 2);
        assert_eq!(parse_meta(&m), Some((META_BATCH, 1, 2)));
    }

    #[test]
    fn flush_scope() {
        assert!(flushable_under(&channel_topic("app", "x"), b"app"));
        assert!(flushable_under(&inbox_topic("app", "x"), b"app"));
        assert!(!flushable_under(&group_topic("app", "x"), b"app"));
        assert!(!flushable_under(&channel_topic("app2", "x"), b"app"));
    }

    #[test]
    fn mark_controls() {
        let reply = inbox_topic("p", "i");
        let token = 9u64.to_le_bytes();
        let rest: Vec<&[u8]> = vec![&reply, &token, b"p"];
        assert_eq!(parse_mark_control(&rest), Some((&reply[..], 9, &b"p"[..])));
        assert_eq!(parse_mark_control(&rest[..2]), None);
    }
}
