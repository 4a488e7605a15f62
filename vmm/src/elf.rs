//! A minimal ELF64 loader for the guest program: `PT_LOAD` segments of an x86-64 executable,
//! placed at their physical addresses inside the image window of the memory layout.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot_info::{IMAGE_END, IMAGE_GPA};

/// Errors loading a guest image. The image is untrusted input: every field is checked.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// Not an ELF64 little-endian x86-64 executable.
    #[error("Not an x86-64 ELF64 executable: {0}")]
    NotElf(&'static str),
    /// A header or segment lies outside the file.
    #[error("Truncated ELF image: {0}")]
    Truncated(&'static str),
    /// A segment does not fit the image window.
    #[error("Segment at {addr:#x} ({size:#x} bytes) is outside the image window {IMAGE_GPA:#x}..{IMAGE_END:#x}")]
    OutOfWindow {
        /// Load address.
        addr: u64,
        /// Size in memory.
        size: u64,
    },
    /// The entry point is outside the loaded segments.
    #[error("Entry point {0:#x} is not in a loaded segment")]
    BadEntry(u64),
    /// Writing guest memory failed.
    #[error("Cannot write the image into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const PT_LOAD: u32 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;

fn field<const N: usize>(b: &[u8], off: u64) -> Result<[u8; N], ElfError> {
    let start = usize::try_from(off).map_err(|_| ElfError::Truncated("offset"))?;
    let end = start.checked_add(N).ok_or(ElfError::Truncated("offset"))?;
    b.get(start..end)
        .and_then(|s| s.try_into().ok())
        .ok_or(ElfError::Truncated("header field"))
}

fn u16_at(b: &[u8], off: u64) -> Result<u16, ElfError> {
    field::<2>(b, off).map(u16::from_le_bytes)
}

fn u32_at(b: &[u8], off: u64) -> Result<u32, ElfError> {
    field::<4>(b, off).map(u32::from_le_bytes)
}

fn u64_at(b: &[u8], off: u64) -> Result<u64, ElfError> {
    field::<8>(b, off).map(u64::from_le_bytes)
}

/// Loads `image` into `mem`; returns the entry point.
pub fn load(image: &[u8], mem: &GuestMemoryMmap) -> Result<u64, ElfError> {
    if image.get(0..4) != Some(b"\x7fELF".as_slice()) {
        return Err(ElfError::NotElf("magic"));
    }
    if image.get(4..6) != Some([2u8, 1].as_slice()) {
        return Err(ElfError::NotElf("not 64-bit little-endian"));
    }
    if u16_at(image, 16)? != ET_EXEC || u16_at(image, 18)? != EM_X86_64 {
        return Err(ElfError::NotElf("not an x86-64 executable"));
    }
    let entry = u64_at(image, 24)?;
    let phoff = u64_at(image, 32)?;
    let phentsize = u64::from(u16_at(image, 54)?);
    let phnum = u64::from(u16_at(image, 56)?);
    if phentsize < 56 {
        return Err(ElfError::NotElf("program header size"));
    }
    let mut entry_ok = false;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .ok_or(ElfError::Truncated("program header"))?;
        if u32_at(image, ph)? != PT_LOAD {
            continue;
        }
        let offset = u64_at(image, ph + 8)?;
        let paddr = u64_at(image, ph + 24)?;
        let filesz = u64_at(image, ph + 32)?;
        let memsz = u64_at(image, ph + 40)?;
        let end = paddr.checked_add(memsz);
        if filesz > memsz || paddr < IMAGE_GPA || end.is_none_or(|e| e > IMAGE_END) {
            return Err(ElfError::OutOfWindow {
                addr: paddr,
                size: memsz,
            });
        }
        let data = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(filesz).ok())
            .and_then(|(o, n)| image.get(o..o.checked_add(n)?))
            .ok_or(ElfError::Truncated("segment data"))?;
        mem.write_slice(data, GuestAddress(paddr))
            .map_err(ElfError::Write)?;
        let bss = usize::try_from(memsz - filesz).map_err(|_| ElfError::Truncated("bss"))?;
        mem.write_slice(&vec![0u8; bss], GuestAddress(paddr + filesz))
            .map_err(ElfError::Write)?;
        let vaddr = u64_at(image, ph + 16)?;
        entry_ok |= vaddr
            .checked_add(memsz)
            .is_some_and(|end| (vaddr..end).contains(&entry));
    }
    if !entry_ok {
        return Err(ElfError::BadEntry(entry));
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    /// A one-segment executable: `code` at `addr`, entry at `entry`.
    fn elf(addr: u64, code: &[u8], entry: u64) -> Vec<u8> {
        let mut b = vec![0u8; 120];
        b[0..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
        b[ph + 16..ph + 24].copy_from_slice(&addr.to_le_bytes());
        b[ph + 24..ph + 32].copy_from_slice(&addr.to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        b[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + 16).to_le_bytes());
        b.extend_from_slice(code);
        b
    }

    #[test]
    fn test_elf_load_places_segment_and_returns_entry() {
        let m = mem();
        let e = load(&elf(IMAGE_GPA, &[0xF4, 0x90], IMAGE_GPA), &m).unwrap();
        assert_eq!(e, IMAGE_GPA);
        let mut got = [0u8; 3];
        m.read_slice(&mut got, GuestAddress(IMAGE_GPA)).unwrap();
        assert_eq!(got, [0xF4, 0x90, 0]);
    }

    #[test]
    fn test_elf_load_bad_images_rejected() {
        let m = mem();
        assert!(matches!(load(b"nope", &m), Err(ElfError::NotElf(_))));
        let low = elf(0x1000, &[0x90], 0x1000);
        assert!(matches!(load(&low, &m), Err(ElfError::OutOfWindow { .. })));
        let entry = elf(IMAGE_GPA, &[0x90], 0x5000);
        assert!(matches!(load(&entry, &m), Err(ElfError::BadEntry(_))));
        let mut cut = elf(IMAGE_GPA, &[0x90; 64], IMAGE_GPA);
        cut.truncate(130);
        assert!(matches!(load(&cut, &m), Err(ElfError::Truncated(_))));
    }
}
