//! Decode speed with one kept graph for all single-token steps vs a graph built per token.
//!   cargo run --release -p ccsm --example decode_graph_reuse -- MODEL [TOKENS] [ROUNDS]

use std::time::Instant;

use ccsm::llama::LlamaModel;
use ccsm::sampling::argmax;
use ccsm::{GGMLModel, Model, ModelOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).ok_or("usage: decode_graph_reuse MODEL [TOKENS] [ROUNDS]")?;
    let steps: usize = args.get(2).map_or(Ok(128), |s| s.parse())?;
    let rounds: usize = args.get(3).map_or(Ok(3), |s| s.parse())?;
    let mut model = GGMLModel::new(LlamaModel::load(path)?, ModelOptions { n_ctx: 1024, ..Default::default() })?;
    let prompt = model.model().tokenizer().encode("The history of the hacker culture")?;
    let mut totals = [0f64; 2];
    // Interleaved rounds, so machine noise hits both variants alike.
    for _ in 0..rounds {
        for (i, reuse) in [true, false].into_iter().enumerate() {
            model.reset();
            model.set_reuse_decode_graph(reuse);
            let mut next = argmax(&model.forward(&prompt)?) as u32;
            let start = Instant::now();
            for _ in 0..steps {
                next = argmax(&model.forward(&[next])?) as u32;
            }
            totals[i] += start.elapsed().as_secs_f64();
        }
    }
    let per_token = |t: f64| t / (rounds * steps) as f64 * 1e3;
    println!("| graph | ms/token | tokens/s |");
    println!("|---|---|---|");
    for (name, t) in [("kept across steps", totals[0]), ("built per token", totals[1])] {
        println!("| {name} | {:.3} | {:.1} |", per_token(t), 1e3 / per_token(t));
    }
    println!("speed-up of keeping the graph: {:.3}x", totals[1] / totals[0]);
    Ok(())
}
