//! `causeway invite` and `causeway join` with the real binary: two sites
//! peer each other without editing their files by hand. No namespaces:
//! only files in temporary directories.

use std::path::Path;
use std::process::{Command, Output};

use causeway::config;

use crate::common::*;

/// A rendezvous key pinned by site a (its private half is not needed here).
const RENDEZVOUS_KEY: &str = "Uxw5597LYTGBKqnK/Jz6KjYh2ZodZF4sbhwR6zaqX2E=";

fn causeway(args: &[&str], config: &Path) -> Output {
    Command::new(causeway_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run causeway")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `causeway invite`: exactly one line, the token.
fn invite(config: &Path) -> String {
    let out = causeway(&["invite"], config);
    assert!(out.status.success(), "invite failed: {}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    text.trim_end().to_owned()
}

/// `causeway join`; on success, the token it printed (its last line).
fn join(config: &Path, token: &str) -> Result<(String, String), String> {
    let out = causeway(&["join", token], config);
    if !out.status.success() {
        return Err(stderr(&out));
    }
    let text = stdout(&out);
    let token = text.lines().last().expect("output").to_owned();
    Ok((text, token))
}

/// Site `name`'s config, with absolute key and state paths in its
/// directory, and `extra` appended as is.
fn write_site(files: &SiteFiles, name: &str, pod_cidr: &str, extra: &str) -> std::path::PathBuf {
    let text = format!(
        "# Site {name}, written by hand.\n[site]\nname = {name:?}\nprivate_key_file = {key:?}\nstate_dir = {state:?}\n\
         pod_cidrs = [{pod_cidr:?}]  # the pod network\n{extra}",
        key = files.path("private.key"),
        state = files.path("state"),
    );
    let path = files.path("causeway.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn parse(path: &Path) -> config::Config<config::Parsed> {
    let text = std::fs::read_to_string(path).expect("read config");
    config::parse(&text, &path.display().to_string()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[test]
fn invite_then_join_back_peers_both_sites() {
    let a = SiteFiles::new();
    let a_path = write_site(
        &a,
        "a",
        "10.0.0.0/16",
        &format!(
            "advertise_endpoints = [\"192.0.2.1:51820\"]\n\n\
             [[rendezvous]]\naddress = \"198.18.0.1:7443\"\npublic_key = {RENDEZVOUS_KEY:?}\n"
        ),
    );
    let b = SiteFiles::new();
    // b already has a peer with an allow rule, and no newline at the end.
    let b_path = write_site(
        &b,
        "b",
        "10.1.0.0/16",
        &format!(
            "\n[[peer]]\nname = \"lab\"\npublic_key = {:?}\ncidrs = [\"10.9.0.0/16\"]\n\n\
             [[peer.allow]]\ncidr = \"10.1.5.0/24\"\nproto = \"tcp\"  # lab: HTTPS only",
            SiteFiles::new().public_key
        ),
    );
    let b_before = std::fs::read_to_string(&b_path).expect("read");

    let token_a = invite(&a_path);
    assert!(
        token_a.starts_with("cw1.") && token_a.len() < 600,
        "{token_a}"
    );
    assert!(!token_a.contains(char::is_whitespace));

    let (report, token_b) = join(&b_path, &token_a).expect("b joins a");
    assert!(report.contains(&a.public_key), "{report}");
    assert!(report.contains("reload"), "{report}");
    assert!(token_b.starts_with("cw1."), "{report}");

    // b's file: what it had, byte for byte, then a and a's rendezvous.
    let b_after = std::fs::read_to_string(&b_path).expect("read");
    assert!(b_after.starts_with(&b_before), "{b_after}");
    let config_b = parse(&b_path);
    let [lab, peer_a] = &config_b.peers[..] else {
        panic!("{:?}", config_b.peers)
    };
    assert_eq!(lab.allow.len(), 1, "the allow rule moved:\n{b_after}");
    assert_eq!(peer_a.name, "a");
    assert_eq!(
        causeway::keys::encode_public(&peer_a.public_key),
        a.public_key
    );
    assert_eq!(peer_a.cidrs, ["10.0.0.0/16".parse().expect("cidr")]);
    assert!(peer_a.allow.is_empty());
    assert_eq!(
        peer_a.endpoint.as_ref().map(|e| e.spec.as_str()),
        Some("192.0.2.1:51820")
    );
    let [rendezvous] = &config_b.rendezvous[..] else {
        panic!("{:?}", config_b.rendezvous)
    };
    assert_eq!(rendezvous.address.spec, "198.18.0.1:7443");
    assert_eq!(
        causeway::keys::encode_public(&rendezvous.public_key),
        RENDEZVOUS_KEY
    );
    // The daemon would load it: key, views and all.
    config::load(&b_path).unwrap_or_else(|e| panic!("{e}\n{b_after}"));

    // a joins b's token back; the rendezvous both pin is not repeated.
    let (report, _) = join(&a_path, &token_b).expect("a joins b");
    assert!(report.contains(&b.public_key), "{report}");
    let config_a = parse(&a_path);
    let [peer_b] = &config_a.peers[..] else {
        panic!("{:?}", config_a.peers)
    };
    assert_eq!(peer_b.name, "b");
    assert_eq!(
        causeway::keys::encode_public(&peer_b.public_key),
        b.public_key
    );
    assert_eq!(peer_b.cidrs, ["10.1.0.0/16".parse().expect("cidr")]);
    assert!(peer_b.endpoint.is_none(), "b advertised no endpoint");
    assert_eq!(config_a.rendezvous.len(), 1);
    config::load(&a_path).unwrap_or_else(|e| panic!("{e}"));

    // Invites still work on the changed files.
    assert_eq!(invite(&a_path), token_a.clone(), "a's token changed");
    assert_ne!(invite(&b_path), token_a);
}

#[test]
fn joining_twice_or_joining_yourself_changes_nothing() {
    let a = SiteFiles::new();
    let a_path = write_site(&a, "a", "10.0.0.0/16", "");
    let b = SiteFiles::new();
    let b_path = write_site(&b, "b", "10.1.0.0/16", "");
    let token_a = invite(&a_path);
    join(&b_path, &token_a).expect("first join");
    let after_first = std::fs::read_to_string(&b_path).expect("read");

    let err = join(&b_path, &token_a).expect_err("second join accepted");
    assert!(
        err.contains("peer[0] \"a\" already has public key"),
        "{err}"
    );
    assert!(err.contains("nothing was changed"), "{err}");
    assert_eq!(std::fs::read_to_string(&b_path).expect("read"), after_first);

    let a_before = std::fs::read_to_string(&a_path).expect("read");
    let err = join(&a_path, &token_a).expect_err("own token accepted");
    assert!(err.contains("this site's own invite"), "{err}");
    assert_eq!(std::fs::read_to_string(&a_path).expect("read"), a_before);

    // A damaged token is refused, and says how to get a good one.
    let err = join(&a_path, &token_a[..token_a.len() - 10]).expect_err("cut token accepted");
    assert!(err.contains("damaged or incomplete"), "{err}");
    let err = join(&a_path, "hello").expect_err("garbage accepted");
    assert!(err.contains("not a Causeway invite token"), "{err}");
    assert_eq!(std::fs::read_to_string(&a_path).expect("read"), a_before);
}

#[test]
fn a_peer_whose_pod_cidrs_overlap_ours_is_joined_with_a_view() {
    let a = SiteFiles::new();
    let a_path = write_site(&a, "a", "10.0.0.0/16", "");
    let b = SiteFiles::new();
    let b_path = write_site(&b, "b", "10.0.0.0/16", "");
    let (report, _) = join(&b_path, &invite(&a_path)).expect("join");
    assert!(
        report.contains("10.0.0.0/16 seen as 100.64.0.0/16"),
        "{report}"
    );
    let config_b = config::load(&b_path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config_b.peers[0].views[0].to_string(),
        "10.0.0.0/16 seen as 100.64.0.0/16"
    );
}

/// A token with `json` inside, as `causeway invite` would print it.
fn token_of(json: &serde_json::Value) -> String {
    use base64::Engine;
    format!(
        "cw1.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string())
    )
}

#[test]
fn a_hostile_token_is_refused_and_changes_nothing() {
    let a = SiteFiles::new();
    let b = SiteFiles::new();
    let b_path = write_site(&b, "b", "10.1.0.0/16", "");
    let before = std::fs::read(&b_path).expect("read");
    let evil_key = SiteFiles::new().public_key;
    // A site name that closes the comment `join` writes and adds a peer of
    // its own, routing half of the IPv4 Internet into the tunnel.
    let injected = format!(
        "x\n[[peer]]\nname = \"evil\"\npublic_key = \"{evil_key}\"\ncidrs = [\"128.0.0.0/1\"]\n#"
    );
    let token = |site: &str, pod_cidrs: &[&str]| {
        token_of(&serde_json::json!({
            "v": 1, "site": site, "public_key": a.public_key, "pod_cidrs": pod_cidrs,
        }))
    };
    let cases = [
        // (token, --name, what the error must say)
        (
            token(&injected, &["10.0.0.0/16"]),
            Some("a"),
            "invalid site: \"x\\n[[peer]]",
        ),
        (
            token(&injected, &["10.0.0.0/16"]),
            None,
            "is not a valid site name",
        ),
        (
            token("a", &["0.0.0.0/1"]),
            None,
            "invalid pod_cidrs[0]: 0.0.0.0/1 is broader than /8",
        ),
        (
            token("a", &["10.0.0.0/16", "::/0"]),
            None,
            "invalid pod_cidrs[1]: ::/0 is the default route",
        ),
        (
            token("a", &["127.0.0.0/8"]),
            None,
            "invalid pod_cidrs[0]: 127.0.0.0/8 overlaps 127.0.0.0/8 (loopback)",
        ),
    ];
    for (token, name, expected) in cases {
        let mut args = vec!["join", token.as_str()];
        if let Some(name) = name {
            args.extend(["--name", name]);
        }
        let out = causeway(&args, &b_path);
        let err = stderr(&out);
        assert!(
            !out.status.success(),
            "{args:?} was accepted:\n{}\n{}",
            stdout(&out),
            String::from_utf8_lossy(&std::fs::read(&b_path).expect("read"))
        );
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(err.contains("ask the other site for a new token"), "{err}");
        assert_eq!(stdout(&out), "", "{args:?}");
        assert_eq!(
            std::fs::read(&b_path).expect("read"),
            before,
            "{args:?} changed the file"
        );
    }
}
