//! Migration v2 over vfio-user (`DEVICE_FEATURE` states, `MIG_DATA_READ`/`MIG_DATA_WRITE`): the
//! vGPU's state as a byte stream the client pulls from the source and pushes into the
//! destination.
//!
//! The stream is a sequence of `vgpu-migration` envelopes (each self-delimiting: its header
//! carries the payload length):
//! - in `PRE_COPY`, envelopes holding only `lmem.delta` (local-memory pages: first every
//!   non-zero page, then the pages written since — by engines, tracked exactly, or by the CPU
//!   through the aperture, found by hashing); a read that returns nothing means "nothing more
//!   for now";
//! - in `STOP_COPY` (engines paused), one envelope with the whole device state (`Vgpu::save`
//!   without local memory) plus an `lmem.delta` of what changed since pre-copy (every non-zero
//!   page if there was no pre-copy), then the end of the stream.
//!
//! The destination (in `RESUMING`) applies each envelope as soon as it is complete; leaving
//! `RESUMING` requires that the device state arrived and nothing is left over. Envelopes are
//! bounded ([`MAX_ENVELOPE`]), so the input buffer is too. The destination vGPU must have the
//! source's profile and GM ranges (the guest uses physical GM numbering).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vgpu_device::addr::LmemOffset;
use vgpu_device::vgpu::Vgpu;
use vgpu_migration::Snapshot;
use vgpu_vfio_user::{BackendError, MigState};

/// Pauses (`true`) or resumes (`false`) the vGPU's engines.
pub type PauseHook = Arc<dyn Fn(bool) + Send + Sync>;

/// Largest envelope produced or accepted (local-memory deltas are split to fit).
pub const MAX_ENVELOPE: usize = 32 << 20;
const PAGE: usize = 4096;
const PAGE_U64: u64 = 4096;
const ENVELOPE_HEADER: usize = 8 + 4 + 8;
/// Pages per delta envelope, leaving room for framing.
const PAGES_PER_ENVELOPE: usize = (MAX_ENVELOPE - 64 * 1024) / (PAGE + 16);

#[derive(serde::Serialize, serde::Deserialize)]
struct Delta {
    pages: Vec<DeltaPage>,
}

/// One local-memory page. Encoded as postcard encodes the tuple `(u64, Vec<u8>)` it replaced
/// (a struct is its fields in order), but the bytes go through serde in one piece.
#[derive(serde::Serialize, serde::Deserialize)]
struct DeltaPage {
    index: u64,
    #[serde(with = "vgpu_migration::bytes")]
    data: Vec<u8>,
}

fn invalid(msg: impl Into<String>) -> BackendError {
    BackendError::Invalid(msg.into())
}

fn lock(v: &Mutex<Vgpu>) -> MutexGuard<'_, Vgpu> {
    v.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Migration state of one vGPU behind vfio-user.
pub struct VfioMigration {
    vgpu: Arc<Mutex<Vgpu>>,
    pause: PauseHook,
    /// Bytes produced and not yet read.
    out: Vec<u8>,
    out_pos: usize,
    /// Pages still to send in this phase.
    todo: Vec<u64>,
    /// Hash of every page as last sent (`None`: nothing sent yet).
    hashes: Option<Vec<u64>>,
    /// Stop-copy: the device state was produced.
    final_done: bool,
    /// Resuming: bytes received and not yet applied.
    input: Vec<u8>,
    /// Resuming: the device state arrived.
    restored: bool,
    /// Resuming: the stream was rejected; nothing more is buffered or applied until the
    /// client enters `RESUMING` again.
    broken: bool,
    /// The state the last arc ended in.
    state: MigState,
}

impl VfioMigration {
    /// Migration for `vgpu`, pausing its engines through `pause`.
    pub fn new(vgpu: Arc<Mutex<Vgpu>>, pause: PauseHook) -> Self {
        VfioMigration {
            vgpu,
            pause,
            out: Vec::new(),
            out_pos: 0,
            todo: Vec::new(),
            hashes: None,
            final_done: false,
            input: Vec::new(),
            restored: false,
            broken: false,
            state: MigState::Running,
        }
    }

