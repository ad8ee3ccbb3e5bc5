//! Shared by the host tests: rustls servers with rcgen P-256 keys, and the client-side
//! pump that drives a relay `TlsSession` over a non-blocking `TcpStream` the way the
//! firmware drives it over smoltcp.

#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use duplex_relay::entropy::RdRand;
use duplex_relay::tls::TlsSession;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Always presents one certificate with one signing key (which need not match it).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

pub fn p256_key() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("P-256 key")
}

pub fn certificate(key: &KeyPair) -> CertificateDer<'static> {
    let params = CertificateParams::new(vec!["server.test".to_string()]).expect("params");
    params.self_signed(key).expect("certificate").der().clone()
}

/// A TLS 1.3-only rustls server configuration presenting `cert` and signing with `signer`.
pub fn server_config(cert: CertificateDer<'static>, signer: &KeyPair) -> Arc<rustls::ServerConfig> {
    // ring (deprecated in rustls 0.23.48 only for lacking post-quantum key exchange, which
    // these tests do not need) builds without cmake, unlike aws-lc-rs.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signer.serialize_der()));
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .expect("signing key");
    let certified = Arc::new(CertifiedKey::new(vec![cert], signing));
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Fixed(certified))),
    )
}

/// A relay TLS session over a non-blocking TCP stream.
pub struct Pump {
    pub tcp: TcpStream,
    pub tls: TlsSession,
    eof: bool,
}

impl Pump {
    pub fn connect(port: u16, pin: [u8; 32]) -> std::io::Result<Pump> {
        let tcp = TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_nonblocking(true)?;
        let rng = RdRand::new().expect("RDRAND on the test machine");
        Ok(Pump {
            tcp,
            tls: TlsSession::client(pin, rng),
            eof: false,
        })
    }

    /// Moves bytes both ways and runs the session once; `Err` on a socket error.
    pub fn step(&mut self) -> Result<(), String> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.tcp.read(&mut buf) {
                Ok(0) => {
                    if !self.eof {
                        self.eof = true;
                        self.tls.peer_closed();
                    }
                    break;
                }
                Ok(n) => self.tls.push_ciphertext(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        self.tls.poll();
        let mut error = None;
        let tcp = &mut self.tcp;
        self.tls.drain_ciphertext(|bytes| match tcp.write(bytes) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
            Err(e) => {
                error = Some(e.to_string());
                0
            }
        });
        error.map_or(Ok(()), Err)
    }
}
