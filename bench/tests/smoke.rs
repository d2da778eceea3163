//! The lab's smoke run: one run of every system in the `lan` scenario with
//! short tests. It proves that the tool builds labs, starts every system
//! it can, measures, tears down and writes a well-formed report; it asserts
//! nothing about speed. Systems whose tools are missing (boringtun-cli on a
//! fresh machine, causeway when its binary was not built next to this
//! one) must show up as skipped, never as numbers. Causeway through NATs
//! and through the relay must be measured wherever plain causeway is: their
//! cells fail unless the daemons report the expected path.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const SYSTEMS: [&str; 9] = [
    "raw",
    "causeway",
    "causeway-remap",
    "causeway-nat",
    "causeway-relay",
    "causeway-relay-quic",
    "causeway-tcp",
    "wireguard-go",
    "boringtun-cli",
];
const METRICS: [&str; 14] = [
    "tcp1_gbps",
    "tcp4_gbps",
    "udp_gbps",
    "udp_loss_percent",
    "udp_jitter_ms",
    "rtt_idle_p50_ms",
    "rtt_idle_p99_ms",
    "rtt_idle_p999_ms",
    "rtt_loaded_p50_ms",
    "rtt_loaded_p99_ms",
    "cpu_seconds_per_gb",
    "peak_rss_mib",
    "setup_ms",
    "wan_cpu_seconds",
];

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn lab_smoke_writes_a_well_formed_report() {
    if !is_root() {
        eprintln!("skipped: the lab needs root (network namespaces)");
        return;
    }
    let out = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_causeway-bench"))
        .args([
            "lab",
            "--scenario",
            "lan",
            "--runs",
            "1",
            "--seconds",
            "0.5",
            "--udp-bitrate",
            "200M",
            "--out",
        ])
        .arg(out.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run causeway-bench lab");
    let pid = child.id();
    let run = child
        .wait_with_output()
        .expect("wait for causeway-bench lab");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "causeway-bench lab failed:\n{stdout}\n{stderr}"
    );
    eprintln!("{stdout}");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the smoke run took {:?}",
        started.elapsed()
    );

    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("report.json")).expect("report.json"),
    )
    .expect("valid JSON");
    assert_eq!(json["runs"], 1);
    assert!(json["machine"]["nproc"].as_u64().is_some_and(|n| n >= 1));
    let scenarios = json["scenarios"].as_array().expect("scenarios");
    assert_eq!(scenarios.len(), 1);
    let sc = &scenarios[0];
    let cells = sc["cells"].as_array().expect("cells");
    assert_eq!(cells.len(), SYSTEMS.len(), "one cell per system");
    for (cell, system) in cells.iter().zip(SYSTEMS) {
        assert_eq!(cell["system"], system);
        match cell["status"].as_str().expect("status") {
            "measured" => {
                let metrics = cell["metrics"].as_object().expect("metrics");
                for name in METRICS {
                    check_metric(system, name, &metrics[name]);
                }
            }
            "skipped" | "not_built" | "failed" => {
                assert!(
                    cell["reason"].as_str().is_some_and(|r| !r.is_empty()),
                    "{system}: a {} cell needs a reason",
                    cell["status"]
                );
                assert!(
                    cell.get("metrics").is_none(),
                    "{system}: no numbers for a cell that was not measured"
                );
            }
            other => panic!("{system}: unknown status {other}"),
        }
    }
    let causeway = cells
        .iter()
        .find(|c| c["system"] == "causeway")
        .expect("cell");
    for system in ["causeway-nat", "causeway-relay", "causeway-tcp"] {
        let cell = cells.iter().find(|c| c["system"] == system).expect("cell");
        assert_ne!(cell["status"], "not_built", "{system}");
        if causeway["status"] == "measured" {
            assert_eq!(cell["status"], "measured", "{system}: {}", cell["reason"]);
            let setup = &cell["metrics"]["setup_ms"]["value"];
            assert!(
                setup.as_f64().is_some_and(|ms| ms > 0.0),
                "{system}: setup {setup}"
            );
        }
    }

    let summary = sc["summary"].as_array().expect("summary");
    assert_eq!(summary.len(), SYSTEMS.len());
    let md = std::fs::read_to_string(out.path().join("report.md")).expect("report.md");
    for s in summary {
        let name = s["system"].as_str().expect("system name");
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no row for {name} in:\n{md}"));
        let cells: Vec<&str> = row
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .skip(1)
            .collect();
        assert!(!cells.is_empty());
        for text in cells {
            let ok = text == "—"
                || text == "skipped"
                || text == "not built"
                || text == "failed"
                || text
                    .split_whitespace()
                    .next()
                    .is_some_and(|n| n.parse::<f64>().is_ok_and(f64::is_finite));
            assert!(ok, "{name}: cell {text:?} is neither a number nor a marker");
        }
        if s["status"] != "measured" {
            assert!(
                !row.chars().any(|c| c.is_ascii_digit()),
                "{name} is {} but its row has numbers: {row}",
                s["status"]
            );
        }
    }
    assert!(!md.contains("NaN") && !md.contains("| inf"), "{md}");
    let svg = std::fs::read_to_string(out.path().join("report.svg")).expect("report.svg");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(!svg.contains("NaN"));
    assert_no_leftovers(pid);
}

