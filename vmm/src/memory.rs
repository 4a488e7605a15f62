//! Guest RAM: one memfd-backed region at guest-physical 0, shared so that vgpud can map it for
//! DMA, registered as KVM memslot 0; and host mappings of device memory (apertures) that become
//! further memslots.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

/// Errors creating or registering memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    #[error("Cannot create the guest RAM memfd")]
    Memfd(#[source] std::io::Error),
    /// Mapping failed.
    #[error("Cannot map memory")]
    Mmap(#[source] std::io::Error),
    /// vm-memory refused the region.
    #[error("Cannot build guest memory: {0}")]
    Region(String),
    /// KVM refused the memslot.
    #[error("KVM refused memslot {slot} at {gpa:#x}")]
    Memslot {
        /// Slot number.
        slot: u32,
        /// Guest-physical address.
        gpa: u64,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A size does not fit the host's address space.
    #[error("Size {0:#x} does not fit")]
    Size(u64),
}

/// Guest RAM.
pub struct GuestRam {
    file: File,
    mem: GuestMemoryMmap,
    size: u64,
}

impl GuestRam {
    /// `size` bytes of zeroed RAM in a fresh memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vgpu-vmm-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(MemoryError::Memfd)?;
        let len = usize::try_from(size).map_err(|_| MemoryError::Size(size))?;
        let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, 0);
        let region =
            MmapRegion::from_file(fo, len).map_err(|e| MemoryError::Region(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| MemoryError::Region("region overflows".into()))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| MemoryError::Region(e.to_string()))?;
        Ok(GuestRam { file, mem, size })
    }

    /// The guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd (for vfio-user `DMA_MAP`).
    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Registers the RAM as memslot `slot`.
    pub fn register(&self, vm: &VmFd, slot: u32) -> Result<(), MemoryError> {
        for r in self.mem.iter() {
            let host = r.as_ptr() as u64;
            set_memslot(vm, slot, r.start_addr().0, r.len(), host)?;
        }
        Ok(())
    }
}

/// Adds (or with `size` 0, removes) memslot `slot`.
pub fn set_memslot(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    size: u64,
    host: u64,
) -> Result<(), MemoryError> {
    let region = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: host,
    };
    // SAFETY: `host` is either 0 (removal) or the start of a mapping of at least `size` bytes
    // that its owner (GuestRam or HostMapping) keeps alive until the memslot is removed or the
    // VM is destroyed.
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemoryError::Memslot {
        slot,
        gpa,
        source,
    })
}

/// A shared mapping of `len` bytes of a file (a vGPU's local memory, mapped as its aperture).
pub struct HostMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; the guest and the device access it concurrently
// as a real aperture would be, and the VMM itself never creates references into it.
unsafe impl Send for HostMapping {}
// SAFETY: as above.
unsafe impl Sync for HostMapping {}

impl HostMapping {
    /// Maps `len` bytes of `fd` at `offset`, shared, read-write.
    pub fn new(fd: i32, offset: u64, len: u64) -> Result<Self, MemoryError> {
        let n = usize::try_from(len).map_err(|_| MemoryError::Size(len))?;
        let off = libc::off_t::try_from(offset).map_err(|_| MemoryError::Size(offset))?;
        // SAFETY: a fresh shared mapping of a descriptor the caller owns; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                n,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemoryError::Mmap(std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast()).ok_or(MemoryError::Size(len))?;
        Ok(HostMapping { ptr, len: n })
    }

    /// Host address of the mapping.
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether the mapping is empty (never: mappings have a size).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`. Memslots that pointed at it are
        // removed before, or the VM is gone.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
