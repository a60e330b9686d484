//! Where a model runs: the CPU, or a device (a GPU through ggml's Vulkan backend) holding the weights,
//! the KV caches and every graph's intermediate tensors. The weights decide: an engine runs where its
//! model's weights are, and makes its caches there.
//!
//! A device runs ggml's own ops only (our CPU kernels — the split attention, the VNNI and interleaved
//! products, the threaded copies — have no device code), so graphs built for it take ggml's: attention
//! is `flash_attn_ext` over the cache as stored, and a cache whose K/V types the device's attention
//! does not take at the model's head size is refused when it is made, naming the device and types.

use std::rc::Rc;

use ggml::{Backend, Device, TensorStore};

use crate::error::{Error, Result};
use crate::kv_cache::KvCacheConfig;
use crate::CacheType;

/// The share of a device's free memory (after the weights) that KV caches get by default: the rest
/// is for compute buffers, which grow with the largest step (a prompt chunk of many rows).
pub const DEVICE_CACHE_SHARE: f64 = 0.8;

/// The default KV budget on a device with `free` bytes free (after the weights) for caches that
/// would take `wanted`: at most `DEVICE_CACHE_SHARE` of `free`.
pub fn device_cache_budget(wanted: usize, free: usize) -> usize {
    wanted.min((free as f64 * DEVICE_CACHE_SHARE) as usize)
}

/// Where weights, caches and graphs live.
#[derive(Clone, Default)]
pub enum Placement {
    /// Host memory, graphs on ggml's CPU backend (and our kernels).
    #[default]
    Cpu,
    /// A device's memory, graphs run whole on the device (shared by the engines and caches of one
    /// thread: ggml's device backends are not driven from several threads at once).
    Device(Rc<Device>),
}

impl Placement {
    /// `cpu`, `vulkan` (the first Vulkan device) or `vulkan:N`: the `--device` argument. A device this
    /// build or machine lacks is an error listing those it has.
    pub fn parse(spec: &str) -> Result<Placement> {
        let spec = spec.trim().to_ascii_lowercase();
        if spec == "cpu" {
            return Ok(Placement::Cpu);
        }
        let index = match spec.strip_prefix("vulkan").map(|rest| rest.strip_prefix(':').unwrap_or(rest)) {
            Some("") if spec == "vulkan" => Some(0),
            Some(n) if spec.contains(':') => n.parse::<usize>().ok(),
            _ => None,
        }
        .ok_or_else(|| Error::Input(format!("device `{spec}`: expected cpu, vulkan or vulkan:N")))?;
        if !ggml::gpu_backends().iter().any(|b| b.eq_ignore_ascii_case("vulkan")) {
            return Err(Error::Input(format!(
                "device `{spec}`: this build has no Vulkan backend (build with `--features vulkan`, see README)"
            )));
        }
        let name = format!("Vulkan{index}");
        let count = ggml::devices().iter().filter(|d| d.name.starts_with("Vulkan")).count();
        if count == 0 {
            return Err(Error::Input(format!(
                "device `{spec}`: no Vulkan device found (a CPU driver such as Mesa's lavapipe is used only when GGML_VK_VISIBLE_DEVICES names it, e.g. GGML_VK_VISIBLE_DEVICES=0)"
            )));
        }
        if index >= count {
            return Err(Error::Input(format!(
                "device `{spec}`: this machine has {count} Vulkan device(s): vulkan:0 to vulkan:{}",
                count - 1
            )));
        }
        let device = Device::open(&name).map_err(|e| Error::Input(format!("device `{spec}`: {e}")))?;
        Ok(Placement::Device(Rc::new(device)))
    }

    /// `cpu`, or the device's registry name (`Vulkan0`).
    pub fn name(&self) -> String {
        match self {
            Placement::Cpu => "cpu".into(),
            Placement::Device(d) => d.name().to_owned(),
        }
    }

    /// The device; None for the CPU.
    pub fn device(&self) -> Option<&Rc<Device>> {
        match self {
            Placement::Cpu => None,
            Placement::Device(d) => Some(d),
        }
    }

    /// Whether this is a device.
    pub fn is_device(&self) -> bool {
        self.device().is_some()
    }

    /// Bytes the device reports free and in all; None for the CPU.
    pub fn device_memory(&self) -> Option<(usize, usize)> {
        self.device().map(|d| d.memory())
    }

    /// Free bytes once weights of `weight_bytes` are in: what the device reports, but never more than
    /// its total less the weights (a device without a memory-budget query reports its whole heap free).
    pub fn free_after_weights(&self, weight_bytes: u64) -> Option<usize> {
        self.device_memory().map(|(free, total)| free.min(total.saturating_sub(weight_bytes as usize)))
    }

