//! Helpers of the hand-written `close` writer ([`super::CloseObject::write_json`]): JSON
//! values appended to a `Vec<u8>`, as the very bytes serde_json writes for them (its string
//! escaping, `itoa` integers, `zmij` floats, `null` for a float that is not finite). The
//! export tests compare the writer with serde_json on every shape of `close` object.

use std::{
    fmt,
    io::{self, Write as _},
    net::SocketAddr,
};

/// A byte serde_json escapes in a string: `"`, `\` and the C0 controls (nothing else, not
/// even DEL or non-ASCII).
#[inline]
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Does any byte of `s` need escaping? Without an early exit, so that it vectorises: the
/// answer is almost always no, and the whole string is read either way.
#[inline]
fn any_escape(s: &[u8]) -> bool {
    s.iter().fold(false, |acc, &b| acc | needs_escape(b))
}

/// The contents of a JSON string (no quotes), escaped as serde_json does: `\"`, `\\`,
/// `\b \f \n \r \t`, and `\u00xx` (lowercase hex) for the other controls. `s` is UTF-8
/// and only ASCII bytes are replaced, so the output is UTF-8 too.
fn escaped(out: &mut Vec<u8>, s: &[u8]) {
    if !any_escape(s) {
        out.extend_from_slice(s);
        return;
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut run = 0;
    for (i, &b) in s.iter().enumerate() {
        if !needs_escape(b) {
            continue;
        }
        out.extend_from_slice(&s[run..i]);
        run = i + 1;
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            _ => {
                out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ]);
                continue;
            }
        };
        out.extend_from_slice(&[b'\\', short]);
    }
    out.extend_from_slice(&s[run..]);
}

/// A JSON string.
#[inline]
pub(super) fn string(out: &mut Vec<u8>, s: &str) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    escaped(out, s.as_bytes());
    out.push(b'"');
}

/// A JSON string from the program's own names (enum names, states, errno names): known
/// to need no escaping, so the bytes are copied as they are.
#[inline]
pub(super) fn name(out: &mut Vec<u8>, s: &'static str) {
    debug_assert!(!any_escape(s.as_bytes()), "{s:?} needs escaping");
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// A JSON string or `null`.
#[inline]
pub(super) fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => null(out),
    }
}

/// A value's `Display` form as a JSON string (serde's `collect_str`), formatted straight
/// into `out` and escaped afterwards in the rare case it needs it. Fails only if the
/// `Display` impl does.
pub(super) fn display_str(out: &mut Vec<u8>, v: impl fmt::Display) -> io::Result<()> {
    out.push(b'"');
    let start = out.len();
    write!(out, "{v}")?;
    if any_escape(&out[start..]) {
        let raw = out.split_off(start);
        escaped(out, &raw);
    }
    out.push(b'"');
    Ok(())
}

