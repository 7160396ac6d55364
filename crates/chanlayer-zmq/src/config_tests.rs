//! Unit tests of the ZeroMQ settings.

use super::*;
use chanlayer_testkit::options::check_refused;

fn embedded(url: &str) -> String {
    match ZmqConfig::from_url(url).expect(url).mode {
        Mode::Embedded { endpoint } => endpoint,
        m => panic!("{url}: {m:?}"),
    }
}

fn dedicated(url: &str) -> (String, String) {
    match ZmqConfig::from_url(url).expect(url).mode {
        Mode::Dedicated { pull, publish } => (pull, publish),
        m => panic!("{url}: {m:?}"),
    }
}

#[test]
fn embedded_forms() {
    assert_eq!(embedded("zmq://127.0.0.1:5556"), "tcp://127.0.0.1:5556");
    assert_eq!(embedded("zmq://localhost"), "tcp://localhost:5556");
    assert_eq!(embedded("zmq://"), "tcp://127.0.0.1:5556");
    assert_eq!(embedded("zmq://[::1]:7000"), "tcp://[::1]:7000");
    assert!(ZmqConfig::from_url("zmq://[::1]:7000").expect("v6").ipv6);
    assert!(
        !ZmqConfig::from_url("zmq://127.0.0.1:7000")
            .expect("v4")
            .ipv6
    );
    assert_eq!(embedded("zmq://[::1]"), "tcp://[::1]:5556");
    assert_eq!(
        embedded("zmq://tcp://10.0.0.1:6000?prefix=app"),
        "tcp://10.0.0.1:6000"
    );
    assert_eq!(
        embedded("zmq://ipc:///tmp/a%20b.sock"),
        "ipc:///tmp/a b.sock"
    );
    assert_eq!(
        embedded("zmq://127.0.0.1:5556?mode=embedded"),
        "tcp://127.0.0.1:5556"
    );
}

#[test]
fn dedicated_forms() {
    assert_eq!(
        dedicated("zmq://?pull=tcp://127.0.0.1:5557&pub=tcp://127.0.0.1:5558"),
        (
            "tcp://127.0.0.1:5557".to_owned(),
            "tcp://127.0.0.1:5558".to_owned()
        )
    );
    assert_eq!(
        dedicated("zmq://?mode=dedicated&pull=ipc:///run/p.sock&pub=ipc:///run/s.sock"),
        (
            "ipc:///run/p.sock".to_owned(),
            "ipc:///run/s.sock".to_owned()
        )
    );
    assert_eq!(
        dedicated("zmq://10.1.2.3?mode=dedicated"),
        (
            "tcp://10.1.2.3:5557".to_owned(),
            "tcp://10.1.2.3:5558".to_owned()
        )
    );
    assert_eq!(
        dedicated("zmq://?mode=dedicated"),
        (
            "tcp://127.0.0.1:5557".to_owned(),
            "tcp://127.0.0.1:5558".to_owned()
        )
    );
    assert_eq!(
        dedicated("zmq://[::1]?mode=dedicated").0,
        "tcp://[::1]:5557"
    );
}

#[test]
fn bad_urls_are_clear() {
    for (url, words) in [
        ("zmq://?pull=tcp://127.0.0.1:1", "both pull="),
        ("zmq://?pub=tcp://127.0.0.1:1", "both pull="),
        ("zmq://h:1?pull=tcp://a:1&pub=tcp://a:2", "not both"),
        ("zmq://?mode=embedded&pull=tcp://a:1", "mode=embedded"),
        ("zmq://h:1?mode=dedicated", "host only"),
        ("zmq://?mode=fast", "mode=fast"),
        ("zmq://h:99999", "port"),
        ("zmq://h:0", "port"),
        ("zmq://h:x", "port"),
        ("zmq://udp://h:1", "unsupported transport"),
        ("zmq://ipc://", "no path"),
        ("zmq://tcp://h", "no port"),
        ("zmq://?pull=tcp://h:1&pub=foo", "option pub"),
        ("zmq://u:secret@h:1", "no user or password"),
        ("zmq://h:1?bind=sometimes", "bind=sometimes"),
        ("zmq://h:1?sndhwm=-1", "sndhwm"),
        ("zmq://h:1?send_queue=0", "send_queue"),
        ("zmq://h:1?nope=1", "unknown option \"nope\""),
        ("zmq://h:1?zmq.nope=1", "unknown socket option"),
        ("zmq://h:1?zmq.sndbuf=big", "zmq.sndbuf=big"),
        ("zmq://?mode=dedicated&bind=eager", "embedded mode"),
        ("zmq://h1:1,h2:2", "one host"),
    ] {
        let e = ZmqConfig::from_url(url).expect_err(url).to_string();
        assert!(e.contains(words), "{url}: {e}");
        assert!(!e.contains("secret@"), "{url}: {e}");
    }
}

