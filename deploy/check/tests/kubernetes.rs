//! The Kubernetes manifests: every file is part of its kustomization, every
//! object validates against the Kubernetes schemas (strict: unknown fields
//! are errors) of the oldest and newest versions we support, the rendered
//! kustomizations too, and the manifests agree with the daemon and with each
//! other (paths, ports, keys).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use causeway_deploy_check::{Validators, both, kustomize_build, or_skip, repo_root};
use serde_json::Value;

/// The Kubernetes versions the manifests are checked against: the oldest
/// supported (docs/deploy.md) and the newest the schemas know.
const KUBERNETES: [&str; 2] = ["1.28.0", "1.37.0"];

fn work() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy-check")
}

fn kube() -> PathBuf {
    repo_root().join("deploy/kubernetes")
}

/// Every directory under deploy/kubernetes that holds a kustomization.
fn kustomizations() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![kube()];
    while let Some(dir) = pending.pop() {
        if dir.join("kustomization.yaml").is_file() {
            found.push(dir.clone());
        }
        for entry in fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path);
            }
        }
    }
    found.sort();
    assert!(
        found.len() >= 5,
        "expected the two bases and three examples, found {found:?}"
    );
    found
}

/// The YAML files of a kustomization directory other than kustomization.yaml.
fn manifests_in(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn validators() -> Option<Validators> {
    or_skip("kubernetes-validate (PyPI)", Validators::get(&work()))
}

#[test]
fn every_manifest_is_listed_in_its_kustomization() {
    let Some(v) = validators() else { return };
    for dir in kustomizations() {
        let k = &v.yaml_documents(&dir.join("kustomization.yaml"))[0];
        let resources = strings(&k["resources"]);
        for resource in &resources {
            let path = dir.join(resource);
            assert!(
                path.is_file() || path.join("kustomization.yaml").is_file(),
                "{}: resource {resource} does not exist",
                dir.display()
            );
        }
        let listed: BTreeSet<String> = resources
            .iter()
            .filter(|r| r.ends_with(".yaml"))
            .cloned()
            .collect();
        assert_eq!(
            listed,
            manifests_in(&dir),
            "{}: the YAML files and resources: differ",
            dir.display()
        );
        for generator in k["configMapGenerator"].as_array().into_iter().flatten() {
            for file in strings(&generator["files"]) {
                assert!(
                    dir.join(&file).is_file(),
                    "{}: generator file {file} is missing",
                    dir.display()
                );
            }
        }
    }
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let Some(v) = validators() else { return };
    // The files as written (this needs no kustomize)...
    let mut files: Vec<PathBuf> = kustomizations()
        .iter()
        .flat_map(|dir| {
            manifests_in(dir)
                .into_iter()
                .map(move |name| dir.join(name))
        })
        .collect();
    // ...and what `kubectl apply -k` would send, generated ConfigMaps,
    // namespaces and images included.
    let rendered = tempfile::tempdir().expect("tempdir");
    let mut rendered_any = false;
    for dir in kustomizations() {
        match kustomize_build(&dir) {
            Some(Ok(yaml)) => {
                let name = dir
                    .strip_prefix(kube())
                    .expect("under kube")
                    .to_string_lossy()
                    .replace('/', "-");
                let file = rendered.path().join(format!("{name}.rendered.yaml"));
                fs::write(&file, yaml).expect("write rendered");
                files.push(file);
                rendered_any = true;
            }
            Some(Err(e)) => panic!("kubectl kustomize {} failed: {e}", dir.display()),
            None => break,
        }
    }
    if !rendered_any {
        eprintln!(
            "NOTE: kubectl is not installed, so the kustomizations were not rendered; \
             the files were validated one by one and every_manifest_is_listed_in_its_kustomization \
             checks that the kustomizations list them"
        );
    }
    for version in KUBERNETES {
        let out = v.kubernetes_validate(version, &files);
        assert!(
            out.status.success(),
            "kubernetes-validate {version}:\n{}",
            both(&out)
        );
    }
}

/// The validator must catch what it is there to catch.
#[test]
fn the_schema_validation_rejects_an_unknown_field() {
    let Some(v) = validators() else { return };
    let text = fs::read_to_string(kube().join("gateway/daemonset.yaml")).expect("read");
    let broken = text.replacen("hostNetwork: true", "hostNetwrk: true", 1);
    assert_ne!(text, broken);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("daemonset.yaml");
    fs::write(&file, broken).expect("write");
    let out = v.kubernetes_validate(KUBERNETES[1], &[file]);
    assert!(
        !out.status.success() && both(&out).contains("hostNetwrk"),
        "{}",
        both(&out)
    );
}

fn only(v: &Validators, path: &str) -> Value {
    let mut docs = v.yaml_documents(&kube().join(path));
    assert_eq!(docs.len(), 1, "{path}: one object per file");
    docs.remove(0)
}

fn container(workload: &Value) -> &Value {
    let containers = workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1);
    &containers[0]
}

