//! Unit tests of the bridge between async callers and the socket threads.

use super::*;

/// What is queued, in order: data as (topic, item lengths), commands as their value.
#[derive(Debug, PartialEq)]
enum Shape {
    Data(Vec<u8>, Vec<usize>),
    Control(u32),
}

fn shape(items: VecDeque<Item<u32>>) -> Vec<Shape> {
    items
        .into_iter()
        .map(|i| match i {
            Item::Data(Outgoing {
                topic,
                body,
                count: 1,
            }) => Shape::Data(topic, vec![body.len()]),
            Item::Data(Outgoing { topic, body, count }) => {
                let lens: Vec<usize> = wire::batch_items(&body)
                    .expect("a batch")
                    .iter()
                    .map(|i| i.len())
                    .collect();
                assert_eq!(lens.len(), count, "count matches the items");
                Shape::Data(topic, lens)
            }
            Item::Control(c) => Shape::Control(c),
        })
        .collect()
}

fn data(topic: &[u8], lens: &[usize]) -> Shape {
    Shape::Data(topic.to_vec(), lens.to_vec())
}

#[test]
fn consecutive_data_of_a_topic_merges_into_a_run_and_commands_travel_alone() {
    const BIG: usize = wire::BATCH_ITEM_MAX + 1;
    // (pushes, what is queued) for each way of pushing data.
    enum Push {
        Borrowed(&'static [u8], usize),
        Owned(&'static [u8], usize),
        All(&'static [(&'static [u8], usize)]),
        Control(u32),
    }
    use Push::*;
    let cases: &[(&str, &[Push], Vec<Shape>)] = &[
        (
            "borrowed",
            &[
                Borrowed(b"a", 10),
                Borrowed(b"a", 20),
                Borrowed(b"a", 30),
                Borrowed(b"b", 5),
                Borrowed(b"b", BIG),
                Borrowed(b"b", 5),
                Borrowed(b"b", 6),
            ],
            vec![
                data(b"a", &[10, 20, 30]),
                data(b"b", &[5]),
                data(b"b", &[BIG]),
                data(b"b", &[5, 6]),
            ],
        ),
        (
            "owned merges the same way",
            &[
                Owned(b"a", 10),
                Owned(b"a", 20),
                Owned(b"b", 5),
                Owned(b"b", BIG),
                Owned(b"b", 5),
            ],
            vec![
                data(b"a", &[10, 20]),
                data(b"b", &[5]),
                data(b"b", &[BIG]),
                data(b"b", &[5]),
            ],
        ),
        (
            "a command ends a run",
            &[
                Borrowed(b"a", 1),
                Control(7),
                Borrowed(b"a", 2),
                Owned(b"a", 3),
                Control(8),
                Control(9),
            ],
            vec![
                data(b"a", &[1]),
                Shape::Control(7),
                data(b"a", &[2, 3]),
                Shape::Control(8),
                Shape::Control(9),
            ],
        ),
        (
            "a batch merges into what is queued and within itself",
            &[
                Borrowed(b"a", 1),
                All(&[(b"a", 2), (b"a", 3), (b"b", 4), (b"b", 5)]),
            ],
            vec![data(b"a", &[1, 2, 3]), data(b"b", &[4, 5])],
        ),
    ];
    for (name, pushes, want) in cases {
        let m: Mailbox<u32> = Mailbox::new(100).expect("mailbox");
        for p in *pushes {
            match p {
                Borrowed(t, n) => m.push(Cow::Borrowed(t), vec![7; *n].as_slice().into()),
                Owned(t, n) => m.push(t.to_vec().into(), vec![7; *n].into()),
                All(msgs) => m.push_all(
                    msgs.iter()
                        .map(|(t, n)| (t.to_vec(), vec![7; *n]))
                        .collect(),
                ),
                Control(c) => m.push_control(*c),
            }
            .expect("room");
        }
        assert_eq!(shape(m.take_all()), *want, "{name}");
    }
    // A run stops at BATCH_MAX_BYTES.
    let m: Mailbox<u32> = Mailbox::new(100).expect("mailbox");
    let per = wire::BATCH_ITEM_MAX;
    let fit = wire::BATCH_MAX_BYTES / (per + 4);
    for _ in 0..=fit {
        m.push(Cow::Borrowed(b"c"), Cow::Borrowed(&vec![1; per]))
            .expect("room");
    }
    let counts: Vec<usize> = m.take_all().iter().map(Item::count).collect();
    assert_eq!(counts, vec![fit, 1]);
}

