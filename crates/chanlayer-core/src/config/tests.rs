use super::url::decode_component;
use super::*;

#[test]
fn credentials_are_parsed_and_redacted() {
    let cfg = LayerConfig::from_url(
        "amqp://guest:s3cr%40t@127.0.0.1:5672/%2f?prefix=app&heartbeat=10&sasl.password=hunter2",
    )
    .unwrap();
    let c = cfg.backend.credentials.as_ref().unwrap();
    assert_eq!(c.username, "guest");
    assert_eq!(c.password.as_ref().unwrap().expose(), "s3cr@t");
    assert_eq!(cfg.backend.address, "127.0.0.1:5672/%2f");
    assert_eq!(cfg.options.prefix, "app");
    assert_eq!(cfg.backend.options.get("heartbeat"), Some("10"));
    for text in [format!("{cfg}"), format!("{cfg:?}")] {
        assert!(!text.contains("s3cr"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
    assert_eq!(
        cfg.to_string(),
        "amqp://guest:***@127.0.0.1:5672/%2f?heartbeat=10&sasl.password=***&prefix=app"
    );
    let cfg = LayerConfig::from_url(
        "kafka://h:9092?capacity=7&expiry=2s&group_expiry=1h&codec=json&max_message_size=1000&channel_capacity.jobs*=9",
    )
    .unwrap();
    assert_eq!(
        cfg.to_string(),
        "kafka://h:9092?capacity=7&channel_capacity.jobs*=9&expiry=2000ms&group_expiry=3600000ms&codec=json&max_message_size=1000"
    );
    assert_eq!(
        LayerConfig::from_url("memory://").unwrap().to_string(),
        "memory://"
    );
}

/// Passwords with every character that has a meaning in a URL, unencoded.
const HOSTILE_PASSWORDS: &[&str] = &[
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

/// URLs around `password` (unencoded) for `scheme`: valid ones and ones that fail in
/// different places after the user-info.
fn hostile_urls(scheme: &str, password: &str) -> Vec<String> {
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
    ]
    .iter()
    .map(|rest| format!("{scheme}://guest:{password}@{rest}"))
    .collect()
}

/// Asserts that `text` contains neither `password` nor any 4-character run of it, as
/// written or percent-decoded.
fn assert_hidden(text: &str, password: &str, url: &str) {
    for form in [password.to_owned(), decode_component(password)] {
        let chars: Vec<char> = form.chars().collect();
        for w in chars.windows(4.min(chars.len())) {
            let w: String = w.iter().collect();
            assert!(
                !text.contains(&w),
                "{url}: {w:?} of the password shows in {text}"
            );
        }
    }
}

/// Whatever the URL, no part of its password shows in the config or in an error; an
/// `@` after `?` or `#` is refused with a hint to percent-encode.
#[test]
fn hostile_passwords_never_show() {
    let mut accepted = 0;
    let mut refused = 0;
    for scheme in ["amqp", "amqps", "kafka", "zmq", "AMQP"] {
        for password in HOSTILE_PASSWORDS {
            for url in hostile_urls(scheme, password) {
                match LayerConfig::from_url(&url) {
                    Ok(cfg) => {
                        accepted += 1;
                        assert_hidden(&format!("{cfg} {cfg:?}"), password, &url);
                        let c = cfg.backend.credentials.as_ref().expect("credentials");
                        assert_eq!(c.username, "guest", "{url}");
                        let got = c.password.as_ref().expect("a password").expose();
                        assert_eq!(got, decode_component(password), "{url}");
                        assert!(!cfg.backend.address.contains('@'), "{url}");
                    }
                    Err(e) => {
                        refused += 1;
                        assert!(matches!(e, Error::Config(_)), "{url}: {e:?}");
                        assert_hidden(&format!("{e} {e:?}"), password, &url);
                        if password.contains(['?', '#']) {
                            assert!(e.to_string().contains("percent-encode"), "{url}: {e}");
                        }
                    }
                }
            }
        }
    }
    assert!(
        accepted > 0 && refused > 0,
        "{accepted} accepted, {refused} refused"
    );
    // The case from the field: a '?' in the password.
    let e = LayerConfig::from_url("amqp://guest:S3cr?Pw5J@127.0.0.1:5672//=").unwrap_err();
    assert!(e.to_string().contains("percent-encode"), "{e}");
    // Passwords with unencoded '/', '@', ':' parse, and the address is right.
    for (url, password, address) in [
        ("amqp://guest:pa/ss@h:1/%2f", "pa/ss", "h:1/%2f"),
        ("amqp://guest:p@ss@h:1/v", "p@ss", "h:1/v"),
        (
            "kafka://guest:a:b/c@d@h1:1,h2:2?prefix=x",
            "a:b/c@d",
            "h1:1,h2:2",
        ),
        ("amqp://guest:%3F%23%40@h", "?#@", "h"),
    ] {
        let cfg = LayerConfig::from_url(url).unwrap();
        assert_eq!(cfg.backend.address, address, "{url}");
        let c = cfg.backend.credentials.unwrap();
        assert_eq!(c.password.unwrap().expose(), password, "{url}");
    }
    // A password where the scheme should be is not echoed either.
    let e = LayerConfig::from_url("guest:Hid3Me@host://x").unwrap_err();
    assert!(
        !e.to_string().contains("Hid3Me") && !e.to_string().contains("hid3me"),
        "{e}"
    );
}

#[test]
fn kafka_host_lists_survive() {
    let cfg = LayerConfig::from_url("kafka://h1:9092,h2:9092?kafka.compression.type=lz4").unwrap();
    assert_eq!(cfg.backend.address, "h1:9092,h2:9092");
    assert_eq!(
        cfg.backend.options.get("kafka.compression.type"),
        Some("lz4")
    );
}

#[test]
fn bad_values_are_clear() {
    let e = LayerConfig::from_url("memory://?capacity=lots").unwrap_err();
    assert!(e.to_string().contains("capacity=lots"), "{e}");
    // Which schemes exist is the facade's registry's business; the syntax is checked here.
    assert_eq!(
        LayerConfig::from_url("redis://x").unwrap().backend.scheme,
        "redis"
    );
    let e = LayerConfig::from_url("1redis://x").unwrap_err();
    assert!(e.to_string().contains("scheme"), "{e}");
    let e = LayerConfig::from_url("memory://?capacity=0").unwrap_err();
    assert!(
        e.to_string()
            .contains("too small; use a whole number from 1 to"),
        "{e}"
    );
    let e = LayerConfig::from_url("memory://?expiry=soon").unwrap_err();
    assert!(e.to_string().contains("expiry=soon"), "{e}");
    let e = LayerConfig::from_url("nonsense").unwrap_err();
    assert!(matches!(e, Error::Config(_)));
    let e = LayerConfig::from_url("amqp://u:pw@h?password=abc&capacity=x").unwrap_err();
    assert!(!e.to_string().contains("pw@") && !e.to_string().contains("abc"));
    assert_eq!(
        e.to_string().matches("configuration error").count(),
        1,
        "{e}"
    );
    let cfg = LayerConfig::from_url("amqp://u:pa/ss@w0rd@host:5672/%2f").unwrap();
    assert_eq!(cfg.backend.address, "host:5672/%2f");
    assert_eq!(
        cfg.backend.credentials.unwrap().password.unwrap().expose(),
        "pa/ss@w0rd"
    );
    assert!(LayerConfig::from_url("memory://?expiry=0.0001").is_err());
}

/// A whole number too large for an integer option is "too large", with the range, not
/// "not a whole number"; every integer option of the URL is read this way.
#[test]
fn integers_out_of_range_name_the_range() {
    let max = usize::MAX;
    for key in ["capacity", "max_message_size", "channel_capacity.a.*"] {
        let e = LayerConfig::from_url(&format!("memory://?{key}=99999999999999999999999"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "option {key}=99999999999999999999999: too large; use a whole number from 1 to {max}"
            )),
            "{e}"
        );
        assert!(!e.contains("not a whole number"), "{e}");
        for (v, why) in [
            ("0", "too small"),
            ("-3", "too small"),
            ("1.5", "not a whole number"),
            ("", "not a whole number"),
        ] {
            let e = LayerConfig::from_url(&format!("memory://?{key}={v}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why) && e.contains("from 1 to"), "{key}={v}: {e}");
        }
        let cfg = LayerConfig::from_url(&format!("memory://?{key}={max}")).unwrap();
        assert_eq!(
            cfg.options
                .capacity_for("a.b")
                .max(cfg.options.max_message_size),
            max
        );
    }
    assert_eq!(parse_int::<i32>("-1", -1..=i32::MAX).unwrap(), -1);
    assert_eq!(parse_int::<u8>(" +7 ", 0..=u8::MAX).unwrap(), 7);
    let e = parse_int::<i8>("-129", -1..=5).unwrap_err().to_string();
    assert!(
        e.contains("too small; use a whole number from -1 to 5"),
        "{e}"
    );
    let e = parse_int::<i8>("6", -1..=5).unwrap_err().to_string();
    assert!(
        e.contains("too large; use a whole number from -1 to 5"),
        "{e}"
    );
    // A secret-looking option's value is not quoted.
    let mut o = BackendOptions::default();
    o.0.insert("token".into(), "abc".into());
    let e = o.take_int::<u32>("token", 0..=9).unwrap_err().to_string();
    assert!(e.contains("option token=***: not a whole number"), "{e}");
}

/// The shared duration check: timeouts are positive and bounded; expiry and
/// group_expiry are positive; the errors name the option, the value and the range.
#[test]
fn duration_bounds() {
    let mut o = BackendOptions::default();
    for (v, want) in [
        ("0", Err("option t=0: must be more than zero; use a duration from 1ms to 24days 20h 31m 23s 647ms")),
        ("0.0004", Err("option t=0.0004: must be more than zero")),
        ("25d", Err("option t=25d: too long; use a duration from 1ms to")),
        ("soon", Err("option t=soon: invalid duration")),
        ("1ms", Ok(Duration::from_millis(1))),
        ("24d", Ok(Duration::from_secs(24 * 86_400))),
    ] {
        o.0.insert("t".into(), v.into());
        match (o.take_timeout("t"), want) {
            (Ok(d), Ok(w)) => assert_eq!(d, Some(w)),
            (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{v}: {e}"),
            (got, w) => panic!("{v}: {got:?}, wanted {w:?}"),
        }
        assert!(o.get("t").is_none(), "taken");
    }
    assert_eq!(o.take_timeout("absent").unwrap(), None);
    o.0.insert("d".into(), "2s".into());
    let e = o
        .take_duration("d", Duration::from_secs(5)..=Duration::from_secs(9))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("option d=2s: too short; use a duration from 5s to 9s"),
        "{e}"
    );
    for key in ["expiry", "group_expiry"] {
        let e = LayerConfig::from_url(&format!("memory://?{key}=0")).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "option {key}=0s: must be more than zero; use a duration of at least 1ms"
            )),
            "{e}"
        );
    }
}

#[test]
fn durations() {
    assert_eq!(
        "60".parse::<ConfigDuration>().unwrap().0,
        Duration::from_secs(60)
    );
    assert_eq!(
        "0.5".parse::<ConfigDuration>().unwrap().0,
        Duration::from_millis(500)
    );
    assert_eq!(
        "2m".parse::<ConfigDuration>().unwrap().0,
        Duration::from_secs(120)
    );
    assert!("-1".parse::<ConfigDuration>().is_err());
}

#[test]
fn capacity_overrides_first_match_wins() {
    let cfg = LayerConfig::from_url(
        "memory://?channel_capacity.http.*=5&channel_capacity.*=7&capacity=3",
    )
    .unwrap();
    assert_eq!(cfg.options.capacity_for("http.x"), 5);
    assert_eq!(cfg.options.capacity_for("ws.x"), 7);
}

#[test]
fn inspect_is_on_by_default_and_turned_off_by_the_url() {
    let on = LayerConfig::from_url("amqp://h").unwrap();
    assert!(on.options.inspect);
    assert_eq!(on.to_string(), "amqp://h", "the default is not shown");
    let off = LayerConfig::from_url("amqp://h?inspect=false").unwrap();
    assert!(!off.options.inspect);
    assert_eq!(off.to_string(), "amqp://h?inspect=false");
    assert!(
        off.backend.options.0.is_empty(),
        "a shared option, not the backend's"
    );
    let e = LayerConfig::from_url("amqp://h?inspect=no").unwrap_err();
    assert_eq!(
        e.to_string(),
        "configuration error: option inspect=no: use true or false"
    );
    let file: PartialOptions = serde_json::from_str(r#"{"inspect": false}"#).unwrap();
    let mut options = LayerOptions::default();
    options.apply(file).unwrap();
    assert!(!options.inspect);
}
