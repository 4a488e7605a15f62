//! Snapshot and restore of a vGPU: a tree of component states (the `vgpu-migration` format).
//!
//! | child | saved | rebuilt on restore |
//! |---|---|---|
//! | `header` | spec version, profile, local-memory size, GM ranges, GTT mode | — (checked for compatibility) |
//! | `config` | PCI config space (BARs, command, MSI-X control, PCIe control) | the read-only header |
//! | `msix` | MSI-X table and PBA | — |
//! | `regs` | the virtual register file (rings, PPGTT roots, plane, scratch, GPRs) | PV block (from the partition) |
//! | `intr` | `INTR_STATUS`, `INTR_MASK` | — |
//! | `ggtt` | guest GGTT entries, fault counters | shadow entries (from the entries and the DMA map) |
//! | `engine.<name>` | ring state, engine registers, error state, render state, queued submissions as scanned dwords, counters | decoded commands (decoded and checked again), PPGTT shadows, TLBs |
//! | `display` | flip count | — |
//! | `audit` | total events | the event list starts empty |
//! | `lmem` (optional) | every non-zero page of local memory | zero pages |
//!
//! `lmem` is the bulk of a snapshot with memory. It is serialized straight from local memory
//! (one pass finds the non-zero pages, a second copies them into the state as byte strings)
//! and restored from pages borrowed from the decoded state, so no page is copied into a vector
//! of its own either way. The bytes are those of `LmemState { pages: Vec<(u64, Vec<u8>)> }`.
//!
//! The device must be quiescent while saving (no engine executing it: pause it in the
//! scheduler) and is restored before it is scheduled again. Restore checks every field and
//! changes nothing when it fails.

use serde::ser::{SerializeSeq, SerializeStruct, SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};
use vgpu_abi::{regs, Engine, PAGE_SIZE, SPEC_VERSION};
use vgpu_migration::{MigrationError, Snapshot};

use crate::addr::{GmRange, LmemOffset};
use crate::engine::context::EngineState;
use crate::pci::{ConfigSpace, ConfigSpaceState, MsixState};
use crate::phys::LmemSlice;
use crate::vgpu::policy::REG_DWORDS;
use crate::vgpu::{GttMode, Vgpu};

/// Compatibility record of a vGPU snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VgpuHeader {
    /// `vgpu_abi::SPEC_VERSION` of the device that saved it.
    pub spec_version: u32,
    /// Profile name.
    pub profile: String,
    /// Local memory (aperture) size.
    pub lmem_size: u64,
    /// Mappable GM range (the guest uses physical GM numbering, so it must be the same).
    pub mappable: GmRange,
    /// Hidden GM range.
    pub hidden: GmRange,
    /// GTT mode of the saving device (informative: state is mode-independent).
    pub gtt_mode: GttMode,
}

#[derive(Serialize, Deserialize)]
struct GgttState {
    entries: Vec<u64>,
    faults: u64,
    last_fault: u64,
}

/// The `lmem` state as decoded: (page index, 4 KiB of data) for every page that is not all
/// zeros, the data borrowed from the snapshot. Encoded by [`LmemOut`].
#[derive(Deserialize)]
struct LmemState<'a> {
    #[serde(borrow)]
    pages: Vec<(u64, &'a [u8])>,
}

/// The `lmem` state as saved: the pages `pages` of `lmem`, each read while it is serialized,
/// in the layout of [`LmemState`] (a struct of one sequence of (index, byte string) tuples).
struct LmemOut<'a> {
    lmem: &'a LmemSlice,
    pages: &'a [u64],
}

impl Serialize for LmemOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Pages<'a>(&'a LmemOut<'a>);
        impl Serialize for Pages<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(Some(self.0.pages.len()))?;
                for &index in self.0.pages {
                    seq.serialize_element(&PageOut {
                        lmem: self.0.lmem,
                        index,
                    })?;
                }
                seq.end()
            }
        }
        let mut st = s.serialize_struct("LmemState", 1)?;
        st.serialize_field("pages", &Pages(self))?;
        st.end()
    }
}

/// One `(index, data)` tuple of [`LmemOut`].
struct PageOut<'a> {
    lmem: &'a LmemSlice,
    index: u64,
}

