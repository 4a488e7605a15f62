//! The daemon's core: the software physical GPU, its scheduler, and the vGPUs it serves, each on
//! its own vfio-user socket.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vgpu_device::phys::{profile, PhysError, PhysGpu, PhysGpuConfig};
use vgpu_device::sched::{SchedConfig, SchedError, SchedParams, Scheduler};
use vgpu_device::vgpu::{GttMode, Vgpu, VgpuConfig, VgpuError};
use vgpu_vfio_user::{Backend, Server};

use crate::backend::VgpuBackend;

/// Errors of daemon operations.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No profile of that name.
    #[error("Unknown profile '{0}'")]
    UnknownProfile(String),
    /// Admission refused or the physical GPU failed.
    #[error("Cannot create the vGPU")]
    Phys(#[from] PhysError),
    /// The device model refused.
    #[error("Cannot build the vGPU")]
    Vgpu(#[from] VgpuError),
    /// The scheduler refused.
    #[error("Scheduler")]
    Sched(#[from] SchedError),
    /// The vfio-user server could not start.
    #[error("Cannot serve the vGPU on {path}")]
    Serve {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: vgpu_vfio_user::Error,
    },
    /// No vGPU with that id.
    #[error("No vGPU {0}")]
    UnknownVgpu(u32),
    /// A vGPU spec string did not parse.
    #[error("Bad vGPU spec '{spec}': {reason}")]
    BadSpec {
        /// The spec.
        spec: String,
        /// Why.
        reason: String,
    },
    /// The name is taken.
    #[error("A vGPU named '{0}' exists")]
    NameTaken(String),
    /// The socket directory could not be created.
    #[error("Cannot create socket directory {0}")]
    SocketDir(PathBuf, #[source] std::io::Error),
}

/// Daemon settings.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The physical GPU.
    pub gpu: PhysGpuConfig,
    /// Scheduler settings.
    pub sched: SchedConfig,
    /// Where vfio-user sockets are created.
    pub socket_dir: PathBuf,
}

/// What to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VgpuSpec {
    /// Profile name.
    pub profile: String,
    /// GTT mode.
    pub gtt: GttMode,
    /// Optional name (also names the socket).
    pub name: Option<String>,
    /// Scheduler weight (default: the profile's).
    pub weight: Option<u32>,
}

impl std::str::FromStr for VgpuSpec {
    type Err = DaemonError;

    /// Parses `profile=NAME[,gtt=shadow|two-dim][,name=NAME][,weight=N]`.
    fn from_str(s: &str) -> Result<Self, DaemonError> {
        let bad = |reason: String| DaemonError::BadSpec {
            spec: s.into(),
            reason,
        };
        let mut spec = VgpuSpec {
            profile: String::new(),
            gtt: GttMode::Shadow,
            name: None,
            weight: None,
        };
        for kv in s.split(',').filter(|x| !x.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("'{kv}' is not key=value")))?;
            match k {
                "profile" => spec.profile = v.into(),
                "gtt" => spec.gtt = v.parse().map_err(bad)?,
                "name" => {
                    if v.is_empty()
                        || !v
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    {
                        return Err(bad("names use letters, digits, '-' and '_'".into()));
                    }
                    spec.name = Some(v.into());
                }
                "weight" => {
                    spec.weight = Some(
                        v.parse()
                            .map_err(|_| bad(format!("weight '{v}' is not a number")))?,
                    )
                }
                _ => return Err(bad(format!("unknown key '{k}'"))),
            }
        }
        if spec.profile.is_empty() {
            return Err(bad("profile=NAME is required".into()));
        }
        Ok(spec)
    }
}

/// A served vGPU, as listed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VgpuInfo {
    /// Instance id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Profile name.
    pub profile: String,
    /// GTT mode.
    pub gtt: GttMode,
    /// The vfio-user socket.
    pub socket: PathBuf,
}

struct Served {
    info: VgpuInfo,
    vgpu: Arc<Mutex<Vgpu>>,
    server: Server,
}

