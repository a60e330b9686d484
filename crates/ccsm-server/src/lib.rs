//! ccsm's HTTP server: OpenAI's speech, completions and chat APIs over one model, many sessions in one
//! memory budget. One thread owns the ggml state and runs the engine loop (continuous batching for
//! text, frame rounds for speech); the HTTP side (axum on tokio) talks to it over channels.
#![forbid(unsafe_code)]

mod api;
mod app;
mod conversations;
mod guards;
mod hearing;
mod hosts;
mod http;
mod jobs;
mod listener;
mod metrics;
mod prefixes;
mod requests;
mod speech_api;
mod speech_loop;
mod text_api;
mod text_loop;
mod text_tools;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use ccsm::csm::CsmEngine;
use ccsm::engine::TextEngine;
use ccsm::memory::{CachePolicy, SessionLayouts};
use ccsm::mimi::{MimiCodec, MimiModel, MimiOptions};
use ccsm::{AnyModel, Architecture, CacheType};
use jobs::Job;

pub use app::{Voice, MAX_BODY_BYTES, MAX_INPUT_CHARS, MAX_TEXT_BODY_BYTES};
pub use listener::{connections_within_files, open_files_limit, ConnectionLimits};
pub use metrics::Metrics;
pub use prefixes::PrefixOptions;
pub use requests::{MAX_MESSAGES, MAX_PROMPT_BYTES};

/// How `ccsm-infer serve` runs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The GGUF model to serve: a CSM (speech) or Llama (text) model; a Mimi codec alone is refused.
    pub model: PathBuf,
    /// A Mimi codec for a CSM model without one embedded.
    pub codec: Option<PathBuf>,
    /// Address to listen on (`ccsm-infer serve` defaults to 127.0.0.1).
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    pub port: u16,
    /// Sessions generating at once.
    pub parallel: usize,
    /// Keys clients must send; none: the server is open (a warning when it listens beyond loopback).
    pub api_keys: Vec<String>,
    /// `Host` names a loopback server also answers to (`*`: any); see `guards::HostPolicy`.
    pub allowed_hosts: Vec<String>,
    /// Header, idle and shutdown deadlines and the connection cap.
    pub limits: ConnectionLimits,
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    /// Folder of `NAME.json` voices (see [`load_voices`]); none: speakers are chosen by id only.
    pub voices: Option<PathBuf>,
    /// Sessions' cache types (text models: per-layer layouts, plans, a recent window) and the bytes
    /// every session's caches share (default: `parallel` sessions of a full context).
    pub cache: CachePolicy,
    /// Under memory pressure, admit sessions with q8_0/q4_0 caches instead of queueing them.
    pub adapt: bool,
    /// Most cache cells one session may use (default: the model's context, at most 4096).
    pub n_ctx: Option<usize>,
    /// ggml compute threads of the engine.
    pub n_threads: usize,
    /// Where the model runs: `cpu`, `vulkan` or `vulkan:N` (`ccsm::Placement::parse`); the codec
    /// decodes on the CPU.
    pub device: String,
    /// Most rows one engine step runs (prompts are fed in chunks within it).
    pub n_batch: usize,
    /// Requests that may wait for admission before new ones get 429.
    pub max_queue: usize,
    /// Cached prompt prefixes: on or off, their type, their folder.
    pub prefixes: PrefixOptions,
    /// How long a speech conversation is kept after its last turn.
    pub conversation_ttl: Duration,
}

