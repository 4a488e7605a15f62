//! The vgpud daemon, REST API and vgpuctl CLI. Empty until the vfio-user and API issues land.
