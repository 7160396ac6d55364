//! Raw zmq sockets, doing what the ZeroMQ layer does on the wire, over TCP loopback on
//! free ports: a bound PUB socket and SUB sockets subscribed to one topic (embedded mode),
//! or PUSH → a forwarding thread (`zmq_proxy_steerable`, PULL → PUB) → SUB (dedicated mode).
//!
//! Zero loss is checked: before measuring, each path's sender sends probes until one
//! arrives (the subscription is active at the publisher); every payload carries a sequence
//! number (its first 8 bytes) and the receivers count the gaps.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::free_port;
use crate::raw_mpsc::{FanOut, Members};

/// High-water marks of every raw socket (and, in the benches, of the layer's sockets, its
/// `send_queue` and channel `capacity`): above the messages in flight, so nothing is dropped
/// or refused for room.
pub const HWM: usize = 100_000;
/// How long an iteration may wait for a message before it fails with what it knows.
pub const STALL: Duration = Duration::from_secs(10);
/// How long setup may wait for a subscription to become active.
pub const READY: Duration = Duration::from_secs(10);
/// The sequence number of a raw readiness probe (ignored by the receivers).
pub const PROBE: u64 = u64::MAX;

/// A raw socket with linger 0 and the [`HWM`]s.
pub fn raw_socket(ctx: &zmq::Context, kind: zmq::SocketType) -> zmq::Socket {
    let s = ctx.socket(kind).expect("a raw zmq socket");
    s.set_linger(0).expect("linger");
    let hwm = i32::try_from(HWM).expect("HWM fits an i32");
    s.set_sndhwm(hwm).expect("sndhwm");
    s.set_rcvhwm(hwm).expect("rcvhwm");
    s
}

/// A SUB socket connected to `endpoint` and subscribed to `topic`; a receive waits at most
/// STALL.
pub fn raw_sub(ctx: &zmq::Context, endpoint: &str, topic: &[u8]) -> zmq::Socket {
    let s = raw_socket(ctx, zmq::SUB);
    let stall = i32::try_from(STALL.as_millis()).expect("STALL fits an i32 of ms");
    s.set_rcvtimeo(stall).expect("rcvtimeo");
    s.set_subscribe(topic).expect("subscribe");
    s.connect(endpoint).expect("connect the SUB socket");
    s
}

/// `tcp://127.0.0.1:{port}`.
pub fn tcp(port: u16) -> String {
    format!("tcp://127.0.0.1:{port}")
}

/// Sends `[topic, payload]`.
pub fn send_two(tx: &zmq::Socket, topic: &[u8], payload: &[u8]) {
    tx.send(topic, zmq::SNDMORE)
        .and_then(|()| tx.send(payload, 0))
        .expect("a raw send");
}

/// The sequence number in the first 8 bytes of a payload ([`PROBE`] if there are none).
pub fn seq_of(payload: &[u8]) -> u64 {
    payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(PROBE, u64::from_le_bytes)
}

/// Sends probes on `topic` until one arrives at `rx` (the subscription is active at the
/// publisher), then takes what arrived. Later probes are skipped by the receivers.
pub fn raw_ready(what: &str, tx: &zmq::Socket, rx: &zmq::Socket, topic: &[u8]) {
    let deadline = Instant::now() + READY;
    let probe = PROBE.to_le_bytes();
    loop {
        assert!(
            Instant::now() < deadline,
            "{what}: no probe came through within {READY:?}"
        );
        send_two(tx, topic, &probe);
        if rx.poll(zmq::POLLIN, 10).expect("poll") > 0 {
            break;
        }
    }
    while rx.poll(zmq::POLLIN, 0).expect("poll") > 0 {
        let _ = rx.recv_multipart(0);
    }
}

/// Receives the next data message (skipping probes) into `payload`; `false` after STALL.
pub fn raw_recv(rx: &zmq::Socket, topic: &mut zmq::Message, payload: &mut zmq::Message) -> bool {
    loop {
        match rx.recv(topic, 0) {
            Ok(()) => {}
            Err(zmq::Error::EAGAIN) => return false,
            Err(e) => panic!("a raw receive failed: {e}"),
        }
        if !topic.get_more() {
            continue;
        }
        rx.recv(payload, 0).expect("the second frame");
        if seq_of(payload) != PROBE {
            return true;
        }
    }
}