/// A zmq:// URL with a hostile password in it is refused, and no part of the password
/// shows in the error.
#[test]
fn hostile_passwords_never_show() {
    use chanlayer_testkit::secrets::{assert_hidden, encode, hostile_urls, HOSTILE_PASSWORDS};
    for password in HOSTILE_PASSWORDS {
        let mut urls = hostile_urls("zmq", password);
        urls.push(format!("zmq://u:{}@127.0.0.1:5556", encode(password)));
        for url in urls {
            let e = ZmqConfig::from_url(&url).expect_err(&url);
            assert_hidden(&format!("{e} {e:?}"), password, &url);
        }
    }
}

/// Every integer option, `zmq.<option>` included, says "too large" or "too small" with
/// its range, at parse time.
#[test]
fn integers_out_of_range_name_the_range() {
    check_refused(
        ZmqConfig::from_url,
        "zmq://h:1",
        [
            (
                "sndhwm",
                "99999999999999999999999",
                "too large; use a whole number from 0 to 2147483647",
            ),
            (
                "rcvhwm",
                "-1",
                "too small; use a whole number from 0 to 2147483647",
            ),
            (
                "send_queue",
                "0",
                "too small; use a whole number from 1 to 18446744073709551615",
            ),
            (
                "retain",
                "99999999999999999999999",
                "too large; use a whole number from 0 to 18446744073709551615",
            ),
            (
                "retain_bytes",
                "-5",
                "too small; use a whole number from 0 to 18446744073709551615",
            ),
            (
                "zmq.sndbuf",
                "2147483648",
                "too large; use a whole number from -2147483648 to 2147483647",
            ),
            (
                "zmq.maxmsgsize",
                "99999999999999999999999",
                "too large; use a whole number from -1 to 9223372036854775807",
            ),
            (
                "capacity",
                "99999999999999999999999",
                "too large; use a whole number from 1 to 18446744073709551615",
            ),
        ],
    );
    let c = ZmqConfig::from_url("zmq://h:1?zmq.maxmsgsize=4294967296").expect("an int64 option");
    assert_eq!(c.socket_options[0].value, 4_294_967_296);
}

/// Timeouts must be positive, through the same rule and message as every backend's;
/// the millisecond options stay within a C int.
#[test]
fn zero_timeouts_are_refused() {
    let zero = "must be more than zero; use a duration from 1ms to 24days 20h 31m 23s 647ms";
    let long = "too long; use a duration from 0s to 24days 20h 31m 23s 647ms";
    check_refused(
        ZmqConfig::from_url,
        "zmq://h:1",
        [
            ("subscribe_timeout", "0", zero),
            ("connect_timeout", "0", zero),
            ("reconnect_interval", "0", zero),
            ("reconnect_interval_max", "30d", long),
            ("linger", "30d", long),
        ],
    );
    for key in ["reconnect_interval_max", "linger"] {
        assert!(
            ZmqConfig::from_url(&format!("zmq://h:1?{key}=0")).is_ok(),
            "{key}=0 is allowed"
        );
    }
}

#[test]
fn options_are_read() {
    let c = ZmqConfig::from_url("zmq://127.0.0.1:1?bind=never&sndhwm=5&rcvhwm=6&send_queue=7&subscribe_timeout=250ms&connect_timeout=2&reconnect_interval=20ms&reconnect_interval_max=1s&linger=0&close_linger=300ms&retain=3&retain_for=10s&retain_bytes=1000&ipv6=true&zmq.tcp_keepalive=1&zmq.sndbuf=65536").expect("options");
    assert_eq!(c.bind, BindPolicy::Never);
    assert_eq!((c.sndhwm, c.rcvhwm, c.send_queue), (5, 6, 7));
    assert_eq!(c.subscribe_timeout, Duration::from_millis(250));
    assert_eq!(c.connect_timeout, Duration::from_secs(2));
    assert_eq!(c.reconnect_interval, Duration::from_millis(20));
    assert_eq!(c.reconnect_interval_max, Duration::from_secs(1));
    assert_eq!(c.linger, Duration::ZERO);
    assert_eq!(c.close_linger, Duration::from_millis(300));
    assert_eq!(
        c.retention,
        Retention {
            per_topic: 3,
            max_age: Duration::from_secs(10),
            max_bytes: 1000
        }
    );
    assert!(c.ipv6);
    assert_eq!(c.socket_options.len(), 2);
    let s = c.socket(zmq::SUB).expect("a socket");
    assert_eq!(s.get_sndbuf().expect("sndbuf"), 65536);
}

#[test]
fn curve_without_libsodium_is_a_clear_error() {
    if curve_available() {
        return;
    }
    let e = ZmqConfig::from_url(&format!(
        "zmq://127.0.0.1:1?curve_serverkey={}",
        "x".repeat(40)
    ))
    .expect_err("no curve")
    .to_string();
    assert!(e.contains("CURVE"), "{e}");
    assert!(e.contains("libsodium"), "{e}");
}
