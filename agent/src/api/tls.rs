//! HTTPS for the API: the `[api] tls_cert`/`tls_key` identity, optional
//! client certificates signed by `[api] client_ca`, and a listener that
//! hands axum finished TLS connections.
//!
//! Client certificates are a second lock, not a replacement: a request over
//! an authenticated TLS connection still needs its bearer token and role, so
//! a leaked client key alone cannot reimage a node, nor a leaked token alone
//! from a machine without a certificate.

use crate::config::ApiConfig;
use crate::{Error, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A client that has not finished its handshake by then is dropped, so
/// idle connections cannot hold the listener's handshake slots.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the kernel's
/// backlog.
const MAX_HANDSHAKES: usize = 128;

/// The server's TLS configuration from `[api]`, or `None` when `tls_cert` is
/// not set (plain HTTP). Unreadable or malformed files are `ConfigInvalid`,
/// naming the key and the file.
pub fn server_config(api: &ApiConfig) -> Result<Option<Arc<ServerConfig>>> {
    let (Some(cert_path), Some(key_path)) = (&api.tls_cert, &api.tls_key) else {
        return Ok(None);
    };
    let certs = read_certificates("tls_cert", cert_path)?;
    let key = read_private_key(key_path)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::ConfigInvalid(format!("[api] TLS protocol versions: {e}")))?;
    let builder = match &api.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certificates("client_ca", ca_path)? {
                roots.add(cert).map_err(|e| {
                    invalid_file("client_ca", ca_path, &format!("not a usable CA: {e}"))
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid_file("client_ca", ca_path, &e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        let why = match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                "the private key does not belong to the certificate".to_string()
            }
            e => e.to_string(),
        };
        Error::ConfigInvalid(format!(
            "[api] tls_cert {} with tls_key {}: {why}",
            cert_path.display(),
            key_path.display()
        ))
    })?;
    // The API speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

fn invalid_file(key: &str, path: &Path, what: &str) -> Error {
    Error::ConfigInvalid(format!("[api] {key} {}: {what}", path.display()))
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| invalid_file(key, path, &format!("cannot read: {e}")))
}

/// Every `CERTIFICATE` block of a PEM file; at least one.
fn read_certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_file(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| invalid_file(key, path, &format!("malformed PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid_file(
            key,
            path,
            "no PEM CERTIFICATE block in the file",
        ));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = read_file("tls_key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            invalid_file("tls_key", path, "no PEM PRIVATE KEY block in the file")
        }
        e => invalid_file("tls_key", path, &format!("malformed PEM: {e}")),
    })
}

/// Accepts TCP connections and completes their TLS handshakes off the
/// accept path, so one slow or silent client cannot stall the others; axum
/// only ever sees connections whose handshake (and client certificate, when
/// required) succeeded.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    address: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `tcp`. Accepting stops when the listener is dropped.
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<TlsListener> {
        let address = tcp.local_addr()?;
        let (sender, ready) = mpsc::channel(MAX_HANDSHAKES);
        tokio::spawn(accept_and_handshake(tcp, TlsAcceptor::from(config), sender));
        Ok(TlsListener { ready, address })
    }
}

async fn accept_and_handshake(
    mut tcp: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            // The server stopped accepting (shutdown): close the socket.
            () = ready.closed() => return,
            accepted = async {
                let permit = Arc::clone(&handshakes).acquire_owned().await;
                (permit, axum::serve::Listener::accept(&mut tcp).await)
            } => accepted,
        };
        let (Ok(permit), (stream, peer)) = accepted else {
            return;
        };
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = ready.send((tls, peer)).await;
                }
                Ok(Err(err)) => tracing::info!(%peer, %err, "TLS handshake failed"),
                Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept task ended (it only does once this listener is
            // gone); nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn api_with(dir: &Path, cert: &str, key: &str) -> ApiConfig {
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        std::fs::write(&cert_path, cert).expect("write cert");
        std::fs::write(&key_path, key).expect("write key");
        ApiConfig {
            tls_cert: Some(cert_path),
            tls_key: Some(key_path),
            ..plain()
        }
    }

    fn message(result: Result<Option<Arc<ServerConfig>>>) -> String {
        match result {
            Err(err) => {
                assert_eq!(err.code(), "ConfigInvalid");
                err.to_string()
            }
            Ok(_) => panic!("a TLS config was built from bad files"),
        }
    }

    /// An API section without TLS.
    fn plain() -> ApiConfig {
        ApiConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            tokens: Vec::new(),
        }
    }

    #[test]
    fn no_certificate_means_plain_http() {
        assert!(matches!(server_config(&plain()), Ok(None)));
    }

    #[test]
    fn a_file_without_certificates_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let api = api_with(dir.path(), "not pem at all\n", "");
        let text = message(server_config(&api));
        assert!(text.contains("tls_cert"), "{text}");
        assert!(text.contains("cert.pem"), "{text}");
        assert!(text.contains("no PEM CERTIFICATE"), "{text}");
    }

    #[test]
    fn a_broken_pem_block_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let api = api_with(
            dir.path(),
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            "",
        );
        let text = message(server_config(&api));
        assert!(
            text.contains("cert.pem") && text.contains("malformed PEM"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_key_file_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut api = api_with(
            dir.path(),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "",
        );
        api.tls_key = Some(PathBuf::from("/nonexistent/key.pem"));
        let text = message(server_config(&api));
        assert!(
            text.contains("tls_key") && text.contains("/nonexistent/key.pem"),
            "{text}"
        );
    }

    #[test]
    fn a_key_file_without_a_key_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let api = api_with(
            dir.path(),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let text = message(server_config(&api));
        assert!(
            text.contains("key.pem") && text.contains("no PEM PRIVATE KEY"),
            "{text}"
        );
    }
}
