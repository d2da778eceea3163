//! keepalived (VRRP) in a lab namespace: how bare-metal sites choose their
//! active gateway (docs/deploy.md, "Standby gateways").
//!
//! [`shipped_config`] fills in the keepalived config the project ships
//! (`systemd/keepalived-causeway.conf`: its notify hooks run `causeway ctl
//! role …`); [`Keepalived::start_config`] runs Debian's `keepalived` with a
//! config in the foreground inside a node's namespace, its VRRP process
//! only. Dropping it stops keepalived (SIGTERM, which also stops its VRRP
//! child and removes the virtual IP).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::Error;
use crate::netns::{ChildGuard, Netns};

/// The keepalived config the project ships for its users
/// (`systemd/keepalived-causeway.conf`), as the labs run it.
pub const SHIPPED_CONFIG: &str = include_str!("../../systemd/keepalived-causeway.conf");

/// [`SHIPPED_CONFIG`] with what its comments say to change replaced: the
/// `priority`, the virtual IP (`vip`, e.g. `172.16.1.100/24`), and the
/// `causeway` binary (`bin`) and control `socket` its notify hooks call.
/// An error when the shipped file no longer has a line to replace.
pub fn shipped_config(priority: u8, vip: &str, bin: &Path, socket: &Path) -> Result<String, Error> {
    for (what, original) in [
        ("priority", "priority 100 "),
        ("VIP", "192.0.2.100/24"),
        ("binary", "/usr/local/bin/causeway"),
        ("socket", "--interface causeway0"),
    ] {
        if !SHIPPED_CONFIG.contains(original) {
            return Err(Error::Spec(format!(
                "the shipped keepalived config changed: its {what} line has no {original:?}"
            )));
        }
    }
    Ok(SHIPPED_CONFIG
        .replace("priority 100 ", &format!("priority {priority} "))
        .replace("192.0.2.100/24", vip)
        .replace("/usr/local/bin/causeway", &bin.display().to_string())
        .replace(
            "--interface causeway0",
            &format!("--socket {}", socket.display()),
        ))
}

/// A running keepalived; stopped on drop.
#[derive(Debug)]
pub struct Keepalived {
    child: ChildGuard,
    log: PathBuf,
}

impl Keepalived {
    /// Starts keepalived in `ns` with the config `text` (e.g. a shipped
    /// example with its addresses replaced), its files in `dir`.
    pub fn start_config(ns: &Netns, dir: &Path, text: &str) -> Result<Keepalived, Error> {
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
