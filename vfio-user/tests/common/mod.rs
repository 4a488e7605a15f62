//! Shared test fixtures: a small PCI device behind the `Backend` trait, a raw protocol client
//! that encodes messages by hand (independently of the crate's `wire` module), and helpers.

#![allow(dead_code, missing_docs)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use libc::{c_void, iovec};
use vfio_bindings::bindings::vfio::*;
use vgpu_vfio_user::{
    Backend, BackendError, DeviceInfo, DmaHandle, DmaRegion, IrqInfo, MigState, RegionInfo, Server,
    ServerConfig,
};
use vm_memory::VolatileMemory;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const BAR0_SIZE: u64 = 0x1000;
pub const BAR2_SIZE: u64 = 0x10000;
pub const BAR2_SPARSE: (u64, u64) = (0x1000, 0x4000);
pub const CONFIG_SIZE: u64 = 256;
pub const MSIX_VECTORS: u32 = 4;
/// BAR0 offset whose reads and writes fail in the backend.
pub const BAR0_FAILING: u64 = 0xf00;
/// BAR0 doorbell: a write makes the device read 8 bytes of client memory at the address held
/// in `BAR0_DMA_ADDR` (through the server's DMA handle) into `BAR0_DMA_DATA`.
pub const BAR0_DOORBELL: u64 = 0x800;
pub const BAR0_DMA_DATA: u64 = 0x808;
pub const BAR0_DMA_ADDR: u64 = 0x810;

/// A memfd of `size` bytes.
pub fn memfd(size: u64) -> File {
    // SAFETY: the name is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vgpu-vfio-user-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

/// What the backend was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    RegionRead(u32, u64, usize),
    RegionWrite(u32, u64, Vec<u8>),
    SetIrqs {
        index: u32,
        action: u32,
        start: u32,
        count: u32,
        fds: Vec<bool>,
    },
    DmaMap {
        iova: u64,
        size: u64,
        mapped: bool,
        readable: bool,
        writable: bool,
    },
    DmaUnmap(u64, u64),
    Reset,
    Transition(MigState, MigState),
    MigRead(usize),
    MigWrite(Vec<u8>),
    LogStart(u64, Vec<(u64, u64)>),
    LogStop,
    LogReport(u64, u64, u64),
    Disconnected,
}

/// A small PCI device: config space (region 7), 4 KiB of BAR0 registers, a 64 KiB BAR2 in a
/// memfd with one sparse area, MSI-X with 4 vectors.
pub struct TestBackend {
    pub config: Vec<u8>,
    pub bar0: Vec<u8>,
    pub bar2: File,
    pub irqs: Vec<Option<File>>,
    pub dma: Vec<DmaRegion>,
    pub calls: Vec<Call>,
    pub migration_flags: u64,
    pub logging_supported: bool,
    /// Arcs that fail.
    pub fail_arcs: Vec<(MigState, MigState)>,
    /// Migration stream to hand out.
    pub mig_out: Vec<u8>,
    /// Migration stream received.
    pub mig_in: Vec<u8>,
    /// Pages (absolute IOVAs) to report dirty.
    pub dirty: Vec<u64>,
    /// The server's DMA handle, for the doorbell.
    pub dma_handle: Option<DmaHandle>,
}

impl TestBackend {
    pub fn new() -> Self {
        let mut config = vec![0u8; CONFIG_SIZE as usize];
        config[0..4].copy_from_slice(&0x1234_1af4u32.to_le_bytes());
        TestBackend {
            config,
            bar0: vec![0u8; BAR0_SIZE as usize],
            bar2: memfd(BAR2_SIZE),
            irqs: (0..MSIX_VECTORS).map(|_| None).collect(),
            dma: Vec::new(),
            calls: Vec::new(),
            migration_flags: u64::from(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY),
            logging_supported: true,
            fail_arcs: Vec::new(),
            mig_out: (0..100u8).collect(),
            mig_in: Vec::new(),
            dirty: Vec::new(),
            dma_handle: None,
        }
    }

    pub fn shared() -> Arc<Mutex<TestBackend>> {
        Arc::new(Mutex::new(TestBackend::new()))
    }

