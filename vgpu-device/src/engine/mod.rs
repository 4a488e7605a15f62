//! Engines: command decoding and execution, the command scanner and per-engine contexts.

pub mod context;
pub mod exec;
pub mod ops;
pub mod scanner;
pub mod translate;
