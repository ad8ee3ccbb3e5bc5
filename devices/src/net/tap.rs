//! A host TAP device as a network card's backend ([`Tap`]): `/dev/net/tun` opened
//! non-blocking, attached with `TUNSETIFF` to the interface named in the config
//! (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: Ethernet frames, no packet-information prefix, a
//! virtio-net header before each frame), `TUNSETVNETHDRSZ` = 12 (`virtio_net_hdr_v1`) and
//! `TUNSETOFFLOAD` = 0 (no checksum or segmentation offload: the kernel hands over complete
//! frames of at most the interface's MTU, as the guest negotiated no offloads). The header is
//! in the host's byte order, little-endian on x86_64, as virtio 1 wants.
//!
//! The interface is created if it does not exist and goes away when the fd is closed, unless
//! it was made persistent beforehand (`ip tuntap add ... mode tap vnet_hdr`), which is how a
//! setup script puts it in a bridge before the monitor starts.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::os::raw::{c_char, c_int, c_short, c_uint, c_ulong};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use super::{NetBackend, NET_HDR_LEN};

/// The ioctl type of tun/tap (`'T'`).
const TUNTAP: c_uint = 0x54;
vmm_sys_util::ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, c_int);
vmm_sys_util::ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, c_uint);
vmm_sys_util::ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, c_int);

/// Why a TAP could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Interface names are 1 to 15 bytes, without `/`, whitespace or NUL.
    #[error("tap: {0:?} is not a valid interface name (1-15 bytes, no '/', whitespace or NUL)")]
    InvalidName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("tap: cannot open /dev/net/tun: {0}")]
    Open(io::Error),
    /// An ioctl failed (`TUNSETIFF` fails with EPERM without CAP_NET_ADMIN).
    #[error("tap {name}: {what}: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// A TAP device, non-blocking, with 12-byte virtio-net headers and no offloads.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Whether `name` can be an interface name: 1 to 15 bytes, without `/`, whitespace or NUL.
pub fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
}

impl Tap {
    /// Opens (creating it if needed) the TAP interface `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if !name_ok(name) {
            return Err(TapError::InvalidName(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let fail = |what: &'static str| TapError::Ioctl {
            name: name.to_owned(),
            what,
            source: io::Error::last_os_error(),
        };

        // SAFETY: `ifreq` is a plain C struct (a name array and a union of plain data) for
        // which all-zero bytes are a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, &src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = src as c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as c_short;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is and which
        // lives through the call; the fd is the tun device just opened.
        if unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut ifr) } < 0 {
            return Err(fail("TUNSETIFF"));
        }
        let hdr_len = NET_HDR_LEN as c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int`, which `hdr_len` is and which lives
        // through the call.
        if unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr_len) } < 0 {
            return Err(fail("TUNSETVNETHDRSZ"));
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value (the offload flags, none here)
        // and touches no memory of ours.
        if unsafe { ioctl_with_val(&file, TUNSETOFFLOAD(), 0 as c_ulong) } < 0 {
            return Err(fail("TUNSETOFFLOAD"));
        }
        // The kernel wrote back the interface's name.
        let name = ifr
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8 as char)
            .collect();
        Ok(Tap { file, name })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Another handle on the same TAP queue (`dup`): frames waiting in the kernel's queue are
    /// read through whichever handle reads first, and the interface stays while any handle
    /// is open. The monitor keeps one per partition and gives each run's card a clone, so a
    /// reboot in place keeps the interface and the frames that wait in it.
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }
}

impl NetBackend for Tap {
    fn send(&mut self, hdr: &[u8; NET_HDR_LEN], frame: &[u8]) -> io::Result<()> {
        let total = NET_HDR_LEN + frame.len();
        // A TAP takes a frame in one write or not at all.
        let n = self
            .file
            .write_vectored(&[IoSlice::new(hdr), IoSlice::new(frame)])?;
        if n != total {
            return Err(io::Error::other(format!(
                "short write to the TAP: {n} of {total} bytes"
            )));
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_tap_names_are_refused_before_opening() {
        for bad in ["", "a/b", "with space", "sixteen-bytes-xx", "nul\0"] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::InvalidName(_))),
                "{bad:?}"
            );
        }
        assert!(name_ok("dplx-relay0"));
        assert!(name_ok("fifteen-bytes-x"));
    }
}
