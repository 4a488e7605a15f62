//! Decode rejections, faults and footprints.

#![allow(clippy::cast_possible_truncation)] // Test-only: small, known-range values.

use vgpu_abi::cmd::enc::{self, Copy, Csc};
use vgpu_abi::cmd::{self, AuditReason, Header};
use vgpu_abi::PAGE_SIZE;

use super::reference;
use super::tests::{op, random_bytes, run_in, run_with, Layout, MEM};
use super::*;
use crate::mem::{BufferTranslate, FaultKind};
#[test]
fn test_decode_bad_length_and_unknown_opcode_rejected() {
    let blt = enc::color_blt(cmd::ROP_PATCOPY, cmd::BPP_32, 0, 64, 16, 4, 0);
    let h = Header::parse(blt[0]);
    let short = Header { len: 5, ..h };
    assert_eq!(
        decode(short, &blt[1..6]).unwrap_err().audit_reason(),
        AuditReason::BadLength
    );
    let e = decode(h, &blt[1..6]).unwrap_err();
    assert_eq!(
        e.audit_reason(),
        AuditReason::BadLength,
        "payload shorter than len"
    );
    for dw in [
        cmd::header(cmd::Client::Blt, 0x03, 0, 6),
        cmd::header(cmd::Client::Render, 0x00, 0, 3),
        cmd::header(cmd::Client::Compute, 0x02, 0, 11),
        enc::store_data_imm(0, 0)[0],
        enc::noop()[0],
        (5 << 29) | 6,
        (7 << 29) | 6,
    ] {
        let e = decode(Header::parse(dw), &[0; 11]).unwrap_err();
        assert_eq!(e.audit_reason(), AuditReason::UnknownOpcode, "{dw:#x}");
    }
}

#[test]
fn test_decode_out_of_range_parameters_rejected() {
    let max = cmd::MAX_DIM;
    let top = u64::MAX - 10;
    let copy = |f: fn(&mut Copy)| {
        let mut c = Copy {
            rop: 0xCC,
            bpp: 2,
            dst: 0,
            dst_pitch: 64,
            src: 4096,
            src_pitch: 64,
            width: 16,
            height: 4,
            pattern: 0,
        };
        f(&mut c);
        enc::src_copy_blt(c).to_vec()
    };
    let csc = |f: fn(&mut Csc)| {
        let mut c = Csc {
            src: 0,
            src_pitch: 16,
            src_size: (16, 8),
            dst: 8192,
            dst_pitch: 64,
            dst_size: (16, 8),
            mode: 0,
        };
        f(&mut c);
        enc::csc_scale(c).to_vec()
    };
    let dispatch = |kernel, params, buffers| {
        enc::dispatch(enc::Dispatch {
            kernel,
            params,
            scalar: 1.0,
            buffers,
        })
        .to_vec()
    };
    let bad: Vec<Vec<u32>> = vec![
        enc::color_blt(0xF0, 3, 0, 64, 16, 4, 0).to_vec(),
        enc::color_blt(0xF0, 2, 0, 4 * (max + 1), max + 1, 1, 0).to_vec(),
        enc::color_blt(0xF0, 0, 0, cmd::MAX_PITCH + 1, 1, 2, 0).to_vec(),
        enc::color_blt(0xF0, 1, 0, 31, 16, 2, 0).to_vec(),
        enc::color_blt(0xF0, 2, top, 64, 16, 1, 0).to_vec(),
        copy(|c| c.src_pitch = 63),
        copy(|c| c.src = u64::MAX - 64),
        enc::surface_state(0, 64, 16, 4, 2).to_vec(),
        enc::surface_state(0, 60, 16, 4, 0).to_vec(),
        enc::surface_state(top, 64, 16, 4, 0).to_vec(),
        enc::fill_rect(0, 0, max + 1, 1, 0, false).to_vec(),
        csc(|c| c.mode = 2),
        csc(|c| c.src_size = (15, 8)),
        csc(|c| c.src_size = (16, 7)),
        csc(|c| c.dst_pitch = 63),
        csc(|c| c.src_size = (0, 0)),
        csc(|c| c.dst = 100),
        csc(|c| c.dst = u64::MAX - 100),
        dispatch(3, [1, 1, 1], [0, 4096, 8192]),
        dispatch(
            cmd::KERNEL_SAXPY,
            [cmd::MAX_ELEMENTS + 1, 0, 0],
            [0, 1 << 28, 0],
        ),
        dispatch(cmd::KERNEL_SAXPY, [16, 0, 0], [0, 4, 0]),
        dispatch(
            cmd::KERNEL_REDUCE_SUM,
            [cmd::MAX_ELEMENTS + 1, 0, 0],
            [0, 0, 1 << 28],
        ),
        dispatch(
            cmd::KERNEL_MATMUL,
            [1 << 10, 1 << 10, 1 << 9],
            [0, 1 << 32, 1 << 34],
        ),
        dispatch(cmd::KERNEL_MATMUL, [u32::MAX; 3], [0, 1 << 32, 1 << 34]),
        dispatch(
            cmd::KERNEL_MATMUL,
            [u32::MAX, 0, u32::MAX],
            [0, 1 << 32, 1 << 34],
        ),
        dispatch(cmd::KERNEL_MATMUL, [4, 4, 4], [0, 4096, 60]),
        dispatch(cmd::KERNEL_MATMUL, [4, 4, 4], [0, 4096, 4096 + 63]),
        dispatch(cmd::KERNEL_SAXPY, [4, 0, 0], [top, 0, 0]),
    ];
    for (i, dws) in bad.iter().enumerate() {
        let e = decode(Header::parse(dws[0]), &dws[1..]).unwrap_err();
        assert_eq!(e.audit_reason(), AuditReason::BadParameter, "case {i}: {e}");
    }
    // Limits themselves are fine, and so are zero sizes.
    for dws in [
        enc::color_blt(0xF0, 2, 0, 4 * max, max, max, 0).to_vec(),
        enc::color_blt(0xF0, 2, top, 0, 0, 0, 0).to_vec(),
        copy(|c| c.src = c.dst + 4),
        dispatch(cmd::KERNEL_SAXPY, [16, 0, 0], [64, 64, 0]),
        dispatch(
            cmd::KERNEL_MATMUL,
            [1 << 10, 1 << 10, 1 << 8],
            [0, 1 << 32, 1 << 34],
        ),
        dispatch(cmd::KERNEL_REDUCE_SUM, [16, 0, 0], [0, 0, 8]),
    ] {
        decode(Header::parse(dws[0]), &dws[1..]).unwrap();
    }
}

