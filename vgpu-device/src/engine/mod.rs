//! Engines: command decoding and execution, the command scanner and per-engine contexts.

pub mod ops;
