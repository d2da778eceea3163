//! The HTTP/1.1 server (hyper) of `/metrics`, `/healthz` and `/readyz`,
//! for the site daemon and the rendezvous alike (see [`super::prometheus`]
//! for what `/metrics` holds).
//!
//! Only `GET` and `HEAD` are accepted (405 otherwise); other paths are 404.
//! `/healthz` answers 200 while the caller's `alive` check passes (for a
//! site: both packet threads run), 503 otherwise; `/readyz` 200 only while
//! the caller's `ready` flag is set *and* `alive` passes, 503 otherwise. At most
//! [`MAX_CONNECTIONS`] connections are served at once, request headers
//! must arrive within [`HEADER_TIMEOUT`], and a kept-alive connection is
//! closed after [`MAX_CONNECTION_AGE`].

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{Instrument, debug, info, warn};

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A kept-alive connection is closed (after its current request) this long
/// after it was opened, so that idle clients cannot hold every slot.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(120);
/// Time left to a connection to finish its request once it is being closed.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// The running HTTP server; dropping it stops serving.
pub struct MetricsServer {
    task: JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr`; the error names it.
pub(super) async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for metrics: {e}"),
        )
    })
}

/// Serves `registry` on a bound `listener` (tests bind port 0); `alive`
/// is asked at every `/healthz` and `/readyz`.
pub(super) fn serve_on(
    listener: TcpListener,
    registry: Registry,
    ready: Arc<AtomicBool>,
    alive: impl Fn() -> bool + Send + Sync + 'static,
) -> io::Result<MetricsServer> {
    let local_addr = listener.local_addr()?;
    let state = Arc::new(State {
        registry,
        ready,
        alive: Box::new(alive),
    });
    let task = tokio::spawn(
        accept_loop(listener, state).instrument(tracing::info_span!("metrics", %local_addr)),
    );
    info!(%local_addr, "serving /metrics, /healthz and /readyz");
    Ok(MetricsServer { task })
}

struct State {
    registry: Registry,
    ready: Arc<AtomicBool>,
    /// Whether the process does its job (the site's data path runs).
    alive: Box<dyn Fn() -> bool + Send + Sync>,
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // Connections live in the set, so that aborting this task ends them.
    let mut connections = JoinSet::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    loop {
        while connections.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let state = Arc::clone(&state);
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req: Request<Incoming>| {
                let response = respond(req.method(), req.uri().path(), &state);
                async move { Ok::<_, Infallible>(response) }
            }),
        );
        connections.spawn(
            async move {
                tokio::pin!(conn);
                let served = tokio::select! {
                    served = conn.as_mut() => served,
                    _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {
                        conn.as_mut().graceful_shutdown();
                        tokio::time::timeout(CLOSE_GRACE, conn).await.unwrap_or(Ok(()))
                    }
                };
                if let Err(e) = served {
                    debug!(%peer, "connection: {e}");
                }
                drop(permit);
            }
            .in_current_span(),
        );
    }
}

/// The answer to `method path`.
fn respond(method: &Method, path: &str, state: &State) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/metrics" => {
            let mut body = String::with_capacity(16 << 10);
            match prometheus_client::encoding::prometheus_text::encode(&mut body, &state.registry) {
                Ok(()) => {
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static(
                            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                        ),
                    );
                    response
                }
                Err(fmt::Error) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding the metrics failed\n",
                ),
            }
        }
        "/healthz" if (state.alive)() => text(StatusCode::OK, "ok\n"),
        "/healthz" => text(StatusCode::SERVICE_UNAVAILABLE, "data path down\n"),
        "/readyz" if state.ready.load(Ordering::Acquire) && (state.alive)() => {
            text(StatusCode::OK, "ready\n")
        }
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One HTTP/1.1 exchange; returns the status code, the headers (lower
    /// case) and the body.
    pub(crate) async fn http(addr: SocketAddr, request: &str) -> (u16, String, String) {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(request.as_bytes()).await.expect("send");
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw).await.expect("read");
        let raw = String::from_utf8(raw).expect("utf-8");
        let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
        let status = head
            .split(' ')
            .nth(1)
            .expect("status")
            .parse()
            .expect("code");
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    pub(crate) fn get(path: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    }

    #[tokio::test]
    async fn endpoints() {
        let ready = Arc::new(AtomicBool::new(false));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut registry = Registry::default();
        let scraped = prometheus_client::metrics::counter::Counter::<u64>::default();
        scraped.inc_by(2000);
        registry.register("scraped", "A test counter", scraped);
        let alive = Arc::new(AtomicBool::new(true));
        let server = {
            let alive = Arc::clone(&alive);
            serve_on(listener, registry, Arc::clone(&ready), move || {
                alive.load(Ordering::Acquire)
            })
            .expect("serve")
        };

        let (status, head, body) = http(addr, &get("/metrics")).await;
        assert_eq!(status, 200, "{head}");
        assert!(
            head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert!(body.contains("\nscraped_total 2000\n"), "{body}");

        assert_eq!(http(addr, &get("/healthz")).await.0, 200);
        assert_eq!(http(addr, &get("/readyz")).await.0, 503);
        ready.store(true, Ordering::Release);
        assert_eq!(http(addr, &get("/readyz")).await.0, 200);
        // A dead data path: neither healthy nor ready, metrics still served.
        alive.store(false, Ordering::Release);
        let (status, _, body) = http(addr, &get("/healthz")).await;
        assert_eq!((status, body.as_str()), (503, "data path down\n"));
        assert_eq!(http(addr, &get("/readyz")).await.0, 503);
        assert_eq!(http(addr, &get("/metrics")).await.0, 200);
        alive.store(true, Ordering::Release);
        assert_eq!(http(addr, &get("/readyz")).await.0, 200);
        assert_eq!(http(addr, &get("/metrics?x=1")).await.0, 200);
        assert_eq!(http(addr, &get("/nope")).await.0, 404);

        let (status, head, body) = http(
            addr,
            "HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!((status, body.as_str()), (200, ""), "{head}");
        let (status, head, _) = http(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status, 405);
        assert!(head.contains("allow: get, head"), "{head}");

        // Keep-alive: several requests on one connection.
        let pipelined = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n{}",
            get("/readyz")
        );
        let (status, _, rest) = http(addr, &pipelined).await;
        assert_eq!(status, 200);
        assert_eq!(rest.matches("HTTP/1.1 200 OK").count(), 2, "{rest}");

        // Garbage gets a 400 or a closed connection, and the server goes on.
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"\x00\x01\x02 not http at all\r\n\r\n")
            .await
            .expect("send");
        let mut out = Vec::new();
        let _ = conn.read_to_end(&mut out).await;
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1.1 400"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        assert_eq!(http(addr, &get("/healthz")).await.0, 200);

        // Dropping the server closes the port.
        drop(server);
        tokio::task::yield_now().await;
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "still listening after drop"
        );
    }

    #[tokio::test]
    async fn bind_errors_name_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = taken.local_addr().expect("addr");
        let err = bind(addr).await.expect_err("port in use");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
