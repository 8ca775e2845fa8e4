//! `-o table`: one human-readable line per ended socket.

use super::{Clock, terminal_safe};
use crate::conn::Closed;

pub const TABLE_HEADER: &str = "TIME                        ROLE    LOCAL                      REMOTE                     CLOSED_BY  REASON                    MECH     CONF    PROCESS [MIDDLEBOX]";

/// One human-readable line for `-o table`.
pub fn close_line(c: &Closed, clock: &Clock) -> String {
    let (l, r) = match c.conn.tuple {
        Some(t) => (t.local().to_string(), t.remote().to_string()),
        None => ("?".into(), "?".into()),
    };
    let v = &c.verdict;
    let proc_ = c
        .owner
        .as_ref()
        .map(|(p, n)| format!("{}({p})", terminal_safe(n)))
        .unwrap_or_else(|| "-".into());
    let mbox = v
        .middlebox
        .as_ref()
        .map(|m| format!("  [{}]", terminal_safe(&m.short())))
        .unwrap_or_default();
    format!(
        "{:<27} {:<7} {:<26} {:<26} {:<10} {:<25} {:<8} {:<7} {}{}",
        clock.rfc3339(c.conn.closed_ns.unwrap_or(c.conn.first_ns)),
        c.conn.role.name(),
        l,
        r,
        v.closed_by.as_str(),
        v.reason,
        v.mechanism.as_str(),
        v.confidence.as_str(),
        proc_,
        mbox
    )
}
