//! The default command: text generation with a Llama model.

use ccsm::chat::{ChatTemplate, Message};
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::json;

use ccsm::generate::{generate, LiveQuantize};
use ccsm::llama::LlamaModel;
use ccsm::prefix_cache::file::{PromptFile, Resumed};
use ccsm::sampling::{Sampler, SamplerConfig};
use ccsm::{CacheType, GGMLModel, Model, ModelOptions, DEFAULT_CTX_CAP};

use crate::args::{LogArgs, TopK};
use crate::cache_setup::layout_json;
use crate::cli::GenerateArgs;
use crate::{output, UsageError};

fn n_predict_of(args: &GenerateArgs) -> usize {
    args.n_predict.unwrap_or(64) as usize
}

/// Text generation with a Llama model.
pub fn run(args: &GenerateArgs, log: &LogArgs, path: PathBuf, model: LlamaModel) -> Result<()> {
    if args.batch.is_some() || args.context.is_some() || args.output.is_some() || args.codec.is_some() {
        return Err(UsageError("--batch, --context, -o and --codec are for CSM models; this is a text model".into()).into());
    }
    let prompt = args.prompt_text()?;
    let n_ctx = match args.ctx_size {
        Some(c) if c as usize > model.config().n_ctx_train => {
            return Err(UsageError(format!("-c {c} is beyond the model's context of {}", model.config().n_ctx_train)).into())
        }
        Some(c) => c as usize,
        None => model.config().n_ctx_train.min(DEFAULT_CTX_CAP),
    };
    let (k_type, v_type) = (args.cache.k_type(CacheType::F16), args.cache.v_type(CacheType::F16));
    let live = args.quantize_after.map(|n| LiveQuantize { after: n as usize, k_type, v_type });
    if live.is_some() && args.cache.layers.any() {
        return Err(UsageError("--quantize-after converts to one type per half; it does not take --kv-layout or --kv-plan".into()).into());
    }
    let start_type = |t| if live.is_some() { CacheType::F32 } else { t };
    let options = ModelOptions {
        n_ctx,
        k_type: start_type(k_type),
        v_type: start_type(v_type),
        n_threads: args.threads as usize,
        n_batch: args.batch_size as usize,
    };
    let mut model = GGMLModel::new(model, options).context("setting up the model")?;
    args.cache.apply_rotation(&mut model)?;
    let policy = args.cache.policy(&args.memory, &path, CacheType::F16)?;
    let setup = crate::cache_setup::apply_text(&policy, &mut model, log.quiet)?;
    let memory = setup.memory;
    let tokenizer = model.model().tokenizer();
    let prompt_tokens = if args.chat {
        let template = ChatTemplate::of(tokenizer)?
            .ok_or_else(|| UsageError(format!("--chat: {} has no chat template (tokenizer.chat_template)", path.display())))?;
        template.encode(tokenizer, &[Message { role: "user".into(), content: prompt.clone() }])?
    } else {
        tokenizer.encode(&prompt)?
    };
    if prompt_tokens.is_empty() {
        return Err(UsageError("the prompt is empty".into()).into());
    }
    if !model.evicts() && prompt_tokens.len() + n_predict_of(args) - 1 > model.cache().capacity() {
        return Err(UsageError(format!(
            "the prompt ({} tokens) plus -n {} does not fit the context of {} cells: raise -c/--ctx-size, lower -n, or set --max-memory-mb",
            prompt_tokens.len(),
            n_predict_of(args),
            model.cache().capacity()
        ))
        .into());
    }
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: args.temp.unwrap_or(0.8),
        top_k: args.top_k.map_or(Some(40), TopK::limit),
        top_p: args.top_p.unwrap_or(0.95),
        seed: args.seed,
    })?;
    let n_predict = n_predict_of(args);
    let prompt_file = match &args.prompt_cache {
        Some(file) => Some(PromptFile::new(file, &path).with_context(|| format!("--prompt-cache {}", file.display()))?),
        None => None,
    };
    let resumed = prompt_file.as_ref().map(|f| model.resume_prompt(f, &prompt_tokens));
    let reused = match &resumed {
        Some(Resumed::Rows(n)) => *n,
        Some(Resumed::Refused(why)) => {
            eprintln!("warning: --prompt-cache refused ({why}); the prompt runs and the file is written anew");
            0
        }
        _ => 0,
    };

    // Stream text as it forms: decode the whole continuation each time and print what is new, so
    // multi-byte characters split across tokens come out whole.
    let mut shown = String::new();
    let mut ids = Vec::new();
    let generation = generate(&mut model, &prompt_tokens[reused..], n_predict, &mut sampler, live, |token, tokenizer| {
        if args.json {
            return !crate::interrupt::requested();
        }
        ids.push(token);
        let Ok(text) = tokenizer.decode(&ids) else { return true };
        // A trailing U+FFFD is an incomplete character: wait for its next byte.
        if let Some(new) = text.strip_prefix(shown.as_str()).filter(|t| !t.ends_with('\u{FFFD}')) {
            output::print(new);
            shown = text.clone();
        }
        !crate::interrupt::requested()
    });
    let generation = generation?;
    if let Some(file) = prompt_file.as_ref().filter(|_| reused + 1 < prompt_tokens.len()) {
        if let Err(e) = file.save(model.cache(), &prompt_tokens) {
            eprintln!("warning: --prompt-cache not saved: {e}");
        }
    }
    let text = model.model().tokenizer().decode(&generation.tokens)?;
    let t = &generation.timings;
    if args.json {
        let summary = json!({
            "model": path.display().to_string(),
            "prompt_tokens": prompt_tokens.len(),
            "prompt_cache": args.prompt_cache.as_ref().map(|f| json!({
                "file": f.display().to_string(),
                "rows_reused": reused,
                "refused": match &resumed { Some(Resumed::Refused(why)) => Some(why.clone()), _ => None },
            })),
            "text": text,
            "tokens": generation.tokens,
            "stop": generation.stop,
            "past_trained_context": model.past_trained_context(),
            "seed": args.seed,
            "timings": {
                "prompt_seconds": t.prompt_seconds,
                "prompt_tokens_per_second": t.prompt_tokens_per_second(),
                "decode_steps": t.decode_steps,
                "decode_seconds": t.decode_seconds,
                "decode_tokens_per_second": t.decode_tokens_per_second(),
            },
            "conversion": generation.conversion,
            "memory_optimizer": memory,
            "kv_plan": setup.plan,
            "memory": {
                "kv_bytes": model.kv_memory_usage(),
                "cache": layout_json(model.cache()),
                "k_type": model.cache().config().uniform_types().map(|t| t.k),
                "v_type": model.cache().config().uniform_types().map(|t| t.v),
                "ctx_size": model.cache().capacity(),
                "weight_bytes": model.model().weight_bytes(),
                "compute_buffer_bytes": model.compute_buffer_bytes(),
            },
        });
        output::println(&summary.to_string());
    } else {
        // Whatever the stream could not show yet (an incomplete character at the end).
        let rest = text.strip_prefix(shown.as_str()).unwrap_or("");
        output::println(rest);
    }
    if let (false, Some(reports)) = (log.quiet, &generation.conversion) {
        crate::cache_setup::log_conversion(reports, args.quantize_after.unwrap_or(0) as usize, "tokens");
    }
    if !log.quiet {
        eprintln!(
            "prompt: {} tokens, {:.1} t/s | decode: {} tokens, {:.1} t/s | KV cache: {} bytes ({}, {} cells) | stop: {:?}",
            t.prompt_tokens,
            t.prompt_tokens_per_second(),
            t.decode_steps,
            t.decode_tokens_per_second(),
            model.kv_memory_usage(),
            model.cache().layout(),
            model.cache().capacity(),
            generation.stop,
        );
    }
    Ok(())
}