    fn hash_all(&self) -> Result<Vec<u64>, BackendError> {
        let shared = lock(&self.vgpu).shared().clone();
        let lmem = shared.lmem();
        let mut buf = vec![0u8; PAGE];
        (0..lmem.size() / PAGE_U64)
            .map(|i| {
                lmem.read(LmemOffset(i * PAGE_U64), &mut buf)
                    .map_err(|e| BackendError::Io(e.to_string()))?;
                Ok(xxhash_rust::xxh3::xxh3_64(&buf))
            })
            .collect()
    }

    /// Pages to send now: all non-zero pages the first time, then the changed ones.
    fn collect_dirty(&mut self) -> Result<Vec<u64>, BackendError> {
        let now = self.hash_all()?;
        let engine: Vec<u64> = lock(&self.vgpu).shared().dirty.take_lmem();
        let zero = xxhash_rust::xxh3::xxh3_64(&[0u8; PAGE]);
        let mut pages: BTreeSet<u64> = engine.into_iter().collect();
        match &self.hashes {
            None => pages.extend(
                now.iter()
                    .enumerate()
                    .filter(|(_, h)| **h != zero)
                    .map(|(i, _)| i as u64),
            ),
            Some(old) => pages.extend(
                old.iter()
                    .zip(&now)
                    .enumerate()
                    .filter(|(_, (a, b))| a != b)
                    .map(|(i, _)| i as u64),
            ),
        }
        self.hashes = Some(now);
        Ok(pages.into_iter().collect())
    }

    /// The pages as they are now; their hash baseline becomes what is sent, so a page that
    /// changes back to an older content after this read is still found dirty.
    fn delta(&mut self, pages: &[u64]) -> Result<Snapshot, BackendError> {
        let shared = lock(&self.vgpu).shared().clone();
        let lmem = shared.lmem();
        let mut out = Vec::with_capacity(pages.len());
        for &i in pages {
            let mut b = vec![0u8; PAGE];
            lmem.read(LmemOffset(i * PAGE_U64), &mut b)
                .map_err(|e| BackendError::Io(e.to_string()))?;
            if let Some(h) = self
                .hashes
                .as_mut()
                .and_then(|h| h.get_mut(usize::try_from(i).ok()?))
            {
                *h = xxhash_rust::xxh3::xxh3_64(&b);
            }
            out.push(DeltaPage { index: i, data: b });
        }
        Snapshot::with_state("lmem.delta", &Delta { pages: out })
            .map_err(|e| BackendError::Io(e.to_string()))
    }

    fn emit(&mut self, s: &Snapshot) -> Result<(), BackendError> {
        self.out = vgpu_migration::encode(s).map_err(|e| BackendError::Io(e.to_string()))?;
        self.out_pos = 0;
        Ok(())
    }

    /// Back to `Running` after a device reset: buffers dropped, logging stopped, engines
    /// resumed.
    pub fn reset(&mut self) {
        lock(&self.vgpu).shared().dirty.stop_lmem();
        self.out.clear();
        self.out_pos = 0;
        self.todo.clear();
        self.hashes = None;
        self.final_done = false;
        self.input.clear();
        self.restored = false;
        self.broken = false;
        self.state = MigState::Running;
        (self.pause)(false);
    }

