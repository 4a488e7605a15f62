//! A fake `LiveMigratable` component for the migration tests: `pages` pages of memory in a
//! `Vec`, exact dirty tracking, a writer thread dirtying pages at a set rate, a state of a few
//! counters plus a hash of the memory (restore checks that the memory it finds matches), and
//! failure injection for every trait method.

#![allow(dead_code)] // Each test binary uses a different part.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vgpu_migration::{
    destination, source, DestinationConfig, DestinationError, DestinationReport, LiveMigratable,
    Migratable, MigrationError, MigrationReport, Pausable, Snapshot, Snapshottable, SourceConfig,
    SourceError, PAGE_SIZE,
};

/// Which call fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fail {
    None,
    Compat,
    ReadPage(u64),
    DirtyPages,
    Pause,
    Snapshot,
    AcceptCompat,
    WritePage(u64),
    WriteZeroPage,
    Restore,
    Resume,
}

pub struct Inner {
    pub mem: Vec<u8>,
    dirty: Vec<bool>,
    pub logging: bool,
    pub paused: bool,
    pub writes: u64,
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeState {
    pub writes: u64,
    pub generation: u64,
    pub mem_hash: u32,
    pub label: String,
}

pub struct Fake {
    pub shared: Arc<Mutex<Inner>>,
    pub pages: usize,
    pub compat: Vec<u8>,
    pub fail: Fail,
    pub generation: u64,
    /// Extra pages each `dirty_pages` call reports (after the first), without changing them.
    pub script: VecDeque<Vec<u64>>,
    pub aborted: u32,
    pub resumes: u32,
    pub pauses: u32,
    pub restored: bool,
    pub dirty_calls: u32,
    /// How long each `dirty_pages` call takes (a component that scans its memory).
    pub scan_delay: std::time::Duration,
}

pub const COMPAT: &[u8] = b"fake-gpu rev 1 profile=small";

/// Deterministic pseudo-random bytes.
pub fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn mem_err(reason: &str) -> MigrationError {
    MigrationError::Invalid {
        component: "fake".into(),
        reason: reason.into(),
    }
}

impl Fake {
    /// A source: random pages, every fourth page all zero.
    pub fn source(pages: usize, seed: u64) -> Self {
        let mut s = seed | 1;
        let mut mem = vec![0u8; pages * PAGE_SIZE];
        for (i, page) in mem.chunks_mut(PAGE_SIZE).enumerate() {
            if i % 4 != 3 {
                for w in page.chunks_mut(8) {
                    w.copy_from_slice(&xorshift(&mut s).to_le_bytes());
                }
            }
        }
        Self::with_mem(mem, 7)
    }

    /// A destination: garbage memory, so zero markers must be applied.
    pub fn destination(pages: usize) -> Self {
        Self::with_mem(vec![0xaa; pages * PAGE_SIZE], 0)
    }

