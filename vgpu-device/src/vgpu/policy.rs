//! The BAR0 register policy table: for every dword of the register file, how an access is
//! handled. Following VPIO, only registers that affect isolation or device state are hooked;
//! plain storage is passed to the register model without side effects.

use std::sync::OnceLock;

use vgpu_abi::regs::{self, Access, RegInfo};
use vgpu_abi::Engine;

/// How an access to one register is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Plain storage in the virtual register file: reads return the last write, writes have no
    /// side effect (scratch, GPRs, plane geometry).
    PassThrough,
    /// Trap and emulate: the device model handles the access (rings, doorbells, resets,
    /// interrupts, PPGTT roots, flips).
    Trap,
    /// Read-only: reads return the model's value, writes are dropped and counted.
    ReadOnly,
    /// Not a register: reads return all-ones, writes are dropped and counted.
    Ignored,
}

/// Registers whose writes have side effects the model must emulate.
const TRAPPED_GLOBAL: &[u32] = &[
    regs::RESET_CTL,
    regs::INTR_STATUS,
    regs::INTR_MASK,
    regs::TLB_INVALIDATE,
    regs::PLANE_CTL,
    regs::PLANE_SURF_LO,
    regs::PLANE_SURF_HI,
];

/// Engine-block registers (relative offsets) whose writes have side effects.
const TRAPPED_ENGINE: &[u32] = &[
    regs::RING_BASE_LO,
    regs::RING_BASE_HI,
    regs::RING_SIZE,
    regs::RING_CTL,
    regs::RING_TAIL,
    regs::PPGTT_ROOT_LO,
    regs::PPGTT_ROOT_HI,
];

fn policy_of(info: &RegInfo, trapped: bool) -> Policy {
    match (info.access, trapped) {
        (_, true) => Policy::Trap,
        (Access::Ro, false) => Policy::ReadOnly,
        (Access::Rw, false) => Policy::PassThrough,
        // Write-only and write-1-to-clear registers always have side effects.
        (Access::Wo | Access::Rw1c, false) => Policy::Trap,
    }
}

/// Number of dwords in the register file.
pub const REG_DWORDS: usize = (vgpu_abi::pci::REGS_SIZE / 4) as usize;

/// The policy of every dword of the register file, built once.
pub fn table() -> &'static [Policy; REG_DWORDS] {
    static TABLE: OnceLock<Box<[Policy; REG_DWORDS]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Box::new([Policy::Ignored; REG_DWORDS]);
        for info in regs::GLOBAL_REGISTERS {
            t[(info.offset / 4) as usize] = policy_of(info, TRAPPED_GLOBAL.contains(&info.offset));
        }
        for e in Engine::ALL {
            for info in regs::ENGINE_REGISTERS {
                let off = regs::engine_base(e) + info.offset;
                t[(off / 4) as usize] = policy_of(info, TRAPPED_ENGINE.contains(&info.offset));
            }
        }
        t
    })
}

/// The policy for the dword at BAR0 offset `offset` (must be below the register file size).
pub fn policy(offset: u32) -> Policy {
    table()
        .get((offset / 4) as usize)
        .copied()
        .unwrap_or(Policy::Ignored)
}

/// Counts of each policy, for documentation and tests: (pass-through, trap, read-only).
pub fn summary() -> (usize, usize, usize) {
    let t = table();
    let n = |p| t.iter().filter(|&&x| x == p).count();
    (n(Policy::PassThrough), n(Policy::Trap), n(Policy::ReadOnly))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_policy_table_covers_every_register() {
        for info in regs::GLOBAL_REGISTERS {
            assert_ne!(policy(info.offset), Policy::Ignored, "{}", info.name);
        }
        for e in Engine::ALL {
            for info in regs::ENGINE_REGISTERS {
                assert_ne!(
                    policy(regs::engine_base(e) + info.offset),
                    Policy::Ignored,
                    "{}",
                    info.name
                );
            }
        }
        assert_eq!(policy(0x0ffc), Policy::Ignored);
        assert_eq!(policy(0xfffc), Policy::Ignored);
    }

    #[test]
    fn test_policy_hooks_only_state_changing_registers() {
        assert_eq!(policy(regs::SCRATCH0), Policy::PassThrough);
        assert_eq!(
            policy(regs::engine_base(Engine::Blit) + regs::gpr(3)),
            Policy::PassThrough
        );
        assert_eq!(
            policy(regs::engine_base(Engine::Blit) + regs::RING_TAIL),
            Policy::Trap
        );
        assert_eq!(
            policy(regs::engine_base(Engine::Render) + regs::RING_HEAD),
            Policy::ReadOnly
        );
        assert_eq!(policy(regs::INTR_STATUS), Policy::Trap);
        assert_eq!(policy(regs::PV_LMEM_SIZE), Policy::ReadOnly);
        let (pass, trap, ro) = summary();
        let total = regs::GLOBAL_REGISTERS.len() + 4 * regs::ENGINE_REGISTERS.len();
        assert_eq!(pass + trap + ro, total);
        assert!(
            trap < total / 2,
            "VPIO: only a minority of registers is hooked"
        );
    }
}
