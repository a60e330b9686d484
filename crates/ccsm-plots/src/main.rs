//! `ccsm-plots`: draws the benchmark figures as PNG (run by `make plots` after `make bench`):
//! KV cache bytes against context per cache type (from the same sizing code the cache uses), and mean
//! KL divergence against bits per element per cache type, beside llama.cpp's figures.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use plotters::prelude::*;
use plotters::style::FontStyle;

use ccsm::kv_cache::KvCacheConfig;
use ccsm::llama::LlamaConfig;
use ccsm::CacheType;

#[derive(Parser)]
#[command(about = "Draw the benchmark plots (PNG)")]
struct Args {
    /// The model whose cache geometry is plotted.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Perplexity/KL results (one JSON object per line, from tools/bench.sh).
    #[arg(long, default_value = "docs/data/kld.jsonl")]
    kld: PathBuf,
    /// A TrueType font for the labels.
    #[arg(long, default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    font: PathBuf,
    /// The planner's table (tools/kv_planner_table.py --out).
    #[arg(long, default_value = "docs/data/kv-planner.json")]
    planner: PathBuf,
    /// Cached elements per token of the planner table's model (SmolLM2: 2 x 30 layers x 192).
    #[arg(long, default_value_t = 11520)]
    planner_elements_per_token: usize,
    /// Where the PNG files go.
    #[arg(long, default_value = "docs")]
    out: PathBuf,
}

/// llama.cpp's mean KLD at ctx 512 on the same model and text (shared/notes/targets.md).
const LLAMA_CPP_KLD: [(CacheType, CacheType, f64); 4] = [
    (CacheType::Q8_0, CacheType::Q8_0, 0.00366),
    (CacheType::Q4_1, CacheType::Q4_1, 0.04997),
    (CacheType::Q4_0, CacheType::Q4_0, 0.05547),
    (CacheType::Q8_0, CacheType::Q4_0, 0.00964),
];

fn bits(k: CacheType, v: CacheType) -> f64 {
    (k.dtype().bits_per_element() + v.dtype().bits_per_element()) / 2.0
}

fn color(i: usize) -> RGBColor {
    [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189)][i % 5]
}

