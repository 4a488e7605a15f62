//! Builds the bare-metal guest program (`guest/`, target `x86_64-unknown-none`) with a nested
//! cargo and embeds its ELF image (`OUT_DIR/vgpu-guest.elf`).
//!
//! If the target's standard library is not installed, the build still succeeds with an empty
//! image: the VMM then refuses to run the built-in guest and says how to install the target
//! (`rustup target add x86_64-unknown-none`); tests skip with that reason. Any other failure of
//! the guest build fails this build.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-none";

fn main() {
    let manifest =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest = manifest.join("..").join("guest");
    for p in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "link.ld",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("..").join("vgpu-abi").join("src").display()
    );
    let image = out.join("vgpu-guest.elf");
    match target_installed() {
        Ok(true) => {}
        Ok(false) | Err(_) => {
            println!(
                "cargo:warning=the {TARGET} target is not installed: the built-in guest is \
                 unavailable (run `rustup target add {TARGET}`)"
            );
            std::fs::write(&image, b"").expect("write empty guest image");
            return;
        }
    }
    build_guest(&guest, &out, &image);
}

/// Whether the sysroot of the compiler cargo uses has the guest target's standard library.
fn target_installed() -> std::io::Result<bool> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let o = Command::new(rustc).args(["--print", "sysroot"]).output()?;
    let sysroot = String::from_utf8_lossy(&o.stdout).trim().to_string();
    Ok(Path::new(&sysroot)
        .join("lib/rustlib")
        .join(TARGET)
        .join("lib")
        .is_dir())
}

fn build_guest(guest: &Path, out: &Path, image: &Path) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out.join("guest-target");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(guest)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    // The outer build's flags and wrappers (clippy, coverage, sccache) are for the host crates;
    // the guest takes its flags from guest/.cargo/config.toml.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_RUSTC_WRAPPER",
        "CLIPPY_ARGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo for the guest program");
    assert!(status.success(), "building the guest program failed");
    let built = target_dir.join(TARGET).join("release").join("vgpu-guest");
    std::fs::copy(&built, image).expect("copy the guest image");
}
