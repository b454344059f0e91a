//! The CUDA backend.

pub mod compile;
