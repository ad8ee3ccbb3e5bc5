//! Server key pins: the SHA-256 of a certificate's DER `SubjectPublicKeyInfo`
//! (`docs/tunnel-protocol.md#transport-and-security`), computed the same way by the relay
//! (which checks a server against its pin) and the servers (which print theirs).
//!
//! The certificate is decoded by RustCrypto's `x509-cert` (DER, no_std); nothing in it is
//! trusted beyond its key, whose hash must equal the pin.

use alloc::vec::Vec;

use sha2::{Digest, Sha256};
use x509_cert::der::{Decode, Encode};
use x509_cert::Certificate;

/// The DER `SubjectPublicKeyInfo` of a DER certificate, or `None` if it is not one.
pub fn certificate_spki(cert_der: &[u8]) -> Option<Vec<u8>> {
    let cert = Certificate::from_der(cert_der).ok()?;
    cert.tbs_certificate.subject_public_key_info.to_der().ok()
}

/// SHA-256 of a DER `SubjectPublicKeyInfo`: the pin of a server key.
pub fn spki_pin(spki_der: &[u8]) -> [u8; 32] {
    Sha256::digest(spki_der).into()
}

/// The pin of a DER certificate's key, or `None` if it is not a certificate.
pub fn certificate_pin(cert_der: &[u8]) -> Option<[u8; 32]> {
    certificate_spki(cert_der).map(|spki| spki_pin(&spki))
}