impl Serialize for PageOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut page = [0u8; PAGE];
        self.lmem
            .read(LmemOffset(self.index * PAGE_SIZE), &mut page)
            .map_err(serde::ser::Error::custom)?;
        let mut t = s.serialize_tuple(2)?;
        t.serialize_element(&self.index)?;
        t.serialize_element(&vgpu_migration::bytes::Bytes(&page))?;
        t.end()
    }
}

/// The indexes of the pages of `lmem` that are not all zeros.
fn nonzero_pages(lmem: &LmemSlice) -> Result<Vec<u64>, MigrationError> {
    let mut pages = Vec::new();
    let mut buf = [0u8; PAGE];
    for i in 0..lmem.size() / PAGE_SIZE {
        // Data pages are told apart by their first bytes; only zero-looking ones are read whole.
        let (head, tail) = buf.split_at_mut(64);
        lmem.read(LmemOffset(i * PAGE_SIZE), head)
            .map_err(|e| invalid(e.to_string()))?;
        let nonzero = !vgpu_migration::protocol::is_zero(head) || {
            lmem.read(LmemOffset(i * PAGE_SIZE + 64), tail)
                .map_err(|e| invalid(e.to_string()))?;
            !vgpu_migration::protocol::is_zero(tail)
        };
        if nonzero {
            pages.push(i);
        }
    }
    Ok(pages)
}

/// `PAGE_SIZE` as a `usize`.
const PAGE: usize = 4096;

fn invalid(reason: impl Into<String>) -> MigrationError {
    MigrationError::Invalid {
        component: "vgpu".into(),
        reason: reason.into(),
    }
}

fn engine_id(e: Engine) -> String {
    format!("engine.{}", e.name())
}

impl Vgpu {
    /// The compatibility record of this vGPU.
    pub fn header(&self) -> VgpuHeader {
        let s = self.shared();
        VgpuHeader {
            spec_version: SPEC_VERSION,
            profile: s.profile().name.into(),
            lmem_size: s.lmem().size(),
            mappable: s.ggtt.mappable(),
            hidden: s.ggtt.hidden(),
            gtt_mode: s.ggtt.mode(),
        }
    }

    /// Checks that a snapshot with `h` can be restored into this vGPU.
    pub fn check_compatible(&self, h: &VgpuHeader) -> Result<(), MigrationError> {
        let mine = self.header();
        if h.spec_version != mine.spec_version {
            return Err(invalid(format!(
                "spec version {:#x}, this device implements {:#x}",
                h.spec_version, mine.spec_version
            )));
        }
        if h.profile != mine.profile || h.lmem_size != mine.lmem_size {
            return Err(invalid(format!(
                "profile {} with {} MiB, this vGPU is {} with {} MiB",
                h.profile,
                h.lmem_size >> 20,
                mine.profile,
                mine.lmem_size >> 20
            )));
        }
        if h.mappable != mine.mappable || h.hidden != mine.hidden {
            return Err(invalid(
                "GM partition differs (create the vGPU at the snapshot's GM ranges)",
            ));
        }
        Ok(())
    }

    /// Saves the vGPU (without local memory unless `with_lmem`). The vGPU must be quiescent.
    pub fn save(&self, with_lmem: bool) -> Result<Snapshot, MigrationError> {
        let s = self.shared();
        let mut root = Snapshot::new("vgpu");
        root.add(Snapshot::with_state("header", &self.header())?);
        root.add(Snapshot::with_state(
            "config",
            &self.config_space().state(),
        )?);
        let (status, mask, msix) = s.intr.save();
        root.add(Snapshot::with_state("msix", &msix)?);
        root.add(Snapshot::with_state("intr", &(status, mask))?);
        root.add(Snapshot::with_state("regs", &s.vregs())?);
        let (faults, last_fault) = s.ggtt.fault_state();
        root.add(Snapshot::with_state(
            "ggtt",
            &GgttState {
                entries: s.ggtt.entries(),
                faults,
                last_fault,
            },
        )?);
        for e in Engine::ALL {
            root.add(Snapshot::with_state(engine_id(e), &s.engine(e).save())?);
        }
        root.add(Snapshot::with_state("display", &s.flip_count())?);
        root.add(Snapshot::with_state("audit", &s.audit.total())?);
        if with_lmem {
            let lmem = s.lmem();
            let pages = nonzero_pages(lmem)?;
            // Per page at most 10 bytes of index varint, 2 of length, and the data.
            let size = pages.len().saturating_mul(PAGE + 12).saturating_add(10);
            root.add(Snapshot::with_state_capacity(
                "lmem",
                &LmemOut {
                    lmem,
                    pages: &pages,
                },
                size,
            )?);
        }
        Ok(root)
    }