    /// One arc of the state machine.
    pub fn transition(&mut self, from: MigState, to: MigState) -> Result<(), BackendError> {
        use MigState::*;
        match (from, to) {
            (Running, Stop) | (PreCopy, StopCopy) => (self.pause)(true),
            (Stop, Running) => (self.pause)(false),
            (Running, PreCopy) => {
                lock(&self.vgpu).shared().dirty.start_lmem();
                self.hashes = None;
                self.todo.clear();
                self.out.clear();
            }
            (PreCopy, Running) | (StopCopy, Stop) => {
                lock(&self.vgpu).shared().dirty.stop_lmem();
                self.hashes = None;
                self.out.clear();
                self.todo.clear();
                self.final_done = false;
                if (from, to) == (PreCopy, Running) {
                    (self.pause)(false);
                }
            }
            (Stop, StopCopy) => {
                self.final_done = false;
                self.out.clear();
                self.todo.clear();
            }
            (Stop, Resuming) => {
                self.input.clear();
                self.restored = false;
                self.broken = false;
            }
            (Resuming, Stop) => {
                if self.broken {
                    return Err(invalid("the migration stream was rejected"));
                }
                if !self.input.is_empty() || !self.restored {
                    return Err(invalid(
                        "migration stream ended before the device state was complete",
                    ));
                }
            }
            _ => {
                return Err(invalid(format!(
                    "unexpected migration arc {from:?} -> {to:?}"
                )))
            }
        }
        self.state = to;
        Ok(())
    }

    /// `MIG_DATA_READ` in `PreCopy` or `StopCopy`.
    pub fn read(&mut self, max: usize) -> Result<Vec<u8>, BackendError> {
        let stop_copy = self.state == MigState::StopCopy;
        let mut data = Vec::new();
        while data.len() < max {
            if self.out_pos < self.out.len() {
                let n = (self.out.len() - self.out_pos).min(max - data.len());
                data.extend_from_slice(&self.out[self.out_pos..self.out_pos + n]);
                self.out_pos += n;
                continue;
            }
            if self.todo.is_empty() {
                if stop_copy {
                    if self.final_done {
                        break;
                    }
                    // The final envelope: device state plus the last pages (split if large).
                    let mut pages = self.collect_dirty()?;
                    let rest = pages.split_off(pages.len().min(PAGES_PER_ENVELOPE));
                    let mut snap = lock(&self.vgpu)
                        .save(false)
                        .map_err(|e| BackendError::Io(e.to_string()))?;
                    snap.add(self.delta(&pages)?);
                    self.todo = rest;
                    self.final_done = true;
                    self.emit(&snap)?;
                    continue;
                }
                self.todo = self.collect_dirty()?;
                if self.todo.is_empty() {
                    break;
                }
            }
            let take = self.todo.len().min(PAGES_PER_ENVELOPE);
            let batch: Vec<u64> = self.todo.drain(..take).collect();
            let mut snap = Snapshot::new("vgpu.precopy");
            snap.add(self.delta(&batch)?);
            self.emit(&snap)?;
        }
        Ok(data)
    }

    /// `MIG_DATA_WRITE` in `Resuming`. After a refusal the stream is broken: later writes are
    /// refused without being buffered (a client that kept writing after an oversized header
    /// used to grow the input buffer without bound), and leaving `RESUMING` fails.
    pub fn write(&mut self, data: &[u8]) -> Result<(), BackendError> {
        if self.broken {
            return Err(invalid(
                "the migration stream was rejected; enter RESUMING again to restart",
            ));
        }
        let r = self.take(data);
        if r.is_err() {
            self.broken = true;
            self.input = Vec::new();
        }
        r
    }

    fn take(&mut self, data: &[u8]) -> Result<(), BackendError> {
        self.input.extend_from_slice(data);
        loop {
            if self.input.len() < ENVELOPE_HEADER {
                return Ok(());
            }
            let mut len = [0u8; 8];
            len.copy_from_slice(&self.input[12..20]);
            let payload = u64::from_le_bytes(len);
            let total = usize::try_from(payload)
                .ok()
                .and_then(|p| p.checked_add(ENVELOPE_HEADER + 4))
                .filter(|t| *t <= MAX_ENVELOPE)
                .ok_or_else(|| {
                    invalid(format!(
                        "migration envelope of {payload} bytes is too large"
                    ))
                })?;
            if self.input.len() < total {
                return Ok(());
            }
            let rest = self.input.split_off(total);
            let env = std::mem::replace(&mut self.input, rest);
            let snap = vgpu_migration::decode(&env)
                .map_err(|e| invalid(format!("migration stream: {e}")))?;
            self.apply(&snap)?;
        }
    }