/// A wall-clock time as a JSON string in humantime's `format_rfc3339_micros` form
/// (`2026-11-26T21:17:12.806589Z`), written without `fmt`; times before 1970 or after
/// 9999 (never a kernel event's) go through humantime itself.
pub(super) fn rfc3339_micros(out: &mut Vec<u8>, t: std::time::SystemTime) -> io::Result<()> {
    const MAX_SECS: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let since = match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) if d.as_secs() <= MAX_SECS => d,
        _ => return display_str(out, humantime::format_rfc3339_micros(t)),
    };
    let secs = since.as_secs();
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let tod = secs % 86_400;
    let mut b = *b"\"0000-00-00T00:00:00.000000Z\"";
    let mut put = |at: usize, v: u64, width: usize| {
        let mut v = v;
        for i in (0..width).rev() {
            b[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(1, y as u64, 4);
    put(6, u64::from(m), 2);
    put(9, u64::from(d), 2);
    put(12, tod / 3600, 2);
    put(15, tod / 60 % 60, 2);
    put(18, tod % 60, 2);
    put(21, u64::from(since.subsec_micros()), 6);
    out.extend_from_slice(&b);
    Ok(())
}

/// The proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A connection id as a JSON string (what `display_str` would write for it).
#[inline]
pub(super) fn id(out: &mut Vec<u8>, id: crate::timeline::ConnId) {
    out.push(b'"');
    out.extend_from_slice(&id.hex());
    out.push(b'"');
}

/// A socket address as serde writes one for a human-readable format: its `Display` form,
/// as a string. IPv4 (the common case) is formatted here, without `fmt`.
pub(super) fn addr(out: &mut Vec<u8>, a: SocketAddr) -> io::Result<()> {
    match a {
        SocketAddr::V4(v4) => {
            let [a, b, c, d] = v4.ip().octets();
            out.push(b'"');
            int(out, a);
            out.push(b'.');
            int(out, b);
            out.push(b'.');
            int(out, c);
            out.push(b'.');
            int(out, d);
            out.push(b':');
            int(out, v4.port());
            out.push(b'"');
            Ok(())
        }
        SocketAddr::V6(_) => display_str(out, a),
    }
}

/// A socket address or `null`.
pub(super) fn opt_addr(out: &mut Vec<u8>, a: Option<SocketAddr>) -> io::Result<()> {
    match a {
        Some(a) => addr(out, a),
        None => {
            null(out);
            Ok(())
        }
    }
}

#[inline]
pub(super) fn int(out: &mut Vec<u8>, v: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

#[inline]
pub(super) fn opt_int(out: &mut Vec<u8>, v: Option<impl itoa::Integer>) {
    match v {
        Some(v) => int(out, v),
        None => null(out),
    }
}

/// A float as serde_json writes it: shortest round-trip form by `zmij` (`0.0`, `0.001`,
/// `1e16`), `null` when not finite.
#[inline]
pub(super) fn float(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        out.extend_from_slice(zmij::Buffer::new().format_finite(v).as_bytes());
    } else {
        null(out);
    }
}

/// Nanoseconds as the milliseconds float `super::ms` makes of them (rounded to the
/// microsecond), written as `float` would write it, without the float formatter: below
/// 10^15 ns the value is k/1000 for the integer k = round(ns / 1000), and its shortest
/// round-trip form is that decimal with trailing zeros dropped (`12.0`, `0.05`, `1.234`).
/// Larger values take the float path.
pub(super) fn ms(out: &mut Vec<u8>, ns: u64) {
    if ns >= 1_000_000_000_000_000 {
        float(out, super::ms(ns));
        return;
    }
    let k = (ns + 500) / 1_000;
    int(out, k / 1_000);
    let frac = k % 1_000;
    if frac == 0 {
        out.extend_from_slice(b".0");
        return;
    }
    let digits = [
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ];
    let keep = if frac.is_multiple_of(100) {
        2
    } else if frac.is_multiple_of(10) {
        3
    } else {
        4
    };
    out.extend_from_slice(&digits[..keep]);
}

/// [`ms`] or `null`.
#[inline]
pub(super) fn opt_ms(out: &mut Vec<u8>, ns: Option<u64>) {
    match ns {
        Some(ns) => ms(out, ns),
        None => null(out),
    }
}

#[inline]
pub(super) fn boolean(out: &mut Vec<u8>, v: bool) {
    out.extend_from_slice(if v { b"true" } else { b"false" });
}

#[inline]
pub(super) fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"null");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serde<T: serde::Serialize + ?Sized>(v: &T) -> Vec<u8> {
        serde_json::to_vec(v).expect("serialise")
    }

    /// The hand-written timestamp against humantime's: the epoch, leap days, century and
    /// 400-year rules, the last second of 9999, sub-second digits, and a spread of times
    /// in between (multiplicative steps through the whole range).
    #[test]
    fn rfc3339_micros_matches_humantime() {
        use std::time::{Duration, UNIX_EPOCH};
        let mut secs: Vec<u64> = vec![
            0,
            59,
            86_399,
            86_400,
            951_782_400,   // 2000-02-29
            951_868_800,   // 2000-03-01
            4_107_456_000, // 2100-02-28
            4_107_542_400, // 2100-03-01
            1_795_730_232, // 2026-11-26
            253_402_300_799,
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            secs.push((x >> 11) % 253_402_300_800);
        }
        for (i, s) in secs.into_iter().enumerate() {
            let nanos = (i as u32).wrapping_mul(2_654_435_761) % 1_000_000_000;
            let t = UNIX_EPOCH + Duration::new(s, nanos);
            let mut ours = Vec::new();
            rfc3339_micros(&mut ours, t).expect("format");
            let theirs = format!("\"{}\"", humantime::format_rfc3339_micros(t));
            assert_eq!(String::from_utf8_lossy(&ours), theirs, "{s} s {nanos} ns");
        }
    }

    /// The integer millisecond writer against the float path it replaces: every value up
    /// to 3 s in steps of 1 ns near rounding edges, every microsecond up to 2 s, and a
    /// spread of values up to and past 10^15 ns.
    #[test]
    fn ms_matches_the_float_writer() {
        let mut cases: Vec<u64> = (0..3_000_000_000u64)
            .step_by(997)
            .chain((0..2_000_000).map(|us| us * 1_000))
            .chain((0..4_000).flat_map(|i| {
                let edge = i * 1_000 + 500;
                [edge - 1, edge, edge + 1]
            }))
            .collect();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..200_000 {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            cases.push(x % 2_000_000_000_000_000);
        }
        cases.extend([
            999_999_999_999_499,
            999_999_999_999_500,
            999_999_999_999_999,
            1_000_000_000_000_000,
            u64::MAX,
        ]);
        for ns in cases {
            let mut ours = Vec::new();
            ms(&mut ours, ns);
            let mut theirs = Vec::new();
            float(&mut theirs, super::super::ms(ns));
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs),
                "{ns} ns"
            );
        }
    }

    /// Every byte value alone, in runs and between text, including multi-byte UTF-8.
    #[test]
    fn strings_escape_like_serde_json() {
        let mut cases: Vec<String> = (0u8..=0x7f).map(|b| char::from(b).to_string()).collect();
        cases.extend((0u8..=0x7f).map(|b| format!("ab{}cd{}", char::from(b), char::from(b))));
        cases.extend(
            [
                "",
                "plain",
                "say \"hi\"\\ now",
                "\u{0}\u{1}\u{1f}\u{7f}\u{80}\u{9f}",
                "tab\there\nnew\rline\u{8}\u{c}",
                "caf\u{e9} \u{1f600} \u{202e}rtl \u{2028}\u{2029}",
                "\u{1b}]0;pwned\u{7}\u{1b}[2J",
                "trailing\\",
                "\"",
                "a very long string that has no escapes at all and is longer than any vector width",
            ]
            .map(String::from),
        );
        for s in &cases {
            let mut fast = Vec::new();
            string(&mut fast, s);
            assert_eq!(fast, serde(s.as_str()), "{s:?}");
            let mut disp = Vec::new();
            display_str(&mut disp, s).expect("display");
            assert_eq!(disp, serde(s.as_str()), "{s:?}");
        }
    }

    #[test]
    fn numbers_and_addresses_like_serde_json() {
        for v in [
            0.0,
            -0.0,
            0.001,
            0.1,
            1.0,
            2000.0,
            123456.789,
            1e15,
            1e16,
            u64::MAX as f64 / 1e6,
            f64::MIN_POSITIVE,
            f64::MAX,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            let mut fast = Vec::new();
            float(&mut fast, v);
            assert_eq!(fast, serde(&v), "{v}");
        }
        for v in [0u64, 1, 9, 10, 4_026_531_833, u64::MAX] {
            let mut fast = Vec::new();
            int(&mut fast, v);
            assert_eq!(fast, serde(&v));
        }
        for v in [0i32, -1, 104, i32::MIN, i32::MAX] {
            let mut fast = Vec::new();
            int(&mut fast, v);
            assert_eq!(fast, serde(&v));
        }
        for a in [
            "0.0.0.0:0",
            "10.9.1.2:40000",
            "255.255.255.255:65535",
            "[::]:0",
            "[::1]:80",
            "[fd00:9:1::2]:443",
            "[::ffff:10.0.0.1]:8080",
            "[1111:2222:3333:4444:5555:6666:7777:8888]:65535",
        ] {
            let a: SocketAddr = a.parse().expect("address");
            let mut fast = Vec::new();
            addr(&mut fast, a).expect("addr");
            assert_eq!(fast, serde(&a), "{a}");
        }
        let scoped = SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::1".parse().expect("ip"),
            443,
            7,
            u32::MAX,
        ));
        let mut fast = Vec::new();
        addr(&mut fast, scoped).expect("addr");
        assert_eq!(fast, serde(&scoped));
    }
}
