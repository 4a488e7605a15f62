//! A VMM-side harness for end-to-end tests: plays the VMM with the `vfio_user` crate's `Client`
//! (the code Cloud Hypervisor runs) and a shared-memory guest RAM, and the guest driver with
//! `vgpu_device::driver::Driver` over the resulting BAR accesses.

pub mod workload;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_BAR2_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfio_user::Client;
use vgpu_api::daemon::{Daemon, DaemonConfig};
use vgpu_device::driver::DeviceAccess;
use vgpu_device::phys::PhysGpuConfig;
use vgpu_device::sched::SchedConfig;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest-physical base of guest RAM.
pub const RAM_GPA: u64 = 0x1_0000_0000;

/// A daemon in a temporary socket directory.
pub fn daemon(lmem_mib: u64) -> Daemon {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vgpu-it-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    Daemon::new(DaemonConfig {
        gpu: PhysGpuConfig {
            lmem_size: lmem_mib << 20,
            max_vgpus: 64,
        },
        sched: SchedConfig::default(),
        socket_dir: dir,
    })
    .expect("daemon")
}

/// A memfd-backed, mmapped buffer (guest RAM, or a mapped BAR).
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
    fd: Option<OwnedFd>,
}

// SAFETY: the mapping is plain shared memory; tests access it from one thread at a time.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Anonymous shared memory of `len` bytes in a fresh memfd.
    pub fn memfd(len: usize) -> Self {
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: `fd` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let size = libc::off_t::try_from(len).expect("size");
        // SAFETY: a valid fd we own.
        let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), size) };
        assert_eq!(rc, 0, "ftruncate");
        let mut m = Self::map(fd.as_raw_fd(), 0, len);
        m.fd = Some(fd);
        m
    }

    /// Maps `len` bytes of `fd` at `offset`, shared.
    pub fn map(fd: i32, offset: u64, len: usize) -> Self {
        // SAFETY: a fresh shared mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        Mapping {
            ptr: ptr.cast(),
            len,
            fd: None,
        }
    }

    /// The memfd (for `DMA_MAP`).
    pub fn fd(&self) -> i32 {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    /// Copies `data` in at `off`.
    pub fn write(&self, off: u64, data: &[u8]) {
        let off = usize::try_from(off).expect("offset");
        assert!(off + data.len() <= self.len);
        // SAFETY: bounds checked; the mapping is valid for `len` bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) }
    }

    /// Copies out at `off`.
    pub fn read(&self, off: u64, data: &mut [u8]) {
        let off = usize::try_from(off).expect("offset");
        assert!(off + data.len() <= self.len);
        // SAFETY: bounds checked; the mapping is valid for `len` bytes.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), data.as_mut_ptr(), data.len()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A VMM attached to one vGPU: the vfio-user client, the mapped aperture, guest RAM and the
/// MSI-X eventfds.
pub struct Vmm {
    /// The client.
    pub client: Client,
    /// BAR2 as the client mmapped it from the sparse area.
    pub aperture: Mapping,
    /// Guest RAM (DMA-mapped at `RAM_GPA`).
    pub ram: Mapping,
    /// One eventfd per MSI-X vector.
    pub irqs: Vec<EventFd>,
}

/// Bytes of guest RAM each test VMM has.
pub const RAM_SIZE: usize = 16 << 20;

impl Vmm {
    /// Connects like Cloud Hypervisor does: negotiate, read all regions (the client does), map
    /// the aperture's sparse area, DMA-map guest RAM, program the BARs, enable memory and bus
    /// master, wire MSI-X to eventfds.
    pub fn attach(socket: &Path) -> Self {
        Self::attach_ram(socket, Mapping::memfd(RAM_SIZE))
    }

    /// [`Vmm::attach`] with existing guest RAM (a VM that reconnects, e.g. after a migration).
    pub fn attach_ram(socket: &Path, ram: Mapping) -> Self {
        let mut client = connect(socket);
        let bar2 = client.region(VFIO_PCI_BAR2_REGION_INDEX).expect("BAR2");
        let fo = bar2.file_offset.as_ref().expect("BAR2 has an fd");
        assert_eq!(bar2.sparse_areas.len(), 1, "one sparse area");
        let area = bar2.sparse_areas[0];
        let aperture = Mapping::map(
            fo.file().as_raw_fd(),
            fo.start() + area.offset,
            usize::try_from(area.size).expect("size"),
        );
        client
            .dma_map(0, RAM_GPA, RAM_SIZE as u64, ram.fd())
            .expect("dma_map");
        let cfg = |c: &mut Client, off: u64, v: u32| {
            c.region_write(VFIO_PCI_CONFIG_REGION_INDEX, off, &v.to_le_bytes())
                .expect("config")
        };
        cfg(&mut client, 0x10, 0xe000_0000);
        cfg(&mut client, 0x14, 0);
        cfg(&mut client, 0x18, 0x0);
        cfg(&mut client, 0x1c, 0x8);
        cfg(&mut client, 0x04, 0x6);
        let irqs: Vec<EventFd> = (0..5)
            .map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd"))
            .collect();
        let fds: Vec<i32> = irqs.iter().map(|e| e.as_raw_fd()).collect();
        client
            .set_irqs(
                VFIO_PCI_MSIX_IRQ_INDEX,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                5,
                &fds,
            )
            .expect("set_irqs");
        Vmm {
            client,
            aperture,
            ram,
            irqs,
        }
    }

    /// Disconnects, handing back guest RAM.
    pub fn detach(self) -> Mapping {
        let _ = self.client.shutdown();
        self.ram
    }

    /// Waits until MSI-X vector `v` fires; returns the number of events.
    pub fn wait_irq(&self, v: usize, timeout: Duration) -> Option<u64> {
        let t0 = Instant::now();
        loop {
            if let Ok(n) = self.irqs[v].read() {
                return Some(n);
            }
            if t0.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Connects a client, retrying briefly while a previous connection is being torn down.
pub fn connect(socket: &Path) -> Client {
    let t0 = Instant::now();
    loop {
        match Client::new(socket) {
            Ok(c) => return c,
            Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect {}: {e}", socket.display()),
        }
    }
}

impl DeviceAccess for Vmm {
    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        self.client
            .region_read(VFIO_PCI_BAR0_REGION_INDEX, offset, data)
            .expect("region_read");
    }
    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        self.client
            .region_write(VFIO_PCI_BAR0_REGION_INDEX, offset, data)
            .expect("region_write");
    }
    fn bar2_read(&mut self, offset: u64, data: &mut [u8]) {
        self.aperture.read(offset, data);
    }
    fn bar2_write(&mut self, offset: u64, data: &[u8]) {
        self.aperture.write(offset, data);
    }
    fn progress(&mut self) {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// A path that does not exist yet in the temp dir.
pub fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vgpu-it-{}-{name}", std::process::id()))
}
