//! Exporters: versioned NDJSON (one object per line, see docs/events.md) and a table view.
//!
//! [`close`] the `close` object, [`records`] the other records (`ready`, `drops`, `stats`),
//! [`table`] the `-o table` view, [`filter`] which sockets are printed.

mod close;
mod filter;
mod jsonw;
mod records;
mod table;

use std::{
    borrow::Cow,
    time::{Duration, SystemTime},
};

pub use close::{CloseObject, close_json};
pub use filter::Filter;
pub use records::{Drops, Losses, Ready, Stats};
pub use table::{TABLE_HEADER, close_line};

/// Text that came from outside (process names, GOAWAY debug text) made safe for a terminal:
/// control characters (C0, DEL, C1: where escape sequences start) and bidirectional
/// overrides (which can make a line read differently than it is) are shown as `\u{..}`.
/// JSON output needs none of this: serde escapes control characters itself.
pub fn terminal_safe(s: &str) -> Cow<'_, str> {
    let unsafe_char =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Version of every JSON object whoclosed writes. Bumped on incompatible changes only.
pub const SCHEMA_VERSION: u32 = 1;

/// Maps CLOCK_MONOTONIC (the kernel's timestamps) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    mono0_ns: u64,
    real0: SystemTime,
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

impl Clock {
    pub fn now() -> Self {
        Clock {
            mono0_ns: monotonic_ns(),
            real0: SystemTime::now(),
        }
    }

    /// A fixed clock for reproducible output in tests.
    pub fn fixed(mono0_ns: u64, real0: SystemTime) -> Self {
        Clock { mono0_ns, real0 }
    }

    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        if mono_ns >= self.mono0_ns {
            self.real0 + Duration::from_nanos(mono_ns - self.mono0_ns)
        } else {
            self.real0 - Duration::from_nanos(self.mono0_ns - mono_ns)
        }
    }

    pub fn rfc3339(&self, mono_ns: u64) -> String {
        humantime::format_rfc3339_micros(self.wall(mono_ns)).to_string()
    }
}

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1_000.0).round() / 1_000.0
}

#[cfg(test)]
mod tests;
