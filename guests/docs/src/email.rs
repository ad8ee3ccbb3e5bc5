//! Email normalisation for pairing ("Email normalisation" in `docs/shared-data.md`).
//!
//! Two emails are the same when their normalised forms are byte-equal. The normalised form
//! of a string is, in this order:
//! 1. surrounding whitespace removed: every character with the Unicode `White_Space`
//!    property ([`char::is_whitespace`]: ASCII space, tab, CR, LF, NBSP, U+2003, U+3000…);
//! 2. NFC (canonical composition, `unicode-normalization`), so that a precomposed `É`
//!    (U+00C9) and `E` + U+0301 are one character;
//! 3. full Unicode lowercase ([`char::to_lowercase`], locale-independent: `İ` (U+0130)
//!    becomes `i` + U+0307, not `i`; `ß` stays `ß`; no case folding);
//! 4. NFC again (lowercasing may yield decomposed sequences).
//!
//! Then it is rejected (`None`) unless it has exactly one `@`, a non-empty local part of at
//! most [`MAX_LOCAL_LEN`] bytes, a non-empty domain, at most [`MAX_EMAIL_LEN`] bytes in
//! all, and no whitespace or control character inside. Nothing else is folded: no NFKC
//! (it would merge distinct characters such as fullwidth letters), no removal of dots or
//! `+tags` in the local part (Gmail's rules are Gmail's: elsewhere those are different
//! mailboxes), no IDNA/punycode conversion of the domain.

use alloc::string::String;

use unicode_normalization::UnicodeNormalization;

/// Longest normalised email, in bytes (RFC 5321's path limit less the angle brackets).
pub const MAX_EMAIL_LEN: usize = 254;
/// Longest local part (before the `@`), in bytes (RFC 5321).
pub const MAX_LOCAL_LEN: usize = 64;

/// The normalised form of `email`, or `None` when it is not an acceptable address.
pub fn normalize_email(email: &str) -> Option<String> {
    let trimmed = email.trim_matches(char::is_whitespace);
    // Bound the work on hostile input before normalising (NFC may grow a string, but a
    // string this long cannot normalise to an acceptable length anyway).
    if trimmed.is_empty() || trimmed.len() > 4 * MAX_EMAIL_LEN {
        return None;
    }
    let lower: String = trimmed.nfc().flat_map(char::to_lowercase).collect();
    let normal: String = lower.nfc().collect();
    if normal.len() > MAX_EMAIL_LEN || normal.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    let (local, domain) = normal.split_once('@')?;
    if local.is_empty() || local.len() > MAX_LOCAL_LEN || domain.is_empty() || domain.contains('@')
    {
        return None;
    }
    Some(normal)
}
