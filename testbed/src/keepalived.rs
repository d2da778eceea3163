//! keepalived (VRRP) in a lab namespace: how bare-metal sites choose their
//! active gateway (docs/deploy.md, "Standby gateways").
//!
//! [`Keepalived::start`] writes a config for one VRRP instance and runs
//! Debian's `keepalived` in the foreground inside a node's namespace, its
//! VRRP process only. Its notify hooks run the commands the caller gives
//! (the tests pass `causeway ctl role …`). Dropping it stops keepalived
//! (SIGTERM, which also stops its VRRP child and removes the virtual IP).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::Error;
use crate::netns::{ChildGuard, Netns};

/// One VRRP instance.
#[derive(Debug, Clone)]
pub struct Vrrp {
    /// The interface VRRP runs on and the virtual IP goes to (`eth0`).
    pub interface: String,
    /// The virtual router id, the same on every replica (1–255).
    pub router_id: u8,
    /// Higher wins an election; with `nopreempt` only when nobody is master.
    pub priority: u8,
    /// Interval between advertisements (VRRPv3: centiseconds); a backup
    /// takes over after about three missed ones.
    pub advert_interval: Duration,
    /// The virtual IP and its prefix length.
    pub vip: (Ipv4Addr, u8),
    /// An interface whose loss (down, no carrier, deleted) puts this
    /// replica in FAULT: the Causeway TUN, which loses its carrier when the
    /// daemon dies (even by SIGKILL).
    pub track_interface: Option<String>,
    /// Shell commands run on becoming master, backup, and on a fault.
    pub notify_master: String,
    pub notify_backup: String,
    pub notify_fault: String,
    /// Where the config, pid files and log go (must exist).
    pub dir: PathBuf,
}

impl Vrrp {
    /// The keepalived config for this instance.
    pub fn config(&self) -> String {
        let centis = (self.advert_interval.as_millis() / 10).max(1);
        let track = self
            .track_interface
            .as_ref()
            .map(|i| format!("    track_interface {{\n        {i}\n    }}\n"))
            .unwrap_or_default();
        let quoted = |cmd: &str| format!("\"/bin/sh -c '{}'\"", cmd.replace('\'', "'\\''"));
        format!(
            "global_defs {{\n    vrrp_version 3\n    dynamic_interfaces\n    script_user root\n    \
             enable_script_security\n    vrrp_garp_master_delay 1\n    vrrp_garp_master_repeat 3\n    \
             vrrp_garp_lower_prio_repeat 1\n    vrrp_garp_interval 0.01\n}}\n\
             vrrp_instance causeway {{\n    state BACKUP\n    nopreempt\n    interface {iface}\n    \
             virtual_router_id {id}\n    priority {prio}\n    advert_int {adv}\n{track}    \
             virtual_ipaddress {{\n        {vip}/{len} dev {iface}\n    }}\n    \
             notify_master {master}\n    notify_backup {backup}\n    notify_fault {fault}\n}}\n",
            iface = self.interface,
            id = self.router_id,
            prio = self.priority,
            adv = format_args!("{}.{:02}", centis / 100, centis % 100),
            vip = self.vip.0,
            len = self.vip.1,
            master = quoted(&self.notify_master),
            backup = quoted(&self.notify_backup),
            fault = quoted(&self.notify_fault),
        )
    }
}

/// A running keepalived; stopped on drop.
#[derive(Debug)]
pub struct Keepalived {
    child: ChildGuard,
    log: PathBuf,
}

impl Keepalived {
    /// Writes `vrrp`'s config into its `dir` and starts keepalived (VRRP
    /// only, in the foreground, logging to `dir/keepalived.log`) in `ns`.
    pub fn start(ns: &Netns, vrrp: &Vrrp) -> Result<Keepalived, Error> {
        Self::start_config(ns, &vrrp.dir, &vrrp.config())
    }

    /// Starts keepalived in `ns` with the config `text` (e.g. a shipped
    /// example with its addresses replaced), its files in `dir`.
    pub fn start_config(
        ns: &Netns,
        dir: &std::path::Path,
        text: &str,
    ) -> Result<Keepalived, Error> {
        let file = |name: &str| dir.join(name);
        let io = |what: &str, e| ns.io_error(what, e);
        std::fs::write(file("keepalived.conf"), text)
            .map_err(|e| io("writing keepalived.conf", e))?;
        let log = file("keepalived.log");
        let out = std::fs::File::create(&log).map_err(|e| io("creating keepalived.log", e))?;
        let mut cmd: Command = ns.command("keepalived");
        cmd.args(["--dont-fork", "--log-console", "--vrrp", "--use-file"])
            .arg(file("keepalived.conf"))
            .arg("--pid")
            .arg(file("keepalived.pid"))
            .arg("--vrrp_pid")
            .arg(file("vrrp.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out);
        let child = ns.spawn(&mut cmd)?;
        Ok(Keepalived { child, log })
    }

    /// What keepalived logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it: SIGTERM (keepalived removes the virtual IP and tells the
    /// other replicas with a priority-0 advertisement), SIGKILL after 5 s.
    pub fn stop(mut self) -> Result<(), Error> {
        self.child.stop(Duration::from_secs(5)).map(drop)
    }
}
