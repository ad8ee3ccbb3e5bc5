//! Server keys: making a self-signed ECDSA P-256 certificate (`keygen`) and the **pin** a
//! relay checks, the SHA-256 of the certificate's DER `SubjectPublicKeyInfo`
//! (`docs/tunnel-protocol.md#transport-and-security`).
//!
//! The certificate is decoded, and the pin computed, by `duplex_tunnel::pin` (RustCrypto's
//! `x509-cert`), the same code the relay firmware checks its pins with.

use std::path::{Path, PathBuf};

use crate::util::hex;

/// Why a certificate or key could not be made, read or pinned.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in the file ({detail})")]
    NoCertificate { path: PathBuf, detail: String },
    #[error("{path}: no PEM private key in the file ({detail})")]
    NoKey { path: PathBuf, detail: String },
    #[error("certificate DER is malformed: {0}")]
    Der(&'static str),
    #[error("cannot make a key or certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The DER `SubjectPublicKeyInfo` inside a DER certificate.
pub fn spki_of(cert_der: &[u8]) -> Result<Vec<u8>, PinError> {
    duplex_tunnel::certificate_spki(cert_der).ok_or(PinError::Der("not a DER X.509 certificate"))
}

/// SHA-256 of a DER `SubjectPublicKeyInfo`.
pub fn pin_of_spki(spki: &[u8]) -> [u8; 32] {
    duplex_tunnel::spki_pin(spki)
}

/// The pin of a DER certificate.
pub fn pin_of_cert(cert_der: &[u8]) -> Result<[u8; 32], PinError> {
    Ok(pin_of_spki(&spki_of(cert_der)?))
}

/// The pin, as 64 hex digits, of the first certificate of a PEM file.
pub fn pin_of_pem_file(path: &Path) -> Result<String, PinError> {
    let cert = crate::tls::load_certs(path)?;
    let first = cert.first().ok_or_else(|| PinError::NoCertificate {
        path: path.to_path_buf(),
        detail: "empty".into(),
    })?;
    Ok(hex(&pin_of_cert(first.as_ref())?))
}

/// A new self-signed ECDSA P-256 certificate for `name` (a DNS name or IP address) and its
/// key: (certificate PEM, PKCS#8 key PEM, pin hex).
pub fn generate(name: &str) -> Result<(String, String, String), PinError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    let cert = params.self_signed(&key)?;
    let pin = hex(&pin_of_cert(cert.der().as_ref())?);
    Ok((cert.pem(), key.serialize_pem(), pin))
}

/// Writes `cert.pem` and `key.pem` (mode 0600) into `dir` (created if missing); returns
/// the pin.
pub fn keygen(dir: &Path, name: &str) -> Result<String, PinError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PinError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let (cert, key, pin) = generate(name)?;
    let cert_path = dir.join("cert.pem");
    std::fs::write(&cert_path, cert).map_err(io(&cert_path))?;
    let key_path = dir.join("key.pem");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(io(&key_path))?;
    f.write_all(key.as_bytes()).map_err(io(&key_path))?;
    Ok(pin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;

    #[test]
    fn spki_matches_rcgen_public_key() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(vec!["example.test".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let spki = spki_of(cert.der().as_ref()).unwrap();
        assert_eq!(spki, key.subject_public_key_info());
        assert_eq!(
            pin_of_cert(cert.der().as_ref()).unwrap(),
            pin_of_spki(&spki)
        );
    }

    #[test]
    fn malformed_der_is_an_error() {
        assert!(spki_of(&[]).is_err());
        assert!(spki_of(&[0x30, 0x05, 0x30]).is_err());
        assert!(spki_of(&[0x04, 0x00]).is_err());
    }

    #[test]
    fn keygen_writes_files_and_pin_reads_back() {
        let dir = std::env::temp_dir().join(format!("duplex-pin-{}", crate::util::random_u64()));
        let pin = keygen(&dir, "127.0.0.1").unwrap();
        assert_eq!(pin.len(), 64);
        assert_eq!(pin_of_pem_file(&dir.join("cert.pem")).unwrap(), pin);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
