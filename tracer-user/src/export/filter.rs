//! Output filters (`--port`, `--addr`, `--netns`, `--pid`, `--comm`).

use std::net::IpAddr;

use crate::conn::Closed;

/// Output filters. Every socket is still tracked; filters only select what is printed.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub ports: Vec<u16>,
    pub addrs: Vec<IpAddr>,
    pub netns: Vec<u32>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
}

impl Filter {
    pub fn matches(&self, c: &Closed) -> bool {
        let t = c.conn.tuple;
        if !self.ports.is_empty()
            && !t.is_some_and(|t| {
                self.ports.contains(&t.local().port()) || self.ports.contains(&t.remote().port())
            })
        {
            return false;
        }
        if !self.addrs.is_empty()
            && !t.is_some_and(|t| {
                self.addrs.contains(&t.local().ip()) || self.addrs.contains(&t.remote().ip())
            })
        {
            return false;
        }
        if !self.netns.is_empty() && !c.conn.netns.is_some_and(|n| self.netns.contains(&n)) {
            return false;
        }
        if let Some(pid) = self.pid {
            if c.owner.as_ref().map(|o| o.0) != Some(pid) {
                return false;
            }
        }
        if let Some(comm) = &self.comm {
            if c.owner.as_ref().map(|o| &*o.1) != Some(comm.as_str()) {
                return false;
            }
        }
        true
    }
}
