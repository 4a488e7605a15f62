//! The physical GPU model: local memory, GM partitioning, profiles and admission.
