//! Status codes and the error type every fallible operation returns.
//!
//! `Status` is the C-visible code (explicit numbers, never reused); `Error` pairs it with a
//! message that names the argument or feature at fault, which the C surface hands out
//! through `fdmoe_last_error_message`.

use std::fmt;

/// Result status of every fallible `fdmoe_*` call. Numbers are part of the ABI and never reused.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FdmoeStatus {
    /// Success.
    Ok = 0,
    /// An argument has a value the call cannot take (size, enum value, inconsistent shapes).
    InvalidArgument = 1,
    /// A required pointer argument is NULL.
    NullArgument = 2,
    /// The combination is valid in the contract but not implemented by this backend.
    Unsupported = 3,
    /// The token count exceeds the capacity (`max_tokens`) the backend was created with.
    CapacityExceeded = 4,
    /// No usable GPU, driver or CUDA library was found.
    NoDevice = 5,
    /// A CUDA driver, runtime or NVRTC call failed.
    CudaError = 6,
    /// A NCCL call failed.
    NcclError = 7,
    /// Host or device memory could not be allocated.
    OutOfMemory = 8,
    /// The call is not valid in the handle's current state (e.g. forward before weights).
    InvalidState = 9,
    /// A bug in the library (including a caught panic).
    Internal = 10,
}

impl FdmoeStatus {
    /// Stable upper-case name, as in the header without the `FDMOE_STATUS_` prefix.
    pub fn name(self) -> &'static str {
        match self {
            FdmoeStatus::Ok => "OK",
            FdmoeStatus::InvalidArgument => "INVALID_ARGUMENT",
            FdmoeStatus::NullArgument => "NULL_ARGUMENT",
            FdmoeStatus::Unsupported => "UNSUPPORTED",
            FdmoeStatus::CapacityExceeded => "CAPACITY_EXCEEDED",
            FdmoeStatus::NoDevice => "NO_DEVICE",
            FdmoeStatus::CudaError => "CUDA_ERROR",
            FdmoeStatus::NcclError => "NCCL_ERROR",
            FdmoeStatus::OutOfMemory => "OUT_OF_MEMORY",
            FdmoeStatus::InvalidState => "INVALID_STATE",
            FdmoeStatus::Internal => "INTERNAL",
        }
    }

    /// Every status, in numeric order.
    /// cbindgen:ignore
    pub const ALL: [FdmoeStatus; 11] = [
        FdmoeStatus::Ok,
        FdmoeStatus::InvalidArgument,
        FdmoeStatus::NullArgument,
        FdmoeStatus::Unsupported,
        FdmoeStatus::CapacityExceeded,
        FdmoeStatus::NoDevice,
        FdmoeStatus::CudaError,
        FdmoeStatus::NcclError,
        FdmoeStatus::OutOfMemory,
        FdmoeStatus::InvalidState,
        FdmoeStatus::Internal,
    ];
}

/// A failed operation: the status code and a message naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub status: FdmoeStatus,
    pub message: String,
}

impl Error {
    pub fn new(status: FdmoeStatus, message: impl Into<String>) -> Self {
        Error {
            status,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(FdmoeStatus::InvalidArgument, message)
    }
    pub fn null(argument: &str) -> Self {
        Self::new(FdmoeStatus::NullArgument, format!("{argument} is NULL"))
    }
    /// `feature` is not implemented by `backend`; the message names both.
    pub fn unsupported(feature: impl fmt::Display, backend: &str) -> Self {
        Self::new(
            FdmoeStatus::Unsupported,
            format!("{feature} is not supported on backend {backend}"),
        )
    }
    pub fn state(message: impl Into<String>) -> Self {
        Self::new(FdmoeStatus::InvalidState, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(FdmoeStatus::Internal, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status.name(), self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Returns an `InvalidArgument` error from the enclosing function when `cond` is false.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::error::Error::invalid(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure;
