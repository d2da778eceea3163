//! What /proc says about processes and the machine.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// User + system CPU time of a process, all its threads (live and exited),
/// in seconds, from `/proc/<pid>/stat`. `None` once the process is gone.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, secs)| secs)
}

/// Restricts every thread of process `pid` to `cpus` (threads it starts
/// later inherit the set from their creator).
pub(crate) fn pin_threads(pid: u32, cpus: &[usize]) -> anyhow::Result<()> {
    use anyhow::Context as _;
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        anyhow::ensure!(cpu < libc::CPU_SETSIZE as usize, "no CPU {cpu}");
        // SAFETY: `cpu` is within the set (checked above).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("the threads of process {pid}"))?;
    for task in tasks {
        let tid: i32 = task?.file_name().to_string_lossy().parse()?;
        // SAFETY: a valid set of the size given.
        let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
        anyhow::ensure!(
            rc == 0,
            "sched_setaffinity(thread {tid} of {pid}, CPUs {cpus:?}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A thread's id, name and user + system CPU seconds.
pub(crate) type ThreadCpu = (u32, String, f64);

/// User + system CPU seconds of each live thread of process `pid`, by
/// thread id, with the thread's name.
pub(crate) fn thread_cpu_seconds(pid: u32) -> Vec<ThreadCpu> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let tid: u32 = t.ok()?.file_name().to_string_lossy().parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
            let (name, secs) = parse_stat(&stat)?;
            Some((tid, name, secs))
        })
        .collect()
}

/// The command name and user + system CPU seconds of a `stat` line.
fn parse_stat(stat: &str) -> Option<(String, f64)> {
    // The command name (field 2) is in parentheses and may hold spaces;
    // the fields after it are plain.
    let name = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?.to_owned();
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    Some((name, (utime + stime) as f64 / ticks))
}

/// How busy a thread was over an interval, in % of one CPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ThreadLoad {
    /// `<process>/<thread name>`, e.g. `a/cw-outbound`.
    pub(crate) thread: String,
    pub(crate) percent: f64,
    /// CPU seconds over the interval: divided by the bytes a test moved,
    /// the thread's cost per byte, whatever the interval's edges.
    #[serde(default)]
    pub(crate) cpu_seconds: f64,
}

/// The threads that were busy at least `min_percent` of one CPU between
/// two snapshots of [`thread_cpu_seconds`] taken `seconds` apart, busiest
/// first; `process` names the process.
pub(crate) fn busy_threads(
    process: &str,
    before: &[ThreadCpu],
    after: &[ThreadCpu],
    seconds: f64,
    min_percent: f64,
) -> Vec<ThreadLoad> {
    let mut loads: Vec<ThreadLoad> = after
        .iter()
        .map(|(tid, name, end)| {
            let start = before
                .iter()
                .find(|(t, _, _)| t == tid)
                .map_or(0.0, |b| b.2);
            ThreadLoad {
                thread: format!("{process}/{name}"),
                percent: (end - start) / seconds * 100.0,
                cpu_seconds: end - start,
            }
        })
        .filter(|l| l.percent >= min_percent)
        .collect();
    loads.sort_by(|a, b| b.percent.total_cmp(&a.percent));
    loads
}

/// Peak resident set size (`VmHWM`) of a process, in KiB.
pub(crate) fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// Resident set size now (`VmRSS`) of a process, in KiB.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// A `kB` field of `/proc/<pid>/status`.
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The UDP ports bound in the network namespace of process `pid`:
/// `/proc/<pid>/net/udp` and `udp6` list every socket of that namespace,
/// whichever process holds it.
pub(crate) fn udp_ports(pid: u32) -> Vec<u16> {
    let mut ports = Vec::new();
    for table in ["udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        // `  sl  local_address rem_address ...`, then `0: 0100007F:1D13 ...`.
        ports.extend(text.lines().skip(1).filter_map(|line| {
            let local = line.split_whitespace().nth(1)?;
            u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()
        }));
    }
    ports
}

