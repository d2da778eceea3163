//! The container image: `scripts/build-image.sh` builds it with buildah from
//! scratch (no base image can be pulled here) around the binary these tests
//! use, and the gateway then runs once from the image's root file system in
//! a lab namespace: `ip netns exec` + a private mount namespace + `chroot`
//! into the mounted image, with `/dev/net/tun` and `/proc` mounted in as a
//! container runtime would. That is not a container runtime (no cgroups,
//! no seccomp, no capability drop): it checks that the image holds
//! everything the binary needs and that the gateway comes up from it,
//! ready, and stops cleanly. `causeway genkey` also runs from it under
//! runc, as the image's user with no capability. The image's config is
//! compared with the
//! Containerfile's runtime stage, which this test does not build (its base
//! images cannot be pulled here; docs/failover-kubernetes.md says what is
//! and is not checked).
//!
//! buildah's storage is a temporary directory of this test, removed when it
//! ends (also on failure), so nothing is left in the system's storage.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use causeway_testbed::Netns;

use crate::common::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// buildah with a private storage, removed on drop.
struct Storage {
    dir: tempfile::TempDir,
}

impl Storage {
    fn new() -> Self {
        assert!(
            Command::new("buildah").arg("--version").output().is_ok(),
            "buildah is missing: scripts/test.sh installs it (scripts/deps.sh)"
        );
        Storage {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--root".into(),
            self.dir.path().join("root").display().to_string(),
            "--runroot".into(),
            self.dir.path().join("run").display().to_string(),
        ]
    }

    fn buildah(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.args(["--storage-driver", "vfs"]).args(self.args());
        cmd
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        // Working containers first; vfs layers are plain directories that
        // the temporary directory's removal takes with it.
        let _ = self.buildah().args(["rm", "--all"]).output();
        let _ = self.buildah().args(["rmi", "--all", "--force"]).output();
    }
}

/// The `(instruction, rest)` lines of the Containerfile's last stage.
fn runtime_stage() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("Containerfile")).expect("Containerfile");
    let last = text.rfind("\nFROM ").expect("a FROM line");
    let mut out = Vec::new();
    let mut line = String::new();
    for raw in text[last..].lines() {
        let raw = raw.trim();
        if raw.starts_with('#') || raw.is_empty() && line.is_empty() {
            continue;
        }
        line.push_str(raw.trim_end_matches('\\').trim());
        line.push(' ');
        if !raw.ends_with('\\') {
            let l = line.trim().to_owned();
            line.clear();
            if let Some((instr, rest)) = l.split_once(' ') {
                out.push((instr.to_owned(), rest.to_owned()));
            }
        }
    }
    out
}