/// Reads `DIR/NAME.json` voices (`{"speaker": 0, "context": [{"speaker", "text", "frames"}]}`).
pub fn load_voices(dir: &Path) -> Result<BTreeMap<String, Voice>> {
    let mut voices = BTreeMap::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the voices folder {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    paths.sort();
    for path in paths.iter().filter(|p| p.extension().is_some_and(|e| e == "json")) {
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let voice: Voice = serde_json::from_str(&text).with_context(|| {
            format!("{}: expected {{\"speaker\": N, \"context\": [{{\"speaker\", \"text\", \"frames\"}}]}}", path.display())
        })?;
        if let Some(i) = voice.context.iter().position(|s| s.audio.is_some()) {
            bail!("{}: context[{i}] names a recording: put it beside the file as {name}.wav with {name}.txt", path.display());
        }
        voices.insert(name, voice);
    }
    // Recordings: NAME.wav|flac|mp3|ogg with NAME.txt (what it says); NAME.json, when there, gives the
    // speaker. The engine encodes each once, on first use.
    for path in paths.iter().filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| ["wav", "flac", "mp3", "ogg"].contains(&e)))
    {
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
        let transcript = path.with_extension("txt");
        let text = std::fs::read_to_string(&transcript)
            .with_context(|| format!("{}: a voice's recording needs its transcript in {}", path.display(), transcript.display()))?;
        let audio = ccsm::audio_in::read_file(path, ccsm::audio_in::MAX_SECONDS)?;
        let voice = voices.entry(name).or_insert(Voice { speaker: 0, context: Vec::new(), seconds: None });
        voice.context.push(ccsm::csm::Segment {
            speaker: voice.speaker,
            text: text.trim().to_owned(),
            frames: Vec::new(),
            audio: Some(path.clone()),
        });
        voice.seconds = Some(voice.seconds.unwrap_or(0.0) + audio.seconds());
    }
    Ok(voices)
}

/// The engine side, loaded on its own thread while `/health` answers 503.
#[allow(clippy::large_enum_variant)] // made once per process
enum Loaded {
    Text(TextEngine),
    Speech(speech_loop::Speech),
}

/// Loads the model (and for speech the codec, with a second copy of the codec for the hearing thread
/// when it can encode; finished encodings go to `engine_jobs`).
fn load(config: &ServeConfig, engine_jobs: mpsc::Sender<Job>, metrics: Arc<Metrics>) -> Result<Loaded> {
    let placement = ccsm::Placement::parse(&config.device)?;
    let model = ccsm::load_model_placed(&config.model, &placement).with_context(|| format!("loading {}", config.model.display()))?;
    // What the device cannot hold is refused now, before /health says ready, not at every request.
    // (Speech sessions keep no recent window.)
    let (weights, shapes, recent) = match &model {
        AnyModel::Llama(m) => {
            let c = m.config();
            (m.weight_bytes(), vec![(c.n_layer, c.head_dim, c.n_head_kv)], config.cache.recent.unwrap_or(0))
        }
        AnyModel::Csm(m) => {
            let (b, d) = (&m.config().backbone, &m.config().decoder);
            (m.weight_bytes(), vec![(b.n_layer, b.head_dim, b.n_head_kv), (d.n_layer, d.head_dim, d.n_head_kv)], 0)
        }
        AnyModel::Mimi(m) => (m.weight_bytes(), Vec::new(), 0),
    };
    placement.check_sessions(&shapes, config.cache.k_type, config.cache.v_type, recent, config.adapt)?;
    metrics.set_device(&placement, weights);
    match model {
        AnyModel::Llama(m) => Ok(Loaded::Text(TextEngine::new(m, config.n_threads)?)),
        AnyModel::Csm(m) => {
            let codec_path = config.codec.clone().unwrap_or_else(|| config.model.clone());
            let codec = MimiModel::load(&codec_path).with_context(|| format!("loading the codec from {}", codec_path.display()))?;
            // The codec's transformer cache takes the server's cache types, as generation's does.
            let options = MimiOptions {
                n_threads: config.n_threads,
                k_type: config.cache.k_type,
                v_type: config.cache.v_type,
                ..MimiOptions::default()
            };
            let codec = MimiCodec::new(codec, options)?;
            let recordings = config.voices.as_ref().is_some_and(|dir| {
                std::fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|e| e.path().extension().and_then(|x| x.to_str()).is_some_and(|x| ["wav", "flac", "mp3", "ogg"].contains(&x)))
            });
            if recordings && !codec.model().can_encode() {
                bail!(
                    "the voices folder has recordings, but the codec ({}) holds only the decoder: convert it again with its encoder",
                    codec_path.display()
                );
            }
            // Sessions' decoder caches (reset every frame) stay f16.
            let mut engine = CsmEngine::new(m, config.n_threads, config.n_batch, (CacheType::F16, CacheType::F16))?;
            engine.set_code_limit(Some(codec.model().config().codebook_size));
            // Encoding runs beside the engine, not on it: its own codec (the weights read again; the
            // engine's codec decodes every session's frames each round).
            let hearing = if codec.model().can_encode() {
                let codebooks = engine.model().config().n_codebooks;
                Some(hearing::Hearing::start(codec_path, options, codebooks, engine_jobs, metrics)?)
            } else {
                None
            };
            Ok(Loaded::Speech(speech_loop::Speech { engine, codec, hearing }))
        }
        AnyModel::Mimi(_) => bail!("{} is a codec: serve a CSM or Llama model", config.model.display()),
    }
}

