//! TLS configuration of both ends, for QUIC and for TLS over TCP.
//!
//! The rendezvous presents a fresh self-signed certificate (rcgen) on every
//! start. Sites do not judge the certificate: who the rendezvous is is
//! proven in-band by its X25519 key, bound to this TLS session (see
//! [`super::auth`]). The client still checks the TLS 1.3 CertificateVerify
//! signature with the presented certificate, so the handshake is a normal
//! one where the server holds the key of the certificate it shows.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::auth::{EXPORTER_CONTEXT, EXPORTER_LABEL, Exporter};
use super::proto::ALPN;
use super::tcp::TCP_ALPN;

/// The TLS server name sites ask for (SNI) and the certificate names.
pub(crate) const SERVER_NAME: &str = "causeway-rendezvous";
/// QUIC keep-alive sent by sites.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A connection silent for this long is closed (on both ends).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// The exporter of a QUIC connection's TLS session, which the proofs bind
/// to (see [`super::auth`]); `None` if the session offers none.
pub(crate) fn quic_exporter(conn: &quinn::Connection) -> Option<Exporter> {
    let mut exporter = [0u8; 32];
    conn.export_keying_material(&mut exporter, EXPORTER_LABEL, EXPORTER_CONTEXT)
        .ok()
        .map(|()| exporter)
}

/// The same for a TLS-over-TCP connection (see [`super::tcp`]).
pub(crate) fn tcp_exporter<D>(tls: &rustls::ConnectionCommon<D>) -> Option<Exporter> {
    tls.export_keying_material([0u8; 32], EXPORTER_LABEL, Some(EXPORTER_CONTEXT))
        .ok()
}

/// Why the TLS configuration could not be built (never expected).
#[derive(Debug, thiserror::Error)]
#[error("TLS setup failed: {0}")]
pub struct TlsError(String);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Stream data the rendezvous buffers for a connection before it has
/// authenticated (the server raises it per connection afterwards, see
/// `set_receive_window`).
pub(crate) const UNAUTHENTICATED_RECEIVE_WINDOW: u32 = 8 * 1024;
/// Flow-control window of the rendezvous' one control stream.
const STREAM_RECEIVE_WINDOW: u32 = 64 * 1024;
/// Relay datagrams the rendezvous buffers per connection, each way.
const DATAGRAM_BUFFER: usize = 256 * 1024;
/// Connection attempts quinn holds before the server decides about them.
const MAX_INCOMING: usize = 512;
/// Bytes buffered per connection attempt before the server decides.
const INCOMING_BUFFER: u64 = 16 * 1024;
/// Bytes buffered for all connection attempts before the server decides.
const INCOMING_BUFFER_TOTAL: u64 = 2 * 1024 * 1024;

/// Transport settings; `for_site`: the site's side (which sends keep-alives
/// and accepts no streams).
fn transport(for_site: bool) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    if !for_site {
        // quinn's defaults buffer over 1 MiB of stream data and as much of
        // datagrams per connection, before anyone proved anything.
        t.receive_window(UNAUTHENTICATED_RECEIVE_WINDOW.into());
        t.stream_receive_window(STREAM_RECEIVE_WINDOW.into());
        t.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER));
        t.datagram_send_buffer_size(DATAGRAM_BUFFER);
    }
    // One control stream, opened by the site.
    t.max_concurrent_bidi_streams(if for_site { 0u8 } else { 1u8 }.into());
    t.max_concurrent_uni_streams(0u8.into());
    if let Ok(idle) = quinn::IdleTimeout::try_from(IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    if for_site {
        t.keep_alive_interval(Some(KEEP_ALIVE));
    }
    Arc::new(t)
}

/// The rendezvous' TLS configuration with a new self-signed certificate,
/// for `alpn`.
fn server_tls(alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
    let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])
        .map_err(|e| TlsError(format!("certificate generation: {e}")))?;
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| TlsError(e.to_string()))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.max_early_data_size = 0;
    Ok(tls)
}

/// The rendezvous' QUIC server configuration, with a new self-signed
/// certificate.
pub(crate) fn server_config() -> Result<quinn::ServerConfig, TlsError> {
    let quic =
        QuicServerConfig::try_from(server_tls(ALPN)?).map_err(|e| TlsError(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport(false));
    Ok(config)
}

/// The rendezvous' TLS-over-TCP server configuration (see [`super::tcp`]).
pub(crate) fn tcp_server_config() -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_tls(TCP_ALPN).map(Arc::new)
}

/// Bounds what quinn holds for connection attempts the server has not
/// decided about yet.
pub(crate) fn limit_incoming(config: &mut quinn::ServerConfig) {
    config
        .max_incoming(MAX_INCOMING)
        .incoming_buffer_size(INCOMING_BUFFER)
        .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
}

/// A site's TLS configuration for `alpn`.
fn client_tls(alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SignatureOnly(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.enable_early_data = false;
    Ok(tls)
}

/// A site's QUIC client configuration.
pub(crate) fn client_config() -> Result<quinn::ClientConfig, TlsError> {
    let quic =
        QuicClientConfig::try_from(client_tls(ALPN)?).map_err(|e| TlsError(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport(true));
    Ok(config)
}

/// A site's TLS-over-TCP client configuration (see [`super::tcp`]).
pub(crate) fn tcp_client_config() -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_tls(TCP_ALPN).map(Arc::new)
}

/// Accepts any certificate, but checks the handshake signature made with it.
#[derive(Debug)]
struct SignatureOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for SignatureOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Identity is proven in-band (auth.rs), bound to this session.
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // QUIC is TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
