//! Shared pieces of the hostile-input, fault and soak tests: a raw vfio-user client that can
//! send anything (fds included), a well-behaved neighbour vGPU whose work is checked bit-exact
//! while a hostile one is attacked, snapshot mutators, and bounded waits.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vgpu_abi::cmd::{enc, BPP_32, KERNEL_SAXPY, ROP_PATCOPY, ROP_SRCCOPY};
use vgpu_abi::{regs, Engine};
use vgpu_api::daemon::{Daemon, VgpuSpec};
use vgpu_device::driver::{Driver, Locked};
use vgpu_device::vgpu::{GttMode, Vgpu};
use vgpu_migration::Snapshot;

/// Bounded waits of these tests.
pub const T: Duration = Duration::from_secs(20);

/// vfio-user reply flag: error.
pub const ERROR: u32 = 1 << 5;
/// vfio-user header flag: no reply wanted.
pub const NO_REPLY: u32 = 1 << 4;

/// vfio-user commands.
pub mod cmd {
    pub const VERSION: u16 = 1;
    pub const DMA_MAP: u16 = 2;
    pub const DMA_UNMAP: u16 = 3;
    pub const DEVICE_GET_INFO: u16 = 4;
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    pub const DEVICE_SET_IRQS: u16 = 8;
    pub const REGION_READ: u16 = 9;
    pub const REGION_WRITE: u16 = 10;
    pub const DMA_READ: u16 = 11;
    pub const DEVICE_RESET: u16 = 13;
    pub const REGION_WRITE_MULTI: u16 = 15;
    pub const DEVICE_FEATURE: u16 = 16;
    pub const MIG_DATA_READ: u16 = 17;
    pub const MIG_DATA_WRITE: u16 = 18;
}

/// Migration v2 device states and feature numbers.
pub mod mig {
    pub const FEATURE_MIG_STATE: u32 = 2;
    pub const GET: u32 = 1 << 16;
    pub const SET: u32 = 1 << 17;
    pub const STOP: u32 = 1;
    pub const RUNNING: u32 = 2;
    pub const STOP_COPY: u32 = 3;
    pub const RESUMING: u32 = 4;
    pub const PRE_COPY: u32 = 6;
}

/// A vfio-user message on the wire.
pub fn frame(id: u16, command: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + payload.len());
    m.extend_from_slice(&id.to_ne_bytes());
    m.extend_from_slice(&command.to_ne_bytes());
    m.extend_from_slice(
        &u32::try_from(16 + payload.len())
            .unwrap_or(u32::MAX)
            .to_ne_bytes(),
    );
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(payload);
    m
}

/// A reply.
#[derive(Debug)]
pub struct Reply {
    /// Message id.
    pub id: u16,
    /// Flags (`ERROR` set on failure).
    pub flags: u32,
    /// errno of a failure.
    pub error: u32,
    /// Payload after the header.
    pub payload: Vec<u8>,
}

impl Reply {
    /// Whether the server refused.
    pub fn failed(&self) -> bool {
        self.flags & ERROR != 0
    }
}

/// A raw vfio-user connection that can send anything.
pub struct Raw {
    /// The socket.
    pub s: UnixStream,
    id: u16,
}

/// The version message every session starts with.
pub fn version_message(id: u16) -> Vec<u8> {
    let mut p = 0u16.to_ne_bytes().to_vec();
    p.extend_from_slice(&1u16.to_ne_bytes());
    p.extend_from_slice(b"{\"capabilities\":{\"max_msg_fds\":16}}\0");
    frame(id, cmd::VERSION, 0, &p)
}