    /// Restores a saved vGPU into this one (same profile and GM ranges; see
    /// [`Vgpu::check_compatible`]). Everything is decoded and checked before anything changes.
    /// The vGPU must not be scheduled while this runs.
    pub fn restore(&mut self, snap: &Snapshot) -> Result<(), MigrationError> {
        snap.check_bounds()?;
        let header: VgpuHeader = snap.child_state("header")?;
        self.check_compatible(&header)?;
        // Decode and validate everything first.
        let cfg_state: ConfigSpaceState = snap.child_state("config")?;
        let config = ConfigSpace::from_state(self.shared().lmem().size(), &cfg_state)
            .map_err(|e| invalid(format!("config space: {e}")))?;
        let msix: MsixState = snap.child_state("msix")?;
        crate::pci::Msix::from_state(&msix).map_err(|e| invalid(format!("MSI-X: {e}")))?;
        let (status, mask): (u32, u32) = snap.child_state("intr")?;
        let vregs: Vec<u32> = snap.child_state("regs")?;
        if vregs.len() != REG_DWORDS {
            return Err(invalid(format!("register file of {} dwords", vregs.len())));
        }
        let ggtt: GgttState = snap.child_state("ggtt")?;
        let mut engines = Vec::new();
        for e in Engine::ALL {
            let st: EngineState = snap.child_state(&engine_id(e))?;
            if st.ring_enabled && !self.shared().has_engine(e) {
                return Err(invalid(format!(
                    "engine {} enabled but absent from the profile",
                    e.name()
                )));
            }
            engines.push((e, st));
        }
        let flips: u32 = snap.child_state("display")?;
        let audits: u64 = snap.child_state("audit")?;
        let lmem: Option<LmemState> = match snap.child("lmem") {
            Ok(c) => Some(c.state_ref()?),
            Err(_) => None,
        };
        if let Some(l) = &lmem {
            let pages = self.shared().lmem().size() / PAGE_SIZE;
            if l.pages.iter().any(|(i, d)| *i >= pages || d.len() != PAGE) {
                return Err(invalid(
                    "local-memory page out of range or of the wrong size",
                ));
            }
        }
        // Check the engine states against a scratch context first, so a bad one changes nothing.
        for (e, st) in &engines {
            let ring_size = vregs[((regs::engine_base(*e) + regs::RING_SIZE) / 4) as usize];
            crate::engine::context::EngineContext::new(*e)
                .restore(st, ring_size)
                .map_err(|err| invalid(err.to_string()))?;
        }
        let s = self.shared().clone();
        let dma = s.dma();
        s.ggtt
            .restore(
                &ggtt.entries,
                (ggtt.faults, ggtt.last_fault),
                s.lmem(),
                &dma,
            )
            .map_err(|e| invalid(format!("GGTT: {e}")))?;
        // From here on nothing fails.
        for (off, v) in vregs.iter().enumerate() {
            s.set_vreg(u32::try_from(off * 4).unwrap_or(u32::MAX), *v);
        }
        self.write_pv_block();
        s.intr
            .restore(status, mask, &msix)
            .map_err(|e| invalid(format!("MSI-X: {e}")))?;
        s.intr.set_control(config.msix_control());
        self.set_config(config);
        for (e, st) in &engines {
            let ring_size = s.vreg(regs::engine_base(*e) + regs::RING_SIZE);
            s.engine(*e)
                .restore(st, ring_size)
                .map_err(|err| invalid(err.to_string()))?;
        }
        s.set_flip_count(flips);
        s.audit.set_total(audits);
        if let Some(l) = lmem {
            s.lmem().scrub().map_err(|e| invalid(e.to_string()))?;
            // Runs of consecutive pages in one `pwritev` each: the memory was just scrubbed,
            // and writing through the file spares a page fault per page.
            let mut run: Vec<&[u8]> = Vec::new();
            let mut pages = l.pages.iter().peekable();
            while let Some(&(first, data)) = pages.next() {
                run.clear();
                run.push(data);
                while let Some(&&(i, d)) = pages.peek() {
                    if i != first + run.len() as u64 {
                        break;
                    }
                    run.push(d);
                    pages.next();
                }
                s.lmem()
                    .write_vectored(LmemOffset(first * PAGE_SIZE), &run)
                    .map_err(|e| invalid(e.to_string()))?;
            }
        }
        Ok(())
    }
}

