//! The C surface (`include/fdmoe.h`): the only module with `extern "C"`, raw pointer reads and
//! panic catching. Everything here is a thin layer over `crate::Moe`.

pub mod api;
mod boundary;
pub mod handles;
pub mod types;

pub use api::*;
pub use handles::FdmoeBackend;
pub use types::*;
