//! What starting a session from a cached prefix costs: a new session cache, then the prefix's rows
//! copied in (SmolLM2's shape: 30 layers × 3 KV heads × 64, a 1,586-row prefix, n_ctx 4096 sessions).
//!   cargo run --release -p ccsm --example prefix_copy_speed -- [ROWS] [ROUNDS]

use std::time::Instant;

use ccsm::kv_cache::{KvCache, KvCacheConfig};
use ccsm::CacheType;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = args.get(1).map_or(Ok(1586), |s| s.parse())?;
    let rounds: usize = args.get(2).map_or(Ok(7), |s| s.parse())?;
    println!("| session / prefix types | new cache ms | copy ms | MB |");
    println!("|---|---|---|---|");
    for (session, stored) in [(CacheType::F16, CacheType::F16), (CacheType::Q8_0, CacheType::Q8_0), (CacheType::F16, CacheType::Q8_0)] {
        let config = KvCacheConfig::uniform(30, 64, 3, 4096, session, session);
        let mut full = KvCache::with_rotation(config.clone(), Default::default())?;
        full.append(rows)?;
        let prefix = full.snapshot(rows, KvCacheConfig::uniform(30, 64, 3, rows, stored, stored), Default::default())?;
        let (mut best_new, mut best_copy) = (f64::MAX, f64::MAX);
        for _ in 0..rounds {
            let t = Instant::now();
            let mut cache = KvCache::with_rotation(config.clone(), Default::default())?;
            let made = t.elapsed().as_secs_f64();
            let t = Instant::now();
            cache.copy_prefix_from(&prefix, rows)?;
            best_copy = best_copy.min(t.elapsed().as_secs_f64());
            best_new = best_new.min(made);
        }
        let mb = prefix.memory_usage() as f64 / 1e6;
        println!("| {session:?} / {stored:?} | {:.2} | {:.2} | {mb:.1} |", best_new * 1e3, best_copy * 1e3);
    }
    Ok(())
}
