//! The server's live numbers, rendered as Prometheus text for `/metrics`. The two gauges a router
//! (Kubernetes' Gateway API Inference Extension) picks endpoints by are `ccsm_requests_waiting` (queue
//! depth) and `ccsm_kv_cache_usage_ratio` (KV-cache utilisation, 0–1 of the budget).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0];

/// A Prometheus histogram of seconds.
#[derive(Default)]
pub struct Histogram {
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    /// Counts one observation of `seconds` in every bucket whose bound it does not exceed.
    pub fn observe(&self, seconds: f64) {
        let mut h = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if h.0.is_empty() {
            h.0 = vec![0; BUCKETS.len()];
        }
        for (count, &bound) in h.0.iter_mut().zip(&BUCKETS) {
            if seconds <= bound {
                *count += 1;
            }
        }
        h.1 += seconds;
        h.2 += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.render_series(out, name, "");
    }

    /// The series' lines under `label` (`key="value",` or empty), without the header.
    fn render_series(&self, out: &mut String, name: &str, label: &str) {
        let h = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{label}le=\"{bound}\"}} {}", h.0.get(i).copied().unwrap_or(0));
        }
        let braces = if label.is_empty() { String::new() } else { format!("{{{}}}", label.trim_end_matches(',')) };
        let _ = writeln!(out, "{name}_bucket{{{label}le=\"+Inf\"}} {}\n{name}_sum{braces} {}\n{name}_count{braces} {}", h.2, h.1, h.2);
    }
}

/// A histogram split by whether the request started from a cached prefix.
#[derive(Default)]
pub struct ByPrefix {
    /// Requests that started from a cached prefix.
    pub hit: Histogram,
    /// Requests that prefilled their whole prompt.
    pub miss: Histogram,
}

impl ByPrefix {
    /// Counts one observation under `hit` or `miss`.
    pub fn observe(&self, hit: bool, seconds: f64) {
        if hit { &self.hit } else { &self.miss }.observe(seconds);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.hit.render_series(out, name, "prefix=\"hit\",");
        self.miss.render_series(out, name, "prefix=\"miss\",");
    }
}

/// The prefix cache's numbers (published by the engine thread after each change).
#[derive(Default)]
pub struct PrefixNumbers {
    /// Bytes the cached prefixes hold (inside the budget, beside the sessions' caches).
    pub bytes: AtomicUsize,
    /// Cached prefixes.
    pub entries: AtomicUsize,
    /// Requests that started from a cached prefix.
    pub hits: AtomicU64,
    /// Requests that found none.
    pub misses: AtomicU64,
    /// Prompt rows not prefilled thanks to cached prefixes.
    pub rows_reused: AtomicU64,
    /// Prefixes evicted (least recently used first) to make room.
    pub evictions: AtomicU64,
    /// Prefix files refused at start-up (another model, altered, truncated).
    pub files_refused: AtomicU64,
}

impl PrefixNumbers {
    /// Takes the cache's current numbers.
    pub fn publish(&self, cache: &ccsm::prefix_cache::PrefixCache) {
        let stats = cache.stats();
        self.bytes.store(cache.bytes(), Ordering::Relaxed);
        self.entries.store(cache.len(), Ordering::Relaxed);
        self.hits.store(stats.hits, Ordering::Relaxed);
        self.misses.store(stats.misses, Ordering::Relaxed);
        self.rows_reused.store(stats.rows_reused, Ordering::Relaxed);
        self.evictions.store(stats.evictions, Ordering::Relaxed);
    }
}