/// A short `causeway-bench abuse`: the attack runs against a live
/// rendezvous and the legitimate pair still registers and relays.
#[test]
fn abuse_smoke_the_pair_gets_through_the_attack() {
    if !lab_ready() {
        return;
    }
    let (r, pid) = bench_json(&[
        "abuse",
        "--connections",
        "150",
        "--strangers",
        "2",
        "--seconds",
        "3",
        "--json",
    ]);
    assert_eq!(r["path"], "relay", "{r}");
    let registration = r["registration_ms"].as_u64().expect("registration_ms");
    let relayed = r["first_relayed_ms"].as_u64().expect("first_relayed_ms");
    assert!(registration > 0 && relayed >= registration, "{r}");
    let attack = &r["attack"];
    assert!(attack["attempts"].as_u64().is_some_and(|n| n >= 150), "{r}");
    assert!(
        attack["registrations"].as_u64().is_some_and(|n| n > 0),
        "{r}"
    );
    assert!(attack["replays"].as_u64().is_some_and(|n| n > 0), "{r}");
    assert_eq!(attack["replays_welcomed"], 0, "{r}");
    assert!(r["rss_peak_mib"].as_f64().is_some_and(|m| m > 0.0), "{r}");
    assert_no_leftovers(pid);
}

#[test]
fn failover_smoke_measures_a_takeover() {
    if !lab_ready() {
        return;
    }
    let keepalived = Command::new("keepalived")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !keepalived.is_ok_and(|s| s.success()) {
        eprintln!("skipped: keepalived is not installed (apt-get install keepalived)");
        return;
    }
    // The quickest cell: static endpoints, kill -9, 1 s after the failure.
    let (r, pid) = bench_json(&[
        "failover",
        "--runs",
        "1",
        "--paths",
        "static",
        "--failure",
        "kill9",
        "--after",
        "1",
        "--json",
    ]);
    assert_eq!(r["failed"], serde_json::json!([]), "{r}");
    let cell = &r["cells"][0];
    assert_eq!(
        (cell["paths"].as_str(), cell["failure"].as_str()),
        (Some("static"), Some("kill9")),
        "{r}"
    );
    assert_eq!(cell["runs"], 1, "{r}");
    let one = &r["runs"][0];
    // Measured, whatever the value: timings are the benchmark's business.
    for field in ["gap_ms", "first_reply_ms", "takeover_ms", "failback_gap_ms"] {
        assert!(
            one[field]
                .as_f64()
                .is_some_and(|v| v.is_finite() && v > 0.0),
            "{field}: {r}"
        );
    }
    assert_eq!(one["path_after"], "static", "{r}");
    assert_eq!(one["failback_roles_ok"], true, "{r}");
    assert_no_leftovers(pid);
}

