//! Tests for `Target::parse`, most of them attacks: alternative spellings of one
//! address that a lax parser would route or police differently.

use super::*;
use proptest::prelude::*;

fn ok(s: &str) -> Target {
    Target::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
}

fn err(s: &str) -> TargetError {
    match Target::parse(s) {
        Ok(t) => panic!("{s:?} should be rejected, parsed as {t:?}"),
        Err(e) => e,
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> Host {
    Host::Ip(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
}

#[test]
fn parses_the_three_forms() {
    let t = ok("10.1.2.3:10250");
    assert_eq!(t.host, v4(10, 1, 2, 3));
    assert_eq!(t.port, 10250);
    assert!(t.is_ip());

    let t = ok("[2001:db8::1]:10250");
    assert_eq!(t.host, Host::Ip("2001:db8::1".parse().unwrap()));
    assert!(t.is_ip());

    let t = ok("node-a:10250");
    assert_eq!(t.host, Host::Name(NodeName::parse("node-a").unwrap()));
    assert!(!t.is_ip());
    assert_eq!(
        "node-a.idc.example:1".parse::<Target>(),
        Ok(ok("node-a.idc.example:1"))
    );
}

#[test]
fn display_is_canonical() {
    assert_eq!(ok("1.2.3.4:10250").to_string(), "1.2.3.4:10250");
    assert_eq!(ok("node-a:10250").to_string(), "node-a:10250");
    assert_eq!(ok("[2001:db8::1]:10250").to_string(), "[2001:db8::1]:10250");
    // Uppercase and uncompressed IPv6 spellings collapse to RFC 5952 form.
    assert_eq!(
        ok("[2001:DB8:0:0:0:0:0:1]:10250").to_string(),
        "[2001:db8::1]:10250"
    );
    assert_eq!(ok("[::1]:1").to_string(), "[::1]:1");
    assert_eq!(ok("[::1]:1").host.to_string(), "::1");
}

#[test]
fn testplan_16_ipv4_mapped_ipv6_is_unwrapped_so_policy_sees_ipv4() {
    for s in [
        "[::ffff:127.0.0.1]:10250",
        "[::FFFF:7f00:1]:10250",
        "[0:0:0:0:0:ffff:127.0.0.1]:10250",
    ] {
        let t = ok(s);
        assert_eq!(t.host, v4(127, 0, 0, 1), "{s}");
        assert_eq!(t.to_string(), "127.0.0.1:10250");
    }
    let t = ok("[::ffff:169.254.169.254]:80");
    assert_eq!(t.host, v4(169, 254, 169, 254));
}

#[test]
fn testplan_16_odd_ipv4_spellings_are_rejected() {
    for s in [
        "010.0.0.1:80",
        "10.0.0.01:80",
        "00.0.0.0:80",
        "0x7f.0.0.1:80",
        "0X7F.0.0.1:80",
        "0x7f000001:80",
        "2130706433:80",
        "127.1:80",
        "127.0.1:80",
        "1.2.3.4.5:80",
        "256.0.0.1:80",
        "1.2.3.1000:80",
        "1.2.3.4.:80",
        "017700000001:80",
        "0177.0.0.1:80",
    ] {
        let host = s.rsplit_once(':').unwrap().0;
        assert_eq!(err(s), TargetError::NonCanonicalIpv4(host.into()), "{s}");
    }
    assert_eq!(
        err("010.0.0.1:80").to_string(),
        "non-canonical IPv4 address `010.0.0.1`"
    );
}

#[test]
fn zero_octets_are_canonical() {
    assert_eq!(ok("0.0.0.0:80").host, v4(0, 0, 0, 0));
    assert_eq!(ok("10.0.0.0:80").host, v4(10, 0, 0, 0));
    assert_eq!(ok("255.255.255.255:80").host, v4(255, 255, 255, 255));
}

#[test]
fn ports() {
    assert_eq!(ok("a:1").port, 1);
    assert_eq!(ok("a:65535").port, 65535);
    for (s, port) in [
        ("a:0", "0"),
        ("a:65536", "65536"),
        ("a:010250", "010250"),
        ("a:01", "01"),
        ("a:+80", "+80"),
        ("a:-80", "-80"),
        ("a:", ""),
        ("a:8o", "8o"),
        ("a:999999", "999999"),
        ("a:00000000000000000080", "00000000000000000080"),
        ("[::1]:", ""),
        ("[::1]:0x50", "0x50"),
    ] {
        assert_eq!(err(s), TargetError::BadPort(port.into()), "{s}");
    }
    assert_eq!(err("node-a"), TargetError::MissingPort("node-a".into()));
    assert_eq!(err("[::1]"), TargetError::MissingPort("[::1]".into()));
}

#[test]
fn ipv6_rules() {
    assert_eq!(err("::1:80"), TargetError::UnbracketedIpv6("::1".into()));
    assert_eq!(
        err("2001:db8::1:10250"),
        TargetError::UnbracketedIpv6("2001:db8::1".into())
    );
    assert_eq!(
        err("[fe80::1%eth0]:80"),
        TargetError::ZoneId("fe80::1%eth0".into())
    );
    assert_eq!(
        err("[fe80::1%25eth0]:80"),
        TargetError::ZoneId("fe80::1%25eth0".into())
    );
    assert_eq!(err("[]:80"), TargetError::EmptyHost);
    assert_eq!(err("[1.2.3.4]:80"), TargetError::BadIpv6("1.2.3.4".into()));
    assert_eq!(err("[node-a]:80"), TargetError::BadIpv6("node-a".into()));
    assert_eq!(
        err("[::ffff:010.0.0.1]:80"),
        TargetError::BadIpv6("::ffff:010.0.0.1".into())
    );
    assert_eq!(err("[::1:80"), TargetError::BadBrackets("[::1:80".into()));
    assert_eq!(
        err("[::1]x:80"),
        TargetError::BadBrackets("[::1]x:80".into())
    );
    assert_eq!(
        err("[::1]]:80"),
        TargetError::BadBrackets("[::1]]:80".into())
    );
    assert_eq!(err("a]:80"), TargetError::BadBrackets("a]:80".into()));
    assert_eq!(
        err("[[::1]]:80"),
        TargetError::BadBrackets("[[::1]]:80".into())
    );
}

#[test]
fn rejects_whitespace_and_control_characters() {
    for (s, ch, at) in [
        (" a:80", ' ', 0),
        ("a:80 ", ' ', 4),
        ("a :80", ' ', 1),
        ("a:80\r\n", '\r', 4),
        ("a\t:80", '\t', 1),
        ("a\0:80", '\0', 1),
        ("nöde:80", 'ö', 1),
    ] {
        assert_eq!(err(s), TargetError::BadChar { ch, at }, "{s:?}");
    }
    assert_eq!(
        err("a:80\r\n").to_string(),
        "invalid character `\\r` at byte 4 in target"
    );
}

#[test]
fn rejects_urls_and_userinfo() {
    assert_eq!(err("user@node-a:80"), TargetError::Userinfo);
    assert_eq!(err("user:pw@10.0.0.1:80"), TargetError::Userinfo);
    for s in [
        "http://node-a:80",
        "node-a:80/",
        "node-a:80/path",
        "node-a:80?x",
        "node-a:80#f",
        "/",
        "*",
    ] {
        let e = err(s);
        assert!(
            matches!(e, TargetError::NotAuthority | TargetError::MissingPort(_)),
            "{s}: {e:?}"
        );
    }
    assert_eq!(err("http://node-a:80"), TargetError::NotAuthority);
}

#[test]
fn rejects_bad_hosts() {
    assert_eq!(err(":80"), TargetError::EmptyHost);
    assert_eq!(err(""), TargetError::Empty);
    assert_eq!(
        err("Node-A:80"),
        TargetError::BadHost {
            host: "Node-A".into(),
            source: NameError::Uppercase { ch: 'N', at: 0 },
        }
    );
    assert_eq!(
        err("node_a:80").to_string(),
        "invalid host `node_a`: invalid character `_` at byte 4 in node name"
    );
    assert!(matches!(err("node-a.:80"), TargetError::BadHost { .. }));
    assert!(matches!(err("-a:80"), TargetError::BadHost { .. }));
}

#[test]
fn length_is_checked_first() {
    let huge = format!("{}:80", "a".repeat(MAX_TARGET_LEN));
    assert_eq!(
        err(&huge),
        TargetError::TooLong {
            len: MAX_TARGET_LEN + 3
        }
    );
    // Even garbage that would fail for other reasons reports the length.
    let garbage = "\0".repeat(MAX_TARGET_LEN + 1);
    assert_eq!(
        err(&garbage),
        TargetError::TooLong {
            len: MAX_TARGET_LEN + 1
        }
    );
    // A maximal node name with a maximal port fits.
    let label = "a".repeat(63);
    let name = format!("{label}.{label}.{label}.{}", "b".repeat(61));
    assert_eq!(ok(&format!("{name}:65535")).port, 65535);
}

proptest! {
    #[test]
    fn parse_never_panics_on_strings(s in any::<String>()) {
        let _ = Target::parse(&s);
    }

    #[test]
    fn parse_never_panics_on_target_like_strings(s in "[\\[\\]a-zA-Z0-9.:%@/ x-]{0,40}") {
        if let Ok(t) = Target::parse(&s) {
            // Whatever is accepted prints back to something that parses to the same value.
            prop_assert_eq!(Target::parse(&t.to_string()), Ok(t));
        }
    }

    #[test]
    fn ipv4_round_trips(ip in any::<Ipv4Addr>(), port in 1u16..) {
        let s = format!("{ip}:{port}");
        let t = Target::parse(&s).unwrap();
        prop_assert_eq!(&t.host, &Host::Ip(IpAddr::V4(ip)));
        prop_assert_eq!(t.to_string(), s);
    }

    #[test]
    fn ipv6_round_trips(ip in any::<Ipv6Addr>(), port in 1u16..) {
        let t = Target::parse(&format!("[{ip}]:{port}")).unwrap();
        prop_assert_eq!(t.port, port);
        match ip.to_ipv4_mapped() {
            Some(v4) => prop_assert_eq!(&t.host, &Host::Ip(IpAddr::V4(v4))),
            None => prop_assert_eq!(&t.host, &Host::Ip(IpAddr::V6(ip))),
        }
        prop_assert_eq!(Target::parse(&t.to_string()), Ok(t));
    }

    #[test]
    fn strict_ipv4_agrees_with_std(a in 0u16..400, b in 0u16..300, c in 0u16..300, d in 0u16..300, zero in any::<bool>()) {
        let s = if zero { format!("0{a}.{b}.{c}.{d}") } else { format!("{a}.{b}.{c}.{d}") };
        // std's parser is also strict (no octal, no short forms); the two must agree.
        prop_assert_eq!(canonical_ipv4(&s), s.parse::<Ipv4Addr>().ok());
    }
}