/// Everything `/metrics` reports; the engine threads and the HTTP side update it.
#[derive(Default)]
pub struct Metrics {
    /// Requests admitted and generating now (`ccsm_requests_running`).
    pub running: AtomicUsize,
    /// Requests queued for admission (`ccsm_requests_waiting`, the queue depth routers read).
    pub waiting: AtomicUsize,
    /// Bytes of the KV caches (and codec states) of running requests (`ccsm_kv_cache_bytes`).
    pub kv_bytes: AtomicUsize,
    /// The memory budget, in bytes, all sessions' caches share (`ccsm_kv_cache_budget_bytes`).
    pub kv_budget_bytes: AtomicUsize,
    /// Requests that finished generating (`ccsm_requests_total{outcome="ok"}`).
    pub requests_ok: AtomicU64,
    /// Requests ended by a server-side error, such as a failed engine step (`outcome="failed"`).
    pub requests_failed: AtomicU64,
    /// Answered 4xx (malformed, unsupported, too long for the context, unauthorised, ...).
    pub requests_invalid: AtomicU64,
    /// Requests whose client left before they finished, queued or running (`outcome="cancelled"`).
    pub requests_cancelled: AtomicU64,
    /// Requests turned away: 429 with the queue full, 503 before the model is ready (`outcome="rejected"`).
    pub requests_rejected: AtomicU64,
    /// Prompt tokens (text) or backbone rows (speech) of admitted requests.
    pub prompt_tokens: AtomicU64,
    /// Text tokens generated.
    pub tokens_generated: AtomicU64,
    /// Audio frames generated (80 ms each).
    pub frames_generated: AtomicU64,
    /// Engine steps: one graph over every running session.
    pub steps: AtomicU64,
    /// Requests whose recordings are being encoded now, beside the engine (`ccsm_recordings_encoding`).
    pub recordings_encoding: AtomicUsize,
    /// Recordings encoded into frames: uploads, and voices on their first use.
    pub recordings_encoded: AtomicU64,
    /// Seconds from a text request's arrival to its first generated token.
    pub time_to_first_token: Histogram,
    /// Seconds from a speech request's arrival to its first decoded audio.
    pub time_to_first_audio: Histogram,
    /// The prefix cache.
    pub prefix: PrefixNumbers,
    /// Time to first token, by whether the request started from a cached prefix.
    pub time_to_first_token_by_prefix: ByPrefix,
    /// Time to first audio, by whether the request started from a cached prefix.
    pub time_to_first_audio_by_prefix: ByPrefix,
    /// The device the model runs on (`ccsm_device_memory_*_bytes{device}`); unset on the CPU.
    pub device: std::sync::OnceLock<DeviceNumbers>,
}

/// A device's name and memory, as `/metrics` reports it.
pub struct DeviceNumbers {
    /// Its registry name (`Vulkan0`).
    name: String,
    /// Its memory in all.
    total: usize,
    /// Free bytes once the weights were loaded.
    free_after_weights: usize,
}

impl Metrics {
    /// Records the device the model was loaded on, with weights of `weight_bytes` in it (nothing for
    /// the CPU).
    pub fn set_device(&self, placement: &ccsm::Placement, weight_bytes: u64) {
        if let (Some((_, total)), Some(free)) = (placement.device_memory(), placement.free_after_weights(weight_bytes)) {
            let _ = self.device.set(DeviceNumbers { name: placement.name(), total, free_after_weights: free });
        }
    }

    /// The device's free bytes once the weights were loaded (None on the CPU): the default budget's base.
    pub fn device_free_after_weights(&self) -> Option<usize> {
        self.device.get().map(|d| d.free_after_weights)
    }

