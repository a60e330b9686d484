//! Results on stdout. A closed stdout (`| head`) ends the program quietly instead of panicking.

use std::io::{ErrorKind, Write};

/// Writes `text` to stdout and flushes it.
pub fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        if e.kind() == ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

/// Writes `text` and a newline to stdout.
pub fn println(text: &str) {
    print(&format!("{text}\n"));
}

/// Writes a file whole or not at all: a temporary file beside it, then a rename.
pub fn write_atomically(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let tmp = path.with_extension(format!("{}.partial", path.extension().and_then(|e| e.to_str()).unwrap_or("out")));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
