//! The adapter against a **fake API server**: the simulated one of
//! [`crate::election::fake_api_server`] (GET/POST/PUT of Lease objects with
//! `resourceVersion` conflicts and bearer tokens, nothing else of
//! Kubernetes), here on loopback with a certificate from a CA this test
//! makes (rcgen). It can refuse a token (401) and stop answering one
//! client (its requests hang), which is how "blocking the active replica's
//! access" is simulated.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::*;
use crate::election::fake_api_server::{FakeApiServer, pem_certificate as pem};

const NAMESPACE: &str = "causeway-test";

/// The simulated API server on 127.0.0.1, with the files its clients
/// need (the test CA, token files).
struct Fake {
    server: FakeApiServer,
    dir: tempfile::TempDir,
}

impl std::ops::Deref for Fake {
    type Target = FakeApiServer;
    fn deref(&self) -> &FakeApiServer {
        &self.server
    }
}

impl Fake {
    async fn start() -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), pem(ca.der())).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = FakeApiServer::start(
            listener,
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        Fake { server, dir }
    }

    /// Credentials for one client: a token file, accepted by the server.
    fn client(&self, token: &str) -> ApiServer {
        let token_file = self.dir.path().join(format!("{token}.token"));
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        self.accept_token(token);
        ApiServer::new(
            "127.0.0.1",
            self.addr().port(),
            self.dir.path().join("ca.crt"),
            token_file,
        )
        .unwrap()
    }

    fn holder(&self, name: &str) -> Option<String> {
        self.server.holder(NAMESPACE, name)
    }
}

/// Fast timing for tests on the real clock: 1 s lease, step down after
/// 700 ms, renew every 200 ms.
fn fast() -> Timing {
    Timing::new(
        Duration::from_secs(1),
        Duration::from_millis(700),
        Duration::from_millis(200),
    )
}

fn params(identity: &str) -> LeaseParams {
    LeaseParams {
        namespace: NAMESPACE.into(),
        name: DEFAULT_LEASE_NAME.into(),
        identity: identity.into(),
        timing: fast(),
    }
}

/// One replica's adapter, running, with every role change recorded.
struct Replica {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ElectionError>>,
    roles: watch::Receiver<Role>,
    changes: Arc<Mutex<Vec<(Instant, Role)>>>,
    recorder: tokio::task::JoinHandle<()>,
}

impl Replica {
    fn start(api: ApiServer, identity: &str) -> Self {
        let (tx, rx) = watch::channel(Role::Standby);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let on_role = move |role| {
            tx.send_replace(role);
        };
        let task = tokio::spawn(run(api, params(identity), on_role, async move {
            let _ = stopped.await;
        }));
        let changes = Arc::new(Mutex::new(Vec::new()));
        let mut watching = rx.clone();
        let record = Arc::clone(&changes);
        let recorder = tokio::spawn(async move {
            while watching.changed().await.is_ok() {
                let role = *watching.borrow_and_update();
                record.lock().unwrap().push((Instant::now(), role));
            }
        });
        Replica {
            stop: Some(stop),
            task,
            roles: rx,
            changes,
            recorder,
        }
    }

    fn role(&self) -> Role {
        *self.roles.borrow()
    }

    fn changes(&self) -> Vec<(Instant, Role)> {
        self.changes.lock().unwrap().clone()
    }

    /// Stops it cleanly and waits for `run` to return.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .expect("run returns within the release deadline");
        result.unwrap().unwrap();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.task.abort();
        self.recorder.abort();
    }
}

/// Waits (real time, bounded) until `check` holds.
async fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn two_adapters_elect_one_and_fail_over_when_its_access_is_blocked() {
    let server = Fake::start().await;
    let a = Replica::start(server.client("token-a"), "gw-a");
    let b = Replica::start(server.client("token-b"), "gw-b");
    wait_for("one replica active", Duration::from_secs(5), || {
        a.role().is_active() || b.role().is_active()
    })
    .await;
    // For a few lease durations: exactly one, the holder in the Lease.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (active, standby, active_token) = match (a.role(), b.role()) {
        (Role::Active { .. }, Role::Standby) => (&a, &b, "token-a"),
        (Role::Standby, Role::Active { .. }) => (&b, &a, "token-b"),
        roles => panic!("expected exactly one active: {roles:?}"),
    };
    assert_eq!(active.changes().len(), 1, "no flapping");
    assert_eq!(standby.changes(), [], "the standby was never active");
    let holder = server.holder(DEFAULT_LEASE_NAME).unwrap();
    assert_eq!(
        Some(holder.as_str()),
        if std::ptr::eq(active, &a) {
            Some("gw-a")
        } else {
            Some("gw-b")
        }
    );
    let Role::Active { term } = active.role() else {
        unreachable!()
    };

    // Its requests now hang: it gives them up, steps down at its renew
    // deadline, and the other takes over after the Lease expires.
    let blocked = Instant::now();
    server.state().hung.insert(active_token.to_owned());
    let t = fast();
    let took = wait_for(
        "the standby takes over",
        t.lease_duration + t.retry_period + Duration::from_secs(1),
        || standby.role().is_active(),
    )
    .await;
    eprintln!(
        "takeover {took:?} after blocking (lease_duration + retry_period = {:?})",
        t.lease_duration + t.retry_period
    );
    assert_eq!(standby.role(), Role::Active { term: term + 1 });
    let stepped_down = active.changes().last().copied().unwrap();
    assert_eq!(stepped_down.1, Role::Standby);
    assert!(stepped_down.0 <= blocked + t.renew_deadline + Duration::from_millis(500));
    let took_over = standby.changes()[0].0;
    assert!(
        took_over > stepped_down.0,
        "the blocked replica stepped down {:?} after the other became active",
        stepped_down.0 - took_over
    );
    eprintln!(
        "gap between step-down and takeover: {:?}",
        took_over - stepped_down.0
    );

    // Unblocked, it stays standby: the Lease is held.
    server.state().hung.clear();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(active.role(), Role::Standby);
    assert!(standby.role().is_active());
    drop(a);
    drop(b);
}

