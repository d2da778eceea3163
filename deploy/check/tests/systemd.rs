//! The systemd units: `systemd-analyze verify` finds nothing to say, the
//! exposure scores of `systemd-analyze security --offline=yes` stay at or
//! below the ones recorded in docs/deploy.md, the sandbox still lets the
//! daemon do its job, and the sysusers/tmpfiles snippets apply.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use causeway_deploy_check::{both, ensure_command, or_skip, repo_root, run, unit_settings};

const UNITS: [&str; 3] = [
    "causeway.service",
    "causeway-rendezvous.service",
    "causeway-node.service",
];
/// Where the units expect the binary.
const BINARY: &str = "/usr/local/bin/causeway";

fn work() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy-check")
}

fn unit(name: &str) -> PathBuf {
    repo_root().join("systemd").join(name)
}

fn systemd_tool(command: &str) -> Option<PathBuf> {
    or_skip(command, ensure_command(&work(), command, "systemd"))
}

fn values(settings: &[(String, String, String)], key: &str) -> Vec<String> {
    settings
        .iter()
        .filter(|(_, k, _)| k == key)
        .map(|(_, _, v)| v.clone())
        .collect()
}

fn value(settings: &[(String, String, String)], key: &str) -> String {
    let all = values(settings, key);
    assert_eq!(all.len(), 1, "expected exactly one {key}=, found {all:?}");
    all[0].clone()
}

#[test]
fn units_pass_systemd_analyze_verify_without_a_warning() {
    let Some(analyze) = systemd_tool("systemd-analyze") else {
        return;
    };
    // verify insists that ExecStart's binary exists: copies of the units,
    // identical but for that path, point at a stub.
    let dir = tempfile::tempdir().expect("tempdir");
    let stub = dir.path().join("causeway-stub");
    fs::write(&stub, "#!/bin/sh\nexit 0\n").expect("write stub");
    fs::set_permissions(&stub, fs::Permissions::from_mode(0o755)).expect("chmod stub");
    let mut copies = Vec::new();
    for name in UNITS {
        let text = fs::read_to_string(unit(name)).expect("read unit");
        let needle = format!("ExecStart={BINARY} ");
        assert!(
            text.contains(&needle),
            "{name}: ExecStart does not run {BINARY}"
        );
        let copy = dir.path().join(name);
        let text = text.replace(&needle, &format!("ExecStart={} ", stub.display()));
        fs::write(&copy, text).expect("write copy");
        copies.push(copy);
    }
    let out = run(Command::new(analyze).arg("verify").args(&copies));
    // verify exits 0 on unknown keys and unparsable values (it only warns),
    // so any output at all is a failure.
    assert!(
        out.status.success() && both(&out).trim().is_empty(),
        "systemd-analyze verify:\n{}",
        both(&out)
    );
}

/// The scores recorded in docs/deploy.md: rows `| `systemd/<unit>` | <score> |`.
fn recorded_score(unit: &str) -> f64 {
    let docs = fs::read_to_string(repo_root().join("docs/deploy.md")).expect("read docs/deploy.md");
    let tag = format!("`systemd/{unit}`");
    docs.lines()
        .filter(|line| line.trim_start().starts_with('|'))
        .find_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            (cells.get(1) == Some(&tag.as_str()))
                .then(|| cells.get(2)?.parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("docs/deploy.md has no row `| {tag} | <score> |`"))
}