#[test]
fn the_capacity_counts_data_messages_not_items_or_commands() {
    let m: Mailbox<u32> = Mailbox::new(3).expect("mailbox");
    m.push(Cow::Borrowed(b"a"), Cow::Borrowed(b"1"))
        .expect("room");
    m.push(Cow::Borrowed(b"a"), Cow::Borrowed(b"2"))
        .expect("room");
    m.push(b"b".to_vec().into(), b"3".to_vec().into())
        .expect("room");
    assert_eq!(
        m.push(Cow::Borrowed(b"b"), Cow::Borrowed(b"4")),
        Err(Refused::Full),
        "3 messages queued"
    );
    assert_eq!(
        m.push(b"b".to_vec().into(), b"4".to_vec().into()),
        Err(Refused::Full)
    );
    assert_eq!(
        m.push_control(1),
        Ok(()),
        "commands are never refused for room"
    );
    let mut out = VecDeque::new();
    m.take_some(1, &mut out);
    assert_eq!(
        shape(out),
        vec![data(b"a", &[1, 1])],
        "the first two merged"
    );
    m.push(Cow::Borrowed(b"b"), Cow::Borrowed(b"5"))
        .expect("room again");
    m.push(Cow::Borrowed(b"b"), Cow::Borrowed(b"6"))
        .expect("room again");
    assert_eq!(
        m.push(Cow::Borrowed(b"c"), Cow::Borrowed(b"7")),
        Err(Refused::Full)
    );
    assert_eq!(
        m.push_all(vec![(b"c".to_vec(), b"8".to_vec())]),
        Err(Refused::Full),
        "all or none"
    );
    m.take_all();
    let big: Vec<(Vec<u8>, Vec<u8>)> = (0..5).map(|_| (b"c".to_vec(), b"9".to_vec())).collect();
    m.push_all(big)
        .expect("a batch larger than the capacity fits an empty queue");
    m.take_all();
    m.close();
    assert_eq!(
        m.push(Cow::Borrowed(b"a"), Cow::Borrowed(b"x")),
        Err(Refused::Closed)
    );
    assert_eq!(m.push_control(2), Err(Refused::Closed));
}

#[test]
fn a_push_rings_a_sleeping_thread() {
    let m: Mailbox<u32> = Mailbox::new(8).expect("mailbox");
    assert!(m.prepare_sleep());
    m.push_control(1).expect("push");
    let mut items = [m.poll_item()];
    assert_eq!(zmq::poll(&mut items, 1000).expect("poll"), 1);
    m.woke();
    assert!(!m.prepare_sleep(), "an item is queued: no sleep");
    m.take_all();
    assert!(m.prepare_sleep());
    let mut items = [m.poll_item()];
    assert_eq!(
        zmq::poll(&mut items, 0).expect("poll"),
        0,
        "the bell was emptied"
    );
}

/// A sink that records what it was given, takes sends straight when `direct` says (as the
/// embedded publisher does; the dedicated PUSH socket does not), and whose socket is idle
/// when `idle` says.
struct Recorder {
    put: Vec<usize>,
    direct: bool,
    idle: bool,
}

impl Sink for Recorder {
    fn put(&mut self, item: Item<Control>) -> bool {
        self.put.push(item.count());
        false
    }
    fn direct(&self) -> bool {
        self.direct
    }
    fn idle(&mut self) -> bool {
        self.idle
    }
}

#[test]
fn a_send_passes_the_queue_only_while_the_thread_sleeps_and_nothing_waits() {
    let outbox = |idle| {
        let sink = Recorder {
            put: vec![],
            direct: true,
            idle,
        };
        Outbox::new(8, sink).expect("outbox")
    };
    let send = |o: &Outbox| o.send(b"t", Cow::Borrowed(b"x")).expect("send");
    let queued =
        |o: &Outbox<Recorder>| -> usize { o.mailbox.take_all().iter().map(Item::count).sum() };
    let put = |o: &Outbox<Recorder>| lock(&o.sink).put.clone();
    // The thread is awake (it never said it would sleep): the send queues for it.
    let awake = outbox(true);
    send(&awake);
    assert_eq!((queued(&awake), put(&awake)), (1, vec![]));
    // Asleep, nothing queued, the socket idle: straight to the socket.
    let asleep = outbox(true);
    assert!(asleep.mailbox.prepare_sleep());
    send(&asleep);
    assert_eq!((queued(&asleep), put(&asleep)), (0, vec![1]));
    // Asleep, but the socket was used just now: queued, and the doorbell rang.
    let busy = outbox(false);
    assert!(busy.mailbox.prepare_sleep());
    send(&busy);
    assert!(!busy.mailbox.asleep(), "the push woke the thread");
    assert_eq!((queued(&busy), put(&busy)), (1, vec![]));
    // Asleep with something queued: behind it, never past it.
    let behind = outbox(true);
    behind
        .mailbox
        .push_control(Control::Raw(vec![]))
        .expect("push");
    behind.mailbox.sleeping.store(true, Ordering::SeqCst);
    send(&behind);
    assert_eq!(
        behind.mailbox.take_all().len(),
        2,
        "queued behind the command"
    );
    assert!(put(&behind).is_empty());
    // A sink that takes nothing straight (the dedicated PUSH socket): asleep, nothing
    // queued, the socket idle, and still queued for the thread.
    let sink = Recorder {
        put: vec![],
        direct: false,
        idle: true,
    };
    let queues = Outbox::new(8, sink).expect("outbox");
    assert!(queues.mailbox.prepare_sleep());
    send(&queues);
    assert_eq!((queued(&queues), put(&queues)), (1, vec![]));
}
