//! The guest program: the built-in one (built from `guest/` by the build script) or an ELF file.

use std::path::{Path, PathBuf};

/// The built-in guest image (empty when the `x86_64-unknown-none` target was not installed at
/// build time).
static BUILTIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vgpu-guest.elf"));

/// Errors finding the guest image.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The VMM was built without the guest program.
    #[error(
        "The built-in guest program was not built: install its target with \
         `rustup target add x86_64-unknown-none` and rebuild"
    )]
    NotBuilt,
    /// The image file could not be read.
    #[error("Cannot read guest image {0}")]
    Read(PathBuf, #[source] std::io::Error),
}

/// The built-in guest image, if it was built.
pub fn builtin() -> Option<&'static [u8]> {
    (!BUILTIN.is_empty()).then_some(BUILTIN)
}

/// The image at `path`, or the built-in one.
pub fn image(path: Option<&Path>) -> Result<std::borrow::Cow<'static, [u8]>, GuestError> {
    match path {
        Some(p) => std::fs::read(p)
            .map(Into::into)
            .map_err(|e| GuestError::Read(p.to_path_buf(), e)),
        None => builtin().map(Into::into).ok_or(GuestError::NotBuilt),
    }
}