    /// Signals MSI-X vector `v` through the client's eventfd.
    pub fn trigger(&self, v: usize) -> bool {
        match self.irqs.get(v).and_then(Option::as_ref) {
            Some(mut f) => f.write_all(&1u64.to_ne_bytes()).is_ok(),
            None => false,
        }
    }

    /// Reads client memory through the DMA mapping covering `iova`.
    pub fn dma_read(&self, iova: u64, buf: &mut [u8]) -> bool {
        for r in &self.dma {
            if iova >= r.iova && iova + buf.len() as u64 <= r.iova + r.size {
                let Some(m) = &r.mapping else { return false };
                let s = m.get_slice((iova - r.iova) as usize, buf.len()).unwrap();
                s.copy_to(buf);
                return true;
            }
        }
        false
    }
}

impl Backend for TestBackend {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
            num_regions: VFIO_PCI_NUM_REGIONS,
            num_irqs: VFIO_PCI_NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> RegionInfo {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let (size, flags, mmap, sparse_areas) = match index {
            VFIO_PCI_BAR0_REGION_INDEX => (BAR0_SIZE, rw, None, vec![]),
            VFIO_PCI_BAR2_REGION_INDEX => (
                BAR2_SIZE,
                rw | VFIO_REGION_INFO_FLAG_MMAP,
                Some((self.bar2.as_raw_fd(), 0)),
                vec![BAR2_SPARSE],
            ),
            VFIO_PCI_CONFIG_REGION_INDEX => (CONFIG_SIZE, rw, None, vec![]),
            _ => (0, 0, None, vec![]),
        };
        RegionInfo {
            size,
            flags,
            mmap,
            sparse_areas,
        }
    }

    fn irq_info(&self, index: u32) -> IrqInfo {
        match index {
            VFIO_PCI_MSIX_IRQ_INDEX => IrqInfo {
                flags: VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_NORESIZE,
                count: MSIX_VECTORS,
            },
            VFIO_PCI_ERR_IRQ_INDEX | VFIO_PCI_REQ_IRQ_INDEX => IrqInfo {
                flags: VFIO_IRQ_INFO_EVENTFD,
                count: 1,
            },
            _ => IrqInfo {
                flags: VFIO_IRQ_INFO_EVENTFD,
                count: 0,
            },
        }
    }

    fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), BackendError> {
        self.calls.push(Call::RegionRead(index, offset, data.len()));
        let o = offset as usize;
        match index {
            VFIO_PCI_BAR0_REGION_INDEX if offset == BAR0_FAILING => {
                data.fill(0x5a);
                Err(BackendError::Io("failing register".into()))
            }
            VFIO_PCI_BAR0_REGION_INDEX => {
                data.copy_from_slice(&self.bar0[o..o + data.len()]);
                Ok(())
            }
            VFIO_PCI_BAR2_REGION_INDEX => self
                .bar2
                .read_exact_at(data, offset)
                .map_err(|e| BackendError::Io(e.to_string())),
            VFIO_PCI_CONFIG_REGION_INDEX => {
                data.copy_from_slice(&self.config[o..o + data.len()]);
                Ok(())
            }
            _ => Err(BackendError::Invalid("no such region".into())),
        }
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.calls
            .push(Call::RegionWrite(index, offset, data.to_vec()));
        let o = offset as usize;
        match index {
            VFIO_PCI_BAR0_REGION_INDEX if offset == BAR0_FAILING => {
                Err(BackendError::Io("failing register".into()))
            }
            VFIO_PCI_BAR0_REGION_INDEX if offset == BAR0_DOORBELL => {
                let a = BAR0_DMA_ADDR as usize;
                let iova = u64::from_le_bytes(self.bar0[a..a + 8].try_into().unwrap());
                let handle = self.dma_handle.clone().expect("DMA handle");
                let mut buf = [0u8; 8];
                handle
                    .read(iova, &mut buf)
                    .map_err(|e| BackendError::Io(e.to_string()))?;
                let d = BAR0_DMA_DATA as usize;
                self.bar0[d..d + 8].copy_from_slice(&buf);
                Ok(())
            }
            VFIO_PCI_BAR0_REGION_INDEX => {
                self.bar0[o..o + data.len()].copy_from_slice(data);
                Ok(())
            }
            VFIO_PCI_BAR2_REGION_INDEX => self
                .bar2
                .write_all_at(data, offset)
                .map_err(|e| BackendError::Io(e.to_string())),
            VFIO_PCI_CONFIG_REGION_INDEX => {
                self.config[o..o + data.len()].copy_from_slice(data);
                Ok(())
            }
            _ => Err(BackendError::Invalid("no such region".into())),
        }
    }

    fn set_irqs(
        &mut self,
        index: u32,
        action: u32,
        start: u32,
        count: u32,
        fds: Vec<Option<File>>,
    ) -> Result<(), BackendError> {
        self.calls.push(Call::SetIrqs {
            index,
            action,
            start,
            count,
            fds: fds.iter().map(Option::is_some).collect(),
        });
        if index == VFIO_PCI_MSIX_IRQ_INDEX && action == VFIO_IRQ_SET_ACTION_TRIGGER {
            if count == 0 {
                self.irqs.iter_mut().for_each(|f| *f = None);
            }
            for (i, f) in fds.into_iter().enumerate() {
                self.irqs[start as usize + i] = f;
            }
        }
        Ok(())
    }

    fn dma_map(&mut self, region: DmaRegion) -> Result<(), BackendError> {
        self.calls.push(Call::DmaMap {
            iova: region.iova,
            size: region.size,
            mapped: region.mapping.is_some(),
            readable: region.readable,
            writable: region.writable,
        });
        self.dma.push(region);
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), BackendError> {
        self.calls.push(Call::DmaUnmap(iova, size));
        let before = self.dma.len();
        self.dma.retain(|r| !(r.iova == iova && r.size == size));
        if self.dma.len() == before {
            return Err(BackendError::Invalid("not mapped".into()));
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), BackendError> {
        self.calls.push(Call::Reset);
        Ok(())
    }

    fn migration_flags(&self) -> u64 {
        self.migration_flags
    }

    fn migration_transition(&mut self, from: MigState, to: MigState) -> Result<(), BackendError> {
        self.calls.push(Call::Transition(from, to));
        if self.fail_arcs.contains(&(from, to)) {
            return Err(BackendError::Io("arc fails".into()));
        }
        Ok(())
    }

    fn migration_read(&mut self, max: usize) -> Result<Vec<u8>, BackendError> {
        self.calls.push(Call::MigRead(max));
        let n = max.min(self.mig_out.len());
        Ok(self.mig_out.drain(..n).collect())
    }

    fn migration_write(&mut self, data: &[u8]) -> Result<(), BackendError> {
        self.calls.push(Call::MigWrite(data.to_vec()));
        self.mig_in.extend_from_slice(data);
        Ok(())
    }

    fn dma_logging_supported(&self) -> bool {
        self.logging_supported
    }

    fn dma_logging_start(
        &mut self,
        page_size: u64,
        ranges: &[(u64, u64)],
    ) -> Result<(), BackendError> {
        self.calls.push(Call::LogStart(page_size, ranges.to_vec()));
        Ok(())
    }

    fn dma_logging_stop(&mut self) -> Result<(), BackendError> {
        self.calls.push(Call::LogStop);
        Ok(())
    }

    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), BackendError> {
        self.calls.push(Call::LogReport(iova, length, page_size));
        for &page in &self.dirty {
            if page >= iova {
                let n = ((page - iova) / page_size) as usize;
                if let Some(w) = bitmap.get_mut(n / 64) {
                    *w |= 1 << (n % 64);
                }
            }
        }
        // Misbehave: a bit past the requested range, which the server must clear.
        if let Some(w) = bitmap.last_mut() {
            *w |= 1 << 63;
        }
        Ok(())
    }

    fn disconnected(&mut self) {
        self.calls.push(Call::Disconnected);
        self.irqs.iter_mut().for_each(|f| *f = None);
    }
}

/// A unique socket path in a fresh directory (removed by [`TempSock`]'s drop).
pub struct TempSock {
    pub dir: PathBuf,
    pub path: PathBuf,
}

impl TempSock {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vgpu-vu-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        TempSock { dir, path }
    }
}