#[test]
fn test_draw_without_surface_is_an_error() {
    let o = op(&enc::fill_rect(0, 0, 4, 4, 0, false));
    assert_eq!(
        o.footprint(None).unwrap_err().audit_reason(),
        AuditReason::BadParameter
    );
    let mut t = BufferTranslate::scrambled(4);
    let mut m = Mem::new(&mut t);
    assert_eq!(
        o.execute(&mut m, &mut RenderState::default()),
        Err(ExecError::NoSurface)
    );
}

#[test]
fn test_fault_in_destination_leaves_memory_untouched() {
    let init = random_bytes(3, MEM);
    let page = PAGE_SIZE as usize;
    let blit = enc::src_copy_blt(Copy {
        rop: cmd::ROP_SRCCOPY,
        bpp: 2,
        dst: 10 * PAGE_SIZE - 64,
        dst_pitch: 4096,
        src: 0,
        src_pitch: 4096,
        width: 64,
        height: 8,
        pattern: 0,
    });
    let fill = enc::color_blt(0x5A, 1, 10 * PAGE_SIZE, 4096, 100, 8, 0x1234);
    let surf = enc::surface_state(10 * PAGE_SIZE, 4096, 64, 8, 0);
    let rect = enc::fill_rect(0, 0, 64, 8, 0x8000_00FF, true);
    let tri = enc::triangle([(0, 0), (63, 0), (0, 7)], 0xFF, false);
    let csc = enc::csc_scale(Csc {
        src: 0,
        src_pitch: 64,
        src_size: (64, 8),
        dst: 10 * PAGE_SIZE,
        dst_pitch: 4096,
        dst_size: (64, 8),
        mode: cmd::CSC_NV12_TO_XRGB,
    });
    let saxpy = enc::dispatch(enc::Dispatch {
        kernel: cmd::KERNEL_SAXPY,
        params: [4096, 0, 0],
        scalar: 2.0,
        buffers: [0, 10 * PAGE_SIZE, 0],
    });
    let matmul = enc::dispatch(enc::Dispatch {
        kernel: cmd::KERNEL_MATMUL,
        params: [64, 2, 64],
        scalar: 0.0,
        buffers: [0, 4096, 10 * PAGE_SIZE],
    });
    let cases: [&[&[u32]]; 7] = [
        &[&blit],
        &[&fill],
        &[&surf, &rect],
        &[&surf, &tri],
        &[&csc],
        &[&saxpy],
        &[&matmul],
    ];
    for (i, cmds) in cases.iter().enumerate() {
        // The last page the destination touches is unmapped (or read-only): nothing changes.
        for (unmapped, ro, kind) in [
            (&[13][..], &[][..], FaultKind::NotMapped),
            (&[][..], &[13][..], FaultKind::ReadOnly),
        ] {
            let (res, out) = run_with(cmds, &init, unmapped, ro);
            let err = res.expect_err("fault expected");
            assert_eq!(
                err,
                ExecError::Fault(Fault {
                    va: GpuVa(13 * PAGE_SIZE),
                    kind
                }),
                "case {i}"
            );
            let mut want = init.clone();
            unmapped
                .iter()
                .for_each(|&p| want[p * page..(p + 1) * page].fill(0));
            assert!(out == want, "case {i}: memory changed");
        }
    }
    assert_eq!(
        ExecError::Fault(Fault {
            va: GpuVa(0),
            kind: FaultKind::ReadOnly
        })
        .audit_reason(),
        AuditReason::ReadOnlyWrite
    );
}