/// Receives sequence numbers 0..n, handing each payload to `each`; returns how many were
/// missing (gaps, or not there after STALL).
pub fn raw_receive_each(rx: &zmq::Socket, n: u64, mut each: impl FnMut(&[u8])) -> u64 {
    let mut topic = zmq::Message::new();
    let mut payload = zmq::Message::new();
    let (mut expected, mut lost) = (0u64, 0u64);
    while expected < n {
        if !raw_recv(rx, &mut topic, &mut payload) {
            lost += n - expected;
            break;
        }
        let seq = seq_of(&payload);
        if seq < expected {
            continue;
        }
        each(&payload);
        lost += seq - expected;
        expected = seq + 1;
    }
    lost
}

/// Receives sequence numbers 0..n; returns how many were missing (gaps, or not there
/// after STALL).
pub fn raw_receive_n(rx: &zmq::Socket, n: u64) -> u64 {
    raw_receive_each(rx, n, |_| ())
}

/// Sends sequence numbers 0..n in a payload of `size` bytes on `topic`.
fn send_numbered(tx: &zmq::Socket, topic: &[u8], size: usize, n: u64) {
    let mut payload = vec![0xA5u8; size.max(8)];
    for seq in 0..n {
        payload[..8].copy_from_slice(&seq.to_le_bytes());
        send_two(tx, topic, &payload);
    }
}

/// One raw path: a sending socket (PUB or PUSH) and a SUB socket subscribed to `topic`.
pub struct RawPath {
    /// The name in benchmark ids and messages.
    pub name: &'static str,
    /// The sending socket.
    pub tx: zmq::Socket,
    /// The receiving SUB socket.
    pub rx: zmq::Socket,
    /// The topic (first frame) of every message.
    pub topic: Vec<u8>,
    /// Messages moved by the throughput benches.
    pub moved: u64,
}

/// `n` numbered messages of `size` bytes from the sender on this thread to a receiver on
/// another, each with its socket. Panics on a sequence gap.
pub fn raw_send_receive(path: &mut RawPath, size: usize, n: usize) -> Duration {
    let RawPath {
        name,
        tx,
        rx,
        topic,
        moved,
    } = path;
    let mut payload = vec![0xA5u8; size];
    let n64 = n as u64;
    let (elapsed, lost) = std::thread::scope(|s| {
        let rx: &mut zmq::Socket = rx;
        let receiver = s.spawn(move || raw_receive_n(rx, n64));
        let start = Instant::now();
        for seq in 0..n64 {
            payload[..8].copy_from_slice(&seq.to_le_bytes());
            send_two(tx, topic, &payload);
        }
        let lost = receiver.join().expect("the raw receiver thread");
        (start.elapsed(), lost)
    });
    assert_eq!(
        lost, 0,
        "{name}: {lost} of {n} messages lost (sequence gaps, or missing after {STALL:?})"
    );
    *moved += n64;
    elapsed
}

/// The raw twin of a layer's `group_send` to N local members: `m` numbered messages of
/// `size` bytes through `path`, whose receiver thread pushes a copy of each into every
/// member queue of `fan_out`, while a drain task on `rt` takes them. Panics on a gap.
pub fn raw_group_send(
    path: &mut RawPath,
    fan_out: &mut FanOut,
    rt: &tokio::runtime::Runtime,
    size: usize,
    m: usize,
) -> Duration {
    let start = Instant::now();
    let members: Arc<Members> = fan_out.members();
    let drain = fan_out.spawn_drain(rt.handle(), m);
    let m64 = m as u64;
    let RawPath { tx, rx, topic, .. } = path;
    let lost = std::thread::scope(|s| {
        let rx: &mut zmq::Socket = rx;
        let receiver = s.spawn(move || raw_receive_each(rx, m64, |p| members.push(p)));
        send_numbered(tx, topic, size, m64);
        receiver.join().expect("the raw receiver thread")
    });
    assert_eq!(
        lost, 0,
        "{}: {lost} of {m} group messages lost (sequence gaps, or missing after {STALL:?})",
        path.name
    );
    rt.block_on(fan_out.finish(path.name, drain));
    path.moved += m64;
    start.elapsed()
}

/// One sender and several SUB sockets subscribed to the same topic: every receiver gets
/// every message (PUB/SUB is broadcast).
pub struct RawBroadcast {
    /// The name in messages.
    pub name: &'static str,
    /// The sending socket.
    pub tx: zmq::Socket,
    /// The receiving SUB sockets.
    pub rxs: Vec<zmq::Socket>,
    /// The topic of every message.
    pub topic: Vec<u8>,
}

