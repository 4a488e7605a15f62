//! Engine command execution: operations on real bytes.