fn arg<'a>(container: &'a Value, flag: &str) -> &'a str {
    container["args"]
        .as_array()
        .expect("args")
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix(flag)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {flag}= in {}", container["args"]))
}

fn mount_path<'a>(container: &'a Value, volume: &str) -> &'a str {
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["name"] == volume)
        .unwrap_or_else(|| panic!("no mount of {volume}"));
    assert!(
        mount.get("subPath").is_none(),
        "{volume} is mounted with subPath: its updates would never arrive"
    );
    mount["mountPath"].as_str().expect("mountPath")
}

fn volume<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

fn port(container: &Value, name: &str) -> (i64, String) {
    let p = container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no port {name}"));
    (
        p["containerPort"].as_i64().expect("containerPort"),
        p["protocol"].as_str().unwrap_or("TCP").to_owned(),
    )
}

/// The directory and file name of a path such as /etc/causeway/causeway.toml.
fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').expect("an absolute path")
}

fn example_site(name: &str) -> causeway::config::Config<causeway::config::Parsed> {
    let path = kube().join("examples").join(name).join("causeway.toml");
    let text = fs::read_to_string(&path).expect("read example");
    causeway::config::parse(&text, &path.display().to_string()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn gateway_daemonset_fits_the_daemon() {
    let Some(v) = validators() else { return };
    let ds = only(&v, "gateway/daemonset.yaml");
    let pod = &ds["spec"]["template"]["spec"];
    let c = container(&ds);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["nodeSelector"]["causeway.io/gateway"], "true");
    assert_eq!(
        c["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN"])
    );
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(c["args"][0], "up");

    // The probes and the metrics listener are the same port.
    let (metrics, proto) = port(c, "metrics");
    assert_eq!(proto, "TCP");
    assert!(arg(c, "--metrics-listen").ends_with(&format!(":{metrics}")));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(c[probe]["httpGet"]["path"], path);
        assert_eq!(c[probe]["httpGet"]["port"], "metrics");
    }
    assert!(
        c["resources"]["requests"]["cpu"].is_string()
            && c["resources"]["limits"]["memory"].is_string()
    );

    // The config is the ConfigMap, mounted as a directory.
    let (config_dir, config_file) = split(arg(c, "--config"));
    assert_eq!(mount_path(c, "config"), config_dir);
    assert_eq!(
        volume(&ds, "config")["configMap"]["name"],
        "causeway-config"
    );
    for kustomization in ["examples/pharma", "examples/hospital"] {
        let k = only(&v, &format!("{kustomization}/kustomization.yaml"));
        let generator = &k["configMapGenerator"][0];
        assert_eq!(generator["name"], "causeway-config");
        assert_eq!(strings(&generator["files"]), [config_file]);
        assert_eq!(
            k["generatorOptions"]["disableNameSuffixHash"], true,
            "a hash suffix turns reloads into restarts"
        );
    }

    // What the example configs point at is where the DaemonSet puts it.
    let key_dir = mount_path(c, "private-key");
    let key_volume = volume(&ds, "private-key");
    assert_eq!(key_volume["secret"]["secretName"], "causeway-key");
    assert_eq!(
        key_volume["secret"]["defaultMode"], 0o400,
        "the daemon warns about a key others can read"
    );
    let state = volume(&ds, "state");
    assert_eq!(
        state["hostPath"]["path"],
        mount_path(c, "state"),
        "the same path on the node and in the pod"
    );
    for name in ["pharma", "hospital"] {
        let site = example_site(name).site;
        assert_eq!(
            site.private_key_file,
            Path::new(key_dir).join("private.key"),
            "{name}"
        );
        assert_eq!(
            site.state_dir,
            Path::new(mount_path(c, "state")),
            "{name}: views.json must be on the hostPath"
        );
        assert_eq!(
            site.control_socket.parent(),
            Some(Path::new(mount_path(c, "run"))),
            "{name}: `kubectl exec … causeway status` looks there"
        );
        let (wireguard, proto) = port(c, "wireguard");
        assert_eq!(
            (i64::from(site.listen_port), proto.as_str()),
            (wireguard, "UDP"),
            "{name}"
        );
    }
    assert_eq!(
        volume(&ds, "dev-net-tun")["hostPath"],
        serde_json::json!({"path": "/dev/net/tun", "type": "CharDevice"})
    );
    assert_eq!(mount_path(c, "dev-net-tun"), "/dev/net/tun");
    assert_eq!(state["hostPath"]["type"], "DirectoryOrCreate");

    // The UAPI socket is where wg(8) looks in the pod, but no volume gives
    // the pod the node's shared WireGuard socket directory: root in the
    // container could remove or replace other implementations' sockets.
    assert_eq!(mount_path(c, "uapi"), "/var/run/wireguard");
    let volumes = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes");
    for v in volumes {
        let host = v["hostPath"]["path"].as_str().unwrap_or("");
        assert!(
            !["/var/run/wireguard", "/run/wireguard"]
                .iter()
                .any(|shared| host.trim_end_matches('/') == *shared),
            "volume {} mounts the node's shared WireGuard socket directory {host}",
            v["name"]
        );
    }
    assert_eq!(
        volume(&ds, "uapi")["hostPath"]["path"],
        "/run/causeway-uapi"
    );
}

