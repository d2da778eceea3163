//! The thin adapter between [`Elector`] and a
//! Kubernetes API server: in-cluster configuration, GET/POST/PUT of one
//! `coordination.k8s.io/v1` Lease over HTTPS, and the loop that drives the
//! state machine and hands its role changes to the daemon.
//!
//! The HTTP client is hyper's (already built for the metrics server) over
//! tokio-rustls with the rustls and ring that quinn already builds: no
//! `kube`/`k8s-openapi` (see docs/failover-kubernetes.md for the measured
//! cost). One connection is kept alive and replaced after any error or
//! given-up request; TLS 1.3 only (every supported API server speaks it).
//!
//! The service-account token is read again for every request (the kubelet
//! rotates projected tokens), and the CA bundle at every new connection.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Map, Value, json};
use tracing::Instrument;

use super::lease::{Elector, Lease, LeaseSpec, Op, Outcome, Role, Timing};

/// Where a pod's service-account credentials are mounted.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The default Lease name (the Role in deploy/kubernetes/gateway/role.yaml
/// names it: change both together).
pub const DEFAULT_LEASE_NAME: &str = "causeway-gateway";

/// Largest API answer read (a Lease is well under 4 KiB).
const MAX_BODY: usize = 1 << 20;

/// What the election needs to know about its Lease and itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseParams {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's `holderIdentity`: unique among the replicas (the pod
    /// name).
    pub identity: String,
    /// Lease duration, renew deadline, retry period.
    pub timing: Timing,
}

impl LeaseParams {
    /// The parameters with defaults taken from the pod: `namespace` from
    /// `POD_NAMESPACE`, else the service account's namespace file;
    /// `identity` from `POD_NAME`, else the host name; `name` defaults to
    /// [`DEFAULT_LEASE_NAME`].
    pub fn resolve(
        name: Option<String>,
        namespace: Option<String>,
        identity: Option<String>,
        timing: Timing,
    ) -> Result<Self, InClusterError> {
        Self::resolve_with(
            name,
            namespace,
            identity,
            timing,
            &|key| std::env::var(key).ok(),
            Path::new(SERVICE_ACCOUNT_DIR),
            Path::new("/proc/sys/kernel/hostname"),
        )
    }

    /// [`LeaseParams::resolve`] with the environment, the service-account
    /// directory and the host-name file given (for tests).
    pub fn resolve_with(
        name: Option<String>,
        namespace: Option<String>,
        identity: Option<String>,
        timing: Timing,
        env: &dyn Fn(&str) -> Option<String>,
        service_account_dir: &Path,
        hostname_file: &Path,
    ) -> Result<Self, InClusterError> {
        let nonempty = |v: Option<String>| v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
        let namespace = match nonempty(namespace).or_else(|| nonempty(env("POD_NAMESPACE"))) {
            Some(ns) => ns,
            None => {
                let file = service_account_dir.join("namespace");
                let text = read(&file)?;
                nonempty(Some(text)).ok_or(InClusterError::Empty { path: file })?
            }
        };
        let identity = match nonempty(identity).or_else(|| nonempty(env("POD_NAME"))) {
            Some(id) => id,
            None => {
                let text = read(hostname_file)?;
                nonempty(Some(text)).ok_or_else(|| InClusterError::Empty {
                    path: hostname_file.to_owned(),
                })?
            }
        };
        Ok(LeaseParams {
            namespace,
            name: nonempty(name).unwrap_or_else(|| DEFAULT_LEASE_NAME.to_owned()),
            identity,
            timing,
        })
    }

