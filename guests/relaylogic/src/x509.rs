//! Just enough DER to find a certificate's `SubjectPublicKeyInfo` (RFC 5280 §4.1):
//!
//! ```text
//! Certificate ::= SEQUENCE { tbsCertificate TBSCertificate, signatureAlgorithm, signature }
//! TBSCertificate ::= SEQUENCE { [0] EXPLICIT version OPTIONAL, serialNumber INTEGER,
//!     signature AlgorithmIdentifier, issuer Name, validity Validity, subject Name,
//!     subjectPublicKeyInfo SubjectPublicKeyInfo, ... }
//! ```
//!
//! Only the structure is walked (every length bounds-checked); nothing in the certificate
//! is trusted. The relay hashes the `SubjectPublicKeyInfo` found here and compares the hash
//! with its pin, so a parsing quirk cannot make another key acceptable.

/// DER tag of a SEQUENCE.
const SEQUENCE: u8 = 0x30;
/// DER tag of an INTEGER.
const INTEGER: u8 = 0x02;
/// DER tag of `[0]` constructed (the explicit version).
const CONTEXT_0: u8 = 0xa0;

/// One DER element: its tag, its contents, the whole element, and what follows it.
struct Tlv<'a> {
    tag: u8,
    contents: &'a [u8],
    whole: &'a [u8],
    rest: &'a [u8],
}

/// Reads one DER element (single-byte tags, definite lengths of up to 4 bytes).
fn tlv(input: &[u8]) -> Option<Tlv<'_>> {
    let (&tag, after_tag) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // high tag numbers do not occur where we look
    }
    let (&first, after_len) = after_tag.split_first()?;
    let (len, header_rest) = if first < 0x80 {
        (usize::from(first), after_len)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || after_len.len() < n {
            return None; // indefinite or absurd lengths
        }
        let len = after_len[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &after_len[n..])
    };
    if header_rest.len() < len {
        return None;
    }
    let header_len = input.len() - header_rest.len();
    Some(Tlv {
        tag,
        contents: &header_rest[..len],
        whole: &input[..header_len + len],
        rest: &header_rest[len..],
    })
}

/// Reads one element and checks its tag.
fn expect(input: &[u8], tag: u8) -> Option<Tlv<'_>> {
    tlv(input).filter(|t| t.tag == tag)
}

/// The DER `SubjectPublicKeyInfo` (tag and length included) of a DER X.509 certificate.
pub fn spki_of_certificate(cert: &[u8]) -> Option<&[u8]> {
    let cert = expect(cert, SEQUENCE)?;
    let tbs = expect(cert.contents, SEQUENCE)?;
    let mut fields = tbs.contents;
    if let Some(version) = expect(fields, CONTEXT_0) {
        fields = version.rest;
    }
    let serial = expect(fields, INTEGER)?;
    let signature = expect(serial.rest, SEQUENCE)?;
    let issuer = expect(signature.rest, SEQUENCE)?;
    let validity = expect(issuer.rest, SEQUENCE)?;
    let subject = expect(validity.rest, SEQUENCE)?;
    let spki = expect(subject.rest, SEQUENCE)?;
    Some(spki.whole)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_short_and_long_lengths() {
        let short = [0x30, 0x02, 0x05, 0x00, 0xff];
        let t = tlv(&short).unwrap();
        assert_eq!(
            (t.tag, t.contents, t.rest),
            (0x30, &[0x05, 0x00][..], &[0xff][..])
        );
        let mut long = alloc::vec![0x04, 0x82, 0x01, 0x00];
        long.extend(core::iter::repeat_n(7u8, 256));
        let t = tlv(&long).unwrap();
        assert_eq!(t.contents.len(), 256);
        assert_eq!(t.whole.len(), 260);
    }

    #[test]
    fn rejects_truncated_indefinite_and_high_tags() {
        assert!(tlv(&[0x30, 0x05, 0x00]).is_none());
        assert!(tlv(&[0x30, 0x80, 0x00, 0x00]).is_none());
        assert!(tlv(&[0x1f, 0x01, 0x00]).is_none());
        assert!(tlv(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_none());
        assert!(tlv(&[]).is_none());
        assert!(spki_of_certificate(&[0x30, 0x00]).is_none());
        assert!(spki_of_certificate(b"not a certificate at all").is_none());
    }
}
