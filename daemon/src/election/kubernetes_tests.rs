//! The adapter against a **fake API server**: [`FakeApiServer`] is a small
//! HTTPS server in this test, on loopback, with a certificate from a CA the
//! test makes (rcgen), that implements GET/POST/PUT of Lease objects with
//! `resourceVersion` conflicts and bearer tokens, and nothing else of
//! Kubernetes. It can refuse a token (401) and stop answering one client
//! (its requests hang), which is how "blocking the active replica's access"
//! is simulated.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::*;

const NAMESPACE: &str = "causeway-test";

/// What the fake API server keeps and how it behaves.
#[derive(Default)]
struct FakeState {
    /// Lease name → object.
    leases: BTreeMap<String, Value>,
    version: u64,
    /// Tokens it accepts.
    tokens: BTreeSet<String>,
    /// Tokens whose requests it never answers.
    hung: BTreeSet<String>,
    /// `(token, method, status)` of every answered request.
    log: Vec<(String, String, u16)>,
}

/// A fake Kubernetes API server (simulated: Leases only), HTTPS on
/// 127.0.0.1 with a certificate from a test CA.
struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<FakeState>>,
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApiServer {
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

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(FakeState::default()));
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let state = Arc::clone(&shared);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, std::convert::Infallible>(serve(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        FakeApiServer {
            addr,
            state,
            dir,
            task,
        }
    }

    /// Credentials for one client: a token file, accepted by the server.
    fn client(&self, token: &str) -> ApiServer {
        let token_file = self.dir.path().join(format!("{token}.token"));
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        self.state.lock().unwrap().tokens.insert(token.to_owned());
        ApiServer::new(
            "127.0.0.1",
            self.addr.port(),
            self.dir.path().join("ca.crt"),
            token_file,
        )
        .unwrap()
    }

    fn holder(&self, name: &str) -> Option<String> {
        let state = self.state.lock().unwrap();
        state.leases.get(name)?["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_owned)
    }
}

fn status(code: StatusCode, message: &str) -> hyper::Response<Full<Bytes>> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                      "message": message, "code": code.as_u16()});
    hyper::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn object(code: StatusCode, value: &Value) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .unwrap()
}

async fn serve(
    state: &Mutex<FakeState>,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_owned();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    if state.lock().unwrap().hung.contains(&token) {
        std::future::pending::<()>().await;
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut s = state.lock().unwrap();
    let response = answer(&mut s, &token, &method, &path, &body);
    s.log
        .push((token, method.to_string(), response.status().as_u16()));
    response
}

fn answer(
    s: &mut FakeState,
    token: &str,
    method: &Method,
    path: &str,
    body: &[u8],
) -> hyper::Response<Full<Bytes>> {
    if !s.tokens.contains(token) {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    let collection = format!("/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases");
    let name = path
        .strip_prefix(&collection)
        .and_then(|rest| rest.strip_prefix('/'))
        .map(str::to_owned);
    match (method, name) {
        (&Method::GET, Some(name)) => match s.leases.get(&name) {
            Some(lease) => object(StatusCode::OK, lease),
            None => status(StatusCode::NOT_FOUND, "leases not found"),
        },
        (&Method::POST, None) if path == collection => {
            let mut lease: Value = serde_json::from_slice(body).unwrap();
            let name = lease["metadata"]["name"].as_str().unwrap().to_owned();
            if s.leases.contains_key(&name) {
                return status(StatusCode::CONFLICT, "already exists");
            }
            s.version += 1;
            lease["metadata"]["resourceVersion"] = json!(s.version.to_string());
            s.leases.insert(name, lease.clone());
            object(StatusCode::CREATED, &lease)
        }
        (&Method::PUT, Some(name)) => {
            let mut lease: Value = serde_json::from_slice(body).unwrap();
            let Some(current) = s.leases.get(&name) else {
                return status(StatusCode::NOT_FOUND, "leases not found");
            };
            if lease["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return status(
                    StatusCode::CONFLICT,
                    "the object has been modified; please apply your changes to the latest version",
                );
            }
            s.version += 1;
            lease["metadata"]["resourceVersion"] = json!(s.version.to_string());
            s.leases.insert(name, lease.clone());
            object(StatusCode::OK, &lease)
        }
        _ => status(StatusCode::NOT_FOUND, "not a Lease path"),
    }
}

/// A certificate as PEM (rcgen's own `pem` is a feature not built here).
fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
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
    let server = FakeApiServer::start().await;
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
    server
        .state
        .lock()
        .unwrap()
        .hung
        .insert(active_token.to_owned());
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
    server.state.lock().unwrap().hung.clear();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(active.role(), Role::Standby);
    assert!(standby.role().is_active());
    drop(a);
    drop(b);
}

#[tokio::test]
async fn a_clean_stop_releases_the_lease_and_the_other_takes_over_within_a_retry_period() {
    let server = FakeApiServer::start().await;
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
    let server = FakeApiServer::start().await;
    let api = server.client("old-token");
    let a = Replica::start(api.clone(), "gw-a");
    wait_for("gw-a active", Duration::from_secs(5), || {
        a.role().is_active()
    })
    .await;
    // The kubelet rotates the token: the server takes only the new one,
    // and the adapter reads the file again for every request.
    {
        let mut s = server.state.lock().unwrap();
        s.tokens.clear();
        s.tokens.insert("new-token".into());
    }
    std::fs::write(&api.token_file, "new-token\n").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(a.role().is_active(), "still renewing with the new token");
    assert_eq!(a.changes().len(), 1);
    let log = server.state.lock().unwrap().log.clone();
    assert!(
        log.iter()
            .any(|(token, method, code)| token == "new-token" && method == "PUT" && *code == 200)
    );

    // A token the server refuses: the replica steps down (it cannot renew)
    // and keeps trying; run() does not fail.
    server.state.lock().unwrap().tokens.clear();
    wait_for("gw-a steps down", Duration::from_secs(3), || {
        !a.role().is_active()
    })
    .await;
    assert!(!a.task.is_finished());
    let log = server.state.lock().unwrap().log.clone();
    assert!(log.iter().any(|(_, _, code)| *code == 401));
    a.stop().await;
}

#[tokio::test]
async fn unusable_parameters_are_refused_at_once_naming_each() {
    let server = FakeApiServer::start().await;
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
