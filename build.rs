//! Link settings for the `envrender` binary.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    // Relative relocations packed as DT_RELR (glibc 2.36 and later, static
    // glibc included): a position-independent binary otherwise carries one
    // 24-byte entry per pointer to fix up at start (about 29,000 here), and
    // the loader reads every page of them into each process.
    if target.contains("-linux-gnu") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
