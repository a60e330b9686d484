//! Any bytes as a model file: parsed, checked, loaded and run one step (ccsm::exercise::model_file).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// One scratch file per fuzzing process (the loader reads paths, as the CLI does).
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| std::env::temp_dir().join(format!("ccsm-fuzz-model-{}.gguf", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    std::fs::write(scratch(), data).expect("writing the scratch model file");
    let _ = ccsm::exercise::model_file(scratch());
});
