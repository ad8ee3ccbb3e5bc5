//! Puts the guest linker script (`duplex.ld`) into a directory on the linker's search path,
//! so every firmware binary that depends on this crate links with `-Tduplex.ld`
//! (see `guests/.cargo/config.toml`).

use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::copy("duplex.ld", out.join("duplex.ld")).expect("copy duplex.ld into OUT_DIR");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=duplex.ld");
    println!("cargo:rerun-if-changed=build.rs");
}