impl vgpu_migration::Snapshottable for Vgpu {
    fn id(&self) -> String {
        "vgpu".into()
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigrationError> {
        self.save(true)
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), MigrationError> {
        Vgpu::restore(self, snapshot)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::addr::HostLmemOffset;
    use crate::phys::LocalMemory;

    /// `LmemState` as it was saved before pages became byte strings.
    #[derive(Serialize, Deserialize)]
    struct OldLmemState {
        pages: Vec<(u64, Vec<u8>)>,
    }

    fn slice(pages: u64) -> LmemSlice {
        let mem = Arc::new(LocalMemory::new(pages * PAGE_SIZE).unwrap());
        LmemSlice::new(mem, HostLmemOffset(0), pages * PAGE_SIZE).unwrap()
    }

    #[test]
    fn test_lmem_state_same_bytes_as_old_encoding_both_ways() {
        let lmem = slice(300);
        // Zero pages, a page non-zero only at its end, one only at its start, one full page.
        lmem.write(LmemOffset(3 * PAGE_SIZE + PAGE_SIZE - 1), &[1])
            .unwrap();
        lmem.write(LmemOffset(7 * PAGE_SIZE), &[2]).unwrap();
        let full: Vec<u8> = (0..PAGE).map(|i| i.to_le_bytes()[0]).collect();
        lmem.write(LmemOffset(299 * PAGE_SIZE), &full).unwrap();
        let pages = nonzero_pages(&lmem).unwrap();
        assert_eq!(pages, vec![3, 7, 299]);

        let new = Snapshot::with_state_capacity(
            "lmem",
            &LmemOut {
                lmem: &lmem,
                pages: &pages,
            },
            0,
        )
        .unwrap();
        let mut buf = vec![0u8; PAGE];
        let old = OldLmemState {
            pages: pages
                .iter()
                .map(|&i| {
                    lmem.read(LmemOffset(i * PAGE_SIZE), &mut buf).unwrap();
                    (i, buf.clone())
                })
                .collect(),
        };
        let old_snap = Snapshot::with_state("lmem", &old).unwrap();
        assert_eq!(
            new.state, old_snap.state,
            "same bytes as Vec<(u64, Vec<u8>)>"
        );

        // A snapshot written the old way restores through the borrowing decoder.
        let decoded: LmemState = old_snap.state_ref().unwrap();
        assert_eq!(decoded.pages.len(), 3);
        for ((i, data), (oi, odata)) in decoded.pages.iter().zip(&old.pages) {
            assert_eq!((i, *data), (oi, &odata[..]));
        }
        let back: OldLmemState = new.state().unwrap();
        assert_eq!(back.pages, old.pages);
    }

    #[test]
    fn test_lmem_state_truncated_rejected() {
        let lmem = slice(8);
        lmem.write(LmemOffset(PAGE_SIZE), &[9; 100]).unwrap();
        let pages = nonzero_pages(&lmem).unwrap();
        let snap = Snapshot::with_state_capacity(
            "lmem",
            &LmemOut {
                lmem: &lmem,
                pages: &pages,
            },
            0,
        )
        .unwrap();
        let bytes = snap.state.unwrap();
        for cut in [0, 1, 2, 3, bytes.len() - 1] {
            let mut s = Snapshot::new("lmem");
            s.state = Some(bytes[..cut].to_vec());
            assert!(s.state_ref::<LmemState>().is_err(), "cut at {cut}");
        }
    }
}
