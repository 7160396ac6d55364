//! Hostile passwords for the backends' redaction tests: passwords full of characters that
//! mean something in a URL, the URLs around them, and [`assert_hidden`], which checks that
//! no part of a password shows in a text.
//!
//! ```
//! use chanlayer_testkit::secrets::{assert_hidden, hostile_urls, HOSTILE_PASSWORDS};
//! for password in HOSTILE_PASSWORDS {
//!     for url in hostile_urls("amqp", password) {
//!         if let Err(e) = chanlayer_core::LayerConfig::from_url(&url) {
//!             assert_hidden(&format!("{e} {e:?}"), password, &url);
//!         }
//!     }
//! }
//! ```

/// Passwords with every character that has a meaning in a URL (`?`, `#`, `@`, `/`, `:`,
/// `%`, `&`, `=`), spaces and non-ASCII letters, meant to be written into URLs unencoded.
pub const HOSTILE_PASSWORDS: &[&str] = &[
    "S3cr?Pw5J",
    "Xq#9zLmK",
    "p@ss@W0rdZ",
    "pa/ss/Wq7r",
    "Co:lOn:Kx9",
    "Pe%rc%Ent%2",
    "%41Bz%zzQv",
    "sP aCe Yy8",
    "\u{fc}ml\u{e4}utP\u{e4}\u{df}w\u{f6}rd\u{20ac}",
    "Mx?#@/:%Zz 9\u{fc}",
    "Tr@il?",
    "#Lead1ng",
    "?q=Vv&Ww=7",
    "Amp&Key=Q1",
];

/// URLs of `scheme` with `password` written unencoded in the user-info (`guest:PASSWORD@`),
/// followed by addresses and queries that are valid or fail in different places.
pub fn hostile_urls(scheme: &str, password: &str) -> Vec<String> {
    [
        "127.0.0.1:5672/%2f?prefix=app",
        "127.0.0.1:5672//=",
        "h1:9092,h2:9092",
        "host",
        "",
        "host?capacity=lots",
        "host:notaport/x?password=Other&codec=nope",
        "host/path#frag",
        "[::1]:5672/v?expiry=soon",
        "host?partitions=0&prefetch=0&sndhwm=-1",
    ]
    .iter()
    .map(|rest| format!("{scheme}://guest:{password}@{rest}"))
    .collect()
}

/// Parses each of `urls` with `parse` and checks what a user could see: `parse` returns the
/// parsed configuration's texts (its `Debug`, its address) and the password as the backend
/// would hand it to its client, or the error's texts. No part of `password` may show in
/// either; a URL that carried the password percent-encoded must parse and give it back
/// unchanged. Returns how many URLs parsed.
pub fn check_redaction(
    password: &str,
    urls: Vec<String>,
    parse: impl Fn(&str) -> Result<(String, Option<String>), String>,
) -> usize {
    let mut parsed = 0;
    let encoded = encode(password);
    for url in urls {
        let text = match parse(&url) {
            Ok((text, given)) => {
                parsed += 1;
                if url.contains(&encoded) {
                    assert_eq!(given.as_deref(), Some(password), "{url}");
                }
                text
            }
            Err(text) => text,
        };
        assert_hidden(&text, password, &url);
    }
    parsed
}

/// `s` percent-encoded for a URL query value or user-info: every byte but ASCII letters and
/// digits.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `s` percent-decoded (invalid escapes kept as written; invalid UTF-8 replaced).
pub fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Asserts that `text` contains neither `password` nor any run of 4 of its characters, as
/// written or percent-decoded; `context` (the URL) goes into the failure message.
pub fn assert_hidden(text: &str, password: &str, context: &str) {
    for form in [password.to_owned(), decode(password)] {
        let chars: Vec<char> = form.chars().collect();
        for w in chars.windows(4.min(chars.len()).max(1)) {
            let w: String = w.iter().collect();
            assert!(
                !text.contains(&w),
                "{context}: {w:?} of the password shows in: {text}"
            );
        }
    }
}