impl Raw {
    /// Connects (retrying while a previous connection is torn down) and negotiates.
    pub fn connect(path: &Path) -> Raw {
        let t0 = Instant::now();
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    s.set_read_timeout(Some(T)).expect("timeout");
                    s.set_write_timeout(Some(T)).expect("timeout");
                    let mut r = Raw { s, id: 0 };
                    if let Some(rep) = r.try_send_recv(&version_message(0), &[]) {
                        if !rep.failed() {
                            return r;
                        }
                    }
                }
                Err(e) if t0.elapsed() > T => panic!("cannot connect {}: {e}", path.display()),
                Err(_) => {}
            }
            assert!(t0.elapsed() < T, "{}: version refused", path.display());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Next message id.
    pub fn next_id(&mut self) -> u16 {
        self.id = self.id.wrapping_add(1);
        self.id
    }

    /// Sends raw bytes with descriptors; false when the server has closed.
    pub fn send_bytes(&mut self, bytes: &[u8], fds: &[RawFd]) -> bool {
        if fds.is_empty() {
            self.s.write_all(bytes).is_ok()
        } else {
            vmm_sys_util::sock_ctrl_msg::ScmSocket::send_with_fds(&self.s, &[bytes], fds)
                .is_ok_and(|n| n == bytes.len() || self.s.write_all(&bytes[n..]).is_ok())
        }
    }

    /// Reads one reply; `None` when the connection closed or timed out.
    pub fn recv(&mut self) -> Option<Reply> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).ok()?;
        let size = u32::from_ne_bytes(h[4..8].try_into().ok()?) as usize;
        let mut payload = vec![0u8; size.checked_sub(16)?];
        self.s.read_exact(&mut payload).ok()?;
        // Replies never carry fds from vgpud; anything attached is ignored.
        Some(Reply {
            id: u16::from_ne_bytes([h[0], h[1]]),
            flags: u32::from_ne_bytes(h[8..12].try_into().ok()?),
            error: u32::from_ne_bytes(h[12..16].try_into().ok()?),
            payload,
        })
    }

    fn try_send_recv(&mut self, bytes: &[u8], fds: &[RawFd]) -> Option<Reply> {
        if !self.send_bytes(bytes, fds) {
            return None;
        }
        self.recv()
    }

    /// One command and its reply; `None` if the server closed the connection.
    pub fn try_call(&mut self, command: u16, payload: &[u8], fds: &[RawFd]) -> Option<Reply> {
        let id = self.next_id();
        self.try_send_recv(&frame(id, command, 0, payload), fds)
    }

    /// One command and its reply; panics if the connection is gone.
    pub fn call(&mut self, command: u16, payload: &[u8]) -> Reply {
        self.try_call(command, payload, &[])
            .unwrap_or_else(|| panic!("command {command}: connection closed"))
    }

    /// `REGION_READ` of `count` bytes.
    pub fn region_read(&mut self, region: u32, offset: u64, count: u32) -> Reply {
        self.call(cmd::REGION_READ, &region_access(region, offset, count, &[]))
    }

    /// `REGION_WRITE`.
    pub fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Reply {
        let count = u32::try_from(data.len()).expect("count");
        self.call(
            cmd::REGION_WRITE,
            &region_access(region, offset, count, data),
        )
    }

    /// `DMA_MAP` of `size` bytes of `fd` at file `offset` to `iova`.
    pub fn dma_map(&mut self, fd: RawFd, offset: u64, iova: u64, size: u64, flags: u32) -> Reply {
        let p = dma_map_payload(flags, offset, iova, size);
        self.try_call(cmd::DMA_MAP, &p, &[fd]).expect("DMA_MAP")
    }

    /// `DEVICE_FEATURE` `SET` of the migration state.
    pub fn set_state(&mut self, state: u32) -> Reply {
        let mut p = 16u32.to_ne_bytes().to_vec();
        p.extend_from_slice(&(mig::FEATURE_MIG_STATE | mig::SET).to_ne_bytes());
        p.extend_from_slice(&state.to_ne_bytes());
        p.extend_from_slice(&u32::MAX.to_ne_bytes());
        self.call(cmd::DEVICE_FEATURE, &p)
    }

    /// Reads the migration stream until a short read.
    pub fn read_stream(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let want = 256 * 1024u32;
            let r = self.call(cmd::MIG_DATA_READ, &mig_data(8 + want, want, &[]));
            assert!(!r.failed(), "MIG_DATA_READ refused");
            let n = u32::from_ne_bytes(r.payload[4..8].try_into().expect("size")) as usize;
            out.extend_from_slice(&r.payload[8..8 + n]);
            if n < want as usize {
                return out;
            }
        }
    }

    /// Writes migration data in chunks; the first refusal is returned.
    pub fn write_stream(&mut self, data: &[u8], chunk: usize) -> Result<(), Reply> {
        for c in data.chunks(chunk.max(1)) {
            let len = u32::try_from(c.len()).expect("len");
            let r = self.call(cmd::MIG_DATA_WRITE, &mig_data(8 + len, len, c));
            if r.failed() {
                return Err(r);
            }
        }
        Ok(())
    }
}

