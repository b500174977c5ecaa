//! The API over HTTPS, with and without client certificates: the real agent
//! with a CA, a server certificate and client certificates made at test time.

use rcgen::ExtendedKeyUsagePurpose;
use reimage_e2e::bin::{agent, stderr};
use reimage_e2e::daemon::{Daemon, READER, write_config};
use reimage_e2e::pki::{
    Ca, Leaf, add_to_api_table, client, require_client_certificates, server_pki, tls_lines,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn get(
    client: &reqwest::blocking::Client,
    url: &str,
    token: Option<&str>,
) -> reqwest::Result<(u16, serde_json::Value)> {
    let mut request = client.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send()?;
    let status = response.status().as_u16();
    let body = response.json().unwrap_or(serde_json::Value::Null);
    Ok((status, body))
}

#[test]
fn the_api_speaks_https_only_and_still_needs_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = server_pki(dir.path());
    let config = write_config(dir.path(), "");
    add_to_api_table(&config, &tls_lines(&pki));
    let trusting = client(&pki.server_ca.pem(), None);
    let mut daemon = Daemon::start_with(&config, "https", trusting.clone());
    let node_url = format!("{}/v1/node", daemon.url);

    let (status, node) = get(&trusting, &node_url, Some(READER)).expect("HTTPS request");
    assert_eq!(status, 200, "{node}");
    assert_eq!(node["id"], "node-1");

    let (status, body) = get(&trusting, &node_url, None).expect("HTTPS request");
    assert_eq!(status, 401, "a token is still needed over TLS: {body}");
    assert_eq!(body["code"], "AuthenticationFailed");

    let plain = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let plain_url = node_url.replacen("https://", "http://", 1);
    assert!(
        get(&plain, &plain_url, Some(READER)).is_err(),
        "plain HTTP to the TLS port must fail"
    );

    let stranger = Ca::new("some other CA");
    let untrusting = client(&stranger.pem(), None);
    assert!(
        get(&untrusting, &node_url, Some(READER)).is_err(),
        "a client that does not trust the server's CA must fail the handshake"
    );

    // SIGTERM still stops the HTTPS server cleanly.
    let status = daemon.terminate();
    assert!(status.success(), "{status}\n{}", daemon.log_text());
}

#[test]
fn client_ca_requires_a_certificate_it_signed_and_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = server_pki(dir.path());
    let config = write_config(dir.path(), "");
    let controller = require_client_certificates(dir.path(), &config, &pki);
    let good = client(&pki.server_ca.pem(), Some(&controller));
    let daemon = Daemon::start_with(&config, "https", good.clone());
    let node_url = format!("{}/v1/node", daemon.url);

    let (status, node) = get(&good, &node_url, Some(READER)).expect("mutual TLS request");
    assert_eq!(status, 200, "{node}");

    let (status, body) = get(&good, &node_url, None).expect("mutual TLS request");
    assert_eq!(
        status, 401,
        "a client certificate does not replace the token: {body}"
    );

    let anonymous = client(&pki.server_ca.pem(), None);
    assert!(
        get(&anonymous, &node_url, Some(READER)).is_err(),
        "a client without a certificate must fail the handshake"
    );

    let other_ca = Ca::new("not the client CA");
    let impostor = other_ca.issue(&["controller"], ExtendedKeyUsagePurpose::ClientAuth);
    let impostor = client(&pki.server_ca.pem(), Some(&impostor));
    assert!(
        get(&impostor, &node_url, Some(READER)).is_err(),
        "a certificate from another CA must fail the handshake"
    );

    // The agent is still serving after the refused handshakes.
    let (status, _) = get(&good, &node_url, Some(READER)).expect("mutual TLS request");
    assert_eq!(status, 200);
}