#[test]
fn rendezvous_fits_the_daemon_and_the_sites() {
    let Some(v) = validators() else { return };
    let deployment = only(&v, "rendezvous/deployment.yaml");
    let service = only(&v, "rendezvous/service.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let c = container(&deployment);
    assert_eq!(
        deployment["spec"]["replicas"], 1,
        "sites meet only on the same instance"
    );
    assert_eq!(c["args"][0], "rendezvous");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert!(c["securityContext"]["capabilities"].get("add").is_none());
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);

    // STUN must see the sites' own addresses: no SNAT on the way in.
    assert_eq!(service["spec"]["externalTrafficPolicy"], "Local");
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    let mut exposed = Vec::new();
    for p in service["spec"]["ports"].as_array().expect("ports") {
        let name = p["targetPort"].as_str().expect("named targetPort");
        let (target, proto) = port(c, name);
        assert_eq!(p["protocol"], proto.as_str());
        assert_eq!(
            p["port"], target,
            "{name}: the sites dial the same port as the pod listens on"
        );
        exposed.push((name.to_owned(), target, proto));
    }
    exposed.sort();
    assert_eq!(
        exposed,
        [
            ("quic".to_owned(), 7443, "UDP".to_owned()),
            ("stun".to_owned(), 3478, "UDP".to_owned())
        ]
    );

    // The example rendezvous config: where the Deployment mounts things,
    // the ports it exposes, and the sites' keys.
    let (config_dir, config_file) = split(arg(c, "--config"));
    assert_eq!(mount_path(c, "config"), config_dir);
    let path = kube().join("examples/rendezvous").join(config_file);
    let config: toml::Table =
        toml::from_str(&fs::read_to_string(&path).expect("read")).expect("TOML");
    assert_eq!(
        config["private_key_file"].as_str(),
        Some(format!("{}/private.key", mount_path(c, "private-key")).as_str())
    );
    assert!(
        config["listen"]
            .as_str()
            .expect("listen")
            .ends_with(":7443")
    );
    assert!(
        config["stun_listen"]
            .as_str()
            .expect("stun_listen")
            .ends_with(":3478")
    );
    let registered: BTreeSet<(String, String)> = config["site"]
        .as_array()
        .expect("[[site]]")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().expect("name").to_owned(),
                s["public_key"].as_str().expect("key").to_owned(),
            )
        })
        .collect();
    // Each example site lists the other under its registered key, and
    // both dial the same rendezvous (by its key).
    let pharma = example_site("pharma");
    let hospital = example_site("hospital");
    let key = causeway::keys::encode_public;
    let from_sites: BTreeSet<(String, String)> = [(&pharma, &hospital), (&hospital, &pharma)]
        .iter()
        .map(|(a, b)| {
            let peer = &a.peers[0];
            assert_eq!(peer.name, b.site.name);
            (peer.name.clone(), key(&peer.public_key))
        })
        .collect();
    assert_eq!(registered, from_sites);
    assert_eq!(
        key(&pharma.rendezvous[0].public_key),
        key(&hospital.rendezvous[0].public_key)
    );
}

