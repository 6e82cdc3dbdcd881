//! The process's environment: read in place (no allocation) and changed for
//! the program's children. Changing it is only sound while no other thread
//! can read or change it (the constructor, before `main`), which is why
//! [`set`] is an `unsafe fn`.

use core::ffi::CStr;

/// One variable, read in place.
///
/// # Safety
/// No thread may change the environment while the slice is in use.
pub unsafe fn get(name: &CStr) -> Option<&'static [u8]> {
    // SAFETY: the caller's promise.
    unsafe { crate::sys::getenv_bytes(name) }
}

/// Sets (`Some`) or unsets (`None`) a variable; false when that failed.
///
/// # Safety
/// No other thread may read or change the environment meanwhile (glibc's
/// `setenv` is not thread-safe against `getenv`).
pub unsafe fn set(var: &CStr, value: Option<&[u8]>) -> bool {
    let result = match value {
        // SAFETY: the caller's promise; the name is NUL-terminated.
        None => unsafe { libc::unsetenv(var.as_ptr()) },
        Some(v) => match std::ffi::CString::new(v) {
            // SAFETY: as above; both strings are NUL-terminated.
            Ok(value) => unsafe { libc::setenv(var.as_ptr(), value.as_ptr(), 1) },
            Err(_) => -1,
        },
    };
    result == 0
}
