//! libfdmoe: a fused Mixture-of-Experts layer engine.
//!
//! The safe core is `Moe` (create from a `MoeConfig`, `load_weights`, `forward`); `ffi` is the
//! C surface over it (`include/fdmoe.h`). `../shared/SPEC.md` of the project is the contract.

pub mod activation;
pub mod backend;
pub mod config;
pub mod dtype;
pub mod error;
pub mod ffi;
pub mod forward;
pub mod moe;
// The C header (cbindgen) skips the codecs: their constants are internal.
/// cbindgen:ignore
pub mod quant;
pub mod routing;
pub mod weights;

pub use backend::{feature, MemoryRequirements};
pub use config::*;
pub use error::{Error, FdmoeStatus, Result};
pub use forward::ForwardArgs;
pub use moe::Moe;
pub use weights::{ExpertSource, GateSource, WeightSource};

/// Semantic version of the library and its C ABI.
pub const FDMOE_VERSION_MAJOR: u32 = 0;
pub const FDMOE_VERSION_MINOR: u32 = 2;
pub const FDMOE_VERSION_PATCH: u32 = 0;