    /// Every problem at once, naming the setting (config key) at fault.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !is_dns_subdomain(&self.name) {
            out.push(format!(
                "lease_name = {:?}: not a Kubernetes object name (lower-case letters, digits, \
                 '-' and '.', at most 253, starting and ending with a letter or digit)",
                self.name
            ));
        }
        if !is_dns_label(&self.namespace) {
            out.push(format!(
                "lease_namespace = {:?}: not a Kubernetes namespace name (lower-case letters, \
                 digits and '-', at most 63)",
                self.namespace
            ));
        }
        if self.identity.is_empty() || self.identity.len() > 253 {
            out.push(format!(
                "identity = {:?}: must be 1 to 253 characters (default: the pod name, POD_NAME)",
                self.identity
            ));
        }
        out.extend(self.timing.problems());
        out
    }

    fn path(&self) -> String {
        format!(
            "/apis/coordination.k8s.io/v1/namespaces/{}/leases/{}",
            self.namespace, self.name
        )
    }

    fn collection_path(&self) -> String {
        format!(
            "/apis/coordination.k8s.io/v1/namespaces/{}/leases",
            self.namespace
        )
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Where and how to reach the API server.
#[derive(Debug, Clone)]
pub struct ApiServer {
    host: String,
    port: u16,
    ca_file: PathBuf,
    token_file: PathBuf,
}

/// Why the API server's address or credentials cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum InClusterError {
    /// An environment variable every pod has is missing.
    #[error(
        "{0} is not set: failover with election = \"kubernetes\" runs only in a Kubernetes pod \
         (the kubelet sets it)"
    )]
    MissingEnv(&'static str),
    /// `KUBERNETES_SERVICE_PORT` is not a port.
    #[error("KUBERNETES_SERVICE_PORT = {0:?} is not a port number")]
    BadPort(String),
    /// A credentials file cannot be read.
    #[error(
        "cannot read {path}: {source} (is a service account token mounted? \
         automountServiceAccountToken must be true for the gateway)"
    )]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file that must hold something is empty.
    #[error("{path} is empty")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The CA bundle holds no usable certificate.
    #[error("{path}: no usable CA certificate in it: {why}")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

fn read(path: &Path) -> Result<String, InClusterError> {
    std::fs::read_to_string(path).map_err(|source| InClusterError::Unreadable {
        path: path.to_owned(),
        source,
    })
}

impl ApiServer {
    /// The API server of the cluster this pod runs in:
    /// `KUBERNETES_SERVICE_HOST`/`_PORT`, and the CA bundle and token of
    /// the pod's service account.
    pub fn in_cluster() -> Result<Self, InClusterError> {
        Self::in_cluster_with(
            &|key| std::env::var(key).ok(),
            Path::new(SERVICE_ACCOUNT_DIR),
        )
    }

    /// [`ApiServer::in_cluster`] with the environment and the
    /// service-account directory given (for tests).
    pub fn in_cluster_with(
        env: &dyn Fn(&str) -> Option<String>,
        service_account_dir: &Path,
    ) -> Result<Self, InClusterError> {
        let host = env("KUBERNETES_SERVICE_HOST")
            .filter(|h| !h.is_empty())
            .ok_or(InClusterError::MissingEnv("KUBERNETES_SERVICE_HOST"))?;
        let port = env("KUBERNETES_SERVICE_PORT")
            .ok_or(InClusterError::MissingEnv("KUBERNETES_SERVICE_PORT"))?;
        let port = port
            .trim()
            .parse::<u16>()
            .map_err(|_| InClusterError::BadPort(port.clone()))?;
        Self::new(
            host,
            port,
            service_account_dir.join("ca.crt"),
            service_account_dir.join("token"),
        )
    }

