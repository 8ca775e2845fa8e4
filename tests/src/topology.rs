//! Three network namespaces: client <-> router <-> server.
//!
//! ```text
//!   <p>-c                 <p>-r                      <p>-s
//!   veth-r 10.241.1.2 --- veth-c 10.241.1.1
//!                         veth-s 10.241.2.1 --- veth-r 10.241.2.2
//!          fd00:241:1::2      fd00:241:1::1 / fd00:241:2::1   fd00:241:2::2
//! ```
//! All veth devices are created directly inside the namespaces (nothing touches the
//! initial namespace), so two topologies can use identical addresses and device names.

use crate::{run_cmd, wait_until};
use anyhow::{Context, Result, bail};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Address plan of a topology. Two topologies may share the same plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddrPlan {
    pub client_v4: Ipv4Addr,
    pub router_client_v4: Ipv4Addr,
    pub router_server_v4: Ipv4Addr,
    pub server_v4: Ipv4Addr,
    pub prefix_len_v4: u8,
    pub client_v6: Ipv6Addr,
    pub router_client_v6: Ipv6Addr,
    pub router_server_v6: Ipv6Addr,
    pub server_v6: Ipv6Addr,
    pub prefix_len_v6: u8,
}

impl Default for AddrPlan {
    fn default() -> Self {
        AddrPlan {
            client_v4: Ipv4Addr::new(10, 241, 1, 2),
            router_client_v4: Ipv4Addr::new(10, 241, 1, 1),
            router_server_v4: Ipv4Addr::new(10, 241, 2, 1),
            server_v4: Ipv4Addr::new(10, 241, 2, 2),
            prefix_len_v4: 24,
            client_v6: "fd00:241:1::2".parse().expect("literal"),
            router_client_v6: "fd00:241:1::1".parse().expect("literal"),
            router_server_v6: "fd00:241:2::1".parse().expect("literal"),
            server_v6: "fd00:241:2::2".parse().expect("literal"),
            prefix_len_v6: 64,
        }
    }
}

/// Device names (per namespace, so they can repeat across topologies).
const C_DEV: &str = "veth-r"; // in client, towards router
const RC_DEV: &str = "veth-c"; // in router, towards client
const RS_DEV: &str = "veth-s"; // in router, towards server
const S_DEV: &str = "veth-r"; // in server, towards router

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A client/router/server namespace triple. Dropping it deletes the namespaces.
#[derive(Debug)]
pub struct Topology {
    /// Unique prefix, `wc<pid>-<n>`.
    pub prefix: String,
    pub client: String,
    pub router: String,
    pub server: String,
    pub plan: AddrPlan,
    created: Vec<String>,
}

/// Inode of a named network namespace (`stat /run/netns/<name>`), i.e. the value the
/// agent reports as `conn.netns` and accepts for `--netns`.
pub fn netns_inode(name: &str) -> Result<u64> {
    let path = format!("/run/netns/{name}");
    Ok(std::fs::metadata(&path)
        .with_context(|| format!("stat {path}"))?
        .ino())
}

impl Topology {
    /// Topology with the default address plan.
    pub fn new() -> Result<Self> {
        Self::with_plan(AddrPlan::default())
    }

    pub fn with_plan(plan: AddrPlan) -> Result<Self> {
        sweep_stale();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("wc{}-{n}", std::process::id());
        let mut t = Topology {
            client: format!("{prefix}-c"),
            router: format!("{prefix}-r"),
            server: format!("{prefix}-s"),
            prefix,
            plan,
            created: Vec::new(),
        };
        if t.server.len() > 15 {
            bail!("namespace name {} too long", t.server);
        }
        // On error, `t` is dropped and removes whatever was created.
        t.build()
            .with_context(|| format!("building topology {}", t.prefix))?;
        Ok(t)
    }

    fn build(&mut self) -> Result<()> {
        for ns in [
            self.client.clone(),
            self.router.clone(),
            self.server.clone(),
        ] {
            run_cmd("ip", &["netns", "add", &ns])?;
            self.created.push(ns.clone());
            // No DAD anywhere (link-local addresses included) so addresses are usable
            // as soon as the links have carrier.
            self.sysctl(&ns, "net.ipv6.conf.all.accept_dad", "0")?;
            self.sysctl(&ns, "net.ipv6.conf.default.accept_dad", "0")?;
            self.ip(&ns, &["link", "set", "lo", "up"])?;
        }
        let (c, r, s) = (
            self.client.clone(),
            self.router.clone(),
            self.server.clone(),
        );
        self.ip(
            &c,
            &[
                "link", "add", C_DEV, "type", "veth", "peer", "name", RC_DEV, "netns", &r,
            ],
        )?;
        self.ip(
            &s,
            &[
                "link", "add", S_DEV, "type", "veth", "peer", "name", RS_DEV, "netns", &r,
            ],
        )?;
        let p = self.plan.clone();
        let (l4, l6) = (p.prefix_len_v4, p.prefix_len_v6);
        for (ns, dev, v4, v6) in [
            (&c, C_DEV, p.client_v4, p.client_v6),
            (&r, RC_DEV, p.router_client_v4, p.router_client_v6),
            (&r, RS_DEV, p.router_server_v4, p.router_server_v6),
            (&s, S_DEV, p.server_v4, p.server_v6),
        ] {
            self.sysctl(ns, &format!("net.ipv6.conf.{dev}.accept_dad"), "0")?;
            self.ip(ns, &["addr", "add", &format!("{v4}/{l4}"), "dev", dev])?;
            self.ip(
                ns,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{v6}/{l6}"),
                    "dev",
                    dev,
                    "nodad",
                ],
            )?;
            self.ip(ns, &["link", "set", dev, "up"])?;
        }
        self.sysctl(&r, "net.ipv4.ip_forward", "1")?;
        self.sysctl(&r, "net.ipv6.conf.all.forwarding", "1")?;

