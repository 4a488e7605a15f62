//! Checks that the programming manual (`docs/device-spec.md`) agrees with the `vgpu-abi` crate:
//! every register row has the crate's offset, access, reset value and LRI flag, every audit
//! reason has its code and name, every command its client, opcode, length and header, and every
//! command-stream limit its value.

use vgpu_abi::cmd::{self, AuditReason, Client};
use vgpu_abi::regs::{self, Access, RegInfo};

/// The manual, read from the workspace's `docs/`.
fn manual() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/device-spec.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// Splits a Markdown table row into trimmed cells without backticks. `\|` inside a cell is an
/// escaped pipe, not a separator.
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cur.push('|');
                chars.next();
            }
            '|' => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter()
        .map(|c| c.replace('`', "").trim().to_string())
        .collect()
}

/// Every table row of the manual, split into cells.
fn rows(doc: &str) -> Vec<Vec<String>> {
    doc.lines()
        .filter(|l| l.trim_start().starts_with('|'))
        .map(cells)
        .collect()
}

fn access_name(a: Access) -> &'static str {
    match a {
        Access::Ro => "RO",
        Access::Rw => "RW",
        Access::Rw1c => "RW1C",
        Access::Wo => "WO",
    }
}

/// Register rows: Offset | Name | Width | Access | Reset | LRI | Description.
fn check_register_table(rows: &[Vec<String>], table: &[RegInfo], what: &str) -> Vec<String> {
    let mut errors = Vec::new();
    for reg in table {
        let matching: Vec<&Vec<String>> = rows
            .iter()
            .filter(|r| r.len() >= 7 && r[1] == reg.name && r[0].starts_with("0x"))
            .collect();
        if matching.len() != 1 {
            errors.push(format!(
                "{what} register {} has {} register rows in the manual, expected 1",
                reg.name,
                matching.len()
            ));
            continue;
        }
        let r = matching[0];
        let offset = format!("0x{:04X}", reg.offset);
        if r[0] != offset {
            errors.push(format!("{}: manual offset {} != {offset}", reg.name, r[0]));
        }
        if r[2] != "32" {
            errors.push(format!("{}: manual width {} != 32", reg.name, r[2]));
        }
        if r[3] != access_name(reg.access) {
            errors.push(format!(
                "{}: manual access {} != {}",
                reg.name,
                r[3],
                access_name(reg.access)
            ));
        }
        let reset = format!("0x{:08X}", reg.reset);
        let profile_ok = r[4] == "profile" && reg.name.starts_with("PV_");
        if r[4] != reset && !profile_ok {
            errors.push(format!("{}: manual reset {} != {reset}", reg.name, r[4]));
        }
        let lri = if reg.lri { "yes" } else { "no" };
        if r[5] != lri {
            errors.push(format!("{}: manual LRI {} != {lri}", reg.name, r[5]));
        }
    }
    errors
}

#[test]
fn test_spec_doc_registers_match_abi_tables() {
    let rows = rows(&manual());
    let mut errors = check_register_table(&rows, regs::GLOBAL_REGISTERS, "global");
    errors.extend(check_register_table(
        &rows,
        regs::ENGINE_REGISTERS,
        "engine",
    ));
    assert!(
        errors.is_empty(),
        "manual disagrees with vgpu-abi:\n{}",
        errors.join("\n")
    );
}

#[test]
fn test_spec_doc_audit_reasons_listed_with_codes() {
    let rows = rows(&manual());
    let mut errors = Vec::new();
    for code in 1..=u32::MAX {
        let Some(reason) = AuditReason::from_code(code) else {
            break;
        };
        let variant = format!("{reason:?}");
        let found = rows.iter().any(|r| {
            r.len() >= 4 && r[0] == code.to_string() && r[1] == variant && r[2] == reason.name()
        });
        if !found {
            errors.push(format!(
                "no row `| {code} | {variant} | {} | ... |`",
                reason.name()
            ));
        }
    }
    assert!(
        errors.is_empty(),
        "audit reasons missing from the manual:\n{}",
        errors.join("\n")
    );
}

