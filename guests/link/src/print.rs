//! The print algorithms, shared by the firmware and host tools so both compute the same
//! pages and checksums. Exact definitions (enough to reimplement them) are in
//! `docs/print-pipeline.md`.

use alloc::vec;
use alloc::vec::Vec;

use crc::{Crc, Digest, Table, CRC_32_ISO_HDLC};

/// CRC-32/ISO-HDLC (the zlib/PNG/Ethernet CRC), slice-by-16 tables built at compile time.
static CRC32: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISO_HDLC);

/// splitmix64's increment (the golden ratio in 64 bits).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
/// Mixed into the seed with the page index.
const PAGE_MIX: u64 = 0xD1B5_4A32_D192_ED03;
/// Seed of the calibration test pattern.
pub const CALIBRATION_SEED: u64 = 0x4455_504C_4558_4341; // "ACXELPUD"

/// splitmix64's output function.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The splitmix64 generator.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator with state `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix64(self.0)
    }
}

/// The engine's tone curve: `g[v] = floor(sqrt(v * 255))`, a gamma of 2 that lightens the
/// mid-tones to compensate for dot gain. `g[0] = 0`, `g[255] = 255`, monotonic.
pub fn gamma_table() -> [u8; 256] {
    let mut g = [0u8; 256];
    for (v, out) in (0u32..).zip(g.iter_mut()) {
        // sqrt(255 * 255) = 255 at most, so it fits.
        *out = (v * 255).isqrt() as u8;
    }
    g
}

/// The identity tone curve (`g[v] = v`), for tests and for tools that want raw error diffusion.
pub fn identity_table() -> [u8; 256] {
    let mut g = [0u8; 256];
    for (v, out) in (0u8..=255).zip(g.iter_mut()) {
        *out = v;
    }
    g
}

/// The generated content of page `page` (from 0) of a job with `seed`: `width * height`
/// bytes of 8-bit grayscale (0 black, 255 white), row-major.
///
/// A diagonal gradient from black at the top left to white at the bottom right, plus
/// noise of −32..=31 from splitmix64, clamped to 0..=255; every fourth band of 8 rows
/// (which band depends on the page) is halved, like lines of text. The exact definition is
/// in `docs/print-pipeline.md`.
pub fn page_raster(seed: u64, page: u32, width: u16, height: u16) -> Vec<u8> {
    let (w, h) = (u32::from(width), u32::from(height));
    let mut out = Vec::with_capacity((w * h) as usize);
    let mut rng = SplitMix64::new(seed ^ u64::from(page).wrapping_mul(PAGE_MIX));
    let band = page % 4;
    let wd = (w.max(2) - 1) as i32;
    let hd = (h.max(2) - 1) as i32;
    for y in 0..h {
        let gy = (y as i32) * 255 / hd;
        let dark = (y / 8) % 4 == band;
        let mut r = 0u64;
        for x in 0..w {
            if x % 8 == 0 {
                r = rng.next();
            }
            let byte = ((r >> (8 * (x % 8))) & 0xff) as i32;
            let grad = ((x as i32) * 255 / wd + gy) / 2;
            let mut v = (grad + (byte >> 2) - 32).clamp(0, 255);
            if dark {
                v /= 2;
            }
            out.push(v as u8);
        }
    }
    out
}

/// Bytes per halftoned row: `ceil(width / 8)`.
pub fn halftone_stride(width: u16) -> usize {
    usize::from(width).div_ceil(8)
}

/// Floyd–Steinberg error diffusion of an 8-bit grayscale page (0 black, 255 white) through
/// the tone curve `gamma` to one bit per pixel: **1 = a printed (black) dot**, 0 = paper.
/// Rows are packed MSB first (pixel `x` is bit `7 - x % 8` of byte `x / 8`), each row
/// padded with 0 bits to [`halftone_stride`] bytes. So an all-white page gives all-zero
/// bytes and an all-black page all-one bits.
///
/// Per pixel, left to right, top to bottom: `v = gamma[p] + err` (the error diffused to
/// it so far); `v < 128` prints a dot and leaves error `e = v`, else `e = v - 255`; then
/// `e*7/16` goes right, `e*3/16` down-left, `e*5/16` down, and the rest
/// (`e - e*7/16 - e*3/16 - e*5/16`) down-right, with integer division truncating toward
/// zero. Error pushed past the page's edges is dropped.
///
/// # Panics
///
/// If `raster.len() != width * height`.
pub fn halftone(raster: &[u8], width: u16, height: u16, gamma: &[u8; 256]) -> Vec<u8> {
    let (w, h) = (usize::from(width), usize::from(height));
    assert_eq!(raster.len(), w * h, "raster size is not width * height");
    let stride = halftone_stride(width);
    let mut out = vec![0u8; stride * h];
    // Errors for this row and the next, indexed x + 1 (one pad cell each side).
    let mut cur = vec![0i32; w + 2];
    let mut next = vec![0i32; w + 2];
    for (row, bits) in raster
        .chunks_exact(w.max(1))
        .zip(out.chunks_exact_mut(stride.max(1)))
    {
        for (x, &p) in row.iter().enumerate() {
            let v = i32::from(gamma[usize::from(p)]) + cur[x + 1];
            let e = if v < 128 {
                bits[x / 8] |= 0x80 >> (x % 8);
                v
            } else {
                v - 255
            };
            let e7 = e * 7 / 16;
            let e3 = e * 3 / 16;
            let e5 = e * 5 / 16;
            let e1 = e - e7 - e3 - e5;
            cur[x + 2] += e7;
            next[x] += e3;
            next[x + 1] += e5;
            next[x + 2] += e1;
        }
        core::mem::swap(&mut cur, &mut next);
        next.fill(0);
    }
    out
}