#[tokio::test]
async fn a_clean_stop_releases_the_lease_and_the_other_takes_over_within_a_retry_period() {
    let server = Fake::start().await;
    let a = Replica::start(server.client("token-a"), "gw-a");
    wait_for("gw-a active", Duration::from_secs(5), || {
        a.role().is_active()
    })
    .await;
    let b = Replica::start(server.client("token-b"), "gw-b");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(b.role(), Role::Standby);

    let stopping = Instant::now();
    let changes = Arc::clone(&a.changes);
    a.stop().await;
    assert_eq!(
        changes.lock().unwrap().last().map(|c| c.1),
        Some(Role::Standby),
        "it went standby before releasing"
    );
    assert_eq!(server.holder(DEFAULT_LEASE_NAME), None, "released");
    let took = wait_for(
        "gw-b takes the released Lease",
        fast().retry_period + Duration::from_secs(1),
        || b.role().is_active(),
    )
    .await;
    eprintln!(
        "takeover {:?} after the stop began, {took:?} after the release",
        stopping.elapsed()
    );
    assert!(took <= fast().retry_period + Duration::from_millis(500));
    assert_eq!(server.holder(DEFAULT_LEASE_NAME).as_deref(), Some("gw-b"));
}

#[tokio::test]
async fn a_rotated_token_is_read_again_and_a_refused_one_is_reported_not_fatal() {
    let server = Fake::start().await;
    let api = server.client("old-token");
    let a = Replica::start(api.clone(), "gw-a");
    wait_for("gw-a active", Duration::from_secs(5), || {
        a.role().is_active()
    })
    .await;
    // The kubelet rotates the token: the server takes only the new one,
    // and the adapter reads the file again for every request.
    {
        let mut s = server.state();
        s.tokens.clear();
        s.tokens.insert("new-token".into());
    }
    std::fs::write(&api.token_file, "new-token\n").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(a.role().is_active(), "still renewing with the new token");
    assert_eq!(a.changes().len(), 1);
    let log = server.state().log.clone();
    assert!(
        log.iter()
            .any(|a| a.token == "new-token" && a.method == "PUT" && a.status == 200)
    );

    // A token the server refuses: the replica steps down (it cannot renew)
    // and keeps trying; run() does not fail.
    server.state().tokens.clear();
    wait_for("gw-a steps down", Duration::from_secs(3), || {
        !a.role().is_active()
    })
    .await;
    assert!(!a.task.is_finished());
    let log = server.state().log.clone();
    assert!(log.iter().any(|a| a.status == 401));
    a.stop().await;
}

#[tokio::test]
async fn unusable_parameters_are_refused_at_once_naming_each() {
    let server = Fake::start().await;
    let mut p = params("gw-a");
    p.name = "Not_A_Name".into();
    p.timing.renew_deadline = Duration::from_secs(3);
    let err = run(server.client("t"), p, |_| {}, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("lease_name = \"Not_A_Name\""), "{err}");
    assert!(err.contains("renew_deadline_ms = 3000"), "{err}");
}