impl Drop for TempSock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running server with its backend.
pub struct Fixture {
    pub sock: TempSock,
    pub backend: Arc<Mutex<TestBackend>>,
    pub server: Option<Server>,
}

impl Fixture {
    pub fn new() -> Self {
        Fixture::with(TestBackend::new(), ServerConfig::default())
    }

    pub fn with(backend: TestBackend, config: ServerConfig) -> Self {
        let sock = TempSock::new();
        let backend = Arc::new(Mutex::new(backend));
        let server = Server::start_with(&sock.path, backend.clone(), config).unwrap();
        backend.lock().unwrap().dma_handle = Some(server.dma());
        Fixture {
            sock,
            backend,
            server: Some(server),
        }
    }

    pub fn path(&self) -> &Path {
        &self.sock.path
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    pub fn backend(&self) -> MutexGuard<'_, TestBackend> {
        self.backend.lock().unwrap()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.backend().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.backend().calls.clear();
    }

    /// A raw client that has negotiated VERSION 0.1 with `caps`.
    pub fn raw(&self) -> Raw {
        let mut r = Raw::connect(self.path());
        let reply = r.version(0, 1, Some(r#"{"capabilities":{"max_msg_fds":16}}"#));
        assert_eq!(reply.flags & ERROR, 0);
        r
    }

    /// Waits until `pred` holds (several seconds at most: the machine may be loaded).
    pub fn wait_for(&self, what: &str, mut pred: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pred(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

// Protocol constants, spelled out independently of the crate.
pub const REPLY: u32 = 1;
pub const NO_REPLY: u32 = 1 << 4;
pub const ERROR: u32 = 1 << 5;

pub const VERSION: u16 = 1;
pub const DMA_MAP: u16 = 2;
pub const DMA_UNMAP: u16 = 3;
pub const GET_INFO: u16 = 4;
pub const GET_REGION_INFO: u16 = 5;
pub const GET_REGION_IO_FDS: u16 = 6;
pub const GET_IRQ_INFO: u16 = 7;
pub const SET_IRQS: u16 = 8;
pub const REGION_READ: u16 = 9;
pub const REGION_WRITE: u16 = 10;
pub const DMA_READ: u16 = 11;
pub const DMA_WRITE: u16 = 12;
pub const RESET: u16 = 13;
pub const WRITE_MULTI: u16 = 15;
pub const FEATURE: u16 = 16;
pub const MIG_DATA_READ: u16 = 17;
pub const MIG_DATA_WRITE: u16 = 18;

/// Little byte-builder.
#[derive(Default)]
pub struct B(pub Vec<u8>);

impl B {
    pub fn new() -> Self {
        B(Vec::new())
    }
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
    pub fn done(self) -> Vec<u8> {
        self.0
    }
}

pub fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes(b[at..at + 2].try_into().unwrap())
}
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
}
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().unwrap())
}

/// A received message.
#[derive(Debug)]
pub struct Msg {
    pub id: u16,
    pub command: u16,
    pub size: u32,
    pub flags: u32,
    pub error: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Msg {
    pub fn is_error(&self) -> bool {
        self.flags & ERROR != 0
    }
}

/// A hand-rolled protocol client.
pub struct Raw {
    pub s: UnixStream,
    next_id: u16,
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Raw { s, next_id: 0x100 }
    }

    /// The bytes of a message.
    pub fn frame(id: u16, cmd: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
        B::new()
            .u16(id)
            .u16(cmd)
            .u32(16 + payload.len() as u32)
            .u32(flags)
            .u32(0)
            .bytes(payload)
            .done()
    }

    /// Sends a command; returns its id.
    pub fn send(&mut self, cmd: u16, flags: u32, payload: &[u8], fds: &[RawFd]) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let bytes = Raw::frame(id, cmd, flags, payload);
        let n = self.s.send_with_fds(&[&bytes[..]], fds).unwrap();
        if n < bytes.len() {
            self.s.write_all(&bytes[n..]).unwrap();
        }
        id
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// Receives one message (panics on EOF or timeout).
    pub fn recv(&mut self) -> Msg {
        self.try_recv().expect("connection closed")
    }