/// A region access payload (`REGION_READ` / `REGION_WRITE`).
pub fn region_access(region: u32, offset: u64, count: u32, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_ne_bytes().to_vec();
    p.extend_from_slice(&region.to_ne_bytes());
    p.extend_from_slice(&count.to_ne_bytes());
    p.extend_from_slice(data);
    p
}

/// A `DMA_MAP` payload.
pub fn dma_map_payload(flags: u32, offset: u64, iova: u64, size: u64) -> Vec<u8> {
    let mut p = 32u32.to_ne_bytes().to_vec();
    p.extend_from_slice(&flags.to_ne_bytes());
    p.extend_from_slice(&offset.to_ne_bytes());
    p.extend_from_slice(&iova.to_ne_bytes());
    p.extend_from_slice(&size.to_ne_bytes());
    p
}

/// A `DMA_UNMAP` payload.
pub fn dma_unmap_payload(flags: u32, iova: u64, size: u64) -> Vec<u8> {
    let mut p = 24u32.to_ne_bytes().to_vec();
    p.extend_from_slice(&flags.to_ne_bytes());
    p.extend_from_slice(&iova.to_ne_bytes());
    p.extend_from_slice(&size.to_ne_bytes());
    p
}

/// A `MIG_DATA_READ`/`MIG_DATA_WRITE` payload.
pub fn mig_data(argsz: u32, size: u32, data: &[u8]) -> Vec<u8> {
    let mut p = argsz.to_ne_bytes().to_vec();
    p.extend_from_slice(&size.to_ne_bytes());
    p.extend_from_slice(data);
    p
}

/// A `DEVICE_SET_IRQS` payload.
pub fn set_irqs_payload(flags: u32, index: u32, start: u32, count: u32, extra: &[u8]) -> Vec<u8> {
    let argsz = u32::try_from(20 + extra.len()).expect("argsz");
    let mut p = Vec::new();
    for v in [argsz, flags, index, start, count] {
        p.extend_from_slice(&v.to_ne_bytes());
    }
    p.extend_from_slice(extra);
    p
}

/// A memfd of `size` bytes, filled with `fill`.
pub fn memfd(size: u64, fill: u8) -> std::fs::File {
    // SAFETY: a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"hostile-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is fresh and owned by nobody else.
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(size).expect("memfd size");
    if fill != 0 {
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![fill; size as usize], 0).expect("fill");
    }
    f
}

/// The contents of a file.
pub fn file_bytes(f: &std::fs::File) -> Vec<u8> {
    let len = f.metadata().expect("len").len();
    let mut b = vec![0u8; usize::try_from(len).expect("len")];
    std::os::unix::fs::FileExt::read_exact_at(f, &mut b, 0).expect("read");
    b
}

/// A `VgpuSpec`.
pub fn spec(profile: &str, gtt: GttMode, name: &str) -> VgpuSpec {
    VgpuSpec {
        profile: profile.into(),
        gtt,
        name: Some(name.into()),
        weight: None,
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[3]
        })
        .collect()
}

/// Polls `cond` until it holds or `limit` passes; panics with `what` then.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------------
// The well-behaved neighbour.

/// Local-memory layout of the neighbour's work (all below 4 MiB; rings live at the top).
const N_SRC: u64 = 0x10_0000;
const N_DST: u64 = 0x20_0000;
const N_X: u64 = 0x28_0000;
const N_Y: u64 = 0x2C_0000;
const N_FENCE: u64 = 0x30_0000;
/// A sentinel area of the neighbour that nothing may write.
const N_SENTINEL: u64 = 0x38_0000;
const N_SENTINEL_LEN: usize = 0x4_0000;

