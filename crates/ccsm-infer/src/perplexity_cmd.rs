//! `ccsm-infer perplexity`: perplexity of a text, and KL divergence against a saved reference.

use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;

use ccsm::perplexity::{score, PerplexityRun};
use ccsm::{CacheType, GGMLModel, ModelOptions};

use crate::args::LogArgs;
use crate::cache_setup::layout_json;
use crate::cli::PerplexityArgs;
use crate::{output, progress};

pub fn run(args: &PerplexityArgs, log: &LogArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let model = args.weights.load(&args.model)?;
    // A KL reference is an F32-cache run unless asked otherwise.
    let default = if args.kl_base.is_some() { CacheType::F32 } else { CacheType::F16 };
    let (k_type, v_type) = (args.cache.k_type(default), args.cache.v_type(default));
    let ctx = args.ctx_size as usize;
    let options = ModelOptions { n_ctx: ctx, k_type, v_type, n_threads: args.threads as usize, n_batch: args.batch_size as usize };
    let mut model = GGMLModel::new(model, options).context("setting up the model")?;
    args.cache.apply_rotation(&mut model)?;
    let policy = args.cache.policy(&args.memory, &args.model, default)?;
    let setup = crate::cache_setup::apply_text(&policy, &mut model, log.quiet)?;
    let memory = setup.memory;
    let tokens = model.model().tokenizer().encode_plain(&text)?;
    let reference = match &args.kl {
        Some(path) => {
            let (run, vocab) = PerplexityRun::load(path)?;
            anyhow::ensure!(
                vocab == model.model().vocab_size(),
                "{}: reference vocabulary {vocab} differs from the model's {}",
                path.display(),
                model.model().vocab_size()
            );
            Some(run)
        }
        None => None,
    };

    let chunks = args.chunks.map(|c| c as usize);
    let total = chunks.unwrap_or(usize::MAX).min(tokens.len() / ctx);
    let bar = progress::bar(total as u64, "perplexity", log.quiet);
    let started = Instant::now();
    let (run, kl) = score(&mut model, &tokens, ctx, chunks, reference.as_ref(), |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if let Some(path) = &args.kl_base {
        run.save(path, model.model().vocab_size()).with_context(|| format!("writing {}", path.display()))?;
    }

    let ppl = run.perplexity();
    if args.json {
        let summary = json!({
            "model": args.model.display().to_string(),
            "text": args.file.display().to_string(),
            "text_tokens": tokens.len(),
            "ctx": ctx,
            "chunks": run.chunks,
            "scored_tokens": run.positions.len(),
            "cache": layout_json(model.cache()),
            "kv_plan": setup.plan,
            "ppl": ppl,
            "nll": run.nll(),
            "kl": kl,
            "memory_optimizer": memory,
            "seconds": seconds,
        });
        output::println(&summary.to_string());
    } else {
        output::println(&format!(
            "PPL = {:.4} +/- {:.4}  ({} chunks of {ctx}, {} tokens scored, KV {})",
            ppl.mean,
            ppl.stderr,
            run.chunks,
            run.positions.len(),
            model.cache().layout()
        ));
        if let Some(plan) = &setup.plan {
            let measured = kl.as_ref().map_or("(no --kl reference)".to_string(), |k| format!("{:.6}", k.kld.mean));
            output::println(&format!("KV plan: predicted KLD {:.6}, measured {measured}", plan.predicted_kld));
        }
        if let Some(kl) = kl {
            output::println(&format!("Mean ln(PPL/PPL_base) = {:.5} +/- {:.5}", kl.delta_ln_ppl.mean, kl.delta_ln_ppl.stderr));
            output::println(&format!("Mean KLD = {:.6} +/- {:.6}  (max {:.4})", kl.kld.mean, kl.kld.stderr, kl.kld_max));
            output::println(&format!("Same top p = {:.3} +/- {:.3} %", kl.same_top_percent.mean, kl.same_top_percent.stderr));
            output::println(&format!("RMS Δp = {:.3} %", kl.rms_delta_p_percent));
        }
    }
    if !log.quiet {
        eprintln!(
            "scored {} tokens in {seconds:.1} s ({:.1} tokens/s evaluated)",
            run.positions.len(),
            (run.chunks * ctx) as f64 / seconds
        );
    }
    Ok(())
}
