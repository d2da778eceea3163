//! Named network namespaces, commands inside them, and their teardown.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::Error;

/// Sysctls every namespace gets.
pub(crate) const BASE_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
    ("net.ipv6.conf.all.accept_dad", "0"),
    ("net.ipv6.conf.default.accept_dad", "0"),
    // Otherwise addresses join their solicited-node group (and answer
    // neighbour solicitations) only after a random delay of up to a second.
    ("net.ipv6.conf.all.router_solicitation_delay", "0"),
    ("net.ipv6.conf.default.router_solicitation_delay", "0"),
    ("net.ipv4.ping_group_range", "0 2147483647"),
];

/// How long teardown waits after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(1);

/// A new run id, unique in this process: `cw<pid>x<counter>`.
pub(crate) fn next_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "cw{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace made by this crate (a file in `/run/netns`), deleted
/// with everything running in it when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// False once a [`Lab`](crate::Lab) has torn it down together with others.
    armed: bool,
}

impl Netns {
    /// Creates a standalone namespace named `cw<pid>x<counter>-<label>` with
    /// `lo` up (and the same sysctls as a lab's namespaces), for tests that need
    /// one more host. Connect it with [`Netns::veth`]. Removed on drop; a
    /// crashed process's leftovers are swept like a lab's.
    pub fn create(label: &str) -> Result<Netns, Error> {
        check_label("namespace label", label)?;
        let ns = Netns::add(format!("{}-{label}", next_id()))?;
        ns.sysctls(BASE_SYSCTLS)?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip netns add NAME`.
    pub(crate) fn add(name: String) -> Result<Netns, Error> {
        run_command(Command::new("ip").args(["netns", "add", &name]), None)?;
        Ok(Netns { name, armed: true })
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that runs `program` in this namespace
    /// (`ip netns exec NAME program`); add arguments and stdio as usual.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `program args…` in this namespace to completion and returns its
    /// stdout. A non-zero exit is an [`Error::Command`] with its stderr.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String, Error> {
        run_command(self.command(program).args(args), None)
    }

    /// Like [`Netns::run`], feeding `input` on stdin (e.g. `nft -f -`).
    pub fn run_with_input(
        &self,
        program: &str,
        args: &[&str],
        input: &str,
    ) -> Result<String, Error> {
        run_command(self.command(program).args(args), Some(input))
    }

    /// Runs `ip -n NAME args…` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, Error> {
        run_command(Command::new("ip").args(["-n", &self.name]).args(args), None)
    }

    /// Creates a veth pair with `ifname` here and `peer_ifname` in `peer`,
    /// both down. Nothing is ever created in the host's namespace. After
    /// setting both ends up, [`Netns::wait_links_up`] before sending.
    pub fn veth(&self, ifname: &str, peer: &Netns, peer_ifname: &str) -> Result<(), Error> {
        // The kernel treats a veth's carrier change as urgent (and brings the
        // link operationally up at once) only if its ifindex differs from its
        // peer's. Namespaces number links on their own, so equal indexes are
        // common, and then IPv6 stays deaf for up to a second. Pick distinct ones.
        static NEXT_INDEX: AtomicU32 = AtomicU32::new(1000);
        let index = NEXT_INDEX.fetch_add(2, Ordering::Relaxed);
        let add = format!(
            "link add {ifname} index {index} type veth peer name {peer_ifname} netns {} index {}",
            peer.name,
            index + 1
        );
        self.ip(&add.split(' ').collect::<Vec<_>>())?;
        Ok(())
    }

    /// Waits until every link but `lo` is operationally up (IPv6 ignores a
    /// link until then), for at most `timeout`.
    pub fn wait_links_up(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let links = self.ip(&["-br", "link"])?;
            let down: Vec<&str> = links
                .lines()
                .filter_map(|line| {
                    let mut fields = line.split_whitespace();
                    let (name, state) = (fields.next()?, fields.next()?);
                    (name != "lo" && state != "UP").then_some(name)
                })
                .collect();
            if down.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let what = format!("waiting for links {down:?} to come up");
                return Err(self.io_error(&what, io::ErrorKind::TimedOut.into()));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts a command built with [`Netns::command`] of this namespace and
    /// returns a guard that stops it (SIGTERM, SIGKILL after a second) and
    /// reaps it on drop. A command built any other way is refused, so nothing
    /// ever runs in the host's namespace by mistake.
    pub fn spawn(&self, cmd: &mut Command) -> Result<ChildGuard, Error> {
        let args: Vec<&OsStr> = cmd.get_args().collect();
        let command = command_line(cmd);
        let ours = cmd.get_program() == "ip"
            && args.len() >= 4
            && args[..3]
                == [
                    OsStr::new("netns"),
                    OsStr::new("exec"),
                    OsStr::new(&self.name),
                ];
        if !ours {
            return Err(Error::NotInNamespace {
                command,
                netns: self.name.clone(),
            });
        }
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
        Ok(ChildGuard { child, command })
    }

    /// Runs `f` on a new thread that has joined this namespace, and returns
    /// its result. Sockets made inside `f` belong to this namespace and keep
    /// working after `f` returns (return them to use them on any thread).
    ///
    /// # Panics
    /// Re-raises a panic from `f`; panics if the namespace cannot be entered
    /// ([`Netns::try_enter`] returns that as an error instead).
    pub fn enter<F: FnOnce() -> R + Send, R: Send>(&self, f: F) -> R {
        match self.try_enter(f) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`Netns::enter`], returning a failure to enter the namespace as an error.
    pub fn try_enter<F: FnOnce() -> R + Send, R: Send>(&self, f: F) -> Result<R, Error> {
        let file = File::open(self.path()).map_err(|e| self.io_error("open namespace file", e))?;
        thread::scope(|scope| {
            let thread = scope.spawn(move || {
                // SAFETY: setns on a valid namespace fd; only this thread moves.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            });
            match thread.join() {
                Ok(result) => result.map_err(|e| self.io_error("setns", e)),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Sends one ICMP echo request (IPv4 or IPv6) from this namespace and
    /// returns the round-trip time, or `None` if no reply came within
    /// `timeout` (including "no route" and ICMP errors).
    pub fn ping(&self, dst: IpAddr, timeout: Duration) -> Result<Option<Duration>, Error> {
        self.try_enter(|| crate::probe::ping(dst, timeout))?
            .map_err(|e| self.io_error(&format!("ping {dst}"), e))
    }

    /// Writes `(key, value)` pairs such as `("net.ipv4.ip_forward", "1")` to
    /// this namespace's `/proc/sys`.
    pub fn sysctls(&self, settings: &[(&str, &str)]) -> Result<(), Error> {
        self.try_enter(|| {
            for (key, value) in settings {
                let path = format!("/proc/sys/{}", key.replace('.', "/"));
                std::fs::write(&path, value).map_err(|e| (*key, e))?;
            }
            Ok(())
        })?
        .map_err(|(key, e)| self.io_error(&format!("sysctl {key}"), e))
    }

    pub(crate) fn io_error(&self, what: &str, source: io::Error) -> Error {
        Error::Io {
            netns: self.name.clone(),
            what: what.to_owned(),
            source,
        }
    }

    /// Another handle on this namespace that does not own it: dropping it
    /// does nothing. The lab uses it where one namespace has two names
    /// (a cluster site's node 0 is also its `gateway`), tests where a thread
    /// needs its own handle; the owner must outlive it (inside one
    /// [`Site`](crate::Site) it does).
    pub fn alias(&self) -> Netns {
        Netns {
            name: self.name.clone(),
            armed: false,
        }
    }

    /// Marks the namespace as already torn down by someone else.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.armed {
            teardown(&[self.name.as_str()]);
        }
    }
}

/// A process started with [`Netns::spawn`]; stopped and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    command: String,
}

impl ChildGuard {
    /// The process id (of the program itself: `ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The underlying child, e.g. to take its stdout pipe.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) unless the process has been
    /// reaped already, in which case this does nothing.
    pub fn signal(&mut self, signal: i32) -> Result<(), Error> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: plain kill(2); the pid is our unreaped child, so not reused.
        if unsafe { libc::kill(self.child.id() as libc::pid_t, signal) } != 0 {
            return Err(self.error(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill9(&mut self) -> Result<ExitStatus, Error> {
        self.child.kill().map_err(|e| self.error(e))?;
        self.child.wait().map_err(|e| self.error(e))
    }

    /// SIGTERM, then SIGKILL if it is still running after `grace`; reaps it.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus, Error> {
        self.signal(libc::SIGTERM)?;
        match self.wait_timeout(grace)? {
            Some(status) => Ok(status),
            None => self.kill9(),
        }
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>, Error> {
        self.child.try_wait().map_err(|e| self.error(e))
    }

    fn error(&self, source: io::Error) -> Error {
        Error::Process {
            pid: self.child.id(),
            command: self.command.clone(),
            source,
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.stop(GRACE) {
            eprintln!("causeway-testbed: stopping {}: {e}", self.command);
        }
    }
}

/// Runs a command to completion, with `input` on its stdin; its stdout on
/// success, its stderr in the error otherwise.
pub fn run_command(cmd: &mut Command, input: Option<&str>) -> Result<String, Error> {
    let command = command_line(cmd);
    let spawn_error = |source| Error::Spawn {
        command: command.clone(),
        source,
    };
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(spawn_error)?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(input.as_bytes()).map_err(spawn_error)?;
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        return Err(Error::Command {
            command,
            status: output.status,
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn command_line(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Kills every process in the named namespaces (SIGTERM, then SIGKILL after
/// [`GRACE`]) and deletes them. Never panics; reports failures on stderr.
pub(crate) fn teardown(names: &[&str]) {
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let pids = pids_in(names);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: plain kill(2) of a process found inside our namespaces.
            unsafe { libc::kill(pid, signal) };
        }
        let deadline = Instant::now() + GRACE;
        while !pids_in(names).is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
    for name in names {
        let result = run_command(Command::new("ip").args(["netns", "del", name]), None);
        // Another process's sweep may have deleted it first: only report leftovers.
        if let Err(e) = result
            && PathBuf::from("/run/netns").join(name).exists()
        {
            eprintln!("causeway-testbed: deleting namespace {name}: {e}");
        }
    }
}

/// Processes (other than this one) whose network namespace is one of `names`,
/// found like `ip netns pids` does: by comparing `/proc/PID/ns/net`.
fn pids_in(names: &[&str]) -> Vec<libc::pid_t> {
    let inodes: HashSet<(u64, u64)> = names
        .iter()
        .filter_map(|name| std::fs::metadata(PathBuf::from("/run/netns").join(name)).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as libc::pid_t;
    proc.filter_map(|entry| {
        entry
            .ok()?
            .file_name()
            .to_str()?
            .parse::<libc::pid_t>()
            .ok()
    })
    .filter(|&pid| pid != me)
    .filter(|pid| {
        std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .is_ok_and(|m| inodes.contains(&(m.dev(), m.ino())))
    })
    .collect()
}

/// The pid in a name of the form `cw<pid>x<counter>-…`, or `None` if the name
/// does not match that pattern exactly.
pub(crate) fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("cw")?;
    let (pid, rest) = rest.split_once('x')?;
    let (counter, label) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(counter) || label.is_empty() {
        return None;
    }
    pid.parse().ok()
}

/// Tears down namespaces named `cw<pid>x<counter>-…` whose process no longer
/// exists (left behind by a killed test run). Returns how many it removed.
/// [`Lab::build`](crate::Lab::build) calls this first.
pub fn sweep_stale_namespaces() -> usize {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return 0;
    };
    let stale: Vec<String> = dir
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| owner_pid(name).is_some_and(|pid| !process_exists(pid)))
        .collect();
    let names: Vec<&str> = stale.iter().map(String::as_str).collect();
    teardown(&names);
    names.len()
}

fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks whether the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    alive || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Checks a name that becomes part of a namespace or interface name.
pub(crate) fn check_label(what: &str, label: &str) -> Result<(), Error> {
    let ok = !label.is_empty()
        && label.len() <= 24
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Spec(format!(
            "{what} {label:?}: use 1–24 ASCII letters, digits, '-' or '_'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_matches_only_our_pattern() {
        assert_eq!(owner_pid("cw123x0-a-gw"), Some(123));
        assert_eq!(owner_pid("cw123x45-inet"), Some(123));
        assert_eq!(owner_pid("cw123x-a"), None);
        assert_eq!(owner_pid("cwx1-a"), None);
        assert_eq!(owner_pid("cw12a3x1-a"), None);
        assert_eq!(owner_pid("cw123x1-"), None);
        assert_eq!(owner_pid("cw123x1"), None);
        assert_eq!(owner_pid("xcw123x1-a"), None);
        assert_eq!(owner_pid("netns1"), None);
    }

    #[test]
    fn run_ids_are_unique() {
        assert_ne!(next_id(), next_id());
        assert!(next_id().starts_with(&format!("cw{}x", std::process::id())));
    }
}