/// One round of the neighbour's work: a fill + copy on the blit engine and saxpy on the
/// compute engine, each checked bit for bit.
pub fn neighbour_round(d: &mut Driver<Locked>, round: u32, engines: &[Engine]) {
    let (w, h) = (64u32, 32u32);
    if engines.contains(&Engine::Blit) {
        let color = 0x0101_0101u32.wrapping_mul(round | 1);
        let fill = enc::color_blt(ROP_PATCOPY, BPP_32, d.gm_of_lmem(N_SRC), w * 4, w, h, color);
        let copy = enc::src_copy_blt(enc::Copy {
            rop: ROP_SRCCOPY,
            bpp: BPP_32,
            dst: d.gm_of_lmem(N_DST),
            dst_pitch: w * 4,
            src: d.gm_of_lmem(N_SRC),
            src_pitch: w * 4,
            width: w,
            height: h,
            pattern: 0,
        });
        let fence = enc::store_data_imm(d.gm_of_lmem(N_FENCE), round);
        d.submit(Engine::Blit, &[fill.as_slice(), &copy, &fence].concat())
            .unwrap_or_else(|e| panic!("neighbour blit round {round}: {e}"));
        d.wait_idle(Engine::Blit, T)
            .unwrap_or_else(|e| panic!("neighbour blit round {round}: {e}"));
        let mut got = vec![0u8; (w * h * 4) as usize];
        d.lmem_read(N_DST, &mut got);
        assert!(
            got.chunks_exact(4)
                .all(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) == color),
            "neighbour blit round {round}: output differs"
        );
        let mut f = [0u8; 4];
        d.lmem_read(N_FENCE, &mut f);
        assert_eq!(u32::from_le_bytes(f), round, "neighbour fence");
    }
    if engines.contains(&Engine::Compute) {
        let n = 256u32;
        let x: Vec<f32> = (0..n).map(|i| (i + round) as f32 * 0.5).collect();
        let y: Vec<f32> = (0..n).map(|i| 3.0 - i as f32).collect();
        let b = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
        d.lmem_write(N_X, &b(&x));
        d.lmem_write(N_Y, &b(&y));
        let cmd = enc::dispatch(enc::Dispatch {
            kernel: KERNEL_SAXPY,
            params: [n, 0, 0],
            scalar: 2.0,
            buffers: [d.gm_of_lmem(N_X), d.gm_of_lmem(N_Y), 0],
        });
        d.submit(Engine::Compute, &cmd)
            .unwrap_or_else(|e| panic!("neighbour saxpy round {round}: {e}"));
        d.wait_idle(Engine::Compute, T)
            .unwrap_or_else(|e| panic!("neighbour saxpy round {round}: {e}"));
        let mut out = vec![0u8; n as usize * 4];
        d.lmem_read(N_Y, &mut out);
        for (i, c) in out.chunks_exact(4).enumerate() {
            let want = 2.0f32 * x[i] + y[i];
            assert_eq!(
                f32::from_le_bytes([c[0], c[1], c[2], c[3]]).to_bits(),
                want.to_bits(),
                "neighbour saxpy round {round}: element {i}"
            );
        }
    }
}

/// A well-behaved vGPU of the daemon working in its own thread until stopped; its results,
/// a sentinel area of its local memory and a scratch register are checked.
pub struct Neighbour {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
    vgpu: Arc<Mutex<Vgpu>>,
}

