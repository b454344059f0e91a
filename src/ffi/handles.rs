//! Backend handles: opaque to C, each an address in a registry of live layers. Every call
//! looks its handle up, so a destroyed or foreign handle is an `INVALID_STATE` error instead of
//! a use-after-free (unless the allocator has handed the same address to a newer handle).

use std::collections::HashMap;
use std::sync::Arc;

use once_cell::sync::Lazy;
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::moe::Moe;

/// An opaque MoE layer handle.
///
/// Made by `fdmoe_create_backend`, freed by `fdmoe_destroy_backend` (the caller owns it).
/// Any thread may use it; calls on one handle are serialised by the library (one forward at a
/// time), calls on different handles run concurrently.
pub struct FdmoeBackend {
    _reserved: u8,
}

type Shared = Arc<Mutex<Moe>>;

static LIVE: Lazy<Mutex<HashMap<usize, Shared>>> = Lazy::new(|| Mutex::new(HashMap::new()));

/// Registers a layer and returns its handle.
pub fn register(moe: Moe) -> *mut FdmoeBackend {
    let handle = Box::into_raw(Box::new(FdmoeBackend { _reserved: 0 }));
    LIVE.lock()
        .insert(handle as usize, Arc::new(Mutex::new(moe)));
    handle
}

/// The layer behind a live handle.
pub fn lookup(handle: *const FdmoeBackend) -> Result<Shared> {
    if handle.is_null() {
        return Err(Error::null("backend"));
    }
    LIVE.lock().get(&(handle as usize)).cloned().ok_or_else(|| {
        Error::state(
            "backend is not a live handle (already destroyed, or not made by fdmoe_create_backend)",
        )
    })
}

/// Unregisters and frees a handle; the layer is dropped once no call is using it.
/// Returns false when the handle was not live.
///
/// # Safety
/// `handle` is a pointer the caller got from `register` or any other value; only registered
/// (live) addresses are freed.
pub unsafe fn release(handle: *mut FdmoeBackend) -> bool {
    let removed = LIVE.lock().remove(&(handle as usize));
    match removed {
        Some(moe) => {
            // SAFETY: the address came from Box::into_raw in `register` and was live until now.
            drop(unsafe { Box::from_raw(handle) });
            drop(moe);
            true
        }
        None => false,
    }
}