#[test]
fn test_op_engine_and_footprint_shapes() {
    let c = op(&enc::color_blt(
        cmd::ROP_PATINVERT,
        2,
        0x1000,
        256,
        10,
        3,
        0,
    ));
    assert_eq!(c.engine(), vgpu_abi::Engine::Blit);
    let fp = c.footprint(None).unwrap();
    let ext = |va, len, access| Extent {
        va: GpuVa(va),
        len,
        access,
    };
    assert_eq!(
        fp,
        vec![
            ext(0x1000, 2 * 256 + 40, Access::Read),
            ext(0x1000, 2 * 256 + 40, Access::Write)
        ]
    );
    let s = Surface::new(GpuVa(0x2000), 400, 100, 50, 1).unwrap();
    let t = op(&enc::triangle([(90, 40), (200, 45), (95, 100)], 0, false));
    assert_eq!(
        t.footprint(Some(&s)).unwrap(),
        vec![ext(0x2000 + 40 * 400 + 90 * 4, 9 * 400 + 40, Access::Write)]
    );
    let z = op(&enc::color_blt(cmd::ROP_PATCOPY, 2, 0x1000, 256, 0, 3, 0));
    assert!(z.footprint(None).unwrap().is_empty());
}

#[test]
fn test_blit_translates_only_pages_its_rows_touch() {
    // Rows two pages apart: the pages between them may be unmapped; a page a row touches
    // faults (destination or source), before anything is written. Source pages may be
    // read-only. Dense rows (processed as one) fault the same way.
    let init = random_bytes(5, MEM);
    let page = PAGE_SIZE as usize;
    let c = Copy {
        rop: cmd::ROP_SRCPAINT,
        bpp: 2,
        dst: 10 * PAGE_SIZE + 50,
        dst_pitch: 2 * PAGE_SIZE as u32 + 100,
        src: 30 * PAGE_SIZE + 100,
        src_pitch: 2 * PAGE_SIZE as u32,
        width: 50,
        height: 3,
        pattern: 0,
    };
    let blit = enc::src_copy_blt(c);
    let fill = enc::color_blt(
        cmd::ROP_PATINVERT,
        2,
        c.dst,
        c.dst_pitch,
        c.width,
        c.height,
        0x1234_5678,
    );
    let dense = enc::color_blt(cmd::ROP_PATCOPY, 0, 40 * PAGE_SIZE + 7, 3000, 3000, 5, 0x77);
    let gaps = [11, 13, 31, 33];
    let zeroed = |mut m: Vec<u8>, pages: &[usize]| {
        pages
            .iter()
            .for_each(|&p| m[p * page..(p + 1) * page].fill(0));
        m
    };
    for layout in [Layout::Scrambled, Layout::Runs] {
        let mut want = zeroed(init.clone(), &gaps);
        reference::blit(&mut want, &c, true);
        let (res, out) = run_in(layout, &[&blit], &init, &gaps, &[30, 32, 34]);
        res.expect("pages between rows are not touched");
        assert!(out == want, "{layout:?}");
        for (cmds, bad, va) in [
            (&blit[..], 14, 14 * PAGE_SIZE),
            (&blit[..], 34, 34 * PAGE_SIZE),
            (&fill[..], 12, 12 * PAGE_SIZE),
            (&dense[..], 42, 42 * PAGE_SIZE),
        ] {
            let (res, out) = run_in(layout, &[cmds], &init, &[bad], &[]);
            assert_eq!(
                res.unwrap_err(),
                ExecError::Fault(Fault {
                    va: GpuVa(va),
                    kind: FaultKind::NotMapped
                }),
                "{layout:?} page {bad}"
            );
            assert!(out == zeroed(init.clone(), &[bad]), "{layout:?} page {bad}");
        }
    }
}
