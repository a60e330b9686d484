//! Any bytes as one `--batch` line, run against the tiny-csm sample model
//! (ccsm::exercise::batch_line). The model comes from CCSM_FUZZ_CSM or ../models/tiny-csm.gguf.
#![no_main]

use std::cell::RefCell;

use ccsm::csm::CsmGenerator;
use libfuzzer_sys::fuzz_target;

fn load_generator() -> CsmGenerator {
    let path = std::env::var("CCSM_FUZZ_CSM").unwrap_or_else(|_| "../models/tiny-csm.gguf".into());
    ccsm::exercise::batch_generator(path.as_ref()).unwrap_or_else(|e| panic!("{path}: {e} (run `make models`)"))
}

thread_local! {
    // ggml objects are not Send; libFuzzer runs every input on one thread.
    static GENERATOR: RefCell<CsmGenerator> = RefCell::new(load_generator());
}

fuzz_target!(|data: &[u8]| {
    GENERATOR.with(|generator| {
        let _ = ccsm::exercise::batch_line(data, &mut generator.borrow_mut());
    });
});