/// Refuses keys a client could not send or that would guard nothing: empty, blank, with spaces or
/// control characters.
pub fn check_api_key(key: &str) -> Result<()> {
    if key.trim().is_empty() {
        bail!("an API key must not be empty or blank");
    }
    if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("an API key must not contain spaces or control characters");
    }
    Ok(())
}

/// Serves until Ctrl-C or SIGTERM: then stops accepting, lets running requests finish within the
/// shutdown deadline (a second signal stops at once), and returns. An error if the model cannot load,
/// the address cannot be bound, or the engine thread stops while serving.
pub fn serve(config: ServeConfig) -> Result<()> {
    if config.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    for key in &config.api_keys {
        check_api_key(key)?;
    }
    let facts = ccsm::inspect(&config.model, config.n_ctx).with_context(|| format!("checking {}", config.model.display()))?;
    let (served_cache, served) = match facts.architecture {
        Architecture::Llama => (&facts.caches[0], app::Served::Text),
        Architecture::Csm => {
            let has_codec = config.codec.is_some() || facts.caches.iter().any(|c| c.role == ccsm::CacheRole::Codec);
            if !has_codec {
                bail!("speech needs a Mimi codec: {} has none embedded; pass --codec MIMI.gguf", config.model.display());
            }
            (&facts.caches[0], app::Served::Speech { sample_rate: 24_000 })
        }
        Architecture::Mimi => bail!("{} is a codec: serve a CSM or Llama model", config.model.display()),
    };
    let session_ctx = served_cache.cells;
    let shape = served_cache.config(config.cache.k_type, config.cache.v_type);
    shape.validate()?;
    let per_layer = config.cache.is_per_layer() || config.cache.profile.is_some();
    let layouts = match served {
        app::Served::Text => config.cache.session_layouts(&shape)?,
        app::Served::Speech { .. } if per_layer => {
            bail!("per-layer cache types (--kv-layout, --kv-plan) and --kv-recent are for text models")
        }
        app::Served::Speech { .. } => SessionLayouts { configured: shape.kv_layout(), fallbacks: Vec::new(), recent: 0 },
    };
    let voices = match &config.voices {
        Some(dir) => load_voices(dir)?,
        None => BTreeMap::new(),
    };
    // Sessions with an f16 recent window keep their newest rows in a ring a copied prefix cannot fill.
    let prefix_cache = config.prefixes.enabled && layouts.recent == 0;
    if config.prefixes.enabled && !prefix_cache {
        eprintln!("prefix cache off: sessions with an f16 recent window (--kv-recent) do not start from copied rows");
    }
    let settings = text_loop::LoopSettings {
        parallel: config.parallel,
        n_ctx: session_ctx,
        k_type: config.cache.k_type,
        v_type: config.cache.v_type,
        adapt: config.adapt,
        layouts,
        n_batch: config.n_batch,
        budget_bytes: config.cache.budget.map(|b| b.bytes),
        prefixes: PrefixOptions { enabled: prefix_cache, ..config.prefixes.clone() },
        conversation_ttl: config.conversation_ttl,
    };
    // Voices given as frames are prefilled into the prefix cache at start-up (recordings on first use).
    let warm: Vec<Vec<ccsm::csm::Segment>> =
        voices.values().filter(|v| v.context.iter().all(|s| s.audio.is_none())).map(|v| v.context.clone()).collect();

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let address = format!("{}:{}", config.host, config.port);
        let listener = tokio::net::TcpListener::bind(&address).await.with_context(|| format!("binding {address}"))?;
        let bound = listener.local_addr()?;
        if config.api_keys.is_empty() && !bound.ip().is_loopback() {
            eprintln!(
                "warning: serving on {bound} without an API key: anyone who can reach this address can use the model; set --api-key or CCSM_API_KEY (or listen on 127.0.0.1)"
            );
        }
        let metrics = Arc::new(Metrics::default());
        let engine = Arc::new(app::EngineState::default());
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
        let engine_metrics = metrics.clone();
        let engine_state = engine.clone();
        let engine_config = config.clone();
        let engine_jobs = jobs_tx.clone();
        std::thread::Builder::new().name("ccsm-engine".into()).spawn(move || {
            let loaded = match load(&engine_config, engine_jobs, engine_metrics.clone()) {
                Ok(l) => l,
                Err(e) => {
                    let _ = failed_tx.send(e);
                    return;
                }
            };
            let _stops = app::StopsOnExit(engine_state.clone());
            if let Loaded::Text(engine) = &loaded {
                engine_state.set_text(text_tools::TextTools::new(engine.model().tokenizer(), engine.model().vocab_size()));
            }
            // Ready once the loop has its prefixes (from disk, and voices prefilled).
            let ready = move || {
                engine_state.set(app::Engine::Ready);
                tracing::info!("model loaded; serving");
            };
            match loaded {
                Loaded::Text(engine) => text_loop::run(engine, settings, jobs_rx, engine_metrics, ready),
                Loaded::Speech(speech) => speech_loop::run(speech, settings, warm, jobs_rx, engine_metrics, ready),
            }
        })?;
        let listener_metrics = metrics.clone();
        let state = Arc::new(app::AppState {
            model_id: model_id(&facts.name, &config.model),
            served,
            jobs: Mutex::new(jobs_tx),
            engine,
            metrics,
            api_keys: config.api_keys.clone(),
            voices,
            max_queue: config.max_queue,
            hosts: hosts::HostPolicy::for_bind(bound.ip(), &config.allowed_hosts),
            body_timeout: config.body_timeout,
        });
        eprintln!("ccsm server on http://{bound} ({}; loading, /health answers 503 until ready)", config.model.display());
        let (load_error_tx, mut load_error_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
        let (phase_tx, phase_rx) = tokio::sync::watch::channel(listener::Phase::Serving);
        let grace = config.limits.shutdown_timeout;
        tokio::spawn(async move {
            let mut signals = Signals::new();
            tokio::select! {
                _ = signals.next() => {}
                error = failed_rx => {
                    // Loading failed; or the engine thread ended after loading without a word (its
                    // loop failed, or panicked): either way nothing more can be served.
                    let e = error.unwrap_or_else(|_| anyhow::anyhow!("the engine thread stopped after loading (see the messages above); nothing more can be served"));
                    let _ = load_error_tx.send(e);
                    let _ = phase_tx.send(listener::Phase::Closing);
                    return;
                }
            }
            eprintln!("shutting down: no new connections; running requests have {grace:?} to finish (signal again to stop now)");
            let _ = phase_tx.send(listener::Phase::Draining);
            signals.next().await;
            let _ = phase_tx.send(listener::Phase::Closing);
        });
        listener::serve(listener, http::router(state), config.limits.clone(), phase_rx, listener_metrics).await?;
        // Sent before the listener was told to close, if the engine failed.
        if let Ok(e) = load_error_rx.try_recv() {
            return Err(e);
        }
        Ok(())
    })
}

/// Ctrl-C and SIGTERM, as often as they come.
struct Signals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        Signals {
            #[cfg(unix)]
            terminate: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok(),
        }
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        let terminate = async {
            match self.terminate.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate => {}
        }
    }
}

/// The id `/v1/models` lists: the file's name without `.gguf` (as llama-server does), else its
/// `general.name`.
fn model_id(name: &str, path: &Path) -> String {
    match path.file_stem().map(|s| s.to_string_lossy().into_owned()) {
        Some(stem) if !stem.is_empty() => stem,
        _ => name.chars().filter(|c| !c.is_control()).take(128).collect::<String>().trim().to_owned(),
    }
}