fn kv_bytes_plot(args: &Args) -> Result<PathBuf> {
    let file = ggml::gguf::GgufFile::open(&args.model)?;
    let c = LlamaConfig::from_gguf(&file, "llama", ggml::RopeMode::Normal)?;
    let path = args.out.join("kv-bytes.png");
    let root = BitMapBackend::new(&path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_ctx = 8192usize;
    let mib = |t: CacheType, ctx: usize| -> Result<f64> {
        let config = KvCacheConfig::uniform(c.n_layer, c.head_dim, c.n_head_kv, ctx.max(1), t, t);
        Ok(config.bytes()? as f64 / (1024.0 * 1024.0))
    };
    let top = mib(CacheType::F32, max_ctx)? * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("KV cache bytes vs context ({}, {} layers)", args.model.file_name().unwrap_or_default().to_string_lossy(), c.n_layer),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0usize..max_ctx, 0f64..top)?;
    chart.configure_mesh().x_desc("context (cells)").y_desc("MiB").label_style(("sans-serif", 15)).draw()?;
    for (i, t) in CacheType::ALL.into_iter().enumerate() {
        let points = (0..=max_ctx).step_by(256).map(|ctx| Ok((ctx, mib(t, ctx)?))).collect::<Result<Vec<_>>>()?;
        chart
            .draw_series(LineSeries::new(points, color(i).stroke_width(3)))?
            .label(format!("{t} ({:.3} bits/elem)", t.dtype().bits_per_element()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color(i).stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    drop(chart);
    drop(root);
    Ok(path)
}

fn kld_plot(args: &Args) -> Result<PathBuf> {
    let text = std::fs::read_to_string(&args.kld).with_context(|| format!("reading {} (run `make bench` first)", args.kld.display()))?;
    let mut ours = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let k: CacheType = v["cache"]["k_type"].as_str().unwrap_or("").parse().map_err(anyhow::Error::msg)?;
        let t: CacheType = v["cache"]["v_type"].as_str().unwrap_or("").parse().map_err(anyhow::Error::msg)?;
        let kld = v["kl"]["kld"]["mean"].as_f64().context("kld.mean")?;
        ours.push((bits(k, t), kld.max(1e-6), format!("{k}/{t}")));
    }
    let peer: Vec<(f64, f64, String)> = LLAMA_CPP_KLD.iter().map(|&(k, v, kld)| (bits(k, v), kld, format!("{k}/{v}"))).collect();
    let path = args.out.join("kld-vs-bits.png");
    let root = BitMapBackend::new(&path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Mean KL divergence vs bits per element (Jargon File, ctx 512)", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(3.5f64..17.0, (1e-6f64..0.2).log_scale())?;
    chart.configure_mesh().x_desc("bits per element (mean of K and V)").y_desc("mean KLD (log)").label_style(("sans-serif", 15)).draw()?;
    for (series, name, shape_color) in [(&ours, "ccsm", color(0)), (&peer, "llama.cpp", color(1))] {
        chart
            .draw_series(series.iter().map(|(x, y, _)| Circle::new((*x, *y), 6, shape_color.filled())))?
            .label(name)
            .legend(move |(x, y)| Circle::new((x + 10, y), 6, shape_color.filled()));
        chart.draw_series(series.iter().map(|(x, y, label)| Text::new(label.clone(), (*x + 0.15, *y), ("sans-serif", 14))))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.9)).border_style(BLACK).label_font(("sans-serif", 15)).draw()?;
    root.present()?;
    drop(chart);
    drop(root);
    Ok(path)
}

/// Mean KLD against KV bytes per token, one panel per text and context: every fixed type of ours and
/// of llama.cpp as points, the planner as a curve (same model with f32 weights, f32-cache reference).
fn planner_plot(args: &Args) -> Result<PathBuf> {
    let text = std::fs::read_to_string(&args.planner)
        .with_context(|| format!("reading {} (run tools/kv_planner_table.py)", args.planner.display()))?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    let mut panels: Vec<(String, u64)> =
        rows.iter().map(|r| (r["text"].as_str().unwrap_or("").to_owned(), r["ctx"].as_u64().unwrap_or(0))).collect();
    panels.sort();
    panels.dedup();
    // SmolLM2: 30 layers x (K + V) x 192 elements per token, so bytes per token = bits x 1440.
    let elements = args.planner_elements_per_token as f64;
    let path = args.out.join("kld-vs-bytes.png");
    let root = BitMapBackend::new(&path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let cols = 2.min(panels.len().max(1));
    let areas = root.split_evenly((panels.len().div_ceil(cols), cols));
    for ((text_name, ctx), area) in panels.iter().zip(areas) {
        let of = |engine: &str| -> Vec<(f64, f64, String)> {
            rows.iter()
                .filter(|r| r["text"] == text_name.as_str() && r["ctx"] == *ctx && r["engine"] == engine)
                .filter_map(|r| {
                    Some((r["bits"].as_f64()? * elements / 8.0, r["kld"].as_f64()?.max(1e-6), r["layout"].as_str()?.to_owned()))
                })
                .collect()
        };
        let (mut ours, peer, mut plan) = (of("ccsm"), of("llama.cpp"), of("ccsm plan"));
        // Fixed types with a recent window of f16 cells (`--kv-recent`) get their own marker.
        let windowed: Vec<_> = ours.iter().filter(|p| p.2.contains("f16×")).cloned().collect();
        ours.retain(|p| !p.2.contains("f16×"));
        plan.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut chart = ChartBuilder::on(&area)
            .caption(format!("{text_name}, ctx {ctx}"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(65)
            .build_cartesian_2d(5500f64..13000.0, (5e-5f64..0.2).log_scale())?;
        chart.configure_mesh().x_desc("KV bytes per token").y_desc("mean KLD vs f32 cache (log)").label_style(("sans-serif", 14)).draw()?;
        chart
            .draw_series(LineSeries::new(plan.iter().map(|p| (p.0, p.1)), color(2).stroke_width(3)))?
            .label("ccsm planner")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color(2).stroke_width(3)));
        let series = [
            (&ours, "ccsm fixed types", color(0)),
            (&peer, "llama.cpp fixed types", color(1)),
            (&windowed, "ccsm type + f16 window", color(3)),
        ];
        for (series, name, c) in series {
            chart
                .draw_series(series.iter().map(|(x, y, _)| Circle::new((*x, *y), 5, c.filled())))?
                .label(name)
                .legend(move |(x, y)| Circle::new((x + 10, y), 5, c.filled()));
            chart.draw_series(series.iter().map(|(x, y, l)| Text::new(l.clone(), (*x + 60.0, *y), ("sans-serif", 12))))?;
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.9)).border_style(BLACK).label_font(("sans-serif", 13)).draw()?;
    }
    root.present()?;
    drop(root);
    Ok(path)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let font = std::fs::read(&args.font).with_context(|| format!("reading the font {}", args.font.display()))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| anyhow::anyhow!("{} is not a usable TrueType font", args.font.display()))?;
    std::fs::create_dir_all(&args.out)?;
    println!("{}", kv_bytes_plot(&args)?.display());
    println!("{}", kld_plot(&args)?.display());
    if args.planner.exists() {
        println!("{}", planner_plot(&args)?.display());
    }
    Ok(())
}