#[test]
fn node_daemonset_fits_the_agent_and_the_gateway() {
    let Some(v) = validators() else { return };
    let ds = only(&v, "node/daemonset.yaml");
    let pod = &ds["spec"]["template"]["spec"];
    let c = container(&ds);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}]),
        "every node, the gateway nodes too"
    );
    assert_eq!(
        c["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN"])
    );
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["args"][0], "node");

    // The config is the ConfigMap of the pharma example, and parses.
    let (config_dir, config_file) = split(arg(c, "--config"));
    assert_eq!(mount_path(c, "config"), config_dir);
    assert_eq!(
        volume(&ds, "config")["configMap"]["name"],
        "causeway-node-config"
    );
    let k = only(&v, "examples/pharma/kustomization.yaml");
    let generator = k["configMapGenerator"]
        .as_array()
        .expect("generators")
        .iter()
        .find(|g| g["name"] == "causeway-node-config")
        .expect("node config generator");
    assert_eq!(strings(&generator["files"]), [config_file]);
    let path = kube().join("examples/pharma").join(config_file);
    let text = fs::read_to_string(&path).expect("read node.toml");
    let node =
        causeway::node::parse(&text, &path.display().to_string()).unwrap_or_else(|e| panic!("{e}"));

    // The secret is where both the agent and the gateway read it.
    let secret = volume(&ds, "cluster-secret");
    assert_eq!(secret["secret"]["secretName"], "causeway-cluster");
    assert_eq!(
        node.secret_file,
        Path::new(mount_path(c, "cluster-secret")).join("secret")
    );
    let gateway = only(&v, "gateway/daemonset.yaml");
    let gc = container(&gateway);
    assert_eq!(
        volume(&gateway, "cluster-secret")["secret"]["secretName"],
        "causeway-cluster"
    );
    let cluster = example_site("pharma")
        .cluster
        .expect("pharma has [cluster]");
    assert_eq!(
        cluster.secret_file,
        Path::new(mount_path(gc, "cluster-secret")).join("secret")
    );
    // The agent dials the gateways' port, through the headless Service.
    let (cluster_port, proto) = port(gc, "cluster");
    assert_eq!(
        (cluster_port, proto.as_str()),
        (i64::from(cluster.listen.port()), "TCP")
    );
    let service = only(&v, "gateway/service.yaml");
    assert_eq!(service["spec"]["clusterIP"], "None");
    assert_eq!(service["spec"]["publishNotReadyAddresses"], true);
    assert_eq!(service["spec"]["ports"][0]["port"], cluster_port);
    assert!(
        node.gateways
            .iter()
            .all(|g| g.ends_with(&format!(":{cluster_port}"))
                && g.starts_with("causeway-gateway.causeway-system.svc")),
        "{:?}",
        node.gateways
    );
    // The probe asks the agent's metrics port on the node's loopback.
    let (metrics, _) = port(c, "metrics");
    let listen = node.metrics_listen.expect("metrics_listen");
    assert_eq!(i64::from(listen.port()), metrics);
    assert_eq!(
        c["livenessProbe"]["httpGet"]["host"],
        listen.ip().to_string()
    );
}

fn env_field<'a>(container: &'a Value, name: &str) -> &'a str {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name}"))["valueFrom"]["fieldRef"]["fieldPath"]
        .as_str()
        .unwrap_or_else(|| panic!("env {name} is not from the downward API"))
}

