//! vGPU profiles: the catalogue of partition sizes a vGPU can be created with (like GVT-g types
//! or NVIDIA vGPU profiles).

use vgpu_abi::{Engine, ALL_ENGINES_MASK, PAGE_SIZE};

use super::PhysError;

const MIB: u64 = 1 << 20;

/// A vGPU type: how much of the physical GPU one instance gets.
#[derive(Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Profile {
    /// Stable name, used by the API and the CLI.
    pub name: &'static str,
    /// Local memory in bytes; also the size of the BAR2 aperture and of the mappable GM range,
    /// so a power of two.
    pub lmem_size: u64,
    /// Hidden (high) GM in bytes, a multiple of the page size.
    pub hidden_gm_size: u64,
    /// Default scheduling weight.
    pub default_weight: u32,
    /// Largest display plane width in pixels.
    pub max_width: u32,
    /// Largest display plane height in pixels.
    pub max_height: u32,
    /// Engines the vGPU exposes (bits from [`Engine::mask_bit`]).
    pub engine_mask: u32,
    /// One line for listings.
    pub description: &'static str,
}

impl Profile {
    /// Size of the mappable GM range: the same as local memory, which it maps 1:1 at reset.
    pub const fn mappable_gm_size(&self) -> u64 {
        self.lmem_size
    }

    /// Whether the profile exposes `engine`.
    pub const fn has_engine(&self, engine: Engine) -> bool {
        self.engine_mask & engine.mask_bit() != 0
    }

    /// Checks the sizes and the engine mask.
    pub fn validate(&self) -> Result<(), PhysError> {
        let bad = |reason| {
            Err(PhysError::InvalidProfile {
                profile: self.name,
                reason,
            })
        };
        if !self.lmem_size.is_power_of_two() || self.lmem_size < PAGE_SIZE {
            return bad("local memory size must be a power of two of at least one page");
        }
        if self.hidden_gm_size == 0 || !self.hidden_gm_size.is_multiple_of(PAGE_SIZE) {
            return bad("hidden GM size must be a non-zero multiple of the page size");
        }
        if self.engine_mask == 0 || self.engine_mask & !ALL_ENGINES_MASK != 0 {
            return bad("engine mask must name at least one engine and only known engines");
        }
        if self.max_width == 0 || self.max_height == 0 {
            return bad("display size must not be zero");
        }
        Ok(())
    }
}

const fn mask(engines: &[Engine]) -> u32 {
    let mut m = 0;
    let mut i = 0;
    while i < engines.len() {
        m |= engines[i].mask_bit();
        i += 1;
    }
    m
}

static PROFILES: [Profile; 6] = [
    Profile {
        name: "mini",
        lmem_size: 16 * MIB,
        hidden_gm_size: 48 * MIB,
        default_weight: 1,
        max_width: 1024,
        max_height: 768,
        engine_mask: ALL_ENGINES_MASK,
        description: "16 MiB local memory, all engines, up to 1024x768",
    },
    Profile {
        name: "small",
        lmem_size: 64 * MIB,
        hidden_gm_size: 192 * MIB,
        default_weight: 2,
        max_width: 1920,
        max_height: 1080,
        engine_mask: ALL_ENGINES_MASK,
        description: "64 MiB local memory, all engines, up to 1920x1080",
    },
    Profile {
        name: "medium",
        lmem_size: 256 * MIB,
        hidden_gm_size: 256 * MIB,
        default_weight: 4,
        max_width: 2560,
        max_height: 1600,
        engine_mask: ALL_ENGINES_MASK,
        description: "256 MiB local memory, all engines, up to 2560x1600",
    },
    Profile {
        name: "large",
        lmem_size: 1024 * MIB,
        hidden_gm_size: 1024 * MIB,
        default_weight: 8,
        max_width: 3840,
        max_height: 2160,
        engine_mask: ALL_ENGINES_MASK,
        description: "1 GiB local memory, all engines, up to 3840x2160",
    },
    Profile {
        name: "compute",
        lmem_size: 256 * MIB,
        hidden_gm_size: 768 * MIB,
        default_weight: 4,
        max_width: 1024,
        max_height: 768,
        engine_mask: mask(&[Engine::Compute, Engine::Blit]),
        description: "256 MiB local memory, compute and blit engines",
    },
    Profile {
        name: "media",
        lmem_size: 128 * MIB,
        hidden_gm_size: 384 * MIB,
        default_weight: 2,
        max_width: 1920,
        max_height: 1080,
        engine_mask: mask(&[Engine::Video, Engine::Blit, Engine::Render]),
        description: "128 MiB local memory, video, blit and render engines, up to 1920x1080",
    },
];

/// The profile catalogue.
pub fn profiles() -> &'static [Profile] {
    &PROFILES
}

/// The profile called `name`.
pub fn profile(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn test_profiles_catalogue_valid_and_unique() {
        let mut names = HashSet::new();
        for p in profiles() {
            p.validate().unwrap();
            assert!(names.insert(p.name), "duplicate {}", p.name);
            assert_eq!(p.mappable_gm_size(), p.lmem_size);
            assert!(p.default_weight >= 1);
        }
    }

    #[test]
    fn test_profile_lookup_by_name() {
        assert_eq!(profile("compute").unwrap().lmem_size, 256 * MIB);
        let c = profile("compute").unwrap();
        assert!(c.has_engine(Engine::Compute) && c.has_engine(Engine::Blit));
        assert!(!c.has_engine(Engine::Render) && !c.has_engine(Engine::Video));
        assert!(!profile("media").unwrap().has_engine(Engine::Compute));
        assert!(profile("huge").is_none());
    }

    #[test]
    fn test_profile_validate_bad_sizes_rejected() {
        let base = profile("mini").unwrap();
        let bad = [
            Profile {
                lmem_size: 24 * MIB,
                ..*base
            },
            Profile {
                lmem_size: 1024,
                ..*base
            },
            Profile {
                hidden_gm_size: 100,
                ..*base
            },
            Profile {
                hidden_gm_size: 0,
                ..*base
            },
            Profile {
                engine_mask: 0,
                ..*base
            },
            Profile {
                engine_mask: 1 << 7,
                ..*base
            },
            Profile {
                max_width: 0,
                ..*base
            },
        ];
        for p in &bad {
            assert!(
                matches!(p.validate(), Err(PhysError::InvalidProfile { .. })),
                "{p:?}"
            );
        }
    }

    #[test]
    fn test_profile_types_serialize() {
        fn is_serialize<T: serde::Serialize>(_: &T) {}
        is_serialize(&profiles());
    }
}