        for (ns, devs) in [
            (&c, &[C_DEV][..]),
            (&r, &[RC_DEV, RS_DEV][..]),
            (&s, &[S_DEV][..]),
        ] {
            wait_until(
                &format!("links {devs:?} up and no tentative addresses in {ns}"),
                Duration::from_secs(10),
                || self.links_ready(ns, devs),
            )?;
        }

        self.ip(
            &c,
            &[
                "route",
                "add",
                "default",
                "via",
                &p.router_client_v4.to_string(),
            ],
        )?;
        self.ip(
            &c,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &p.router_client_v6.to_string(),
            ],
        )?;
        self.ip(
            &s,
            &[
                "route",
                "add",
                "default",
                "via",
                &p.router_server_v4.to_string(),
            ],
        )?;
        self.ip(
            &s,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &p.router_server_v6.to_string(),
            ],
        )?;
        Ok(())
    }

    fn links_ready(&self, ns: &str, devs: &[&str]) -> Result<bool> {
        let links: serde_json::Value = serde_json::from_str(&self.ip(ns, &["-j", "link", "show"])?)
            .context("parsing `ip -j link show`")?;
        for dev in devs {
            let up = links.as_array().into_iter().flatten().any(|l| {
                l["ifname"].as_str() == Some(dev) && l["operstate"].as_str() == Some("UP")
            });
            if !up {
                return Ok(false);
            }
        }
        let tentative = self.ip(ns, &["-6", "-o", "addr", "show", "tentative"])?;
        Ok(tentative.trim().is_empty())
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut v = vec!["-n", ns];
        v.extend_from_slice(args);
        run_cmd("ip", &v)
    }

    /// `ip netns exec <ns> <args>`.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut v = vec!["netns", "exec", ns];
        v.extend_from_slice(args);
        run_cmd("ip", &v)
    }

    /// `sysctl -w key=value` inside `ns`.
    pub fn sysctl(&self, ns: &str, key: &str, value: &str) -> Result<()> {
        self.exec(ns, &["sysctl", "-q", "-w", &format!("{key}={value}")])?;
        Ok(())
    }

    /// `iptables -w <args>` in the router namespace.
    pub fn router_iptables(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["iptables", "-w"];
        v.extend_from_slice(args);
        self.exec(&self.router, &v)
    }

    /// `ip6tables -w <args>` in the router namespace.
    pub fn router_ip6tables(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["ip6tables", "-w"];
        v.extend_from_slice(args);
        self.exec(&self.router, &v)
    }

    pub fn client_inode(&self) -> Result<u64> {
        netns_inode(&self.client)
    }
    pub fn router_inode(&self) -> Result<u64> {
        netns_inode(&self.router)
    }
    pub fn server_inode(&self) -> Result<u64> {
        netns_inode(&self.server)
    }

    /// Inodes of [client, router, server] (for `--netns`).
    pub fn inodes(&self) -> Result<Vec<u64>> {
        Ok(vec![
            self.client_inode()?,
            self.router_inode()?,
            self.server_inode()?,
        ])
    }

    /// Client address for the family (`v6` selects IPv6).
    pub fn client_ip(&self, v6: bool) -> IpAddr {
        if v6 {
            self.plan.client_v6.into()
        } else {
            self.plan.client_v4.into()
        }
    }

    /// Server address for the family.
    pub fn server_ip(&self, v6: bool) -> IpAddr {
        if v6 {
            self.plan.server_v6.into()
        } else {
            self.plan.server_v4.into()
        }
    }

    /// `server_ip(v6):port`.
    pub fn server_addr(&self, v6: bool, port: u16) -> SocketAddr {
        SocketAddr::new(self.server_ip(v6), port)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.drain(..).rev() {
            if let Err(e) = run_cmd("ip", &["netns", "del", &ns]) {
                eprintln!("warning: cleaning up namespace {ns}: {e:#}");
            }
        }
    }
}

/// Deletes `wc<pid>-<n>-{c,r,s}` namespaces whose creating process no longer exists
/// (left behind by a test process that was killed before it could clean up).
fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for ent in dir.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        let Some(pid) = stale_owner(&name) else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            let _ = run_cmd("ip", &["netns", "del", &name]);
        }
    }
}

fn stale_owner(name: &str) -> Option<i32> {
    let rest = name.strip_prefix("wc")?;
    let mut parts = rest.split('-');
    let pid = parts.next()?;
    let n = parts.next()?;
    let role = parts.next()?;
    if parts.next().is_some()
        || pid.is_empty()
        || !pid.bytes().all(|b| b.is_ascii_digit())
        || n.is_empty()
        || !n.bytes().all(|b| b.is_ascii_digit())
        || !matches!(role, "c" | "r" | "s")
    {
        return None;
    }
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::stale_owner;

    #[test]
    fn stale_name_parsing() {
        assert_eq!(stale_owner("wc1234-0-c"), Some(1234));
        assert_eq!(stale_owner("wc4194304-12-s"), Some(4194304));
        assert_eq!(stale_owner("wc1234-0-x"), None);
        assert_eq!(stale_owner("wcx-0-c"), None);
        assert_eq!(stale_owner("wc12-c"), None);
        assert_eq!(stale_owner("other"), None);
    }
}
