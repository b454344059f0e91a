//! The rules every exported function follows, in one place: panics never cross into C, the
//! thread's last error message is set on failure and cleared on success, and versioned structs
//! are read as `min(struct_size, sizeof)` bytes over their defaults.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{Error, FdmoeStatus, Result};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Pointer to this thread's last error message (empty after a successful call).
pub fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".to_string())
}

/// Runs one entry point: catches panics, records the message, returns the status.
pub fn run(body: impl FnOnce() -> Result<()>) -> FdmoeStatus {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_last_error("");
            FdmoeStatus::Ok
        }
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.status
        }
        Err(payload) => {
            set_last_error(&format!(
                "internal error (caught panic): {}",
                panic_message(payload.as_ref())
            ));
            FdmoeStatus::Internal
        }
    }
}

/// Runs a body that cannot report a status (destroy): panics are swallowed.
pub fn run_silent(body: impl FnOnce()) {
    let _ = catch_unwind(AssertUnwindSafe(body));
}

/// A `#[repr(C)]` struct that begins with `uint32_t struct_size` and only ever grows.
///
/// # Safety
/// Implementors are `#[repr(C)]`, start with a `u32` size field and are valid for any bytes a
/// C caller may write in their fields (plain integers, floats and raw pointers).
pub unsafe trait Versioned: Copy {
    /// Size of the struct in the first release that had it: the smallest size accepted.
    const FIRST_SIZE: usize;
    /// The defaults `*_init` writes.
    fn defaults() -> Self;
}

/// Reads a versioned struct from C. Older (smaller) structs get defaults for the fields they
/// lack; newer (larger) ones are accepted only when the fields this version does not know are
/// zero, so a request for a feature this build lacks is never silently dropped.
///
/// # Safety
/// `ptr`, if non-NULL, points to at least `struct_size` readable bytes.
pub unsafe fn read_versioned<T: Versioned>(ptr: *const T, name: &str) -> Result<T> {
    if ptr.is_null() {
        return Err(Error::null(name));
    }
    let size = std::ptr::read_unaligned(ptr as *const u32) as usize;
    let ours = std::mem::size_of::<T>();
    if size < T::FIRST_SIZE {
        return Err(Error::invalid(format!(
            "{name}->struct_size = {size} is smaller than the smallest known size {}; initialise it with its fdmoe_*_init function",
            T::FIRST_SIZE
        )));
    }
    if size > ours {
        let tail = std::slice::from_raw_parts((ptr as *const u8).add(ours), size - ours);
        if tail.iter().any(|&b| b != 0) {
            return Err(Error::new(
                FdmoeStatus::Unsupported,
                format!("{name} sets fields newer than this library (struct_size {size} > {ours}); upgrade libfdmoe"),
            ));
        }
    }
    let mut value = T::defaults();
    std::ptr::copy_nonoverlapping(
        ptr as *const u8,
        &mut value as *mut T as *mut u8,
        size.min(ours),
    );
    Ok(value)
}

/// Writes `T::defaults()` (which carries its own struct_size) to `ptr`.
///
/// # Safety
/// `ptr`, if non-NULL, points to a writable `T`.
pub unsafe fn write_defaults<T: Versioned>(ptr: *mut T, name: &str) -> Result<()> {
    if ptr.is_null() {
        return Err(Error::null(name));
    }
    std::ptr::write_unaligned(ptr, T::defaults());
    Ok(())
}

/// Writes the first `min(size, sizeof)` bytes of `T::defaults()` to `ptr`, with `struct_size`
/// set to that count: a caller compiled against an older (smaller) header is never overrun.
///
/// # Safety
/// `ptr`, if non-NULL, points to `size` writable bytes.
pub unsafe fn write_defaults_sized<T: Versioned>(
    ptr: *mut T,
    size: usize,
    name: &str,
) -> Result<()> {
    if ptr.is_null() {
        return Err(Error::null(name));
    }
    if size < T::FIRST_SIZE {
        return Err(Error::invalid(format!(
            "size = {size} is smaller than the smallest known size of {name} ({})",
            T::FIRST_SIZE
        )));
    }
    let n = size.min(std::mem::size_of::<T>());
    let value = T::defaults();
    std::ptr::copy_nonoverlapping(&value as *const T as *const u8, ptr as *mut u8, n);
    std::ptr::write_unaligned(ptr as *mut u32, n as u32);
    Ok(())
}

/// Writes `value` into a caller struct, `min(struct_size, sizeof)` bytes, keeping the caller's
/// `struct_size`.
///
/// # Safety
/// `ptr`, if non-NULL, points to at least `struct_size` writable bytes.
pub unsafe fn write_versioned<T: Versioned>(ptr: *mut T, value: &T, name: &str) -> Result<()> {
    if ptr.is_null() {
        return Err(Error::null(name));
    }
    let size = std::ptr::read_unaligned(ptr as *const u32) as usize;
    if size < T::FIRST_SIZE {
        return Err(Error::invalid(format!(
            "{name}->struct_size = {size} is smaller than the smallest known size {}",
            T::FIRST_SIZE
        )));
    }
    let n = size.min(std::mem::size_of::<T>());
    // Skip the caller's struct_size (the first 4 bytes) so it stays as they set it.
    std::ptr::copy_nonoverlapping(
        (value as *const T as *const u8).add(4),
        (ptr as *mut u8).add(4),
        n - 4,
    );
    Ok(())
}