    /// Refuses, before anything is made, sessions' caches of `k`/`v` (and, when `fallbacks`, the
    /// narrower types a budget escalates to) with `recent` f16 cells for stacks of `shapes` (layers,
    /// head size, KV heads) that this device cannot hold: a server says so at start-up rather than
    /// failing every request.
    pub fn check_sessions(
        &self,
        shapes: &[(usize, usize, usize)],
        k: CacheType,
        v: CacheType,
        recent: usize,
        fallbacks: bool,
    ) -> Result<()> {
        let mut pairs = vec![(k, v)];
        if fallbacks {
            pairs.extend(crate::memory::ESCALATION.iter().map(|&t| (t, t)));
        }
        for &(n_layer, head_dim, n_head_kv) in shapes {
            for &(k, v) in &pairs {
                self.check_cache(&KvCacheConfig::uniform(n_layer, head_dim, n_head_kv, 1, k, v).with_recent(recent))?;
            }
        }
        Ok(())
    }

    /// Refuses a cache living in `cache`'s placement for graphs running here (a device's rows read by
    /// the CPU, or host rows by a device): `what` names the cache in the error.
    pub fn require_same(&self, cache: &Placement, what: &str) -> Result<()> {
        let same = match (self, cache) {
            (Placement::Cpu, Placement::Cpu) => true,
            (Placement::Device(a), Placement::Device(b)) => Rc::ptr_eq(a, b) || a.name() == b.name(),
            _ => false,
        };
        match same {
            true => Ok(()),
            false => Err(Error::Input(format!(
                "{what} is in {}'s memory but the engine runs on {}: make it with the engine",
                cache.name(),
                self.name()
            ))),
        }
    }

    /// The backend graphs run on here (`n_threads` for the CPU's).
    pub fn backend(&self, n_threads: usize) -> Result<Backend> {
        Ok(match self {
            Placement::Cpu => Backend::cpu(n_threads)?,
            Placement::Device(d) => Backend::on_device(Rc::clone(d)),
        })
    }

    /// Gives the store's tensors memory here.
    pub fn allocate(&self, store: &mut TensorStore) -> Result<()> {
        match self {
            Placement::Cpu => store.allocate()?,
            Placement::Device(d) => store.allocate_on(d)?,
        }
        Ok(())
    }

    /// Refuses a cache whose layers' K/V types the device's attention does not take at its head size
    /// (and a recent window, whose graphs join f16 ring cells to the stored ones with our kernel).
    pub fn check_cache(&self, config: &KvCacheConfig) -> Result<()> {
        let Placement::Device(device) = self else { return Ok(()) };
        if config.recent > 0 {
            return Err(Error::Input(format!(
                "the device {} has no recent f16 window (its attention over the ring and the stored cells is our CPU kernel): use --kv-recent 0",
                device.name()
            )));
        }
        let mut checked = Vec::new();
        for layer in 0..config.n_layer {
            let types = config.types(layer);
            if !checked.contains(&(types.k, types.v)) {
                if !device.attends(types.k.dtype(), types.v.dtype(), config.head_dim)? {
                    return Err(Error::Input(format!(
                        "the device {} has no attention over a {} K / {} V cache at head size {}: choose another cache type (`ccsm-infer system` lists the ones it takes)",
                        device.name(),
                        types.k,
                        types.v,
                        config.head_dim
                    )));
                }
                checked.push((types.k, types.v));
            }
        }
        Ok(())
    }
}

/// The cache types (K and V alike) whose attention a device takes at head size `head_dim`.
pub fn device_cache_types(device: &Device, head_dim: usize) -> Vec<CacheType> {
    CacheType::ALL.iter().copied().filter(|t| device.attends(t.dtype(), t.dtype(), head_dim).unwrap_or(false)).collect()
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_or_say_what_is_expected() {
        assert!(matches!(Placement::parse("cpu"), Ok(Placement::Cpu)));
        assert!(matches!(Placement::parse(" CPU "), Ok(Placement::Cpu)));
        for bad in ["gpu", "vulkan:", "vulkan:-1", "vulkan0", "cuda"] {
            let e = Placement::parse(bad).unwrap_err().to_string();
            assert!(e.contains("cpu, vulkan or vulkan:N"), "{bad}: {e}");
        }
        if ggml::gpu_backends().is_empty() {
            let e = Placement::parse("vulkan:1").unwrap_err().to_string();
            assert!(e.contains("--features vulkan"), "{e}");
        }
    }

    #[test]
    fn the_cpu_takes_every_cache_and_a_device_keeps_a_share_for_compute() {
        let cpu = Placement::Cpu;
        assert_eq!(device_cache_budget(1000, 10_000), 1000);
        assert_eq!(device_cache_budget(usize::MAX, 10_000), 8000);
        assert!(cpu.require_same(&Placement::Cpu, "a cache").is_ok());
        let config = KvCacheConfig::uniform(2, 32, 2, 64, CacheType::MXFP4, CacheType::Q4_0).with_recent(8);
        assert!(cpu.check_cache(&config).is_ok());
        assert_eq!(cpu.name(), "cpu");
    }
}