/// Whether process `pid` is in the network namespace bound at `ns`
/// (`/run/netns/<name>`): the same nsfs inode, as `ip netns identify` checks.
pub(crate) fn in_netns(pid: u32, ns: &Path) -> bool {
    match (
        std::fs::metadata(format!("/proc/{pid}/ns/net")),
        std::fs::metadata(ns),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The machine a report was measured on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Machine {
    pub(crate) nproc: usize,
    pub(crate) cpu_model: String,
    pub(crate) kernel: String,
    pub(crate) memory_gib: f64,
}

impl Machine {
    pub(crate) fn this() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, m)| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| k.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            kernel,
            memory_gib: (kib / (1024.0 * 1024.0) * 10.0).round() / 10.0,
        }
    }
}

/// Now, as `YYYY-MM-DD HH:MM UTC`.
pub(crate) fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc(secs)
}

fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (h, m) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{d:02} {h:02}:{m:02} UTC")
}

/// Field `name` of the `Udp:` lines of a `/proc/<pid>/net/snmp` text.
pub(crate) fn snmp_udp_field(text: &str, name: &str) -> Option<u64> {
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc(1_767_225_600 + 3600 + 120), "2026-01-01 01:02 UTC");
    }

    #[test]
    fn this_process_has_cpu_and_memory() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(peak_rss_kib(me).is_some_and(|k| k > 0));
        assert!(Machine::this().nproc >= 1);
    }

    #[test]
    fn reads_thread_names_and_cpu() {
        let (name, secs) = parse_stat("42 (cw outbound) R 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3")
            .expect("parsed");
        assert_eq!(name, "cw outbound");
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert!((secs - 300.0 / ticks).abs() < 1e-9);
        let me = thread_cpu_seconds(std::process::id());
        assert!(!me.is_empty());
    }

    #[test]
    fn busy_threads_are_the_deltas_over_the_interval() {
        let before = vec![
            (1, "cw-outbound".to_owned(), 10.0),
            (2, "tokio".to_owned(), 1.0),
        ];
        let after = vec![
            (1, "cw-outbound".to_owned(), 11.9),
            (2, "tokio".to_owned(), 1.02),
            // Started during the interval.
            (3, "cw-inbound".to_owned(), 0.5),
        ];
        let loads = busy_threads("a", &before, &after, 2.0, 5.0);
        let got: Vec<(&str, i64)> = loads
            .iter()
            .map(|l| (l.thread.as_str(), l.percent.round() as i64))
            .collect();
        assert_eq!(got, vec![("a/cw-outbound", 95), ("a/cw-inbound", 25)]);
        assert!((loads[0].cpu_seconds - 1.9).abs() < 1e-9);
    }

    #[test]
    fn pins_every_thread_of_a_process() {
        let affinity = |pid: u32| {
            // SAFETY: a zeroed set is valid; the call fills it.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: a valid set and its size.
            let rc = unsafe {
                libc::sched_getaffinity(pid as i32, std::mem::size_of_val(&set), &mut set)
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            (0..libc::CPU_SETSIZE as usize)
                // SAFETY: `c` is within the set.
                .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
                .collect::<Vec<_>>()
        };
        let first = affinity(std::process::id())[0];
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .expect("sleep");
        let pinned = pin_threads(child.id(), &[first]).map(|()| affinity(child.id()));
        let refused = pin_threads(child.id(), &[libc::CPU_SETSIZE as usize]);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(pinned.expect("pinned"), vec![first]);
        assert!(refused.is_err());
    }

    #[test]
    fn sees_a_bound_udp_port() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = socket.local_addr().expect("addr").port();
        assert!(udp_ports(std::process::id()).contains(&port));
        let own = format!("/proc/{}/ns/net", std::process::id());
        assert!(in_netns(std::process::id(), Path::new(&own)));
        assert!(!in_netns(std::process::id(), Path::new("/nonexistent")));
    }
}