impl Neighbour {
    /// Starts working on vGPU `id` of `daemon` (a `mini` or larger profile with blit and compute).
    pub fn start(daemon: &Daemon, id: u32) -> Neighbour {
        let vgpu = daemon.vgpu(id).expect("neighbour vGPU");
        let mut d = Driver::probe(Locked(vgpu.clone())).expect("probe neighbour");
        d.lmem_write(N_SENTINEL, &pattern(N_SENTINEL_LEN, id));
        d.write32(regs::SCRATCH1, 0x5afe_0000 | id);
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), rounds.clone());
        let thread = std::thread::Builder::new()
            .name(format!("neighbour-{id}"))
            .spawn(move || {
                let mut round = 1u32;
                while !s.load(Ordering::Relaxed) {
                    neighbour_round(&mut d, round, &[Engine::Blit, Engine::Compute]);
                    r.fetch_add(1, Ordering::Relaxed);
                    round = round.wrapping_add(1);
                }
            })
            .expect("spawn");
        Neighbour {
            stop,
            rounds,
            thread: Some(thread),
            vgpu,
        }
    }

    /// Rounds completed so far.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more rounds completed (the neighbour still makes progress).
    pub fn wait_progress(&self, n: u64, what: &str) {
        let start = self.rounds();
        let t0 = Instant::now();
        while self.rounds() < start + n {
            if self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
                panic!("neighbour stopped ({what})");
            }
            assert!(
                t0.elapsed() < T,
                "neighbour made no progress in {T:?} ({what})"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops the neighbour, propagating its failure, and checks what it must have kept.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if let Err(e) = t.join() {
                std::panic::resume_unwind(e);
            }
        }
        let mut d = Driver::probe(Locked(self.vgpu.clone())).expect("probe neighbour");
        let id = d.pv().vgpu_id;
        let mut got = vec![0u8; N_SENTINEL_LEN];
        d.lmem_read(N_SENTINEL, &mut got);
        assert!(
            got == pattern(N_SENTINEL_LEN, id),
            "neighbour sentinel memory changed"
        );
        assert_eq!(
            d.read32(regs::SCRATCH1),
            0x5afe_0000 | id,
            "neighbour register changed"
        );
        self.rounds()
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshot mutation.

/// Every node of a snapshot tree, by path.
pub fn node_paths(s: &Snapshot) -> Vec<Vec<String>> {
    fn walk(s: &Snapshot, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        out.push(path.clone());
        for (k, c) in &s.children {
            path.push(k.clone());
            walk(c, path, out);
            path.pop();
        }
    }
    let mut out = Vec::new();
    walk(s, &mut Vec::new(), &mut out);
    out
}

/// The node at `path`.
pub fn node_mut<'a>(s: &'a mut Snapshot, path: &[String]) -> &'a mut Snapshot {
    path.iter()
        .fold(s, |n, k| n.children.get_mut(k).expect("path"))
}

/// A structural mutation of a snapshot tree (applied after decoding, re-encoded with a valid
/// checksum so that it reaches the component's own validation).
#[derive(Clone, Debug)]
pub enum Mutation {
    /// Flip bit `bit` of state byte `at` of node `node` (indices taken modulo the sizes).
    FlipBit { node: usize, at: usize, bit: u8 },
    /// Set state byte `at` of node `node` to `v`.
    SetByte { node: usize, at: usize, v: u8 },
    /// Cut the node's state to `keep` bytes (modulo its length + 1).
    Truncate { node: usize, keep: usize },
    /// Append bytes to the node's state.
    Append { node: usize, bytes: Vec<u8> },
    /// Replace the node's state with random bytes.
    Replace { node: usize, bytes: Vec<u8> },
    /// Remove the node's state.
    DropState { node: usize },
    /// Remove the node (not the root).
    DropNode { node: usize },
    /// Give the node's state to another node.
    Swap { a: usize, b: usize },
    /// Write a postcard varint (a length or count) at `at`: the classic "huge count" attack.
    Varint { node: usize, at: usize, v: u64 },
    /// Add a child with random state.
    AddChild {
        node: usize,
        id: String,
        bytes: Vec<u8>,
    },
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

fn state_at<'a>(s: &'a mut Snapshot, paths: &[Vec<String>], i: usize) -> Option<&'a mut Vec<u8>> {
    node_mut(s, &paths[i % paths.len()]).state.as_mut()
}

