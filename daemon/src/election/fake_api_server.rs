//! A **simulated** Kubernetes API server, for tests only: the election's
//! unit tests (`kubernetes_tests.rs`) and the end-to-end test that runs two
//! `causeway up` replicas against it (`tests/e2e/failover_kubernetes.rs`).
//! Nothing in the daemon uses it.
//!
//! It is HTTPS (rustls, with the certificate and key the test gives it,
//! typically from a test CA) and implements GET, POST and PUT of
//! `coordination.k8s.io/v1` Lease objects, in any namespace, with
//! `resourceVersion` conflicts (409) and bearer tokens (401 for one it does
//! not accept), and nothing else of Kubernetes: no RBAC, no watch, no
//! other resource, no admission, no validation of the objects.
//! It can also stop answering one token's requests (they hang), which is
//! how the unit tests simulate the active replica losing its access.
//!
//! It is compiled into the library (hidden from the docs) rather than
//! into the unit tests alone because integration tests cannot see a
//! library's `#[cfg(test)]` code, and it needs no dependency the daemon
//! does not already have (hyper's server for the metrics endpoint,
//! tokio-rustls, serde_json); making a certificate is left to the test
//! (rcgen is a dev-dependency). The binary never calls it, so the linker
//! drops it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Where Leases live: `/apis/coordination.k8s.io/v1/namespaces/<ns>/leases`.
const LEASES_PREFIX: &str = "/apis/coordination.k8s.io/v1/namespaces/";

/// One request the simulated API server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    /// The bearer token it came with ("" without one).
    pub token: String,
    /// `GET`, `POST` or `PUT` (or whatever else was asked).
    pub method: String,
    /// The status code of the answer.
    pub status: u16,
}

/// What the simulated API server keeps and how it behaves.
#[derive(Debug, Default)]
pub struct FakeState {
    /// `(namespace, name)` → Lease object, as last written.
    pub leases: BTreeMap<(String, String), Value>,
    /// The last `resourceVersion` given out (one counter for all objects).
    pub version: u64,
    /// Tokens it accepts; any other gets 401.
    pub tokens: BTreeSet<String>,
    /// Tokens whose requests it never answers.
    pub hung: BTreeSet<String>,
    /// Every answered request, in order.
    pub log: Vec<Answered>,
}

/// A simulated Kubernetes API server (Leases only) serving HTTPS on a
/// listener the caller bound. Stops when dropped.
#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<FakeState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApiServer {
    /// Serves on `listener` (the caller picks the address and network
    /// namespace) with `cert_chain` and `key`; accepts no token until
    /// [`FakeApiServer::accept_token`]. Must be called inside a tokio
    /// runtime, which then runs it.
    pub fn start(
        listener: TcpListener,
        cert_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, std::io::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(cert_chain, key))
            .map_err(std::io::Error::other)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let addr = listener.local_addr()?;
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
        Ok(FakeApiServer { addr, state, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its state, to inspect or change (tokens, hung clients, the log).
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        lock(&self.state)
    }

    /// Accepts `token` from now on.
    pub fn accept_token(&self, token: &str) {
        self.state().tokens.insert(token.to_owned());
    }

    /// The Lease object `namespace/name`, if it exists.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        self.state()
            .leases
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// The `holderIdentity` of Lease `namespace/name` (`None` when it does
    /// not exist or was released).
    pub fn holder(&self, namespace: &str, name: &str) -> Option<String> {
        self.lease(namespace, name)?["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_owned)
    }
}

/// The lock, also after a panic elsewhere (the state stays usable).
fn lock(state: &Mutex<FakeState>) -> MutexGuard<'_, FakeState> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A certificate (DER) as PEM, e.g. for the CA file a client reads.
pub fn pem_certificate(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

fn respond(code: StatusCode, value: &Value) -> hyper::Response<Full<Bytes>> {
    let mut response = hyper::Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn status(code: StatusCode, message: &str) -> hyper::Response<Full<Bytes>> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                      "message": message, "code": code.as_u16()});
    respond(code, &body)
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
    if lock(state).hung.contains(&token) {
        std::future::pending::<()>().await;
    }
    let Ok(body) = req.into_body().collect().await else {
        return status(StatusCode::BAD_REQUEST, "cannot read the request body");
    };
    let body = body.to_bytes();
    let mut s = lock(state);
    let response = answer(&mut s, &token, &method, &path, &body);
    s.log.push(Answered {
        token,
        method: method.to_string(),
        status: response.status().as_u16(),
    });
    response
}

/// `(namespace, Some(name))` for a Lease's path, `(namespace, None)` for
/// the collection's.
fn lease_path(path: &str) -> Option<(String, Option<String>)> {
    let rest = path.strip_prefix(LEASES_PREFIX)?;
    let (namespace, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("leases")?;
    let name = match rest {
        "" => None,
        _ => Some(rest.strip_prefix('/').filter(|n| !n.contains('/'))?),
    };
    Some((namespace.to_owned(), name.map(str::to_owned)))
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
    let Some((namespace, name)) = lease_path(path) else {
        return status(StatusCode::NOT_FOUND, "not a Lease path");
    };
    let parsed = || {
        serde_json::from_slice::<Value>(body)
            .ok()
            .filter(Value::is_object)
    };
    match (method, name) {
        (&Method::GET, Some(name)) => match s.leases.get(&(namespace, name)) {
            Some(lease) => respond(StatusCode::OK, lease),
            None => status(StatusCode::NOT_FOUND, "leases not found"),
        },
        (&Method::POST, None) => {
            let Some(mut lease) = parsed() else {
                return status(StatusCode::BAD_REQUEST, "the body is not a JSON object");
            };
            let Some(name) = lease["metadata"]["name"].as_str().map(str::to_owned) else {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "metadata.name: Required");
            };
            let key = (namespace, name);
            if s.leases.contains_key(&key) {
                return status(StatusCode::CONFLICT, "already exists");
            }
            s.version += 1;
            lease["metadata"]["resourceVersion"] = json!(s.version.to_string());
            s.leases.insert(key, lease.clone());
            respond(StatusCode::CREATED, &lease)
        }
        (&Method::PUT, Some(name)) => {
            let Some(mut lease) = parsed() else {
                return status(StatusCode::BAD_REQUEST, "the body is not a JSON object");
            };
            let key = (namespace, name);
            let Some(current) = s.leases.get(&key) else {
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
            s.leases.insert(key, lease.clone());
            respond(StatusCode::OK, &lease)
        }
        _ => status(StatusCode::METHOD_NOT_ALLOWED, "not simulated"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_paths() {
        let ns = |s: &str| s.to_owned();
        assert_eq!(
            lease_path("/apis/coordination.k8s.io/v1/namespaces/a/leases"),
            Some((ns("a"), None))
        );
        assert_eq!(
            lease_path("/apis/coordination.k8s.io/v1/namespaces/a/leases/gw"),
            Some((ns("a"), Some(ns("gw"))))
        );
        assert_eq!(
            lease_path("/apis/coordination.k8s.io/v1/namespaces/a/leases/gw/x"),
            None
        );
        assert_eq!(
            lease_path("/apis/coordination.k8s.io/v1/namespaces/a/pods"),
            None
        );
        assert_eq!(lease_path("/api/v1/namespaces/a/leases"), None);
    }
}
