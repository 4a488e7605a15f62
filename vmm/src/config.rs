//! What to run: the VM's memory, its vGPUs, the guest program and its mode.

use std::path::PathBuf;
use std::time::Duration;

use vgpu_device::vgpu::GttMode;

/// Errors parsing a `--vgpu` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The value is not `profile=NAME[,gtt=MODE]` or `socket=PATH`.
    #[error("Bad --vgpu '{spec}': {reason}")]
    BadVgpu {
        /// The value given.
        spec: String,
        /// Why it was refused.
        reason: String,
    },
}

/// One vGPU of the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VgpuAttach {
    /// A vGPU embedded in the VMM process, on the VMM's own software physical GPU.
    InProcess {
        /// Profile name (`mini`, `small`, ...).
        profile: String,
        /// GTT virtualization mode.
        gtt: GttMode,
    },
    /// A vGPU served by vgpud on this vfio-user socket.
    Socket(PathBuf),
}

impl std::str::FromStr for VgpuAttach {
    type Err = ConfigError;

    /// Parses `profile=NAME[,gtt=shadow|two-dim]` or `socket=PATH`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |reason: &str| ConfigError::BadVgpu {
            spec: s.into(),
            reason: reason.into(),
        };
        if let Some(path) = s.strip_prefix("socket=") {
            if path.is_empty() {
                return Err(bad("socket=PATH needs a path"));
            }
            return Ok(VgpuAttach::Socket(PathBuf::from(path)));
        }
        let mut profile = None;
        let mut gtt = GttMode::Shadow;
        for kv in s.split(',').filter(|x| !x.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad("expected key=value"))?;
            match k {
                "profile" if !v.is_empty() => profile = Some(v.to_string()),
                "gtt" => gtt = v.parse().map_err(|e: String| bad(&e))?,
                _ => return Err(bad(&format!("unknown key '{k}'"))),
            }
        }
        let profile = profile.ok_or_else(|| bad("profile=NAME or socket=PATH is required"))?;
        Ok(VgpuAttach::InProcess { profile, gtt })
    }
}

/// What the guest program does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GuestMode {
    /// The workload: blit, render, compute and display, checked bit-exactly.
    #[default]
    Workload,
    /// Attacks that the vGPU must refuse (passes only if it does).
    Malicious,
    /// Times MMIO accesses (trap-path benchmark), this many per series.
    Bench(u32),
}

/// A VM to run.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Name used in console output and thread names.
    pub name: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The vGPUs, in PCI device order (device 1, 2, ...).
    pub vgpus: Vec<VgpuAttach>,
    /// An ELF guest image to run instead of the built-in guest program.
    pub guest: Option<PathBuf>,
    /// What the guest program does.
    pub mode: GuestMode,
    /// The run fails if the guest has not reported by then.
    pub timeout: Duration,
    /// Print the guest console line by line as it arrives (the binary does; tests collect it).
    pub echo_console: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            name: "vm".into(),
            memory_mib: 64,
            vgpus: Vec::new(),
            guest: None,
            mode: GuestMode::Workload,
            timeout: Duration::from_secs(60),
            echo_console: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vgpu_attach_parse_accepts_both_forms() {
        assert_eq!(
            "profile=small,gtt=two-dim".parse::<VgpuAttach>().unwrap(),
            VgpuAttach::InProcess {
                profile: "small".into(),
                gtt: GttMode::TwoDim
            }
        );
        assert_eq!(
            "profile=mini".parse::<VgpuAttach>().unwrap(),
            VgpuAttach::InProcess {
                profile: "mini".into(),
                gtt: GttMode::Shadow
            }
        );
        assert_eq!(
            "socket=/tmp/a,b.sock".parse::<VgpuAttach>().unwrap(),
            VgpuAttach::Socket("/tmp/a,b.sock".into())
        );
    }

    #[test]
    fn test_vgpu_attach_parse_bad_values_rejected() {
        for bad in [
            "",
            "gtt=shadow",
            "profile=small,gtt=3d",
            "socket=",
            "colour=red",
            "x",
        ] {
            assert!(bad.parse::<VgpuAttach>().is_err(), "{bad}");
        }
    }
}