/// Applies `m` to `s`.
pub fn mutate(s: &mut Snapshot, m: &Mutation) {
    let paths = node_paths(s);
    let pick = |i: usize| paths[i % paths.len()].clone();
    match m {
        Mutation::FlipBit { node, at, bit } => {
            if let Some(v) = state_at(s, &paths, *node).filter(|v| !v.is_empty()) {
                let i = at % v.len();
                v[i] ^= 1 << (bit % 8);
            }
        }
        Mutation::SetByte { node, at, v: b } => {
            if let Some(v) = state_at(s, &paths, *node).filter(|v| !v.is_empty()) {
                let i = at % v.len();
                v[i] = *b;
            }
        }
        Mutation::Truncate { node, keep } => {
            if let Some(v) = state_at(s, &paths, *node) {
                let k = keep % (v.len() + 1);
                v.truncate(k);
            }
        }
        Mutation::Append { node, bytes } => {
            if let Some(v) = state_at(s, &paths, *node) {
                v.extend_from_slice(bytes);
            }
        }
        Mutation::Replace { node, bytes } => {
            if let Some(v) = state_at(s, &paths, *node) {
                v.clone_from(bytes);
            }
        }
        Mutation::DropState { node } => node_mut(s, &pick(*node)).state = None,
        Mutation::DropNode { node } => {
            let p = pick(*node);
            if let Some((last, parent)) = p.split_last() {
                node_mut(s, parent).children.remove(last);
            }
        }
        Mutation::Swap { a, b } => {
            let (pa, pb) = (pick(*a), pick(*b));
            let sa = node_mut(s, &pa).state.take();
            let sb = std::mem::replace(&mut node_mut(s, &pb).state, sa);
            node_mut(s, &pa).state = sb;
        }
        Mutation::Varint { node, at, v: n } => {
            if let Some(v) = state_at(s, &paths, *node) {
                let i = at % (v.len() + 1);
                let tail = v.split_off(i);
                v.extend_from_slice(&varint(*n));
                v.extend_from_slice(&tail);
            }
        }
        Mutation::AddChild { node, id, bytes } => {
            let mut c = Snapshot::new(id.clone());
            c.state = Some(bytes.clone());
            node_mut(s, &pick(*node)).add(c);
        }
    }
}

/// A proptest strategy for mutations.
pub fn mutation() -> impl proptest::strategy::Strategy<Value = Mutation> {
    use proptest::prelude::*;
    let bytes = prop::collection::vec(any::<u8>(), 0..48);
    let huge = prop_oneof![
        Just(u64::MAX),
        Just(u64::from(u32::MAX)),
        Just(1u64 << 40),
        Just(1u64 << 20),
        0u64..4096,
        any::<u64>()
    ];
    prop_oneof![
        4 => (any::<usize>(), any::<usize>(), any::<u8>())
            .prop_map(|(node, at, bit)| Mutation::FlipBit { node, at, bit }),
        2 => (any::<usize>(), any::<usize>(), any::<u8>())
            .prop_map(|(node, at, v)| Mutation::SetByte { node, at, v }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(node, keep)| Mutation::Truncate { node, keep }),
        1 => (any::<usize>(), bytes.clone()).prop_map(|(node, bytes)| Mutation::Append { node, bytes }),
        1 => (any::<usize>(), bytes.clone()).prop_map(|(node, bytes)| Mutation::Replace { node, bytes }),
        1 => any::<usize>().prop_map(|node| Mutation::DropState { node }),
        1 => any::<usize>().prop_map(|node| Mutation::DropNode { node }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap { a, b }),
        3 => (any::<usize>(), any::<usize>(), huge)
            .prop_map(|(node, at, v)| Mutation::Varint { node, at, v }),
        1 => (any::<usize>(), "[a-z.]{0,12}", bytes)
            .prop_map(|(node, id, bytes)| Mutation::AddChild { node, id, bytes }),
    ]
}

/// Cases for a property: `FUZZ_CASES` (set by `scripts/fuzz`) or `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs property `name` over `cases` inputs of `strategy` (no failure files; the failing
/// input, shrunk, is in the panic message) and prints `FUZZ_COUNT name N` for `scripts/fuzz`.
pub fn run_prop<S: proptest::strategy::Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value),
) where
    S::Value: std::fmt::Debug,
{
    let config = proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        // Shrinking re-runs whole sessions: keep it bounded.
        max_shrink_iters: 64,
        ..proptest::test_runner::Config::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let n = std::cell::Cell::new(0u64);
    let r = runner.run(&strategy, |v| {
        n.set(n.get() + 1);
        test(v);
        Ok(())
    });
    eprintln!("FUZZ_COUNT {name} {}", n.get());
    if let Err(e) = r {
        panic!("{name}: {e}");
    }
}

/// The raw fd of something.
pub fn raw_fd(f: &impl AsRawFd) -> RawFd {
    f.as_raw_fd()
}
