//! The slow-client policy, end to end: a websocket client that joins a room and then stops
//! reading while another floods the room. The server's memory for it stays bounded: once
//! its socket and its outbox (`--buffer`) are full, lines for it are dropped and counted
//! (`/stats`: `dropped_slow`), the flooding client is not held back, and after
//! `--write-timeout` without taking a frame the stalled client is disconnected and its
//! membership goes; the flooding client, which reads everything, loses nothing. Raw
//! websocket frames over a `TcpStream`: no client library needed.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{start_server_with, stats, Server};

/// Opens a websocket to `/ws` and returns the stream after the 101 response.
fn open_websocket(server: &Server) -> TcpStream {
    let host = server.base.strip_prefix("http://").expect("http base");
    let mut stream = TcpStream::connect(host).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    write!(
        stream,
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .expect("handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("handshake response");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "no upgrade: {head}");
    stream
}

/// A client's text frame (masked, as clients must; the mask key is zero).
fn text_frame(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    let mut frame = vec![0x81];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// Reads until `needle` has been seen (scanning raw bytes); returns what was read.
fn read_until(stream: &mut TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "connection closed before {needle:?}");
        seen.extend_from_slice(&buf[..n]);
        // A needle may straddle two reads: look at the tail again each time.
        if String::from_utf8_lossy(&seen).contains(needle) {
            return String::from_utf8_lossy(&seen).into_owned();
        }
    }
}

#[test]
fn a_client_that_stops_reading_loses_its_own_lines_then_is_disconnected() {
    let server = start_server_with(
        "memory://",
        "slow",
        "slow-client",
        // The default outbox (256); a stalled socket is closed after 3 s; no idle closing
        // meanwhile (the slow client answers no ping).
        &["--write-timeout", "3s", "--idle-timeout", "10m"],
    );

    let mut slow = open_websocket(&server);
    slow.write_all(&text_frame(r#"{"join":"flood"}"#))
        .expect("join");
    read_until(&mut slow, r#""type":"joined""#);
    // From here on the slow client reads nothing.

    let mut flooder = open_websocket(&server);
    flooder
        .write_all(&text_frame(r#"{"join":"flood"}"#))
        .expect("join");
    read_until(&mut flooder, r#""type":"joined""#);

    // The flooder reads everything it is sent, on a thread, as a browser does; it counts
    // its chat lines and any "dropped" notice.
    let lines_back = Arc::new(AtomicU64::new(0));
    let told_dropped = Arc::new(AtomicU64::new(0));
    {
        let mut drain = flooder.try_clone().expect("clone");
        drain.set_read_timeout(None).expect("no read timeout");
        let (lines_back, told_dropped) = (lines_back.clone(), told_dropped.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut carry = Vec::new();
            while let Ok(n) = drain.read(&mut buf) {
                if n == 0 {
                    break;
                }
                carry.extend_from_slice(&buf[..n]);
                // Count in what ends with a complete event; keep the rest for the next read.
                let Some(end) = carry.iter().rposition(|b| *b == b'}') else {
                    continue;
                };
                let done: Vec<u8> = carry.drain(..=end).collect();
                let text = String::from_utf8_lossy(&done);
                let messages = text.matches(r#""type":"message""#).count() as u64;
                let dropped = text.matches(r#""type":"dropped""#).count() as u64;
                lines_back.fetch_add(messages, Ordering::Relaxed);
                told_dropped.fetch_add(dropped, Ordering::Relaxed);
            }
        });
    }

    // Flood in bursts of 50 lines; before the next burst, the flooder has all of its own
    // lines back (no sleeps: pacing by the echo), until the slow client is disconnected.
    let padding = "x".repeat(1900);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut sent = 0u64;
    loop {
        let s = stats(&server);
        if s["closed_stalled"] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow client was not disconnected after {sent} lines: {s}"
        );
        let mut burst = Vec::new();
        for i in 0..50 {
            burst.extend(text_frame(&format!(
                r#"{{"room":"flood","text":"{sent}-{i} {padding}","name":"flooder"}}"#
            )));
        }
        flooder.write_all(&burst).expect("flood");
        sent += 50;
        while lines_back.load(Ordering::Relaxed) < sent {
            assert!(
                Instant::now() < deadline,
                "the flooder got {} of its {sent} lines back: {}",
                lines_back.load(Ordering::Relaxed),
                stats(&server)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert_eq!(
        told_dropped.load(Ordering::Relaxed),
        0,
        "the flooder, which reads everything, was told it lost lines"
    );
    let s = stats(&server);
    println!("after {sent} lines: {s}");
    assert!(
        s["dropped_slow"].as_u64().unwrap_or_default() > 0,
        "lines for the slow client were not dropped: {s}"
    );
    // The slow client is gone and has left the room; the flooder is still there.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(stats(&server)["connections"] == 1 && stats(&server)["memberships"] == 1) {
        assert!(
            Instant::now() < deadline,
            "the stalled client's connection or membership stayed: {}",
            stats(&server)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Nothing was dropped for the flooder: every line it said reached it, except those
    // dropped for the slow client.
    let s = stats(&server);
    let delivered = s["delivered"].as_u64().unwrap_or_default();
    let dropped = s["dropped_slow"].as_u64().unwrap_or_default();
    assert!(delivered >= sent, "the flooder missed lines: {s}");
    assert_eq!(
        s["said"].as_u64(),
        Some(sent),
        "every line said was taken: {s}"
    );
    assert!(
        delivered + dropped <= 2 * sent,
        "more lines handed out than said to two members: {s}"
    );
    drop(slow);
}
