//! Snapshot, restore and live migration of vGPU state. Empty until the migration issue lands.
