//! TLS for the servers and the simulated relay: TLS 1.3 only, ring provider.
//!
//! * Servers ([`server_config`]) accept every TLS 1.3 suite and group of ring, among them
//!   the one the relay's `embedded-tls` client offers: `TLS_AES_128_GCM_SHA256` with
//!   `secp256r1`, and an ECDSA P-256 certificate (from `duplex-mediator keygen`).
//! * The simulated relay ([`pinned_client_config`]) offers only what `embedded-tls` offers
//!   and trusts a server by its **pin** (SHA-256 of the certificate's
//!   `SubjectPublicKeyInfo`), checking the `CertificateVerify` signature under that key;
//!   no CA, names or dates, as on the relay.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring as ring_provider, CryptoProvider};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime,
};

use crate::pin::{pin_of_spki, spki_of, PinError};

/// Why a TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Key(#[from] PinError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The certificates of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PinError> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| PinError::NoCertificate {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let certs = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PinError::NoCertificate {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PinError::NoCertificate {
            path: path.to_path_buf(),
            detail: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PinError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| PinError::NoKey {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// ring's provider (the brief's choice, and the crypto `embedded-tls` pairs with). rustls
/// 0.23.48 deprecates the function only because ring has no post-quantum key exchange,
/// which the relay could not use anyway.
#[allow(deprecated)]
fn provider() -> CryptoProvider {
    ring_provider::default_provider()
}

/// A TLS 1.3-only server configuration from PEM files; also returns the pin (64 hex
/// digits) of the certificate.
pub fn server_config(
    cert: &Path,
    key: &Path,
) -> Result<(Arc<rustls::ServerConfig>, String), TlsError> {
    let certs = load_certs(cert)?;
    let pin = crate::util::hex(&pin_of_spki(&spki_of(certs[0].as_ref())?));
    let key = load_key(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    // Relays never resume sessions: no tickets, no session cache (less per handshake).
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok((Arc::new(config), pin))
}

/// Trusts exactly the server whose certificate's `SubjectPublicKeyInfo` hashes to `pin`.
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl PinVerifier {
    fn spki(&self, cert: &CertificateDer<'_>) -> Result<Vec<u8>, rustls::Error> {
        spki_of(cert.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if pin_of_spki(&self.spki(end_entity)?) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
        let spki = SubjectPublicKeyInfoDer::from(self.spki(cert)?);
        rustls::crypto::verify_tls13_signature_with_raw_key(message, &spki, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ECDSA_NISTP256_SHA256]
    }
}

/// A client configuration like the relay's: TLS 1.3, `TLS_AES_128_GCM_SHA256`,
/// `secp256r1`, ECDSA P-256 signatures, the server trusted by its pin.
pub fn pinned_client_config(pin: [u8; 32]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let base = provider();
    let algorithms = base.signature_verification_algorithms;
    let provider = CryptoProvider {
        cipher_suites: vec![ring_provider::cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![ring_provider::kx_group::SECP256R1],
        ..base
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinVerifier { pin, algorithms }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}