/// The page checksum: CRC-32/ISO-HDLC (polynomial 0x04C11DB7 reflected, init and final
/// XOR 0xFFFFFFFF; the CRC of zlib, PNG and Ethernet; `"123456789"` → `0xCBF43926`) of
/// the packed halftone bits as [`halftone`] returns them.
pub fn page_checksum(bits: &[u8]) -> u32 {
    CRC32.checksum(bits)
}

/// What the engine answers for a page: [`page_checksum`] of the [`halftone`] with
/// [`gamma_table`]. Host tools use it to predict a job's checksums.
pub fn print_checksum(raster: &[u8], width: u16, height: u16, gamma: &[u8; 256]) -> u32 {
    page_checksum(&halftone(raster, width, height, gamma))
}

/// The checksum page `page` of a job `(seed, width, height)` gets from the engine.
pub fn expected_page_checksum(seed: u64, page: u32, width: u16, height: u16) -> u32 {
    print_checksum(
        &page_raster(seed, page, width, height),
        width,
        height,
        &gamma_table(),
    )
}

/// An incremental CRC-32/ISO-HDLC (the same CRC as [`page_checksum`]).
pub struct Crc32(Digest<'static, u32, Table<16>>);

impl Crc32 {
    /// A CRC over no bytes yet.
    pub fn new() -> Self {
        Crc32(CRC32.digest())
    }

    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The CRC of all bytes added.
    pub fn finish(self) -> u32 {
        self.0.finalize()
    }
}

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for Crc32 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Crc32")
    }
}