/// The daemon.
pub struct Daemon {
    cfg: DaemonConfig,
    phys: Mutex<PhysGpu>,
    sched: Scheduler,
    vgpus: Mutex<BTreeMap<u32, Served>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Daemon {
    /// Creates the physical GPU and starts the scheduler.
    pub fn new(cfg: DaemonConfig) -> Result<Self, DaemonError> {
        std::fs::create_dir_all(&cfg.socket_dir)
            .map_err(|e| DaemonError::SocketDir(cfg.socket_dir.clone(), e))?;
        let phys = PhysGpu::new(cfg.gpu)?;
        let sched = Scheduler::new(&cfg.sched)?;
        Ok(Daemon {
            cfg,
            phys: Mutex::new(phys),
            sched,
            vgpus: Mutex::new(BTreeMap::new()),
        })
    }

    /// The socket directory.
    pub fn socket_dir(&self) -> &Path {
        &self.cfg.socket_dir
    }

    /// Creates a vGPU and serves it on `<socket_dir>/<name>.sock`.
    pub fn create(&self, spec: &VgpuSpec) -> Result<VgpuInfo, DaemonError> {
        let p = profile(&spec.profile)
            .ok_or_else(|| DaemonError::UnknownProfile(spec.profile.clone()))?;
        let mut vgpus = lock(&self.vgpus);
        if let Some(n) = &spec.name {
            if vgpus.values().any(|s| &s.info.name == n) {
                return Err(DaemonError::NameTaken(n.clone()));
            }
        }
        let part = lock(&self.phys).create_partition(p)?;
        let id = part.id;
        let vgpu = Vgpu::new(
            part,
            &VgpuConfig {
                gtt_mode: spec.gtt,
                ..Default::default()
            },
        )?;
        let name = spec.name.clone().unwrap_or_else(|| format!("vgpu{id}"));
        let socket = self.cfg.socket_dir.join(format!("{name}.sock"));
        let params = SchedParams {
            weight: spec.weight.unwrap_or(p.default_weight),
            ..Default::default()
        };
        let shared = vgpu.shared().clone();
        let vgpu = Arc::new(Mutex::new(vgpu));
        let undo = |vgpu: Arc<Mutex<Vgpu>>| self.release(vgpu);
        if let Err(e) = self.sched.add_vgpu(shared, params) {
            undo(vgpu);
            return Err(e.into());
        }
        let backend: Arc<Mutex<dyn Backend>> = Arc::new(Mutex::new(VgpuBackend::new(vgpu.clone())));
        let server = match Server::start(&socket, backend) {
            Ok(s) => s,
            Err(source) => {
                let _ = self.sched.remove_vgpu(id);
                undo(vgpu);
                return Err(DaemonError::Serve {
                    path: socket,
                    source,
                });
            }
        };
        let info = VgpuInfo {
            id,
            name,
            profile: p.name.into(),
            gtt: spec.gtt,
            socket,
        };
        tracing::info!(id, name = %info.name, profile = p.name, socket = %info.socket.display(), "vGPU created");
        vgpus.insert(
            id,
            Served {
                info: info.clone(),
                vgpu,
                server,
            },
        );
        Ok(info)
    }

    /// Returns a vGPU's partition to the physical GPU (scrubbed), waiting for engines to let go.
    fn release(&self, vgpu: Arc<Mutex<Vgpu>>) {
        let mut vgpu = vgpu;
        loop {
            match Arc::try_unwrap(vgpu) {
                Ok(m) => {
                    let v = m.into_inner().unwrap_or_else(PoisonError::into_inner);
                    let mut v = v;
                    loop {
                        match v.into_partition() {
                            Ok(p) => {
                                if let Err(e) = lock(&self.phys).release(p) {
                                    tracing::error!(error = %e, "cannot release partition");
                                }
                                return;
                            }
                            Err(b) => {
                                v = b.0;
                                std::thread::sleep(std::time::Duration::from_millis(1));
                            }
                        }
                    }
                }
                Err(a) => {
                    vgpu = a;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }

    /// Stops serving a vGPU and frees it. Its local memory is scrubbed before reuse.
    pub fn destroy(&self, id: u32) -> Result<(), DaemonError> {
        let served = lock(&self.vgpus)
            .remove(&id)
            .ok_or(DaemonError::UnknownVgpu(id))?;
        let Served { info, vgpu, server } = served;
        server.shutdown();
        let _ = self.sched.remove_vgpu(id);
        self.release(vgpu);
        tracing::info!(id, name = %info.name, "vGPU destroyed");
        Ok(())
    }

    /// The served vGPUs.
    pub fn list(&self) -> Vec<VgpuInfo> {
        lock(&self.vgpus).values().map(|s| s.info.clone()).collect()
    }

    /// The device of vGPU `id`.
    pub fn vgpu(&self, id: u32) -> Option<Arc<Mutex<Vgpu>>> {
        lock(&self.vgpus).get(&id).map(|s| s.vgpu.clone())
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    /// Stops every vGPU and removes every socket.
    pub fn shutdown(&self) {
        let ids: Vec<u32> = lock(&self.vgpus).keys().copied().collect();
        for id in ids {
            let _ = self.destroy(id);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_spec_parse_accepts_full_and_rejects_bad() {
        let s: VgpuSpec = "profile=small,gtt=two-dim,name=vm1,weight=3"
            .parse()
            .unwrap();
        assert_eq!(
            s,
            VgpuSpec {
                profile: "small".into(),
                gtt: GttMode::TwoDim,
                name: Some("vm1".into()),
                weight: Some(3)
            }
        );
        assert!("gtt=shadow".parse::<VgpuSpec>().is_err());
        assert!("profile=small,gtt=3d".parse::<VgpuSpec>().is_err());
        assert!("profile=small,name=../x".parse::<VgpuSpec>().is_err());
        assert!("profile=small,color=red".parse::<VgpuSpec>().is_err());
        assert!("profile".parse::<VgpuSpec>().is_err());
    }
}