#[test]
fn exposure_scores_stay_at_or_below_the_recorded_ones() {
    let Some(analyze) = systemd_tool("systemd-analyze") else {
        return;
    };
    let version = run(Command::new(&analyze).arg("--version"));
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    for name in UNITS {
        let out = run(Command::new(&analyze)
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(unit(name)));
        let text = both(&out);
        // "→ Overall exposure level for causeway.service: 1.7 OK 🙂"
        let score: f64 = text
            .lines()
            .find_map(|l| {
                l.split_once(&format!("Overall exposure level for {name}: "))?
                    .1
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no overall exposure level for {name} in:\n{text}"));
        let recorded = recorded_score(name);
        assert!(
            score <= recorded,
            "{name}: exposure {score} is above the {recorded} recorded in docs/deploy.md ({version}):\n{text}"
        );
        eprintln!("{name}: exposure {score} (recorded {recorded}, {version})");
    }
}

/// Hardening must not take away what the site daemon needs to work.
#[test]
fn gateway_sandbox_keeps_what_the_daemon_needs() {
    let s = unit_settings(&unit("causeway.service"));
    assert_eq!(value(&s, "Type"), "notify");
    assert_eq!(value(&s, "NotifyAccess"), "main");
    assert!(!value(&s, "WatchdogSec").is_empty());
    assert_eq!(value(&s, "CapabilityBoundingSet"), "CAP_NET_ADMIN");
    assert_eq!(value(&s, "AmbientCapabilities"), "CAP_NET_ADMIN");
    assert_eq!(
        value(&s, "User"),
        "causeway",
        "the user that causeway.sysusers creates"
    );
    let families = value(&s, "RestrictAddressFamilies");
    for family in ["AF_NETLINK", "AF_UNIX", "AF_INET", "AF_INET6"] {
        assert!(
            families.split_whitespace().any(|f| f == family),
            "RestrictAddressFamilies lacks {family}"
        );
    }
    assert_eq!(values(&s, "DeviceAllow"), ["/dev/net/tun rw"]);
    assert!(
        values(&s, "PrivateDevices").is_empty(),
        "PrivateDevices= hides /dev/net/tun"
    );
    assert!(
        values(&s, "PrivateNetwork").is_empty() && values(&s, "PrivateUsers").is_empty(),
        "the daemon configures the host's network: no private network or user namespace"
    );
    // Its directories: config read-only, key and views.json, control socket,
    // and the wg(8) UAPI directory that causeway.tmpfiles creates.
    assert_eq!(value(&s, "ConfigurationDirectory"), "causeway");
    assert_eq!(value(&s, "StateDirectory"), "causeway");
    assert_eq!(value(&s, "RuntimeDirectory"), "causeway");
    assert_eq!(value(&s, "ReadWritePaths"), "-/run/wireguard");
    let exec = value(&s, "ExecStart");
    assert!(
        exec.starts_with(&format!("{BINARY} up --config /etc/causeway/")),
        "{exec}"
    );
    // The syscall filter returns EPERM instead of killing the daemon on a
    // call nobody foresaw.
    assert_eq!(value(&s, "SystemCallErrorNumber"), "EPERM");
}

#[test]
fn rendezvous_sandbox_has_no_privilege() {
    let s = unit_settings(&unit("causeway-rendezvous.service"));
    assert_eq!(value(&s, "Type"), "notify");
    assert_eq!(value(&s, "DynamicUser"), "yes");
    assert_eq!(
        value(&s, "CapabilityBoundingSet"),
        "",
        "an empty bounding set: no capability"
    );
    assert!(values(&s, "AmbientCapabilities").is_empty());
    assert_eq!(value(&s, "PrivateDevices"), "yes");
    assert_eq!(value(&s, "PrivateUsers"), "yes");
    assert_eq!(
        value(&s, "RestrictAddressFamilies"),
        "AF_UNIX AF_INET AF_INET6"
    );
    let exec = value(&s, "ExecStart");
    assert!(
        exec.starts_with(&format!("{BINARY} rendezvous --config /etc/causeway/")),
        "{exec}"
    );
}

#[test]
fn sysusers_and_tmpfiles_snippets_apply_to_an_empty_root() {
    let Some(sysusers) = systemd_tool("systemd-sysusers") else {
        return;
    };
    let Some(tmpfiles) = systemd_tool("systemd-tmpfiles") else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    fs::create_dir_all(root.path().join("etc")).expect("mkdir etc");
    fs::create_dir_all(root.path().join("run")).expect("mkdir run");
    let out = run(Command::new(sysusers)
        .arg(format!("--root={}", root.path().display()))
        .arg(repo_root().join("systemd/causeway.sysusers")));
    assert!(out.status.success(), "systemd-sysusers: {}", both(&out));
    let passwd = fs::read_to_string(root.path().join("etc/passwd")).expect("passwd");
    let user = passwd
        .lines()
        .find(|l| l.starts_with("causeway:"))
        .unwrap_or_else(|| panic!("no causeway user in {passwd}"));
    let fields: Vec<&str> = user.split(':').collect();
    assert_eq!(fields[5], "/var/lib/causeway", "{user}");
    let gid: u32 = fields[3].parse().expect("gid");

    let out = run(Command::new(tmpfiles)
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(repo_root().join("systemd/causeway.tmpfiles")));
    assert!(
        out.status.success() && both(&out).trim().is_empty(),
        "systemd-tmpfiles: {}",
        both(&out)
    );
    let dir = fs::metadata(root.path().join("run/wireguard")).expect("/run/wireguard created");
    assert!(dir.is_dir());
    // Sticky: the causeway group may add its socket but not remove or
    // replace the sockets of other WireGuard implementations.
    assert_eq!(dir.mode() & 0o7777, 0o1770);
    assert_eq!((dir.uid(), dir.gid()), (0, gid), "root:causeway");
}