/// Runs `serve` on a config expected to be refused; returns its stderr.
fn serve_refused(config: &Path) -> String {
    let mut child = agent(&["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent served with bad TLS files");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("output");
    let text = stderr(&output);
    eprintln!("--- refused as expected:\n{text}");
    assert!(!output.status.success(), "{text}");
    text
}

#[test]
fn bad_pem_files_stop_the_agent_with_an_error_naming_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = server_pki(dir.path());
    let config = write_config(dir.path(), "");
    let original = fs::read_to_string(&config).expect("config");

    // A certificate file with no certificate in it.
    let garbage = dir.path().join("garbage.pem");
    fs::write(&garbage, "this is not PEM\n").expect("write");
    add_to_api_table(
        &config,
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            garbage.display(),
            pki.key_path.display()
        ),
    );
    let message = serve_refused(&config);
    assert!(
        message.contains("tls_cert") && message.contains("garbage.pem"),
        "{message}"
    );

    // A key file holding a certificate instead of a key.
    fs::write(&config, &original).expect("config");
    add_to_api_table(
        &config,
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            pki.cert_path.display(),
            pki.cert_path.display()
        ),
    );
    let message = serve_refused(&config);
    assert!(
        message.contains("tls_key") && message.contains("server.pem"),
        "{message}"
    );

    // A key that does not belong to the certificate.
    let other = Ca::new("other").issue(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let other_key = dir.path().join("other.key");
    fs::write(&other_key, &other.key).expect("write");
    fs::write(&config, &original).expect("config");
    add_to_api_table(
        &config,
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            pki.cert_path.display(),
            other_key.display()
        ),
    );
    let message = serve_refused(&config);
    assert!(
        message.contains("server.pem")
            && message.contains("other.key")
            && message.contains("does not belong"),
        "{message}"
    );
}

/// An HTTPS image server on 127.0.0.1 presenting `leaf` (its chain), serving
/// `body` to anyone who completes the handshake. Returns its base URL.
fn image_server(leaf: &Leaf, body: Vec<u8>) -> String {
    let certs = CertificateDer::pem_slice_iter(leaf.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("server certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("server key PEM");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server identity");
    let config = Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let config = Arc::clone(&config);
            let body = body.clone();
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let Ok(connection) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(connection, stream);
                let mut request = [0u8; 4096];
                if tls.read(&mut request).is_err() {
                    return;
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"v1\"\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(head.as_bytes());
                let _ = tls.write_all(&body);
                let _ = tls.flush();
            });
        }
    });
    format!("https://127.0.0.1:{port}")
}

#[test]
fn an_image_server_with_a_certificate_nobody_trusts_is_refused_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("disk.img");
    let storage_sha = reimage_e2e::images::target_disk(&target, 64, 16, 5);
    let disk_sha = reimage_e2e::images::sha256(&fs::read(&target).expect("disk"));
    let raw = reimage_e2e::images::os_image(16, 1, 6);
    let sha = reimage_e2e::images::sha256(&raw);
    // A CA of this test only: in no trust store of the machine.
    let stranger = Ca::new("nobody's CA");
    let untrusted = stranger.issue(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let url = format!("{}/os.img", image_server(&untrusted, raw));

    let started = Instant::now();
    let mut child = agent(&["write", "--image", &url, "--sha256", &sha, "--target"])
        .arg(&target)
        .args(["--save-partlabel", "local-storage"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("write starts");
    // Retrying a certificate that cannot become valid would only delay the
    // error: the default retries take about a minute.
    let deadline = started + Duration::from_secs(30);
    while child.try_wait().expect("child").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("write kept retrying an untrusted certificate");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("output");
    let text = stderr(&output);
    assert!(!output.status.success());
    assert!(text.contains("DownloadFailed"), "{text}");
    assert!(text.to_lowercase().contains("certificate"), "{text}");
    assert_eq!(
        reimage_e2e::images::sha256(&fs::read(&target).expect("disk")),
        disk_sha,
        "nothing written"
    );
    assert_eq!(
        reimage_e2e::images::partition_sha256(&target, "local-storage").map(|(s, _)| s),
        Some(storage_sha)
    );
}