#[test]
fn the_image_built_from_scratch_runs_the_gateway() {
    let storage = Storage::new();
    let tag = format!("localhost/causeway:e2e-{}", std::process::id());
    let mut build = Command::new(repo().join("scripts/build-image.sh"));
    build
        .args(["--binary", causeway_bin(), "--tag", &tag])
        // The option a node agent would use: nft and its libraries.
        .arg("--with-nft")
        .args(storage.args());
    let id = ok(&mut build);
    assert!(!id.is_empty());

    // The image's config is the Containerfile's runtime stage.
    let inspect: serde_json::Value = serde_json::from_str(&ok(storage
        .buildah()
        .args(["inspect", "--type", "image", &tag])))
    .expect("inspect JSON");
    let config = &inspect["OCIv1"]["config"];
    let stage = runtime_stage();
    let instr = |name: &str| -> Vec<&str> {
        stage
            .iter()
            .filter(|(i, _)| i == name)
            .map(|(_, rest)| rest.as_str())
            .collect()
    };
    assert_eq!(instr("USER"), [config["User"].as_str().expect("User")]);
    let entrypoint: serde_json::Value =
        serde_json::from_str(instr("ENTRYPOINT")[0]).expect("exec-form ENTRYPOINT");
    assert_eq!(config["Entrypoint"], entrypoint);
    let cmd: serde_json::Value = serde_json::from_str(instr("CMD")[0]).expect("exec-form CMD");
    assert_eq!(config["Cmd"], cmd);
    let mut exposed: Vec<String> = instr("EXPOSE")[0]
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    exposed.sort();
    let mut ports: Vec<String> = config["ExposedPorts"]
        .as_object()
        .expect("ExposedPorts")
        .keys()
        .cloned()
        .collect();
    ports.sort();
    assert_eq!(ports, exposed);
    for (label, _) in config["Labels"].as_object().expect("Labels") {
        if label.starts_with("org.opencontainers.image.") && !label.ends_with(".version") {
            assert!(
                instr("LABEL")[0].contains(label.as_str()),
                "label {label} is not in the Containerfile"
            );
        }
    }

    // A working container of the image, its root file system mounted.
    let ctr = ok(storage.buildah().args(["from", &tag]));
    let root = PathBuf::from(ok(storage.buildah().args(["mount", &ctr])));
    let bin = root.join("usr/local/bin/causeway");
    assert!(bin.is_file(), "no binary in the image");
    let nft = ok(Command::new("chroot")
        .arg(&root)
        .args(["/usr/sbin/nft", "--version"]));
    assert!(nft.starts_with("nftables"), "{nft}");

    // What Kubernetes would mount: the config, the key, the state and run
    // directories, /dev/net/tun (a mount point for it), /proc.
    for dir in [
        "etc/causeway",
        "etc/causeway-key",
        "var/lib/causeway",
        "run/causeway",
        "dev/net",
        "proc",
    ] {
        std::fs::create_dir_all(root.join(dir)).expect("mount point");
    }
    std::fs::write(root.join("dev/net/tun"), "").expect("tun mount point");
    // The image's own binary, as the image's non-root user (how the
    // rendezvous runs), makes the keys: the loader, glibc and the user
    // database are all in the image.
    let chroot = |user: &str, args: &[&str]| {
        let mut cmd = Command::new("chroot");
        cmd.arg(format!("--userspec={user}"))
            .arg(&root)
            .arg("/usr/local/bin/causeway")
            .args(args);
        cmd
    };
    let key = ok(&mut chroot("65532:65532", &["genkey"]));
    std::fs::write(
        root.join("etc/causeway-key/private.key"),
        format!("{key}\n"),
    )
    .expect("key");
    std::fs::set_permissions(
        root.join("etc/causeway-key/private.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o400),
    )
    .expect("chmod");
    let peer_key = ok(&mut chroot("65532:65532", &["genkey"]));
    let mut pubkey = chroot("65532:65532", &["pubkey"]);
    let peer_public = {
        use std::io::Write as _;
        let mut child = pubkey
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("pubkey");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(peer_key.as_bytes())
            .expect("write key");
        let out = child.wait_with_output().expect("pubkey output");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    std::fs::write(
        root.join("etc/causeway/causeway.toml"),
        format!(
            "[site]\nname = \"image\"\nprivate_key_file = \"/etc/causeway-key/private.key\"\n\
             interface = \"causeway0\"\nlisten_port = {PORT}\npod_cidrs = [\"10.244.0.0/16\"]\n\
             control_socket = \"/run/causeway/causeway0.sock\"\n\
             uapi_socket = \"/run/causeway/uapi.sock\"\nstate_dir = \"/var/lib/causeway\"\n\n\
             [[peer]]\nname = \"peer\"\npublic_key = \"{peer_public}\"\n\
             cidrs = [\"10.245.0.0/16\"]\nendpoint = \"127.0.0.2:{PORT}\"\n"
        ),
    )
    .expect("config");

    // The gateway, from the image, in a lab namespace, as root (as the
    // DaemonSet runs it).
    let ns = Netns::create("image").expect("namespace");
    let log_path = storage.dir.path().join("gateway.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let script = format!(
        "mount --bind /dev/net/tun {root}/dev/net/tun && mount -t proc proc {root}/proc && \
         exec chroot {root} /usr/local/bin/causeway up --config /etc/causeway/causeway.toml \
         --log-format=json --metrics-listen=127.0.0.1:9469",
        root = root.display()
    );
    let mut cmd = ns.command("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdout(std::process::Stdio::null())
        .stderr(log);
    let mut gateway = ns.spawn(&mut cmd).expect("start the gateway");
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // Ready, as the kubelet's readiness probe asks.
    let metrics = "127.0.0.1:9469".parse().expect("addr");
    let start = Instant::now();
    loop {
        if let Ok((200, _)) = try_get(&ns, metrics, "/readyz") {
            break;
        }
        if let Ok(Some(status)) = gateway.wait_timeout(Duration::from_millis(100)) {
            panic!("the gateway exited ({status}):\n{}", log_text());
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "not ready within 15 s:\n{}",
            log_text()
        );
    }
    assert!(
        ns.ip(&["link", "show", "causeway0"]).is_ok(),
        "no causeway0 in the namespace"
    );
    // `kubectl exec … causeway status` runs the image's binary.
    let status = ok(&mut chroot(
        "0:0",
        &[
            "status",
            "--json",
            "--socket",
            "/run/causeway/causeway0.sock",
        ],
    ));
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    assert_eq!(status["site"], "image", "{status}");
    assert_eq!(status["peers"][0]["name"], "peer", "{status}");

    // Under a real OCI runtime (runc), as the image's own user (65532)
    // with every capability dropped, in the lab namespace: how the
    // rendezvous runs. (The gateway cannot run under runc here: creating
    // the TUN fails with EPERM inside this machine's own sandbox, see
    // docs/failover-kubernetes.md.)
    let runc = ok(Command::new("sh").args(["-c", "command -v runc"]));
    // (buildah on the host, joining the namespace: `ip netns exec` would
    // hide the cgroup mounts runc needs.)
    let network = format!("ns:{}", ns.path().display());
    let mut oci = storage.buildah();
    oci.args(["run", "--runtime", &runc, "--isolation", "oci"])
        .args(["--network", &network])
        .args([
            "--cap-drop",
            "ALL",
            &ctr,
            "--",
            "/usr/local/bin/causeway",
            "genkey",
        ]);
    let oci_key = ok(&mut oci);
    assert_eq!(oci_key.len(), 44, "a base64 WireGuard key: {oci_key:?}");

    let exit = gateway.stop(Duration::from_secs(10)).expect("stop");
    assert!(exit.success(), "exit {exit}:\n{}", log_text());
    assert!(
        ns.ip(&["link", "show", "causeway0"]).is_err(),
        "the interface outlived a clean stop"
    );
    assert!(log_text().contains("site is up"), "{}", log_text());
}
