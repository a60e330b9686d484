//! ggml's own log lines arrive in `tracing` under the target `ggml`.

use std::io::Write;
use std::sync::{Arc, Mutex};

use ggml_sys as sys;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn ggml_errors_are_logged_under_the_ggml_target() {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || sink.clone()).with_ansi(false).finish();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-gguf.bin");
    std::fs::write(&path, b"definitely not a gguf file").unwrap();
    let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    tracing::subscriber::with_default(subscriber, || {
        ggml::init();
        let params = sys::gguf_init_params { no_alloc: true, ctx: std::ptr::null_mut() };
        // SAFETY: a valid NUL-terminated path; ggml's parser returns null on this small bad file.
        let ctx = unsafe { sys::gguf_init_from_file(c_path.as_ptr(), params) };
        assert!(ctx.is_null());
    });
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("ggml:") && text.to_lowercase().contains("magic"), "captured: {text:?}");
}