/// `n` numbered messages of `size` bytes to every receiver of `b`, each on a thread of its
/// own. Panics unless every receiver got all of them.
pub fn raw_broadcast(b: &mut RawBroadcast, size: usize, n: usize) -> Duration {
    let n64 = n as u64;
    let (elapsed, lost) = std::thread::scope(|s| {
        let receivers: Vec<_> = b
            .rxs
            .iter_mut()
            .map(|rx| s.spawn(move || raw_receive_n(rx, n64)))
            .collect();
        let start = Instant::now();
        send_numbered(&b.tx, &b.topic, size, n64);
        let lost: Vec<u64> = receivers
            .into_iter()
            .map(|r| r.join().expect("a raw receiver thread"))
            .collect();
        (start.elapsed(), lost)
    });
    assert!(
        lost.iter().all(|l| *l == 0),
        "{}: messages lost per receiver (sequence gaps, or missing after {STALL:?}): {lost:?} of {n}",
        b.name
    );
    elapsed
}

/// One side of the raw round trips: what it sends with, the topic of the other side, and
/// its SUB socket.
pub struct RawSide {
    /// The sending socket (PUB or PUSH).
    pub tx: zmq::Socket,
    /// The SUB socket, subscribed to this side's topic.
    pub rx: zmq::Socket,
    /// The other side's topic.
    pub to_peer: Vec<u8>,
}

/// `iters` round trips: `a` sends `body` to `b`, which echoes it on a thread of its own.
pub fn raw_round_trips(
    (a, b): (&mut RawSide, &mut RawSide),
    body: &[u8],
    iters: u64,
    latencies: &Mutex<Vec<Duration>>,
) -> Duration {
    let mut each = Vec::with_capacity(usize::try_from(iters).unwrap_or(0));
    let total = std::thread::scope(|s| {
        let b: &mut RawSide = b;
        let echo = s.spawn(move || {
            let mut topic = zmq::Message::new();
            let mut payload = zmq::Message::new();
            for _ in 0..iters {
                assert!(
                    raw_recv(&b.rx, &mut topic, &mut payload),
                    "the raw echo got no message within {STALL:?}"
                );
                let reply = std::mem::replace(&mut payload, zmq::Message::new());
                b.tx.send(&b.to_peer[..], zmq::SNDMORE)
                    .and_then(|()| b.tx.send(reply, 0))
                    .expect("a raw reply");
            }
        });
        let mut topic = zmq::Message::new();
        let mut payload = zmq::Message::new();
        let start = Instant::now();
        for _ in 0..iters {
            let t = Instant::now();
            send_two(&a.tx, &a.to_peer, body);
            assert!(
                raw_recv(&a.rx, &mut topic, &mut payload),
                "no raw reply within {STALL:?}"
            );
            std::hint::black_box(payload.len());
            each.push(t.elapsed());
        }
        let total = start.elapsed();
        echo.join().expect("the raw echo thread");
        total
    });
    latencies
        .lock()
        .expect("latencies lock")
        .extend_from_slice(&each);
    total
}