#[test]
fn in_cluster_config_comes_from_the_environment_and_the_service_account() {
    let dir = tempfile::tempdir().unwrap();
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |key: &str| {
            vars.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    // Not in a pod.
    let err = ApiServer::in_cluster_with(&env(&[]), dir.path()).unwrap_err();
    assert!(
        err.to_string()
            .contains("KUBERNETES_SERVICE_HOST is not set"),
        "{err}"
    );
    let pod = env(&[
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("KUBERNETES_SERVICE_PORT", "443"),
    ]);
    // No token mounted: the message names the file and the fix.
    let err = ApiServer::in_cluster_with(&pod, dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("ca.crt"), "{err}");
    std::fs::write(dir.path().join("ca.crt"), "not a certificate").unwrap();
    let err = ApiServer::in_cluster_with(&pod, dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no usable CA certificate"), "{err}");
    let ca = rcgen::generate_simple_self_signed(vec!["kubernetes".to_owned()]).unwrap();
    std::fs::write(dir.path().join("ca.crt"), pem(ca.cert.der())).unwrap();
    let err = ApiServer::in_cluster_with(&pod, dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("token") && err.contains("automountServiceAccountToken"),
        "{err}"
    );
    std::fs::write(dir.path().join("token"), "abc\n").unwrap();
    let api = ApiServer::in_cluster_with(&pod, dir.path()).unwrap();
    assert_eq!(api.authority(), "10.96.0.1:443");
    let v6 = env(&[
        ("KUBERNETES_SERVICE_HOST", "fd00::1"),
        ("KUBERNETES_SERVICE_PORT", "6443"),
    ]);
    assert_eq!(
        ApiServer::in_cluster_with(&v6, dir.path())
            .unwrap()
            .authority(),
        "[fd00::1]:6443"
    );
    let bad_port = env(&[
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("KUBERNETES_SERVICE_PORT", "https"),
    ]);
    let err = ApiServer::in_cluster_with(&bad_port, dir.path()).unwrap_err();
    assert!(err.to_string().contains("\"https\" is not a port"), "{err}");

    // Defaults: the pod's namespace and name, else the files.
    let hostname = dir.path().join("hostname");
    std::fs::write(&hostname, "node-7\n").unwrap();
    let from_env = env(&[("POD_NAMESPACE", "site-a"), ("POD_NAME", "gw-5d8f")]);
    let p = LeaseParams::resolve_with(
        None,
        None,
        None,
        Timing::default(),
        &from_env,
        dir.path(),
        &hostname,
    )
    .unwrap();
    assert_eq!(
        (p.namespace.as_str(), p.identity.as_str(), p.name.as_str()),
        ("site-a", "gw-5d8f", DEFAULT_LEASE_NAME)
    );
    assert_eq!(p.problems(), Vec::<String>::new());
    let err = LeaseParams::resolve_with(
        None,
        None,
        None,
        Timing::default(),
        &env(&[]),
        dir.path(),
        &hostname,
    )
    .unwrap_err();
    assert!(err.to_string().contains("namespace"), "{err}");
    std::fs::write(dir.path().join("namespace"), "causeway-system").unwrap();
    let p = LeaseParams::resolve_with(
        Some("my-lease".into()),
        None,
        None,
        Timing::default(),
        &env(&[]),
        dir.path(),
        &hostname,
    )
    .unwrap();
    assert_eq!(
        (p.namespace.as_str(), p.identity.as_str(), p.name.as_str()),
        ("causeway-system", "node-7", "my-lease")
    );
}

#[test]
fn micro_time_is_the_apis_format() {
    let at = |secs: u64, micros: u32| UNIX_EPOCH + Duration::new(secs, micros * 1_000);
    assert_eq!(micro_time(at(0, 0)), "1970-01-01T00:00:00.000000Z");
    assert_eq!(
        micro_time(at(1_700_000_000, 123_456)),
        "2023-11-14T22:13:20.123456Z"
    );
    assert_eq!(
        micro_time(at(1_709_164_800, 1)),
        "2024-02-29T00:00:00.000001Z"
    );
    assert_eq!(
        micro_time(at(4_102_444_799, 999_999)),
        "2099-12-31T23:59:59.999999Z"
    );
}

#[test]
fn a_put_keeps_the_fields_it_does_not_know() {
    let mut object = json!({
        "metadata": {"name": "l", "resourceVersion": "5", "labels": {"team": "net"}},
        "spec": {"holderIdentity": "gw-a", "leaseDurationSeconds": 2, "leaseTransitions": 3,
                 "strategy": "OldestEmulationVersion"},
    });
    let lease = lease_of(&object).unwrap();
    assert_eq!(lease.spec.holder.as_deref(), Some("gw-a"));
    assert_eq!(lease.spec.transitions, 3);
    assert_eq!(lease.resource_version, "5");
    let released = LeaseSpec {
        holder: None,
        lease_duration_seconds: Some(1),
        acquire_time: Some("x".into()),
        renew_time: Some("x".into()),
        transitions: 3,
    };
    write_spec(&mut object, &released);
    assert_eq!(object["spec"].get("holderIdentity"), None);
    assert_eq!(object["spec"]["strategy"], "OldestEmulationVersion");
    assert_eq!(object["metadata"]["labels"]["team"], "net");
    assert_eq!(lease_of(&object).unwrap().spec, released);
    let err = lease_of(&json!({"metadata": {}, "spec": {}})).unwrap_err();
    assert!(err.contains("resourceVersion"), "{err}");
    let err =
        lease_of(&json!({"metadata": {"resourceVersion": "1"}, "spec": {"leaseTransitions": -1}}))
            .unwrap_err();
    assert!(err.contains("spec.leaseTransitions = -1"), "{err}");
}
