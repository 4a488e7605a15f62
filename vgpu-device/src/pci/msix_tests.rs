use super::*;
use crate::irq::CountingInterrupts;

const ON: (bool, bool) = (true, false);

fn read_table32(m: &Msix, off: u64) -> u32 {
    let mut b = [0u8; 4];
    m.table_read(off, &mut b);
    u32::from_le_bytes(b)
}

fn write_table32(m: &mut Msix, off: u64, v: u32, sink: &dyn InterruptSink) {
    m.table_write(off, &v.to_le_bytes(), ON.0, ON.1, sink);
}

fn unmask(m: &mut Msix, v: u16, enabled: bool, function_masked: bool, sink: &dyn InterruptSink) {
    let off = u64::from(v) * MSIX_ENTRY_SIZE + 12;
    m.table_write(off, &0u32.to_le_bytes(), enabled, function_masked, sink);
}

fn read_pba(m: &Msix) -> u64 {
    let mut b = [0u8; 8];
    m.pba_read(0, &mut b);
    u64::from_le_bytes(b)
}

#[test]
fn test_msix_reset_all_vectors_masked_nothing_pending() {
    let m = Msix::new();
    for v in 0..MSIX_VECTORS {
        assert!(m.entry(v).unwrap().masked());
        assert_eq!(read_table32(&m, u64::from(v) * 16 + 12), MSIX_ENTRY_MASKED);
        assert!(!m.pending(v));
    }
    assert_eq!(m.entry(MSIX_VECTORS), None);
    assert_eq!(read_pba(&m), 0);
}

#[test]
fn test_msix_table_write_read_back_fields() {
    let sink = CountingInterrupts::default();
    let mut m = Msix::new();
    write_table32(&mut m, 16, 0xFEE0_1003, &sink);
    write_table32(&mut m, 20, 0x1, &sink);
    m.table_write(
        24,
        &0xFFFF_FFFE_0000_4021u64.to_le_bytes(),
        true,
        false,
        &sink,
    );
    let e = m.entry(1).unwrap();
    assert_eq!(e.address(), 0x1_FEE0_1000, "address bits 1:0 read 0");
    assert_eq!(e.data, 0x4021);
    assert_eq!(
        e.control, 0,
        "reserved control bits read 0; vector unmasked"
    );
    let mut b = [0u8; 8];
    m.table_read(16, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1_FEE0_1000);
}

#[test]
fn test_msix_trigger_unmasked_enabled_delivers() {
    let sink = CountingInterrupts::default();
    let mut m = Msix::new();
    unmask(&mut m, 2, true, false, &sink);
    m.trigger(2, true, false, &sink);
    assert_eq!(sink.count(2), 1);
    assert!(!m.pending(2));
}

#[test]
fn test_msix_trigger_masked_vector_sets_pending_unmask_delivers() {
    let sink = CountingInterrupts::default();
    let mut m = Msix::new();
    m.trigger(3, true, false, &sink);
    assert_eq!(sink.count(3), 0);
    assert!(m.pending(3));
    assert_eq!(read_pba(&m), 1 << 3);
    unmask(&mut m, 3, true, false, &sink);
    assert_eq!(sink.count(3), 1, "delivered on unmask");
    assert!(!m.pending(3));
    assert_eq!(read_pba(&m), 0);
}

#[test]
fn test_msix_function_mask_holds_pending_until_cleared() {
    let sink = CountingInterrupts::default();
    let mut m = Msix::new();
    unmask(&mut m, 0, true, true, &sink);
    m.trigger(0, true, true, &sink);
    assert_eq!(sink.count(0), 0);
    assert!(m.pending(0));
    m.control_changed(true, true, &sink);
    assert_eq!(sink.count(0), 0, "still function-masked");
    m.control_changed(true, false, &sink);
    assert_eq!(sink.count(0), 1);
    assert!(!m.pending(0));
    m.control_changed(true, false, &sink);
    assert_eq!(sink.count(0), 1, "delivered once");
}