/// The raw forwarder of dedicated mode: PULL → PUB in `zmq_proxy_steerable` on a thread.
pub struct Forwarder {
    control: zmq::Socket,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Binds PULL at `pull` and PUB at `publish` and forwards on a thread (one forwarder
    /// per context: its control socket has a fixed inproc name).
    pub fn start(ctx: &zmq::Context, pull: &str, publish: &str) -> Forwarder {
        let mut frontend = raw_socket(ctx, zmq::PULL);
        frontend.bind(pull).expect("bind the raw PULL socket");
        let mut backend = raw_socket(ctx, zmq::PUB);
        backend.bind(publish).expect("bind the raw PUB socket");
        let control_endpoint = "inproc://chanlayer-bench-raw-forwarder";
        let mut steer = ctx.socket(zmq::PAIR).expect("a control socket");
        steer
            .bind(control_endpoint)
            .expect("bind the control socket");
        let control = ctx.socket(zmq::PAIR).expect("a control socket");
        control
            .connect(control_endpoint)
            .expect("connect the control socket");
        let thread = std::thread::Builder::new()
            .name("raw forwarder".into())
            .spawn(move || {
                if let Err(e) = zmq::proxy_steerable(&mut frontend, &mut backend, &mut steer) {
                    println!("the raw forwarder stopped: {e}");
                }
            })
            .expect("start the raw forwarder thread");
        Forwarder {
            control,
            thread: Some(thread),
        }
    }

    /// Stops the forwarding thread and waits for it.
    pub fn stop(mut self) {
        let _ = self.control.send("TERMINATE", 0);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where raw senders send and raw receivers connect.
pub enum Topology {
    /// Every sender binds a PUB socket of its own (on a free port); receivers connect to it.
    Embedded,
    /// Senders connect PUSH sockets to `pull`; receivers connect to `publish` (a
    /// [`Forwarder`]'s endpoints).
    Dedicated {
        /// The forwarder's PULL endpoint.
        pull: String,
        /// The forwarder's PUB endpoint.
        publish: String,
    },
}

impl Topology {
    /// A sending socket, and the endpoint its receivers connect to.
    pub fn sender(&self, ctx: &zmq::Context) -> (zmq::Socket, String) {
        match self {
            Topology::Embedded => {
                let endpoint = tcp(free_port());
                let tx = raw_socket(ctx, zmq::PUB);
                tx.bind(&endpoint).expect("bind the raw PUB socket");
                (tx, endpoint)
            }
            Topology::Dedicated { pull, publish } => {
                let tx = raw_socket(ctx, zmq::PUSH);
                tx.connect(pull).expect("connect the raw PUSH socket");
                (tx, publish.clone())
            }
        }
    }

    /// A ready [`RawPath`] (probed through) on `topic`.
    pub fn path(&self, ctx: &zmq::Context, name: &'static str, topic: &[u8]) -> RawPath {
        let (tx, endpoint) = self.sender(ctx);
        let rx = raw_sub(ctx, &endpoint, topic);
        raw_ready(name, &tx, &rx, topic);
        RawPath {
            name,
            tx,
            rx,
            topic: topic.to_vec(),
            moved: 0,
        }
    }

    /// A ready [`RawBroadcast`] with `receivers` SUB sockets on `topic`.
    pub fn broadcast(
        &self,
        ctx: &zmq::Context,
        name: &'static str,
        topic: &[u8],
        receivers: usize,
    ) -> RawBroadcast {
        let (tx, endpoint) = self.sender(ctx);
        let rxs: Vec<_> = (0..receivers)
            .map(|_| raw_sub(ctx, &endpoint, topic))
            .collect();
        for rx in &rxs {
            raw_ready(name, &tx, rx, topic);
        }
        // Probes sent for one receiver may still be on their way to the others.
        for rx in &rxs {
            while rx.poll(zmq::POLLIN, 20).expect("poll") > 0 {
                let _ = rx.recv_multipart(0);
            }
        }
        RawBroadcast {
            name,
            tx,
            rxs,
            topic: topic.to_vec(),
        }
    }

    /// Two ready sides for round trips: each sends with a socket of its own and subscribes
    /// to its own topic at the other's publisher (embedded) or at the forwarder.
    pub fn sides(&self, ctx: &zmq::Context, name: &str) -> (RawSide, RawSide) {
        let (to_a, to_b) = (b"i:chanlayer-bench:raw.a\0", b"i:chanlayer-bench:raw.b\0");
        let (ta, ea) = self.sender(ctx);
        let (tb, eb) = self.sender(ctx);
        let a = RawSide {
            tx: ta,
            rx: raw_sub(ctx, &eb, to_a),
            to_peer: to_b.to_vec(),
        };
        let b = RawSide {
            tx: tb,
            rx: raw_sub(ctx, &ea, to_b),
            to_peer: to_a.to_vec(),
        };
        let what = format!("{name} (round trip)");
        raw_ready(&what, &a.tx, &b.rx, &a.to_peer);
        raw_ready(&what, &b.tx, &a.rx, &b.to_peer);
        (a, b)
    }
}

/// Everything raw of the `zmq` bench: the two throughput paths, the round-trip sides, the
/// forwarder.
pub struct Raw {
    /// Embedded: PUB bound, SUB connected.
    pub pubsub: RawPath,
    /// Dedicated: PUSH → forwarder → SUB.
    pub push_pull_pub: RawPath,
    /// Round trips, embedded.
    pub pubsub_sides: (RawSide, RawSide),
    /// Round trips through the forwarder.
    pub dedicated_sides: (RawSide, RawSide),
    /// The forwarder of dedicated mode.
    pub forwarder: Forwarder,
    _ctx: zmq::Context,
}

impl Raw {
    /// Binds, connects and probes every path (one libzmq context for all).
    pub fn setup() -> Raw {
        let ctx = zmq::Context::new();
        let embedded = Topology::Embedded;
        let pubsub = embedded.path(&ctx, "raw_pubsub", b"i:chanlayer-bench:raw.pubsub\0");
        let pubsub_sides = embedded.sides(&ctx, "raw_pubsub");

        let (pull, publish) = (tcp(free_port()), tcp(free_port()));
        let forwarder = Forwarder::start(&ctx, &pull, &publish);
        let dedicated = Topology::Dedicated { pull, publish };
        let push_pull_pub = dedicated.path(
            &ctx,
            "raw_push_pull_pub",
            b"i:chanlayer-bench:raw.dedicated\0",
        );
        let dedicated_sides = dedicated.sides(&ctx, "raw_push_pull_pub");
        Raw {
            pubsub,
            push_pull_pub,
            pubsub_sides,
            dedicated_sides,
            forwarder,
            _ctx: ctx,
        }
    }
}
