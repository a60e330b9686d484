//! Routes ggml's log output into `tracing` under the target `ggml`.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};

use ggml_sys as sys;

thread_local! {
    /// ggml writes some messages in pieces (GGML_LOG_LEVEL_CONT); lines are joined here.
    static PENDING: RefCell<(sys::ggml_log_level, String)> = const { RefCell::new((0, String::new())) };
}

pub(crate) fn install() {
    // SAFETY: the callback is a plain function valid for the whole program; no user data is passed.
    unsafe { sys::ggml_log_set(Some(log_callback), std::ptr::null_mut()) };
}

unsafe extern "C" fn log_callback(level: sys::ggml_log_level, text: *const c_char, _user: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: ggml passes a NUL-terminated string valid for the duration of the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        if level != sys::GGML_LOG_LEVEL_CONT {
            pending.0 = level;
        }
        pending.1.push_str(&text);
        while let Some(end) = pending.1.find('\n') {
            let line: String = pending.1.drain(..=end).collect();
            emit(pending.0, line.trim_end());
        }
    });
}

fn emit(level: sys::ggml_log_level, line: &str) {
    if line.is_empty() {
        return;
    }
    match level {
        sys::GGML_LOG_LEVEL_ERROR => tracing::error!(target: "ggml", "{line}"),
        sys::GGML_LOG_LEVEL_WARN => tracing::warn!(target: "ggml", "{line}"),
        sys::GGML_LOG_LEVEL_INFO => tracing::info!(target: "ggml", "{line}"),
        _ => tracing::debug!(target: "ggml", "{line}"),
    }
}
