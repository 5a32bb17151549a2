//! TLS to KPS is rustls with the system roots plus `kps.ca_file`: a private cloud's endpoint,
//! signed by a CA the system does not know, is refused until the manifest names that CA.
//! The fake KPS speaks plain HTTP; a small TLS front on 127.0.0.1 forwards to it.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use tokio_rustls::rustls;

/// A TLS listener for `localhost` forwarding every connection to `backend`. Returns its port
/// and the certificate (PEM) to trust.
fn tls_front(backend: SocketAddr) -> (u16, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_pem = certified.cert.pem();
    let cert = certified.cert.der().clone();
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
    });
    (port, cert_pem)
}

#[test]
fn a_private_ca_is_trusted_only_through_ca_file() {
    let sb = Sandbox::new();
    sb.fake.add_key("a");
    let (port, ca_pem) = tls_front(sb.fake.addr());
    std::fs::write(sb.path("private-ca.pem"), ca_pem).unwrap();
    let manifest = |ca: &str| {
        let text = sb
            .header()
            .replace(&sb.fake.url(), &format!("https://localhost:{port}"))
            .replace("  auth:\n", &format!("{ca}  auth:\n"))
            + "keys:\n  a: out/a.pem\n";
        sb.write_manifest(&text);
    };

    manifest("");
    let run = sb.reconcile();
    assert_eq!(run.code, 1, "an unknown CA is refused: {run:?}");
    assert!(
        run.stderr.contains("key a ") && run.stderr.contains("certificate"),
        "{run:?}"
    );
    assert!(!sb.path("out/a.pem").exists());

    manifest("  ca_file: private-ca.pem\n");
    let run = sb.reconcile();
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        std::fs::read_to_string(sb.path("out/a.pem")).unwrap(),
        sb.fake.private_key("a").unwrap()
    );
    assert!(
        !run.stderr.contains("plain http"),
        "https needs no warning: {run:?}"
    );
}