/// The gateway's access to the Kubernetes API: exactly what the Lease
/// election (daemon/src/election) does, on the Lease it uses, for the
/// pod's service account; and the pod tells the daemon who and where it is.
#[test]
fn the_gateway_may_hold_its_lease_and_nothing_more() {
    let Some(v) = validators() else { return };
    let ds = only(&v, "gateway/daemonset.yaml");
    let account = only(&v, "gateway/serviceaccount.yaml");
    let role = only(&v, "gateway/role.yaml");
    let binding = only(&v, "gateway/rolebinding.yaml");
    let k = only(&v, "gateway/kustomization.yaml");
    let namespace = k["namespace"].as_str().expect("namespace");
    let pod = &ds["spec"]["template"]["spec"];

    // The pod runs as the account and gets its token (the account alone
    // does not mount it anywhere else).
    assert_eq!(account["kind"], "ServiceAccount");
    assert_eq!(pod["serviceAccountName"], account["metadata"]["name"]);
    assert_eq!(pod["automountServiceAccountToken"], true);
    assert_eq!(account["automountServiceAccountToken"], false);

    // The binding gives the Role to that account, in the gateway's namespace.
    assert_eq!(binding["kind"], "RoleBinding");
    assert_eq!(
        binding["roleRef"],
        serde_json::json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                           "name": role["metadata"]["name"]})
    );
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                            "namespace": namespace}])
    );

    check_lease_role(&role).unwrap_or_else(|e| panic!("gateway/role.yaml: {e}"));

    // Who and where the replica is: its holderIdentity and the Lease's
    // namespace, from the downward API.
    let c = container(&ds);
    assert_eq!(env_field(c, "POD_NAME"), "metadata.name");
    assert_eq!(env_field(c, "POD_NAMESPACE"), "metadata.namespace");
    // A standby must be ready (readiness gates the rolling update), and an
    // update waits a little on each node before the next.
    assert!(
        ds["spec"]["minReadySeconds"]
            .as_i64()
            .is_some_and(|s| s > 0)
    );
}

/// The Role allows leases in coordination.k8s.io only; get and update only
/// on the daemon's Lease by name; create (which RBAC cannot limit by
/// name); nothing else, no wildcards.
fn check_lease_role(role: &Value) -> Result<(), String> {
    use causeway::election::kubernetes::DEFAULT_LEASE_NAME;
    if role["kind"] != "Role" {
        return Err(format!(
            "kind {}: a namespaced Role, not a ClusterRole",
            role["kind"]
        ));
    }
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().ok_or("no rules")? {
        if strings(&rule["apiGroups"]) != ["coordination.k8s.io"]
            || strings(&rule["resources"]) != ["leases"]
        {
            return Err(format!("{rule}: only leases in coordination.k8s.io"));
        }
        let names = strings(&rule["resourceNames"]);
        for verb in strings(&rule["verbs"]) {
            if verb == "create" {
                if !names.is_empty() {
                    return Err(format!("{rule}: resourceNames never match a create"));
                }
            } else if names != [DEFAULT_LEASE_NAME] {
                return Err(format!(
                    "{rule}: {verb} must be limited to the daemon's Lease {DEFAULT_LEASE_NAME}"
                ));
            }
            granted.insert(verb);
        }
    }
    let wanted: BTreeSet<String> = ["create", "get", "update"].map(String::from).into();
    if granted != wanted {
        return Err(format!(
            "verbs {granted:?}: the election sends GET, POST and PUT, so exactly {wanted:?}"
        ));
    }
    Ok(())
}

/// The Role check must catch what it is there to catch.
#[test]
fn the_role_check_rejects_more_access_or_less() {
    let Some(v) = validators() else { return };
    let role = only(&v, "gateway/role.yaml");
    assert_eq!(check_lease_role(&role), Ok(()));
    let broken = |edit: &dyn Fn(&mut Value)| {
        let mut r = role.clone();
        edit(&mut r);
        check_lease_role(&r).expect_err("a broken Role passed")
    };
    let e = broken(&|r| r["rules"][0]["verbs"] = serde_json::json!(["get", "update", "delete"]));
    assert!(e.contains("delete"), "{e}");
    let e = broken(&|r| r["rules"][0]["resourceNames"] = serde_json::json!([]));
    assert!(e.contains("must be limited"), "{e}");
    let e = broken(&|r| r["rules"][1]["resources"] = serde_json::json!(["*"]));
    assert!(e.contains("only leases"), "{e}");
    let e = broken(&|r| r["rules"][1]["verbs"] = serde_json::json!([]));
    assert!(e.contains("exactly"), "{e}");
    let e = broken(&|r| r["kind"] = serde_json::json!("ClusterRole"));
    assert!(e.contains("ClusterRole"), "{e}");
}