/// Renders the calibration test pattern into `buf`, which starts `offset` bytes into the
/// calibration area: byte `i` of the area is `gamma[((x + y) / 2) ^ (r & 0x0f)]` with
/// `x = i % 256`, `y = (i / 256) % 256` and `r` byte `i % 8` (little-endian) of
/// `mix64((i / 8) ^ CALIBRATION_SEED)` — 256×256 tiles of a gradient with noise, pushed
/// through the tone curve.
pub fn render_test_pattern(buf: &mut [u8], offset: u64, gamma: &[u8; 256]) {
    let mut word = mix64((offset / 8) ^ CALIBRATION_SEED);
    for (pos, byte) in (offset..).zip(buf.iter_mut()) {
        if pos % 8 == 0 {
            word = mix64((pos / 8) ^ CALIBRATION_SEED);
        }
        let r = (word >> (8 * (pos % 8))) as u8;
        let x = (pos % 256) as u32;
        let y = ((pos / 256) % 256) as u32;
        let v = (((x + y) / 2) as u8) ^ (r & 0x0f);
        *byte = gamma[usize::from(v)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ones(bits: &[u8]) -> u32 {
        bits.iter().map(|b| b.count_ones()).sum()
    }

    #[test]
    fn crc_is_iso_hdlc() {
        assert_eq!(page_checksum(b"123456789"), 0xCBF4_3926);
        let mut c = Crc32::new();
        c.update(b"1234");
        c.update(b"56789");
        assert_eq!(c.finish(), 0xCBF4_3926);
    }

    #[test]
    fn gamma_is_monotonic_with_fixed_ends() {
        let g = gamma_table();
        assert_eq!((g[0], g[255]), (0, 255));
        assert_eq!(g[128], 180);
        assert!(g.windows(2).all(|p| p[0] <= p[1]));
        let id = identity_table();
        assert!(id.iter().enumerate().all(|(i, &v)| i == usize::from(v)));
    }

    #[test]
    fn white_page_is_all_zero_and_black_page_all_ones() {
        let g = gamma_table();
        let white = halftone(&[255; 64 * 8], 64, 8, &g);
        assert_eq!(white.len(), 64);
        assert!(white.iter().all(|&b| b == 0));
        let black = halftone(&[0; 64 * 8], 64, 8, &g);
        assert!(black.iter().all(|&b| b == 0xff));
        assert_eq!(
            page_checksum(&white),
            page_checksum(&[0; 64]),
            "checksum is of the bits only"
        );
    }

    #[test]
    fn rows_are_padded_with_zero_bits() {
        let g = gamma_table();
        let black = halftone(&[0; 10 * 3], 10, 3, &g);
        assert_eq!(black, [0xff, 0xc0, 0xff, 0xc0, 0xff, 0xc0]);
        assert_eq!(halftone_stride(10), 2);
        assert_eq!(halftone_stride(16), 2);
        assert_eq!(halftone_stride(17), 3);
    }

    #[test]
    fn half_gray_sets_about_half_the_bits() {
        let id = identity_table();
        let bits = halftone(&[128; 256 * 256], 256, 256, &id);
        let n = ones(&bits);
        let total = 256 * 256;
        assert!(n.abs_diff(total / 2) < total / 100, "{n} of {total} set");
        // A first row of 128s alternates: dot-free, dot, dot-free, ...
        assert_eq!(bits[0], 0b0101_0101);
        // Through the gamma 2 curve, 128 becomes 180: about 30% dots.
        let bits = halftone(&[128; 256 * 256], 256, 256, &gamma_table());
        let n = ones(&bits);
        assert!(n.abs_diff(total * 75 / 255) < total / 100, "{n}");
    }

    #[test]
    fn quarter_tones_follow_the_level() {
        let id = identity_table();
        for level in [32u8, 64, 192, 224] {
            let bits = halftone(&[level; 128 * 128], 128, 128, &id);
            let want = 128 * 128 * (255 - u32::from(level)) / 255;
            let n = ones(&bits);
            assert!(
                n.abs_diff(want) < 128 * 128 / 100,
                "level {level}: {n} vs {want}"
            );
        }
    }

    #[test]
    fn known_answers() {
        // Pinned values: a change here changes what every engine answers; bump the
        // protocol docs if it is deliberate.
        let r = page_raster(1, 0, 256, 256);
        assert_eq!(r.len(), 256 * 256);
        assert_eq!(&r[..8], &KNOWN_RASTER_HEAD);
        assert_eq!(expected_page_checksum(1, 0, 256, 256), KNOWN_CHECKSUM_1_0);
        assert_eq!(expected_page_checksum(1, 1, 256, 256), KNOWN_CHECKSUM_1_1);
        assert_eq!(expected_page_checksum(42, 7, 100, 37), KNOWN_CHECKSUM_42_7);
        let one = halftone(&[0], 1, 1, &gamma_table());
        assert_eq!(one, [0x80]);
    }

    const KNOWN_RASTER_HEAD: [u8; 8] = [8, 0, 0, 1, 14, 0, 0, 3];
    const KNOWN_CHECKSUM_1_0: u32 = 0x7197_52ef;
    const KNOWN_CHECKSUM_1_1: u32 = 0x7ae7_b13b;
    const KNOWN_CHECKSUM_42_7: u32 = 0x7ce6_3fc1;

    #[test]
    fn rasters_are_deterministic_and_differ_by_page_and_seed() {
        assert_eq!(page_raster(9, 3, 64, 64), page_raster(9, 3, 64, 64));
        assert_ne!(page_raster(9, 3, 64, 64), page_raster(9, 4, 64, 64));
        assert_ne!(page_raster(9, 3, 64, 64), page_raster(10, 3, 64, 64));
        // Not trivial: plenty of dots and plenty of paper.
        let bits = halftone(&page_raster(5, 0, 256, 256), 256, 256, &gamma_table());
        let n = ones(&bits);
        assert!(n > 256 * 256 / 10 && n < 256 * 256 * 9 / 10, "{n}");
        // Degenerate sizes work.
        assert_eq!(page_raster(1, 0, 1, 1).len(), 1);
        assert_eq!(
            halftone(&page_raster(1, 0, 1, 300), 1, 300, &gamma_table()).len(),
            300
        );
    }

    #[test]
    fn test_pattern_is_position_dependent_and_split_invariant() {
        let g = gamma_table();
        let mut whole = vec![0u8; 4096];
        render_test_pattern(&mut whole, 1000, &g);
        let mut parts = vec![0u8; 4096];
        let (a, b) = parts.split_at_mut(1234);
        render_test_pattern(a, 1000, &g);
        render_test_pattern(b, 1000 + 1234, &g);
        assert_eq!(whole, parts);
        let mut other = vec![0u8; 4096];
        render_test_pattern(&mut other, 0, &g);
        assert_ne!(whole, other);
    }
}
