//! Random input to the destination never panics, never resumes the component, and never
//! allocates beyond a fixed bound (measured with a counting global allocator). Three
//! generators: raw random bytes; a valid hello followed by well-framed messages of random type
//! and payload; a valid hello followed by structurally valid messages with random fields, which
//! reach the state machine's semantic checks.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;

use common::{Fake, COMPAT};
use proptest::prelude::*;
use vgpu_migration::protocol::{Hello, Message, PageData, PageRecord, PAGE_SIZE, PAGE_SIZE_U32};
use vgpu_migration::transport::{frame_bytes, mem_pipe, FrameBuf, MemPipeConfig, MAX_PAYLOAD};
use vgpu_migration::{destination, DestinationConfig, PROTOCOL_VERSION};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn note_alloc(size: usize) {
    let now = CURRENT.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so it upholds
// `GlobalAlloc`'s contract exactly as `System` does; the counters have no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged (see the impl).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged (see the impl).
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged (see the impl).
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged (see the impl).
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            note_alloc(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const PAGES: usize = 8;
const MAX_STATE: u64 = 1 << 20;
const MAX_STATE_BYTES: usize = 1 << 20;
/// One receive buffer of `MAX_PAYLOAD`, the device-state buffer, a page batch and slack.
const BOUND: usize = MAX_PAYLOAD + 2 * MAX_STATE_BYTES + (8 << 20);

fn hello_frame() -> Vec<u8> {
    let mut f = FrameBuf::new();
    Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        page_size: PAGE_SIZE_U32,
        memory_size: (PAGES * PAGE_SIZE) as u64,
        state_size_hint: 0,
        compat: COMPAT.to_vec(),
    })
    .encode(&mut f);
    frame_bytes(1, 0, f.payload())
}

/// One measurement at a time: the counters are process-wide.
static FEED: Mutex<()> = Mutex::new(());

/// Feeds `input` to a destination; returns the peak extra allocation while it ran.
fn feed(input: &[u8]) -> usize {
    let _one = FEED.lock().unwrap_or_else(|e| e.into_inner());
    let (mut a, b) = mem_pipe(&MemPipeConfig {
        buffer: 64 << 20,
        ..MemPipeConfig::default()
    });
    let mut dst = Fake::destination(PAGES);
    a.write_all(input).unwrap();
    a.close_write();
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let t = thread::spawn(move || {
        let cfg = DestinationConfig {
            max_device_state: MAX_STATE,
            ..DestinationConfig::default()
        };
        let r = destination::receive(&mut dst, b, cfg);
        (r.is_ok(), dst)
    });
    let (ok, dst) = t.join().expect("destination panicked");
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    assert!(!ok, "random input completed a migration");
    assert_eq!(dst.resumes, 0, "resumed on random input");
    assert_eq!(dst.aborted, 1);
    drop(a);
    peak
}

/// A structurally valid message with random fields.
fn arb_message() -> impl Strategy<Value = (u16, Vec<u8>)> {
    let page = prop::collection::vec(any::<u8>(), PAGE_SIZE);
    prop_oneof![
        (
            0u32..4,
            prop::collection::vec((0u64..12, any::<bool>()), 1..6),
            page
        )
            .prop_map(|(round, recs, data)| {
                let pages = recs
                    .iter()
                    .map(|&(index, zero)| PageRecord {
                        index,
                        data: if zero {
                            PageData::Zero
                        } else {
                            PageData::Bytes(&data)
                        },
                    })
                    .collect();
                enc(&Message::Pages { round, pages })
            }),
        (0u32..4, 0u64..12).prop_map(|(round, pages)| enc(&Message::RoundEnd { round, pages })),
        (0u32..4, 0u64..12).prop_map(|(round, pages)| enc(&Message::Complete { round, pages })),
        (
            0u64..(4 << 20),
            0u64..64,
            prop::collection::vec(any::<u8>(), 1..64)
        )
            .prop_map(|(total, offset, data)| enc(&Message::DeviceState {
                total: total.max(offset + data.len() as u64),
                offset,
                data: &data
            })),
        Just(enc(&Message::Commit)),
        Just(enc(&Message::Restored)),
        ".{0,20}".prop_map(|r| enc(&Message::Abort { reason: &r })),
    ]
}

fn enc(m: &Message<'_>) -> (u16, Vec<u8>) {
    let mut f = FrameBuf::new();
    m.encode(&mut f);
    (m.message_type() as u16, f.payload().to_vec())
}

fn framed(msgs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut out = hello_frame();
    for (i, (ty, p)) in msgs.iter().enumerate() {
        out.extend(frame_bytes(*ty, u32::try_from(i + 1).unwrap(), p));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn test_fuzz_destination_random_bytes(data in prop::collection::vec(any::<u8>(), 0..4096),
                                          with_hello in any::<bool>()) {
        let input = if with_hello { [hello_frame(), data].concat() } else { data };
        let peak = feed(&input);
        prop_assert!(peak < BOUND, "peak {peak}");
    }

    #[test]
    fn test_fuzz_destination_random_frames(
        msgs in prop::collection::vec((0u16..16, prop::collection::vec(any::<u8>(), 0..600)), 0..8)
    ) {
        let peak = feed(&framed(&msgs));
        prop_assert!(peak < BOUND, "peak {peak}");
    }

    #[test]
    fn test_fuzz_destination_random_valid_messages(msgs in prop::collection::vec(arb_message(), 0..24)) {
        let peak = feed(&framed(&msgs));
        prop_assert!(peak < BOUND, "peak {peak}");
    }
}

#[test]
fn test_fuzz_destination_huge_declared_lengths_bounded() {
    // Declared lengths of 8 MiB and 4 GiB, with no data behind them.
    for len in [u32::try_from(MAX_PAYLOAD).unwrap(), u32::MAX] {
        let mut f = frame_bytes(3, 1, b"");
        f[4..8].copy_from_slice(&len.to_le_bytes());
        let peak = feed(&[hello_frame(), f].concat());
        assert!(peak < BOUND, "peak {peak}");
    }
}