    fn with_mem(mem: Vec<u8>, generation: u64) -> Self {
        let pages = mem.len() / PAGE_SIZE;
        Fake {
            shared: Arc::new(Mutex::new(Inner {
                mem,
                dirty: vec![false; pages],
                logging: false,
                paused: false,
                writes: 0,
            })),
            pages,
            compat: COMPAT.to_vec(),
            fail: Fail::None,
            generation,
            script: VecDeque::new(),
            aborted: 0,
            resumes: 0,
            pauses: 0,
            restored: false,
            dirty_calls: 0,
            scan_delay: std::time::Duration::ZERO,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.lock().unwrap()
    }

    pub fn memory(&self) -> Vec<u8> {
        self.lock().mem.clone()
    }

    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    pub fn is_logging(&self) -> bool {
        self.lock().logging
    }

    pub fn state(&self) -> FakeState {
        let g = self.lock();
        FakeState {
            writes: g.writes,
            generation: self.generation,
            mem_hash: crc32fast::hash(&g.mem),
            label: "fake".into(),
        }
    }

    fn check(&self, f: Fail) -> Result<(), MigrationError> {
        if self.fail == f {
            Err(mem_err(&format!("injected failure {f:?}")))
        } else {
            Ok(())
        }
    }

    fn page_range(&self, index: u64) -> Result<std::ops::Range<usize>, MigrationError> {
        let i = usize::try_from(index).map_err(|_| mem_err("index"))?;
        if i >= self.pages {
            return Err(mem_err("page out of range"));
        }
        Ok(i * PAGE_SIZE..(i + 1) * PAGE_SIZE)
    }
}

impl Pausable for Fake {
    fn pause(&mut self) -> Result<(), MigrationError> {
        self.check(Fail::Pause)?;
        self.pauses += 1;
        self.lock().paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MigrationError> {
        self.check(Fail::Resume)?;
        self.resumes += 1;
        self.lock().paused = false;
        Ok(())
    }
}

impl Snapshottable for Fake {
    fn id(&self) -> String {
        "fake".into()
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigrationError> {
        self.check(Fail::Snapshot)?;
        Ok(Snapshot::with_state("fake", &self.state())?)
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigrationError> {
        self.check(Fail::Restore)?;
        let s: FakeState = snapshot.state()?;
        let mut g = self.lock();
        if crc32fast::hash(&g.mem) != s.mem_hash {
            return Err(mem_err("memory does not match the saved hash"));
        }
        g.writes = s.writes;
        drop(g);
        self.generation = s.generation;
        self.restored = true;
        Ok(())
    }
}

impl Migratable for Fake {
    fn memory_size(&self) -> u64 {
        (self.pages * PAGE_SIZE) as u64
    }

    fn start_dirty_log(&mut self) -> Result<(), MigrationError> {
        let mut g = self.lock();
        g.logging = true;
        g.dirty.fill(true);
        Ok(())
    }

    fn stop_dirty_log(&mut self) -> Result<(), MigrationError> {
        let mut g = self.lock();
        g.logging = false;
        g.dirty.fill(false);
        Ok(())
    }

    fn dirty_pages(&mut self) -> Result<Vec<u64>, MigrationError> {
        self.check(Fail::DirtyPages)?;
        std::thread::sleep(self.scan_delay);
        let mut g = self.lock();
        if !g.logging {
            return Err(mem_err("dirty log not started"));
        }
        let mut out: Vec<u64> = Vec::new();
        for (i, d) in g.dirty.iter_mut().enumerate() {
            if std::mem::take(d) {
                out.push(i as u64);
            }
        }
        drop(g);
        self.dirty_calls += 1;
        // The first call returns every page; scripted extras start with the second.
        if self.dirty_calls > 1 {
            if let Some(extra) = self.script.pop_front() {
                out.extend(extra);
            }
        }
        Ok(out)
    }

    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<(), MigrationError> {
        self.check(Fail::ReadPage(index))?;
        let r = self.page_range(index)?;
        buf.copy_from_slice(&self.lock().mem[r]);
        Ok(())
    }

    fn write_page(&mut self, index: u64, buf: &[u8]) -> Result<(), MigrationError> {
        self.check(Fail::WritePage(index))?;
        let r = self.page_range(index)?;
        self.lock().mem[r].copy_from_slice(buf);
        Ok(())
    }
}

impl LiveMigratable for Fake {
    fn compat(&self) -> Result<Vec<u8>, MigrationError> {
        self.check(Fail::Compat)?;
        Ok(self.compat.clone())
    }

    fn state_size_hint(&self) -> u64 {
        96
    }

    fn accept_compat(&mut self, compat: &[u8], memory_size: u64) -> Result<(), MigrationError> {
        self.check(Fail::AcceptCompat)?;
        if compat != self.compat.as_slice() {
            return Err(mem_err("compatibility record differs"));
        }
        if memory_size != self.memory_size() {
            return Err(mem_err("memory size differs"));
        }
        Ok(())
    }

    fn write_zero_page(&mut self, index: u64) -> Result<(), MigrationError> {
        self.check(Fail::WriteZeroPage)?;
        let r = self.page_range(index)?;
        self.lock().mem[r].fill(0);
        Ok(())
    }

    fn abort(&mut self) {
        self.aborted += 1;
        self.lock().mem.fill(0xdd);
    }
}

/// A guest-like writer: dirties `rate` random pages per second (catching up in bursts after
/// being descheduled, so a loaded machine keeps the average), occasionally zeroing a whole
/// page. Stops writing while the component is paused; stops for good when dropped.
pub struct Writer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    pub fn start(shared: Arc<Mutex<Inner>>, rate: u64, seed: u64) -> Self {
        let w_shared = Arc::clone(&shared);
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let handle = thread::spawn(move || {
            let mut rng = seed | 1;
            let start = Instant::now();
            let mut done: u64 = 0;
            while !s2.load(Ordering::Relaxed) {
                let due = u64::try_from(start.elapsed().as_micros() * u128::from(rate) / 1_000_000)
                    .unwrap_or(u64::MAX);
                if due <= done {
                    thread::sleep(Duration::from_micros(500));
                    continue;
                }
                let n = (due - done).min(512);
                let mut g = shared.lock().unwrap();
                if !g.paused {
                    let pages = g.dirty.len() as u64;
                    for _ in 0..n {
                        let r = xorshift(&mut rng);
                        let p = usize::try_from(r % pages).unwrap();
                        let base = p * PAGE_SIZE;
                        if r.is_multiple_of(16) {
                            g.mem[base..base + PAGE_SIZE].fill(0);
                        } else {
                            let off = base + usize::try_from((r >> 20) % 64).unwrap() * 64;
                            let v = xorshift(&mut rng).to_le_bytes();
                            for k in 0..8 {
                                g.mem[off + 8 * k..off + 8 * k + 8].copy_from_slice(&v);
                            }
                        }
                        g.writes += 1;
                        if g.logging {
                            g.dirty[p] = true;
                        }
                    }
                }
                drop(g);
                done += n;
            }
        });
        let w = Writer {
            stop,
            handle: Some(handle),
        };
        // A loaded machine may start the thread late: migrating before it writes would test
        // nothing.
        let deadline = Instant::now() + Duration::from_secs(30);
        while rate > 0 && shared_writes(&w_shared) == 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        w
    }
}

fn shared_writes(shared: &Mutex<Inner>) -> u64 {
    shared.lock().unwrap().writes
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Runs a migration: the destination `dst` in a thread on `d_stream`, the source `src` here on
/// `s_stream`. Returns both results and the destination component.
pub fn run_pair<SS, DS>(
    src: &mut Fake,
    dst: Fake,
    s_stream: SS,
    d_stream: DS,
    cfg: &SourceConfig,
) -> (
    Result<MigrationReport, SourceError>,
    Result<DestinationReport, DestinationError>,
    Fake,
)
where
    SS: Read + Write,
    DS: Read + Write + Send + 'static,
{
    let t = thread::spawn(move || {
        let mut dst = dst;
        let r = destination::receive(&mut dst, d_stream, DestinationConfig::default());
        (r, dst)
    });
    let s = source::migrate(src, s_stream, cfg, &mut |_| {});
    let (d, dst) = t.join().expect("destination thread panicked");
    (s, d, dst)
}

/// Asserts that the destination holds exactly the source's memory and state (the source is
/// paused after a successful migration, so its memory is the memory at pause time).
pub fn assert_identical(src: &Fake, dst: &Fake) {
    assert!(src.is_paused(), "source stays paused after success");
    assert!(!src.is_logging() && !dst.is_logging());
    let (a, b) = (src.memory(), dst.memory());
    if a != b {
        let bad = a
            .chunks(PAGE_SIZE)
            .zip(b.chunks(PAGE_SIZE))
            .position(|(x, y)| x != y);
        panic!("memory differs, first at page {bad:?}");
    }
    assert_eq!(src.state(), dst.state());
    assert!(dst.restored && !dst.is_paused() && dst.resumes == 1 && dst.aborted == 0);
}

/// Asserts that a failed migration left the source running as before, and the destination
/// aborted and never resumed.
pub fn assert_rolled_back(src: &Fake, before: &[u8], dst: &Fake) {
    assert!(!src.is_paused(), "source must be running");
    assert!(!src.is_logging(), "dirty log must be stopped");
    assert_eq!(src.pauses, src.resumes, "every pause undone");
    assert!(src.memory() == before, "source memory changed");
    assert_eq!(dst.aborted, 1, "destination must abort exactly once");
    assert_eq!(dst.resumes, 0, "destination must never resume");
}
