//! Property tests: arbitrary guest accesses never panic and never corrupt read-only state.

use proptest::prelude::*;
use vgpu_abi::pci::{
    CAP_MSIX_OFFSET, CAP_PCIE_OFFSET, CAP_VENDOR_OFFSET, CLASS_CODE, DEVICE_ID, MSIX_VECTORS,
    VENDOR_ID,
};

use super::caps::{CAP_ID_MSIX, CAP_ID_PCIE, CAP_ID_VENDOR};
use super::config::tests::{cap_walk, read16, read32};
use super::{ConfigSpace, Msix, MsixState};
use crate::irq::CountingInterrupts;

#[derive(Debug, Clone)]
enum Access {
    Read(u16, usize),
    Write(u16, Vec<u8>),
}

fn config_access() -> impl Strategy<Value = Access> {
    prop_oneof![
        (0u16..0x1100, 0usize..9).prop_map(|(o, l)| Access::Read(o, l)),
        (0u16..0x1100, prop::collection::vec(any::<u8>(), 0..9))
            .prop_map(|(o, d)| Access::Write(o, d)),
    ]
}

#[derive(Debug, Clone)]
enum MsixOp {
    TableRead(u64, usize),
    TableWrite(u64, Vec<u8>, bool, bool),
    PbaRead(u64, usize),
    Trigger(u16, bool, bool),
    Control(bool, bool),
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..0x100, any::<u64>()]
}

fn msix_op() -> impl Strategy<Value = MsixOp> {
    prop_oneof![
        (offset(), 0usize..17).prop_map(|(o, l)| MsixOp::TableRead(o, l)),
        (
            offset(),
            prop::collection::vec(any::<u8>(), 0..17),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(o, d, e, m)| MsixOp::TableWrite(o, d, e, m)),
        (offset(), 0usize..17).prop_map(|(o, l)| MsixOp::PbaRead(o, l)),
        (0u16..MSIX_VECTORS + 2, any::<bool>(), any::<bool>())
            .prop_map(|(v, e, m)| MsixOp::Trigger(v, e, m)),
        (any::<bool>(), any::<bool>()).prop_map(|(e, m)| MsixOp::Control(e, m)),
    ]
}

proptest! {
    #[test]
    fn test_config_arbitrary_accesses_never_panic_keep_identity(
        ops in prop::collection::vec(config_access(), 0..200),
        lmem_shift in 12u32..40,
    ) {
        let mut cs = ConfigSpace::new(1 << lmem_shift).unwrap();
        for op in ops {
            match op {
                Access::Read(off, len) => {
                    let mut buf = vec![0u8; len];
                    cs.read(off, &mut buf);
                }
                Access::Write(off, data) => {
                    let _ = cs.write(off, &data);
                }
            }
            prop_assert_eq!(read16(&cs, 0), VENDOR_ID);
            prop_assert_eq!(read16(&cs, 2), DEVICE_ID);
            prop_assert_eq!(read32(&cs, 8) >> 8, CLASS_CODE);
            prop_assert_eq!(
                cap_walk(&cs),
                vec![
                    (CAP_MSIX_OFFSET, CAP_ID_MSIX),
                    (CAP_PCIE_OFFSET, CAP_ID_PCIE),
                    (CAP_VENDOR_OFFSET, CAP_ID_VENDOR),
                ]
            );
            // Whatever the guest did, the state is a valid snapshot.
            prop_assert!(ConfigSpace::from_state(1 << lmem_shift, &cs.state()).is_ok());
        }
    }

    #[test]
    fn test_msix_arbitrary_accesses_never_panic_state_valid(
        ops in prop::collection::vec(msix_op(), 0..200),
    ) {
        let sink = CountingInterrupts::default();
        let mut m = Msix::new();
        for op in ops {
            match op {
                MsixOp::TableRead(off, len) => m.table_read(off, &mut vec![0u8; len]),
                MsixOp::TableWrite(off, data, e, fm) => m.table_write(off, &data, e, fm, &sink),
                MsixOp::PbaRead(off, len) => m.pba_read(off, &mut vec![0u8; len]),
                MsixOp::Trigger(v, e, fm) => m.trigger(v, e, fm, &sink),
                MsixOp::Control(e, fm) => m.control_changed(e, fm, &sink),
            }
            let state: MsixState = m.state();
            prop_assert!(Msix::from_state(&state).is_ok());
        }
    }
}
