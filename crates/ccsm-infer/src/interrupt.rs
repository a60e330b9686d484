//! Ctrl-C: the first one asks generation to stop after the current token or frame (what was made so
//! far is still written); a second one ends the process at once.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Exit code of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
pub const EXIT_CODE: u8 = 130;

pub fn install() {
    let handler = || {
        if REQUESTED.swap(true, Ordering::SeqCst) {
            std::process::exit(EXIT_CODE as i32);
        }
        eprintln!("\ninterrupted: finishing the current step and writing what was generated (Ctrl-C again to quit now)");
    };
    if let Err(e) = ctrlc::set_handler(handler) {
        tracing::warn!("cannot install the Ctrl-C handler: {e}");
    }
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