    /// Receives one message; `None` on EOF.
    pub fn try_recv(&mut self) -> Option<Msg> {
        let mut h = [0u8; 16];
        let mut fds = [-1; 8];
        let mut iov = [iovec {
            iov_base: h.as_mut_ptr().cast::<c_void>(),
            iov_len: 16,
        }];
        // SAFETY: the iovec describes `h`, exclusively borrowed.
        let (n, nfds) = unsafe { self.s.recv_with_fds(&mut iov, &mut fds) }.unwrap();
        if n == 0 {
            return None;
        }
        // SAFETY: descriptors just received are ours.
        let fds: Vec<OwnedFd> = fds[..nfds]
            .iter()
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if n < 16 {
            self.s.read_exact(&mut h[n..]).unwrap();
        }
        let size = u32_at(&h, 4);
        let mut payload = vec![0u8; size as usize - 16];
        self.s.read_exact(&mut payload).unwrap();
        Some(Msg {
            id: u16_at(&h, 0),
            command: u16_at(&h, 2),
            size,
            flags: u32_at(&h, 8),
            error: u32_at(&h, 12),
            payload,
            fds,
        })
    }

    /// Sends a command and receives the reply to it.
    pub fn cmd(&mut self, cmd: u16, payload: &[u8]) -> Msg {
        self.cmd_fds(cmd, payload, &[])
    }

    pub fn cmd_fds(&mut self, cmd: u16, payload: &[u8], fds: &[RawFd]) -> Msg {
        let id = self.send(cmd, 0, payload, fds);
        let r = self.recv();
        assert_eq!(r.id, id, "reply id");
        assert_eq!(r.command, cmd, "reply command");
        assert_eq!(r.flags & 0xf, REPLY, "reply type");
        r
    }

    /// Expects an error reply carrying `errno`.
    pub fn expect_errno(&mut self, cmd: u16, payload: &[u8], fds: &[RawFd], errno: i32) {
        let r = self.cmd_fds(cmd, payload, fds);
        assert!(
            r.is_error(),
            "command {cmd} should fail with {errno}: {r:?}"
        );
        assert_eq!(r.error, errno as u32, "errno of command {cmd}");
        assert_eq!(r.size, 16, "an error reply is the header alone");
    }

    pub fn version(&mut self, major: u16, minor: u16, json: Option<&str>) -> Msg {
        let mut p = B::new().u16(major).u16(minor);
        if let Some(j) = json {
            p = p.bytes(j.as_bytes()).bytes(&[0]);
        }
        self.cmd(VERSION, &p.done())
    }

    pub fn read(&mut self, region: u32, offset: u64, count: u32) -> Msg {
        self.cmd(
            REGION_READ,
            &B::new().u64(offset).u32(region).u32(count).done(),
        )
    }

    pub fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Msg {
        self.cmd(
            REGION_WRITE,
            &B::new()
                .u64(offset)
                .u32(region)
                .u32(data.len() as u32)
                .bytes(data)
                .done(),
        )
    }

    /// Reads until the server closes the connection (bounded by the read timeout).
    pub fn expect_closed(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("expected the server to close the connection: {e}"),
            }
        }
    }
}

pub fn dma_map_payload(flags: u32, offset: u64, iova: u64, size: u64) -> Vec<u8> {
    B::new()
        .u32(32)
        .u32(flags)
        .u64(offset)
        .u64(iova)
        .u64(size)
        .done()
}

pub fn dma_unmap_payload(flags: u32, iova: u64, size: u64) -> Vec<u8> {
    B::new().u32(24).u32(flags).u64(iova).u64(size).done()
}

pub fn set_irqs_payload(flags: u32, index: u32, start: u32, count: u32) -> Vec<u8> {
    B::new()
        .u32(20)
        .u32(flags)
        .u32(index)
        .u32(start)
        .u32(count)
        .done()
}

/// An eventfd as a `File`.
pub fn eventfd() -> File {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just created.
    unsafe { File::from_raw_fd(fd) }
}

/// Reads an eventfd's counter, waiting up to several seconds for it to become non-zero.
pub fn wait_event(f: &File) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut b = [0u8; 8];
        match (&*f).read(&mut b) {
            Ok(8) => return u64::from_ne_bytes(b),
            _ => {
                assert!(Instant::now() < deadline, "eventfd never signalled");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}
