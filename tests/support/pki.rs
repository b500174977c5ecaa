//! A certificate authority made at test time, certificates it signs, the
//! `[api]` lines that serve them, and clients that trust it.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A certificate authority made for one test.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` (DNS names or IP addresses) with `usage`.
    pub fn issue(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// The files an agent's `[api]` names, and the CA that signed its server
/// certificate.
pub struct Pki {
    pub server_ca: Ca,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// A server CA and a certificate for 127.0.0.1 and localhost that it
/// signed, written to `dir/server.pem` (with the CA) and `dir/server.key`.
pub fn server_pki(dir: &Path) -> Pki {
    let server_ca = Ca::new("reimage test server CA");
    let server = server_ca.issue(
        &["127.0.0.1", "localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let cert_path = dir.join("server.pem");
    let key_path = dir.join("server.key");
    fs::write(&cert_path, format!("{}{}", server.cert, server_ca.pem())).expect("write cert");
    fs::write(&key_path, &server.key).expect("write key");
    Pki {
        server_ca,
        cert_path,
        key_path,
    }
}

/// Adds `lines` to the config's `[api]` table (right after `listen`).
pub fn add_to_api_table(config: &Path, lines: &str) {
    let text = fs::read_to_string(config).expect("config");
    let at = text.find("listen = ").expect("listen in config");
    let end = at + text[at..].find('\n').expect("end of the listen line") + 1;
    fs::write(config, format!("{}{lines}\n{}", &text[..end], &text[end..])).expect("write config");
}

/// The `[api]` lines that serve `pki`'s server certificate.
pub fn tls_lines(pki: &Pki) -> String {
    format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"",
        pki.cert_path.display(),
        pki.key_path.display()
    )
}

/// Makes the agent of `config` serve HTTPS with `pki` and demand client
/// certificates signed by a new client CA (written to `dir/clients.pem`),
/// and returns a controller's certificate that CA signed.
pub fn require_client_certificates(dir: &Path, config: &Path, pki: &Pki) -> Leaf {
    let client_ca = Ca::new("reimage test client CA");
    let client_ca_path = dir.join("clients.pem");
    fs::write(&client_ca_path, client_ca.pem()).expect("write client CA");
    add_to_api_table(
        config,
        &format!(
            "{}\nclient_ca = \"{}\"",
            tls_lines(pki),
            client_ca_path.display()
        ),
    );
    client_ca.issue(&["controller"], ExtendedKeyUsagePurpose::ClientAuth)
}

/// A blocking client that trusts `ca_pem` and presents `identity` if given.
pub fn client(ca_pem: &str, identity: Option<&Leaf>) -> reqwest::blocking::Client {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA added");
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(leaf) => {
            let certs = CertificateDer::pem_slice_iter(leaf.cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("client certificate PEM");
            let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("client key PEM");
            builder
                .with_client_auth_cert(certs, key)
                .expect("client identity")
        }
    };
    reqwest::blocking::Client::builder()
        .tls_backend_preconfigured(config)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}
