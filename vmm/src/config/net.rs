//! A partition's network card in the device config (`docs/config.md`, `docs/net.md`): the
//! host TAP interface it is backed by and its MAC address, and their checks.

use serde::{Deserialize, Serialize};

use duplex_devices::net::{format_mac, mac_is_unicast, tap_name_ok};

/// A partition's virtio-net card, backed by a host TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The TAP interface (created if it does not exist): 1-15 bytes, no `/`, whitespace or
    /// NUL; unique among partitions.
    pub tap: String,
    /// The card's MAC address, `aa:bb:cc:dd:ee:ff` (hex digits, either case): unicast, not
    /// all zeros; unique among partitions.
    pub mac: String,
}

impl NetConfig {
    /// The MAC address as bytes (the config was validated, so it parses).
    pub fn mac_bytes(&self) -> Result<[u8; 6], String> {
        parse_mac(&self.mac)
    }
}

/// `aa:bb:cc:dd:ee:ff` → bytes, or why not.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let rule = "must be six hex bytes separated by ':' (e.g. 52:54:00:12:34:56)";
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(|| format!("\"{text}\" {rule}"))?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("\"{text}\" {rule}"));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| format!("\"{text}\" {rule}"))?;
    }
    if parts.next().is_some() {
        return Err(format!("\"{text}\" {rule}"));
    }
    Ok(mac)
}

/// Checks one partition's card: the field at fault and the problem, if any.
pub(super) fn check(net: &NetConfig) -> Result<(), (&'static str, String)> {
    if !tap_name_ok(&net.tap) {
        return Err((
            "net.tap",
            format!(
                "{:?} is not a valid interface name (1-15 bytes, no '/', whitespace or NUL)",
                net.tap
            ),
        ));
    }
    let mac = parse_mac(&net.mac).map_err(|e| ("net.mac", e))?;
    if !mac_is_unicast(&mac) {
        return Err((
            "net.mac",
            format!(
                "{} is not a unicast address (multicast bit set, or all zeros)",
                format_mac(&mac)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_in_either_case_and_nothing_else() {
        assert_eq!(
            parse_mac("52:54:00:AB:cd:0f"),
            Ok([0x52, 0x54, 0, 0xab, 0xcd, 0x0f])
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52-54-00-12-34-56",
            "52:54:00:12:34:5",
            "52:54:00:12:34:5g",
            "+2:54:00:12:34:56",
            "52:54:00:12:34:056",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?}");
        }
    }
}