    /// An API server at `host:port` whose certificate is signed by a CA in
    /// `ca_file` (PEM), authenticated with the bearer token in
    /// `token_file`. Both files are checked now and read again later.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        ca_file: impl Into<PathBuf>,
        token_file: impl Into<PathBuf>,
    ) -> Result<Self, InClusterError> {
        let api = ApiServer {
            host: host.into(),
            port,
            ca_file: ca_file.into(),
            token_file: token_file.into(),
        };
        api.tls_config()?;
        api.token()?;
        Ok(api)
    }

    fn token(&self) -> Result<String, InClusterError> {
        let token = read(&self.token_file)?.trim().to_owned();
        if token.is_empty() {
            return Err(InClusterError::Empty {
                path: self.token_file.clone(),
            });
        }
        Ok(token)
    }

    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, InClusterError> {
        let bad = |why: String| InClusterError::BadCa {
            path: self.ca_file.clone(),
            why,
        };
        let pem = std::fs::read(&self.ca_file).map_err(|source| InClusterError::Unreadable {
            path: self.ca_file.clone(),
            source,
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| bad(format!("not PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("a certificate is unusable: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad("no CERTIFICATE block".into()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Why the election cannot run at all (API failures are not: they are
/// logged and retried, and the replica is standby meanwhile).
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// The parameters are unusable; every problem, each naming its setting.
    #[error("[failover]: {}", .0.join("; "))]
    Params(Vec<String>),
}

/// One HTTPS connection to the API server, kept between requests, and the
/// last Lease object seen (a PUT sends it back with our changes, keeping
/// fields we do not know).
struct Client {
    api: ApiServer,
    params: LeaseParams,
    conn: Mutex<Option<SendRequest<Full<Bytes>>>>,
    last_object: Mutex<Option<Value>>,
}

impl Client {
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let tls = self.api.tls_config().map_err(|e| e.to_string())?;
        let authority = self.api.authority();
        let tcp = tokio::net::TcpStream::connect((self.api.host.as_str(), self.api.port))
            .await
            .map_err(|e| format!("cannot connect to the API server {authority}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.api.host.clone())
            .map_err(|e| format!("API server host {:?}: {e}", self.api.host))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with the API server {authority}: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP with the API server {authority}: {e}"))?;
        tokio::spawn(async move {
            // Ends when the sender is dropped or the server closes.
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// One HTTP exchange. The connection is taken out for the call and put
    /// back only when it completed: a call dropped half-way (given up)
    /// or failed leaves no half-used connection behind.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), String> {
        let token = self.api.token().map_err(|e| e.to_string())?;
        let cached = self.conn.lock().ok().and_then(|mut c| c.take());
        let mut sender = match cached {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        sender
            .ready()
            .await
            .map_err(|e| format!("API server connection: {e}"))?;
        let has_body = body.is_some();
        let mut request = hyper::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, self.api.authority())
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("causeway/", env!("CARGO_PKG_VERSION")),
            );
        if has_body {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| format!("building {method} {path}: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("{method} {path}: reading the answer: {e}"))?
            .to_bytes();
        if let Ok(mut c) = self.conn.lock() {
            *c = Some(sender);
        }
        Ok((status, bytes))
    }

    /// Carries out one of the elector's operations.
    async fn call(&self, op: Op) -> Outcome {
        let (method, path, body) = match &op {
            Op::Get => (Method::GET, self.params.path(), None),
            Op::Create(spec) => {
                let mut object = json!({
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.params.name, "namespace": self.params.namespace},
                    "spec": {},
                });
                write_spec(&mut object, spec);
                (Method::POST, self.params.collection_path(), Some(object))
            }
            Op::Update {
                spec,
                resource_version,
            } => {
                let mut object = self
                    .last_object
                    .lock()
                    .ok()
                    .and_then(|o| o.clone())
                    .unwrap_or_else(|| {
                        json!({
                            "apiVersion": "coordination.k8s.io/v1",
                            "kind": "Lease",
                            "metadata": {"name": self.params.name, "namespace": self.params.namespace},
                        })
                    });
                if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.insert("resourceVersion".into(), json!(resource_version));
                    // Left out, the server keeps them as they are.
                    meta.remove("managedFields");
                }
                write_spec(&mut object, spec);
                (Method::PUT, self.params.path(), Some(object))
            }
        };
        let body = body.map(|b| b.to_string().into_bytes());
        let (status, bytes) = match self.exchange(method.clone(), &path, body).await {
            Ok(answer) => answer,
            Err(e) => return Outcome::Failed(e),
        };
        let parsed = || -> Result<Lease, String> {
            let value: Value = serde_json::from_slice(&bytes)
                .map_err(|e| format!("{method} {path}: the answer is not JSON: {e}"))?;
            let lease = lease_of(&value).map_err(|e| format!("{method} {path}: {e}"))?;
            if let Ok(mut last) = self.last_object.lock() {
                *last = Some(value);
            }
            Ok(lease)
        };
        match (&op, status) {
            (Op::Get, StatusCode::OK) => parsed().map_or_else(Outcome::Failed, Outcome::Found),
            (Op::Get, StatusCode::NOT_FOUND) => Outcome::NotFound,
            (Op::Create(_) | Op::Update { .. }, StatusCode::OK | StatusCode::CREATED) => {
                parsed().map_or_else(Outcome::Failed, Outcome::Written)
            }
            // POST: it exists already; PUT: it changed since, or is gone.
            (Op::Create(_) | Op::Update { .. }, StatusCode::CONFLICT)
            | (Op::Update { .. }, StatusCode::NOT_FOUND) => Outcome::Conflict,
            (_, status) => Outcome::Failed(api_failure(&method, &path, status, &bytes)),
        }
    }
}

/// A failed answer in words: the status, the API's own message, and what
/// to check for the ones an operator can fix.
fn api_failure(method: &Method, path: &str, status: StatusCode, body: &[u8]) -> String {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    let hint = match status {
        StatusCode::UNAUTHORIZED => {
            " (the service-account token was refused: is it mounted and current?)"
        }
        StatusCode::FORBIDDEN => {
            " (the gateway's service account lacks a permission: it needs get, create and \
             update on leases.coordination.k8s.io, see deploy/kubernetes/gateway/role.yaml)"
        }
        _ => "",
    };
    format!("{method} {path}: {status}: {message}{hint}")
}

/// Writes our fields of `spec` into the object's `spec`, keeping others.
fn write_spec(object: &mut Value, spec: &LeaseSpec) {
    let Some(root) = object.as_object_mut() else {
        return;
    };
    let target = root
        .entry("spec")
        .or_insert_with(|| Value::Object(Map::new()));
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(target) = target.as_object_mut() else {
        return;
    };
    let mut set = |key: &str, value: Option<Value>| match value {
        Some(v) => {
            target.insert(key.to_owned(), v);
        }
        None => {
            target.remove(key);
        }
    };
    set("holderIdentity", spec.holder.clone().map(Value::from));
    set(
        "leaseDurationSeconds",
        spec.lease_duration_seconds.map(Value::from),
    );
    set("acquireTime", spec.acquire_time.clone().map(Value::from));
    set("renewTime", spec.renew_time.clone().map(Value::from));
    set("leaseTransitions", Some(Value::from(spec.transitions)));
}

/// The election's view of a Lease object.
fn lease_of(value: &Value) -> Result<Lease, String> {
    let resource_version = value["metadata"]["resourceVersion"]
        .as_str()
        .filter(|v| !v.is_empty())
        .ok_or("the Lease has no metadata.resourceVersion")?
        .to_owned();
    let spec = &value["spec"];
    let text = |key: &str| spec[key].as_str().map(str::to_owned);
    let number = |key: &str| -> Result<Option<u32>, String> {
        match &spec[key] {
            Value::Null => Ok(None),
            v => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| format!("spec.{key} = {v} is not a count")),
        }
    };
    Ok(Lease {
        spec: LeaseSpec {
            holder: text("holderIdentity").filter(|h| !h.is_empty()),
            lease_duration_seconds: number("leaseDurationSeconds")?,
            acquire_time: text("acquireTime"),
            renew_time: text("renewTime"),
            transitions: number("leaseTransitions")?.unwrap_or(0),
        },
        resource_version,
    })
}

/// A wall-clock time as the API's MicroTime: `2026-12-06T02:14:10.123456Z`.
pub fn micro_time(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3_600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// Runs the election until `shutdown` completes, then releases the Lease
/// if this replica holds it (standby first, see [`Elector::release`]) and
/// returns. Every role change is passed to `on_role`, in order, each
/// different from the one before; the replica is [`Role::Standby`] until
/// the first call. API failures are logged and retried (the replica is
/// standby meanwhile, once its renew deadline passed); only unusable
/// parameters are an error, returned before anything is sent.
///
/// `on_role` must take effect at once (send on a `watch` channel, set an
/// atomic): the safety margin between this replica's step-down and another
/// one's takeover is `lease_duration - renew_deadline` (500 ms by default).
/// Make `shutdown` complete once the daemon no longer acts as active: the
/// release lets a standby take over within one retry period.
pub async fn run(
    api: ApiServer,
    params: LeaseParams,
    on_role: impl FnMut(Role) + Send,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ElectionError> {
    let problems = params.problems();
    if !problems.is_empty() {
        return Err(ElectionError::Params(problems));
    }
    let span = tracing::info_span!(
        "election",
        lease = %format!("{}/{}", params.namespace, params.name),
        identity = %params.identity
    );
    drive(api, params, on_role, shutdown).instrument(span).await;
    Ok(())
}

/// A request on its way: the API call, to be awaited or dropped.
type Call = std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>>;

async fn drive(
    api: ApiServer,
    params: LeaseParams,
    mut on_role: impl FnMut(Role) + Send,
    shutdown: impl Future<Output = ()>,
) {
    let mut elector = Elector::new(params.identity.clone(), params.timing, Instant::now());
    let client = Arc::new(Client {
        api,
        params,
        conn: Mutex::new(None),
        last_object: Mutex::new(None),
    });
    let mut shutdown = std::pin::pin!(shutdown);
    let mut stopping = false;
    let mut pending: Option<(u64, Call)> = None;
    let mut failures = Failures::default();
    loop {
        let now = Instant::now();
        elector.handle_timeout(now);
        while let Some(role) = elector.poll_role() {
            match role {
                Role::Active { term } => {
                    tracing::info!(term, "active: this replica holds the Lease")
                }
                Role::Standby => tracing::info!("standby"),
            }
            on_role(role);
        }
        if elector.is_finished() {
            return;
        }
        // A request the elector gave up on is dropped, which cancels it.
        if pending
            .as_ref()
            .is_some_and(|(id, _)| elector.in_flight() != Some(*id))
        {
            pending = None;
            failures.note(&Outcome::Failed(format!(
                "no answer from the API server within {} ms",
                elector.timing().request_timeout.as_millis()
            )));
        }
        if pending.is_none()
            && let Some(request) = elector.poll_request(now, &micro_time(SystemTime::now()))
        {
            let client = Arc::clone(&client);
            pending = Some((
                request.id,
                Box::pin(async move { client.call(request.op).await }),
            ));
        }
        let wake = elector.poll_timeout().map(|(at, _)| at);
        tokio::select! {
            outcome = async {
                match pending.as_mut() {
                    Some((_, call)) => call.await,
                    None => std::future::pending().await,
                }
            }, if pending.is_some() => {
                if let Some((id, _)) = pending.take() {
                    failures.note(&outcome);
                    elector.handle(Instant::now(), id, outcome);
                }
            }
            () = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
            () = &mut shutdown, if !stopping => {
                stopping = true;
                tracing::info!("shutting down: releasing the Lease if held");
                elector.release(Instant::now());
            }
        }
    }
}

/// Logs API failures without flooding: the first of a run, then when the
/// reason changes or every 60th, and the recovery.
#[derive(Default)]
struct Failures {
    count: u64,
    last: Option<String>,
}

impl Failures {
    fn note(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Failed(why) => {
                self.count += 1;
                if self.last.as_deref() != Some(why) || self.count % 60 == 1 {
                    tracing::warn!(failures = self.count, "Lease request failed: {why}");
                }
                self.last = Some(why.clone());
            }
            _ => {
                if self.count > 0 {
                    tracing::info!(failures = self.count, "the API server answers again");
                }
                self.count = 0;
                self.last = None;
            }
        }
    }
}

#[cfg(test)]
#[path = "kubernetes_tests.rs"]
mod tests;