    fn apply(&mut self, snap: &Snapshot) -> Result<(), BackendError> {
        let mut v = lock(&self.vgpu);
        if snap.child("header").is_ok() {
            v.restore(snap)
                .map_err(|e| invalid(format!("device state: {e}")))?;
            self.restored = true;
        }
        if let Ok(delta) = snap.child("lmem.delta") {
            let d: Delta = delta.state().map_err(|e| invalid(e.to_string()))?;
            let pages = v.shared().lmem().size() / PAGE_U64;
            if d.pages
                .iter()
                .any(|p| p.index >= pages || p.data.len() != PAGE)
            {
                return Err(invalid(
                    "local-memory page out of range or of the wrong size",
                ));
            }
            for p in &d.pages {
                v.shared()
                    .lmem()
                    .write(LmemOffset(p.index * PAGE_U64), &p.data)
                    .map_err(|e| BackendError::Io(e.to_string()))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vgpu_device::phys::{profile, PhysGpu, PhysGpuConfig};
    use vgpu_device::vgpu::VgpuConfig;

    use super::*;

    fn migration() -> VfioMigration {
        let mut gpu = PhysGpu::new(PhysGpuConfig {
            lmem_size: 64 << 20,
            max_vgpus: 4,
        })
        .unwrap();
        let part = gpu.create_partition(profile("mini").unwrap()).unwrap();
        let vgpu = Vgpu::new(part, &VgpuConfig::default()).unwrap();
        VfioMigration::new(Arc::new(Mutex::new(vgpu)), Arc::new(|_| {}))
    }

    #[test]
    fn test_delta_page_encoding_same_as_tuple_it_replaced() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct OldDelta {
            pages: Vec<(u64, Vec<u8>)>,
        }
        let data: Vec<u8> = (0..PAGE)
            .map(|i| u8::try_from(i * 7 % 251).unwrap())
            .collect();
        let old = postcard::to_stdvec(&OldDelta {
            pages: vec![(3, data.clone()), (900, vec![0; PAGE])],
        })
        .unwrap();
        let new = postcard::to_stdvec(&Delta {
            pages: vec![
                DeltaPage {
                    index: 3,
                    data: data.clone(),
                },
                DeltaPage {
                    index: 900,
                    data: vec![0; PAGE],
                },
            ],
        })
        .unwrap();
        assert_eq!(old, new);
        let back: Delta = postcard::from_bytes(&old).unwrap();
        assert_eq!(back.pages[0].index, 3);
        assert_eq!(back.pages[0].data, data);
        assert_eq!(back.pages[1].index, 900);
    }

    #[test]
    fn test_write_after_oversized_header_refused_without_buffering() {
        let mut m = migration();
        m.transition(MigState::Running, MigState::Stop).unwrap();
        m.transition(MigState::Stop, MigState::Resuming).unwrap();
        let mut head = vgpu_migration::MAGIC.to_vec();
        head.extend_from_slice(&vgpu_migration::FORMAT_VERSION.to_le_bytes());
        head.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(m.write(&head).is_err());
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..64 {
            assert!(m.write(&chunk).is_err(), "a broken stream takes more data");
            assert!(m.input.capacity() <= MAX_ENVELOPE, "input buffer grows");
        }
        assert!(m.input.is_empty());
        assert!(
            m.transition(MigState::Resuming, MigState::Stop).is_err(),
            "a rejected stream leaves RESUMING"
        );
        // Entering RESUMING again starts a fresh stream.
        m.transition(MigState::Stop, MigState::Resuming).unwrap();
        assert!(m.write(&[0u8; 4]).is_ok());
    }

    #[test]
    fn test_garbage_envelope_then_valid_data_still_refused() {
        let mut m = migration();
        m.transition(MigState::Running, MigState::Stop).unwrap();
        m.transition(MigState::Stop, MigState::Resuming).unwrap();
        let mut bad = vgpu_migration::encode(&Snapshot::new("x")).unwrap();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(m.write(&bad).is_err(), "checksum");
        let good = vgpu_migration::encode(&Snapshot::new("vgpu.precopy")).unwrap();
        assert!(m.write(&good).is_err());
    }
}
