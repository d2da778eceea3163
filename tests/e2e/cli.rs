//! The command line: keys that interoperate with `wg`, and bad configs that
//! are refused before anything on the host changes.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::common::*;

fn run_with_stdin(program: &str, args: &[&str], input: &str) -> String {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{program} {args:?} failed");
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn keys_move_freely_between_causeway_and_wg() {
    let ours = Command::new(causeway_bin())
        .arg("genkey")
        .output()
        .expect("genkey");
    let ours = String::from_utf8(ours.stdout).expect("utf-8");
    assert_eq!(ours.trim().len(), 44);
    assert_eq!(
        run_with_stdin(causeway_bin(), &["pubkey"], &ours),
        run_with_stdin("wg", &["pubkey"], &ours)
    );

    let theirs = String::from_utf8(
        Command::new("wg")
            .arg("genkey")
            .output()
            .expect("wg genkey")
            .stdout,
    )
    .expect("utf-8");
    assert_eq!(
        run_with_stdin(causeway_bin(), &["pubkey"], &theirs),
        run_with_stdin("wg", &["pubkey"], &theirs)
    );

    let bad = Command::new(causeway_bin())
        .arg("pubkey")
        .stdin(Stdio::null())
        .output()
        .expect("pubkey");
    assert!(!bad.status.success());
}

#[test]
fn a_bad_config_is_refused_with_every_problem_and_nothing_changes() {
    let lab = two_sites();
    let gw = &lab.site("a").gateway;
    let files = SiteFiles::new();
    let text = format!(
        "[site]\nname = \"a\"\nprivate_key_file = {key:?}\npod_cidrs = [\"10.0.0.0/33\"]\ncontrol_socket = {sock:?}\ncolour = \"blue\"\n\n\
         [[peer]]\nname = \"b\"\npublic_key = \"not-a-key\"\ncidrs = [\"10.1.0.0/16\"]\n\n\
         [[peer]]\nname = \"b\"\npublic_key = {pk:?}\ncidrs = [\"10.1.2.0/24\"]\n\n\
         [[peer.allow]]\ncidr = \"10.0.5.0/24\"\nproto = \"sctp\"\n",
        key = files.path("private.key"),
        sock = files.socket(),
        pk = files.public_key,
    );
    let path = files.path("bad.toml");
    std::fs::write(&path, text).expect("write");
    let links_before = gw.ip(&["-o", "link"]).expect("links");
    let out = gw
        .command(causeway_bin())
        .args(["up", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "bad config accepted");
    // Unknown keys are reported first by serde; the rest on a second pass.
    assert!(
        stderr.contains("colour"),
        "unknown key not named:\n{stderr}"
    );
    assert_eq!(
        gw.ip(&["-o", "link"]).expect("links"),
        links_before,
        "the network changed"
    );
    assert!(!files.socket().exists());

    // Without the unknown key every remaining problem is listed at once.
    let text = std::fs::read_to_string(&path)
        .expect("read")
        .replace("colour = \"blue\"\n", "");
    std::fs::write(&path, text).expect("write");
    let out = gw
        .command(causeway_bin())
        .args(["up", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for needle in ["10.0.0.0/33", "public_key", "already used", "sctp"] {
        assert!(
            stderr.to_lowercase().contains(needle),
            "{needle:?} not reported:\n{stderr}"
        );
    }
    assert_eq!(
        gw.ip(&["-o", "link"]).expect("links"),
        links_before,
        "the network changed"
    );
}
