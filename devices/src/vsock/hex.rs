//! Byte buffers of the switch's saved state as hex strings (a JSON array of numbers is two
//! to four times bigger). Reading refuses anything but an even number of hex digits. Used
//! as `#[serde(with = "super::hex")]`; depends on nothing.

use std::collections::VecDeque;

use serde::de::Error;
use serde::{Deserialize, Deserializer, Serializer};

/// A byte buffer that can be written and read as hex.
pub trait Buf: Sized {
    fn each(&self) -> impl Iterator<Item = u8> + '_;
    fn len(&self) -> usize;
    fn from_vec(v: Vec<u8>) -> Self;
}

impl Buf for Vec<u8> {
    fn each(&self) -> impl Iterator<Item = u8> + '_ {
        self.iter().copied()
    }
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn from_vec(v: Vec<u8>) -> Self {
        v
    }
}

impl Buf for VecDeque<u8> {
    fn each(&self) -> impl Iterator<Item = u8> + '_ {
        self.iter().copied()
    }
    fn len(&self) -> usize {
        VecDeque::len(self)
    }
    fn from_vec(v: Vec<u8>) -> Self {
        v.into()
    }
}

const DIGITS: &[u8; 16] = b"0123456789abcdef";

pub fn serialize<B: Buf, S: Serializer>(b: &B, s: S) -> Result<S::Ok, S::Error> {
    let mut out = String::with_capacity(b.len() * 2);
    for x in b.each() {
        out.push(char::from(DIGITS[usize::from(x >> 4)]));
        out.push(char::from(DIGITS[usize::from(x & 0xf)]));
    }
    s.serialize_str(&out)
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

pub fn deserialize<'de, B: Buf, D: Deserializer<'de>>(d: D) -> Result<B, D::Error> {
    let s = String::deserialize(d)?;
    if s.len() % 2 != 0 {
        return Err(D::Error::custom("hex bytes: odd number of digits"));
    }
    s.as_bytes()
        .chunks_exact(2)
        .map(|pair| match pair {
            [h, l] => nibble(*h).zip(nibble(*l)).map(|(h, l)| (h << 4) | l),
            _ => None,
        })
        .collect::<Option<Vec<u8>>>()
        .map(B::from_vec)
        .ok_or_else(|| D::Error::custom("hex bytes: not a hex digit"))
}
