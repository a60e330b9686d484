//! How far a fuzz corpus gets: runs every input as its target does and counts the outcomes.
//!
//!     cargo run --release -p ccsm --example fuzz_corpus_report -- model_loader fuzz/corpus/model_loader
//!     cargo run --release -p ccsm --example fuzz_corpus_report -- batch_line fuzz/corpus/batch_line models/tiny-csm.gguf
//!
//! With KEEP_DIR set, the smallest input of each outcome is copied there and listed in its
//! `expected.tsv` with the error it gives (the file name taken out): the regression set
//! `crates/ccsm/tests/fuzz_regressions.rs` replays.

use std::collections::BTreeMap;

use ccsm::exercise;

/// An error's kind: its message with the file name, numbers and quoted names masked (they vary per
/// input), cut to its first words.
fn kind(message: &str, path: &std::path::Path) -> String {
    let message = message.replace(&path.display().to_string(), "FILE");
    let (mut out, mut quoted, mut last_digit) = (String::new(), false, false);
    for c in message.chars() {
        match c {
            '`' => {
                quoted = !quoted;
                if quoted {
                    out.push_str("`…`");
                }
            }
            _ if quoted => {}
            '0'..='9' => {
                if !last_digit {
                    out.push('N');
                }
            }
            _ => out.push(c),
        }
        last_digit = c.is_ascii_digit();
    }
    out.chars().take(96).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (target, dir) = match args.as_slice() {
        [_, target, dir, ..] => (target.as_str(), dir),
        _ => {
            eprintln!("usage: fuzz_corpus_report model_loader|batch_line DIR [tiny-csm.gguf]");
            std::process::exit(2);
        }
    };
    let csm = args.get(3).map_or("models/tiny-csm.gguf", String::as_str);
    let mut generator = (target == "batch_line").then(|| exercise::batch_generator(csm.as_ref()).expect("tiny-csm"));
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    // Per outcome: the smallest input and its exact message.
    let mut smallest: BTreeMap<String, (Vec<u8>, String)> = BTreeMap::new();
    let mut total = 0;
    for entry in std::fs::read_dir(dir).expect("corpus directory") {
        let path = entry.expect("entry").path();
        let result = match &mut generator {
            None => exercise::model_file(&path),
            Some(g) => exercise::batch_line(&std::fs::read(&path).expect("input"), g),
        };
        let (key, message) = match result {
            Ok(()) => ("ok (ran)".to_owned(), "ok".to_owned()),
            Err(e) => {
                let message = e.to_string();
                let prefix = format!("{}: ", path.display());
                (kind(&message, &path), message.strip_prefix(&prefix).unwrap_or(&message).to_owned())
            }
        };
        let bytes = std::fs::read(&path).expect("input");
        if smallest.get(&key).is_none_or(|(b, _)| bytes.len() < b.len()) {
            smallest.insert(key.clone(), (bytes, message));
        }
        *outcomes.entry(key).or_default() += 1;
        total += 1;
    }
    let mut sorted: Vec<_> = outcomes.into_iter().collect();
    sorted.sort_by_key(|b| std::cmp::Reverse(b.1));
    println!("{total} inputs, {} outcomes", sorted.len());
    for (k, n) in sorted {
        println!("{n:6}  {k}");
    }
    if let Ok(keep) = std::env::var("KEEP_DIR") {
        keep_smallest(std::path::Path::new(&keep), target, &smallest);
    }
}

fn keep_smallest(dir: &std::path::Path, target: &str, smallest: &BTreeMap<String, (Vec<u8>, String)>) {
    std::fs::create_dir_all(dir).expect("KEEP_DIR");
    let extension = if target == "model_loader" { "gguf" } else { "json" };
    let mut table = String::from("# file\texpected error (or ok); written by examples/fuzz_corpus_report.rs\n");
    for (i, (bytes, message)) in smallest.values().enumerate() {
        let name = format!("outcome-{i:02}.{extension}");
        std::fs::write(dir.join(&name), bytes).expect("writing an input");
        table.push_str(&format!("{name}\t{}\n", message.replace(['\t', '\n'], " ")));
    }
    std::fs::write(dir.join("expected.tsv"), table).expect("expected.tsv");
}