/// A short `causeway-bench wide`: 1 and 20 peers (19 simulated), one
/// round. Asserts what happened, never how fast: every handshake
/// completed, every simulated peer got traffic it could decrypt and
/// answered, TCP crossed, and the reload restarted no other session.
#[test]
fn wide_smoke_twenty_peers_all_handshake_and_a_reload_disturbs_no_other() {
    if !lab_ready() {
        return;
    }
    let (r, pid) = bench_json(&[
        "wide",
        "--peers",
        "1,20",
        "--runs",
        "1",
        "--seconds",
        "1",
        "--json",
    ]);
    assert!(
        r["machine"]["nproc"].as_u64().is_some_and(|n| n >= 1),
        "{r}"
    );
    let runs = r["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "one run per number of peers");
    let summaries = r["summaries"].as_array().expect("summaries");
    assert_eq!(summaries.len(), 2);
    assert_eq!(summaries[1]["peers"], 20);
    assert!(summaries[1]["tcp_ratio_median"].as_f64().is_some(), "{r}");
    for run in runs {
        let n = run["peers"].as_u64().expect("peers");
        assert_eq!(run["handshakes_completed"], n, "{run}");
        let positive = |v: &Value| {
            v.as_array().is_some_and(|a| {
                !a.is_empty() && a.iter().all(|g| g.as_f64().is_some_and(|g| g > 0.0))
            })
        };
        assert!(positive(&run["tcp_gbps"]), "{run}");
        assert!(
            run["rss_after_traffic_kib"].as_u64().is_some_and(|k| k > 0),
            "{run}"
        );
        if n == 1 {
            assert!(run["reload"].is_null(), "{run}");
            continue;
        }
        assert!(run["sims_handshakes_ms"].as_u64().is_some(), "{run}");
        assert_eq!(run["traffic_answered"], n - 1, "{run}");
        assert_eq!(run["traffic_decrypted"], n - 1, "{run}");
        assert!(positive(&run["tcp_1peer_gbps"]), "{run}");
        let reload = &run["reload"];
        assert_eq!(
            reload["other_sessions_restarted"],
            serde_json::json!([]),
            "{run}"
        );
        assert_eq!(reload["moved_answers"], true, "{run}");
        assert!(
            reload["train_sent"].as_u64().is_some_and(|s| s > 0),
            "{run}"
        );
        assert_eq!(run["daemon_initiated_answered"], n, "{run}");
        assert_eq!(run["daemon_initiated_handshakes"], n, "{run}");
    }
    assert_no_leftovers(pid);
}

/// A short `causeway-bench rendezvous`: 200 real sites register with a
/// real rendezvous, churn, and relay. Asserts facts, never timings.
#[test]
fn rendezvous_smoke_every_site_registers_and_hears_its_peers() {
    if !lab_ready() {
        return;
    }
    let (r, pid) = bench_json(&[
        "rendezvous",
        "--sites",
        "200",
        "--idle",
        "0.5",
        "--churn",
        "2",
        "--churn-percent",
        "5",
        "--relay-pairs",
        "4",
        "--relay-seconds",
        "0.5",
        "--json",
    ]);
    let size = &r["sizes"][0];
    let g = &size["generator"];
    assert_eq!(size["sites"], 200, "{r}");
    // Every site welcomed and registered, nobody refused.
    assert_eq!(g["welcomed"], 200, "{r}");
    assert_eq!(g["registered"], 200, "{r}");
    assert_eq!(size["rendezvous_counters"]["refused"], 0.0, "{r}");
    assert_eq!(g["errors"], serde_json::json!([]), "{r}");
    // Churn happened (5 % of 200 a second for 2 s: 20 changes), and every
    // update a register caused reached every peer: none missing, and
    // afterwards every site sees each peer online with its latest
    // candidates.
    let changes =
        g["reconnects"].as_u64().unwrap_or(0) + g["reregistrations"].as_u64().unwrap_or(0);
    assert_eq!(changes, 20, "{r}");
    assert!(
        g["churn_latency"]["count"].as_u64().is_some_and(|n| n > 0),
        "{r}"
    );
    assert_eq!(g["missing"], 0, "{r}");
    assert!(g["views_checked"].as_u64().is_some_and(|n| n >= 600), "{r}");
    assert_eq!(g["views_stale"], 0, "{r}");
    // The relay delivered packets to every pair.
    let relay = &g["relay"];
    assert_eq!(relay["pairs"], 4, "{r}");
    assert!(
        relay["received_packets"].as_u64().is_some_and(|n| n > 0),
        "{r}"
    );
    assert_eq!(relay["silent_pairs"], 0, "{r}");
    assert!(
        size["rss_registered_kib"].as_u64().is_some_and(|k| k > 0),
        "{r}"
    );
    assert_no_leftovers(pid);
}

/// Whether the lab can run here: root, and `causeway` built next to the
/// benchmark. Says why not.
fn lab_ready() -> bool {
    if !is_root() {
        eprintln!("skipped: the lab needs root (network namespaces)");
        return false;
    }
    let bench = Path::new(env!("CARGO_BIN_EXE_causeway-bench"));
    if !bench.with_file_name("causeway").exists() {
        eprintln!("skipped: build the causeway binary first (cargo build -p causeway)");
        return false;
    }
    true
}

/// Runs `causeway-bench args` to its end: its JSON report, and its pid for
/// [`assert_no_leftovers`]. Fails the test with its output if it failed.
fn bench_json(args: &[&str]) -> (Value, u32) {
    let child = Command::new(env!("CARGO_BIN_EXE_causeway-bench"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run causeway-bench");
    let pid = child.id();
    let run = child.wait_with_output().expect("wait for causeway-bench");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "causeway-bench {args:?} failed:\n{stdout}\n{stderr}"
    );
    eprintln!("{stderr}\n{stdout}");
    let report = serde_json::from_str(&stdout).expect("a JSON report");
    (report, pid)
}

fn check_metric(system: &str, name: &str, v: &Value) {
    match v {
        Value::String(s) => assert_eq!(s, "not_applicable", "{system} {name}"),
        Value::Object(o) if o.contains_key("value") => {
            assert!(
                o["value"].as_f64().is_some_and(f64::is_finite),
                "{system} {name}: {v}"
            );
        }
        Value::Object(o) if o.contains_key("failed") => {
            assert!(
                o["failed"].as_str().is_some_and(|r| !r.is_empty()),
                "{system} {name}: {v}"
            );
        }
        other => panic!("{system} {name}: {other} is neither a value nor a marker"),
    }
}

/// The lab removed its namespaces (`cw<pid>x…`) and UAPI sockets
/// (`cwb<pid % 100000>…`).
fn assert_no_leftovers(pid: u32) {
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let prefix = format!("cw{pid}x");
    let names = String::from_utf8_lossy(&netns.stdout).into_owned();
    let left: Vec<&str> = names.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let prefix = format!("cwb{}", pid % 100_000);
    let sockets: Vec<String> = std::fs::read_dir(Path::new("/var/run/wireguard"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| {
                    n.strip_prefix(&prefix)
                        .is_some_and(|rest| rest.starts_with(['a', 'b']))
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(sockets.is_empty(), "UAPI sockets left behind: {sockets:?}");
}
