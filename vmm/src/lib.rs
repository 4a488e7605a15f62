//! Reference KVM VMM with `--vgpu`. Empty until the reference-VMM issue lands.