#[test]
fn test_spec_doc_commands_match_encodings() {
    let rows = rows(&manual());
    let commands: [(&str, Client, u32); 15] = [
        ("MI_NOOP", Client::Mi, cmd::MI_NOOP),
        ("MI_USER_INTERRUPT", Client::Mi, cmd::MI_USER_INTERRUPT),
        ("MI_BATCH_BUFFER_END", Client::Mi, cmd::MI_BATCH_BUFFER_END),
        (
            "MI_BATCH_BUFFER_START",
            Client::Mi,
            cmd::MI_BATCH_BUFFER_START,
        ),
        ("MI_STORE_DATA_IMM", Client::Mi, cmd::MI_STORE_DATA_IMM),
        (
            "MI_LOAD_REGISTER_IMM",
            Client::Mi,
            cmd::MI_LOAD_REGISTER_IMM,
        ),
        (
            "MI_STORE_REGISTER_MEM",
            Client::Mi,
            cmd::MI_STORE_REGISTER_MEM,
        ),
        ("MI_SEMAPHORE_WAIT", Client::Mi, cmd::MI_SEMAPHORE_WAIT),
        ("XY_COLOR_BLT", Client::Blt, cmd::XY_COLOR_BLT),
        ("XY_SRC_COPY_BLT", Client::Blt, cmd::XY_SRC_COPY_BLT),
        (
            "RENDER_SURFACE_STATE",
            Client::Render,
            cmd::RENDER_SURFACE_STATE,
        ),
        ("RENDER_FILL_RECT", Client::Render, cmd::RENDER_FILL_RECT),
        ("RENDER_TRIANGLE", Client::Render, cmd::RENDER_TRIANGLE),
        ("VIDEO_CSC_SCALE", Client::Video, cmd::VIDEO_CSC_SCALE),
        ("COMPUTE_DISPATCH", Client::Compute, cmd::COMPUTE_DISPATCH),
    ];
    let mut errors = Vec::new();
    for (name, client, opcode) in commands {
        // Command | Client | Opcode | len | Header | Engines
        let Some(r) = rows
            .iter()
            .find(|r| r.len() >= 6 && r[0] == name && r[2].starts_with("0x"))
        else {
            errors.push(format!("{name}: no row in the command summary"));
            continue;
        };
        let (len, header) = match cmd::fixed_len(client, opcode) {
            Some(len) => (
                len.to_string(),
                format!("0x{:08X}", cmd::header(client, opcode, 0, len)),
            ),
            None => (
                "2n".to_string(),
                format!("0x{:08X} | 2n", cmd::header(client, opcode, 0, 0)),
            ),
        };
        let expect = [
            (client as u32).to_string(),
            format!("0x{opcode:02X}"),
            len,
            header,
        ];
        for (i, want) in expect.iter().enumerate() {
            if &r[i + 1] != want {
                errors.push(format!(
                    "{name}: manual column {} is {:?}, expected {want:?}",
                    i + 1,
                    r[i + 1]
                ));
            }
        }
    }
    assert!(
        errors.is_empty(),
        "command summary disagrees with vgpu-abi:\n{}",
        errors.join("\n")
    );
}

#[test]
fn test_spec_doc_limits_and_version_match_constants() {
    let doc = manual();
    let rows = rows(&doc);
    let limits: [(&str, u64); 7] = [
        ("LRI_MAX_PAIRS", cmd::LRI_MAX_PAIRS.into()),
        ("MAX_DIM", cmd::MAX_DIM.into()),
        ("MAX_PITCH", cmd::MAX_PITCH.into()),
        ("MAX_ELEMENTS", cmd::MAX_ELEMENTS.into()),
        ("MAX_MATMUL_OPS", cmd::MAX_MATMUL_OPS),
        ("MAX_BATCH_BYTES", cmd::MAX_BATCH_BYTES.into()),
        (
            "MAX_BATCHES_PER_SUBMISSION",
            cmd::MAX_BATCHES_PER_SUBMISSION.into(),
        ),
    ];
    for (name, value) in limits {
        let found = rows.iter().any(|r| {
            r.len() >= 2
                && r[0] == name
                && r[1].split_whitespace().next() == Some(value.to_string().as_str())
        });
        assert!(
            found,
            "limit {name} = {value} missing from the manual's limits table"
        );
    }
    let version = format!("0x{:08X}", vgpu_abi::SPEC_VERSION);
    assert!(
        doc.contains(&format!("`VERSION` = `{version}`")),
        "spec version {version} not stated"
    );
}