    /// The current values as Prometheus text exposition (what `GET /metrics` returns).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        let load = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        let count = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        gauge("ccsm_requests_running", "Requests being generated now.", "gauge", load(&self.running).to_string());
        gauge("ccsm_requests_waiting", "Requests queued for admission (queue depth).", "gauge", load(&self.waiting).to_string());
        gauge(
            "ccsm_kv_cache_bytes",
            "Bytes of the KV caches (and codec states) of running requests.",
            "gauge",
            load(&self.kv_bytes).to_string(),
        );
        gauge(
            "ccsm_kv_cache_budget_bytes",
            "The memory budget all sessions' caches share.",
            "gauge",
            load(&self.kv_budget_bytes).to_string(),
        );
        gauge(
            "ccsm_recordings_encoding",
            "Requests whose recordings (uploads, voices on first use) are being encoded now, beside the engine.",
            "gauge",
            load(&self.recordings_encoding).to_string(),
        );
        gauge(
            "ccsm_prefix_cache_bytes",
            "Bytes of cached prompt prefixes (inside the budget, beside the sessions' caches; evicted first under pressure).",
            "gauge",
            load(&self.prefix.bytes).to_string(),
        );
        gauge("ccsm_prefix_cache_entries", "Cached prompt prefixes.", "gauge", load(&self.prefix.entries).to_string());
        let ratio = load(&self.kv_bytes) as f64 / load(&self.kv_budget_bytes).max(1) as f64;
        gauge("ccsm_kv_cache_usage_ratio", "KV-cache utilisation: bytes in use over the budget (0-1).", "gauge", format!("{ratio:.6}"));
        if let Some(d) = self.device.get() {
            let name = &d.name;
            for (metric, help, value) in [
                ("ccsm_device_memory_total_bytes", "Memory of the device the model runs on.", d.total),
                (
                    "ccsm_device_memory_free_after_weights_bytes",
                    "Memory the device had free once the weights were loaded (the default KV budget's base).",
                    d.free_after_weights,
                ),
            ] {
                let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge\n{metric}{{device=\"{name}\"}} {value}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP ccsm_requests_total Requests ended, by outcome: ok, failed (a server error), cancelled (the client left), invalid (4xx), rejected (429 queue full, 503 not ready).\n# TYPE ccsm_requests_total counter"
        );
        for (outcome, n) in [
            ("ok", &self.requests_ok),
            ("failed", &self.requests_failed),
            ("invalid", &self.requests_invalid),
            ("cancelled", &self.requests_cancelled),
            ("rejected", &self.requests_rejected),
        ] {
            let _ = writeln!(out, "ccsm_requests_total{{outcome=\"{outcome}\"}} {}", n.load(Ordering::Relaxed));
        }
        let mut counter = |name: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        };
        counter("ccsm_prompt_tokens_total", "Prompt tokens (text) or backbone rows (speech) evaluated.", count(&self.prompt_tokens));
        counter("ccsm_tokens_generated_total", "Text tokens generated.", count(&self.tokens_generated));
        counter("ccsm_frames_generated_total", "Audio frames generated (80 ms each).", count(&self.frames_generated));
        counter("ccsm_engine_steps_total", "Engine steps (one graph over every running session).", count(&self.steps));
        counter("ccsm_recordings_encoded_total", "Recordings encoded into Mimi frames.", count(&self.recordings_encoded));
        counter("ccsm_prefix_cache_hits_total", "Requests that started from a cached prefix.", count(&self.prefix.hits));
        counter("ccsm_prefix_cache_misses_total", "Requests that found no cached prefix.", count(&self.prefix.misses));
        counter(
            "ccsm_prefix_cache_rows_reused_total",
            "Prompt rows not prefilled thanks to cached prefixes.",
            count(&self.prefix.rows_reused),
        );
        counter("ccsm_prefix_cache_evictions_total", "Cached prefixes evicted to make room.", count(&self.prefix.evictions));
        counter("ccsm_prefix_cache_files_refused_total", "Prefix files refused at start-up.", count(&self.prefix.files_refused));
        self.time_to_first_token.render(
            &mut out,
            "ccsm_time_to_first_token_seconds",
            "From the request's arrival to its first generated token.",
        );
        self.time_to_first_audio.render(
            &mut out,
            "ccsm_time_to_first_audio_seconds",
            "From the request's arrival to its first decoded audio.",
        );
        self.time_to_first_token_by_prefix.render(
            &mut out,
            "ccsm_prefix_time_to_first_token_seconds",
            "Time to first token, by whether the request started from a cached prefix.",
        );
        self.time_to_first_audio_by_prefix.render(
            &mut out,
            "ccsm_prefix_time_to_first_audio_seconds",
            "Time to first audio, by whether the request started from a cached prefix.",
        );
        out
    }
}

#[cfg(test)]
mod device_tests {
    use super::*;

    #[test]
    fn a_device_s_memory_is_reported_with_its_name_and_the_cpu_reports_none() {
        let m = Metrics::default();
        assert!(!m.render().contains("ccsm_device_memory"), "no device lines on the CPU");
        m.set_device(&ccsm::Placement::Cpu, 0);
        assert!(m.device_free_after_weights().is_none());
        let _ = m.device.set(DeviceNumbers { name: "Vulkan0".into(), total: 8 << 30, free_after_weights: 3 << 30 });
        let text = m.render();
        assert!(text.contains(&format!("ccsm_device_memory_total_bytes{{device=\"Vulkan0\"}} {}", 8u64 << 30)), "{text}");
        assert!(text.contains(&format!("ccsm_device_memory_free_after_weights_bytes{{device=\"Vulkan0\"}} {}", 3u64 << 30)), "{text}");
        assert_eq!(m.device_free_after_weights(), Some(3 << 30));
    }
}