#[test]
fn test_msix_disabled_holds_pending_until_enabled() {
    let sink = CountingInterrupts::default();
    let mut m = Msix::new();
    unmask(&mut m, 4, false, false, &sink);
    m.trigger(4, false, false, &sink);
    assert!(m.pending(4));
    m.control_changed(true, false, &sink);
    assert_eq!(sink.count(4), 1);
}

#[test]
fn test_msix_unmask_while_function_masked_stays_pending() {
    let sink = CountingInterrupts::default();
    let mut m = Msix::new();
    m.trigger(1, true, true, &sink);
    unmask(&mut m, 1, true, true, &sink);
    assert_eq!(sink.count(1), 0);
    assert!(m.pending(1));
}

#[test]
fn test_msix_trigger_out_of_range_ignored_counted() {
    let sink = CountingInterrupts::default();
    let mut m = Msix::new();
    m.trigger(MSIX_VECTORS, true, false, &sink);
    m.trigger(u16::MAX, true, false, &sink);
    assert_eq!(m.ignored_vectors(), 2);
    assert_eq!(read_pba(&m), 0);
}

#[test]
fn test_msix_bad_accesses_read_ones_drop_writes() {
    let sink = CountingInterrupts::default();
    let mut m = Msix::new();
    let mut b = [0u8; 4];
    m.table_read(2, &mut b);
    assert_eq!(b, [0xFF; 4], "unaligned");
    let mut b2 = [0u8; 2];
    m.table_read(0, &mut b2);
    assert_eq!(b2, [0xFF; 2], "2-byte access");
    let mut b8 = [0u8; 8];
    m.table_read(4, &mut b8);
    assert_eq!(b8, [0xFF; 8], "8-byte access not 8-aligned");
    m.table_read(MSIX_TABLE_SIZE, &mut b);
    assert_eq!(b, [0xFF; 4], "past the table");
    m.pba_read(MSIX_PBA_SIZE, &mut b);
    assert_eq!(b, [0xFF; 4], "past the PBA");
    m.table_write(12, &[0; 2], true, false, &sink);
    m.table_write(u64::MAX - 3, &[0; 4], true, false, &sink);
    m.pba_write(0, &[0xFF; 8]);
    assert!(m.entry(0).unwrap().masked());
    assert_eq!(m.bad_accesses(), 8);
}

#[test]
fn test_msix_state_round_trip_restores_equal() {
    let sink = CountingInterrupts::default();
    let mut m = Msix::new();
    write_table32(&mut m, 0, 0xFEE0_0000, &sink);
    write_table32(&mut m, 8, 0x41, &sink);
    unmask(&mut m, 0, true, false, &sink);
    m.trigger(2, true, false, &sink);
    let state = m.state();
    let restored = Msix::from_state(&state).unwrap();
    assert_eq!(restored.state(), state);
    assert!(restored.pending(2));
    assert_eq!(restored.entry(0), m.entry(0));
    m.trigger(4, true, false, &sink);
    assert_ne!(m.state(), state, "mutated");
    assert_eq!(Msix::from_state(&state).unwrap().state(), state);
}

#[test]
fn test_msix_state_bad_values_rejected() {
    let good = Msix::new().state();
    let mut short = good.clone();
    short.table.pop();
    let mut long_pba = good.clone();
    long_pba.pba.push(0);
    let mut bad_addr = good.clone();
    bad_addr.table[0].addr_lo = 0xFEE0_0001;
    let mut bad_ctl = good.clone();
    bad_ctl.table[1].control = 0x2;
    let mut bad_pba = good.clone();
    bad_pba.pba[0] = 1 << MSIX_VECTORS;
    for bad in [&short, &long_pba, &bad_addr, &bad_ctl, &bad_pba] {
        assert!(Msix::from_state(bad).is_err(), "{bad:?}");
    }
    assert!(matches!(
        Msix::from_state(&short),
        Err(PciError::MsixSizeMismatch { what: "table", .. })
    ));
    assert!(Msix::from_state(&good).is_ok());
}
