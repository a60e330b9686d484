//! ggml's Vulkan backend (the `vulkan` feature) against the CPU backend, on whatever Vulkan device is
//! visible — in CI Mesa's lavapipe, a CPU driver ggml uses only when `GGML_VK_VISIBLE_DEVICES` names
//! it. Without a device the tests say so and pass, unless `CCSM_REQUIRE_VULKAN=1` (CI) makes that a
//! failure. Weights and intermediate tensors live in the device's memory; a graph with an op the
//! device cannot run is refused before it runs.
#![cfg(feature = "vulkan")]

mod common;

use common::Rng;
use ggml::{Backend, ComputeBuffer, Context, DType, Device, DeviceKind, Tensor, TensorStore};

/// ggml's Vulkan backend is not to be driven from several test threads at once (it aborted): each
/// test holds this while it uses the device.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The first Vulkan device, or None (a failure when CI requires one).
fn vulkan() -> Option<Device> {
    let found = ggml::devices().into_iter().find(|d| d.name.starts_with("Vulkan"));
    if found.is_none() {
        assert!(
            std::env::var("CCSM_REQUIRE_VULKAN").is_err(),
            "CCSM_REQUIRE_VULKAN is set but no Vulkan device is visible: {:?}",
            ggml::devices()
        );
        eprintln!("no Vulkan device visible (lavapipe needs GGML_VK_VISIBLE_DEVICES=0): skipped");
    }
    found.map(|d| Device::open(&d.name).unwrap())
}

#[test]
fn the_build_lists_vulkan_and_its_devices() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    assert_eq!(ggml::gpu_backends(), vec!["vulkan"]);
    let devices = ggml::devices();
    assert_eq!(devices.iter().filter(|d| d.kind == DeviceKind::Cpu).count(), 1, "{devices:?}");
    if let Some(device) = vulkan() {
        let (free, total) = device.memory();
        assert!(total > 0 && free <= total, "{free} of {total}");
        assert!(Device::open("CPU").is_err(), "the CPU is not a Device");
        assert!(Device::open("Vulkan99").is_err());
    }
}

/// One graph computed on the CPU backend and on the device: `weights` (type, shape, bytes) stored in
/// each one's memory, `build` makes the graph's input and output from them, `input` fills the input.
/// Returns the CPU's output, then the device's.
fn cpu_and_device(
    device: &Device,
    weights: &[(DType, &[i64], &[u8])],
    input: &[f32],
    build: impl for<'c> Fn(&'c Context, &[Tensor<'c>]) -> (Tensor<'c>, Tensor<'c>),
) -> [Vec<f32>; 2] {
    [false, true].map(|on_device| {
        let mut store = TensorStore::new(weights.len()).unwrap();
        let ids: Vec<_> =
            weights.iter().enumerate().map(|(i, (dtype, shape, _))| store.add(&format!("w{i}"), *dtype, shape).unwrap()).collect();
        if on_device { store.allocate_on(device) } else { store.allocate() }.unwrap();
        for (&id, (_, _, bytes)) in ids.iter().zip(weights) {
            store.get(id).write_bytes(bytes).unwrap();
        }
        let mut compute = if on_device { ComputeBuffer::on(device) } else { ComputeBuffer::new() }.unwrap();
        let ctx = compute.context(32, 32).unwrap();
        let tensors: Vec<Tensor<'_>> = ids.iter().map(|&id| store.get(id)).collect();
        let (x, y) = build(&ctx, &tensors);
        let (x, y) = (x.set_input(), y.set_output());
        let mut graph = ctx.new_graph(32).unwrap();
        graph.expand(y).unwrap();
        ctx.allocate(&graph).unwrap();
        x.write_f32(input).unwrap();
        if on_device { device.compute(&graph) } else { Backend::cpu_exact(2).unwrap().compute(&graph) }.unwrap();
        y.read_f32().unwrap()
    })
}

/// Signal-to-noise ratio of `got` against `want`, in dB.
fn snr_db(want: &[f32], got: &[f32]) -> f64 {
    let signal: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    let noise: f64 = want.iter().zip(got).map(|(&w, &g)| (w as f64 - g as f64).powi(2)).sum();
    10.0 * (signal / noise.max(1e-30)).log10()
}

/// Products of f16, q8_0, q4_0 and q4_1 weights with 1 and 7 f32 columns on the device give the CPU
/// backend's values within 60 dB (the CPU quantizes the columns to 8 bits for quantized weights, the
/// device need not: the floor between them is that rounding, ≈ 2^-8 of each column block).
#[test]
fn device_products_match_the_cpu() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(device) = vulkan() else { return };
    let (k, m) = (256usize, 48usize);
    for dtype in [DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1] {
        for n in [1usize, 7] {
            let mut rng = Rng::new((k + m + n) as u64);
            let bytes = dtype.quantize(&rng.normals(k * m), k).unwrap();
            let xs = rng.normals(k * n);
            let shape = [k as i64, m as i64];
            // In a graph built for a device `product` is ggml's product (our kernels are the CPU's).
            let outputs = cpu_and_device(&device, &[(dtype, &shape, &bytes)], &xs, |ctx, w| {
                let x = ctx.new_tensor(DType::F32, &[k as i64, n as i64]).unwrap();
                (x, ctx.product(w[0], x).unwrap())
            });
            let w = common::decode(dtype, &bytes, k * m);
            let exact: Vec<f32> =
                (0..n * m).map(|i| (0..k).map(|j| w[(i % m) * k + j] as f64 * xs[(i / m) * k + j] as f64).sum::<f64>() as f32).collect();
            let (cpu, dev) = (snr_db(&exact, &outputs[0]), snr_db(&exact, &outputs[1]));
            eprintln!("{dtype} × {n}: CPU {cpu:.1} dB, device {dev:.1} dB against f64");
            assert!(dev >= 60.0 || dev >= cpu - 3.0, "{dtype} × {n} columns: device {dev:.1} dB, CPU {cpu:.1} dB against f64");
        }
    }
}

/// Flash attention over every cache type the device says it takes (K and V of one type) on the
/// device against the CPU's: ≥ 40 dB, under the floor the CPU sets by rounding the queries to the K
/// type's dot type (8 bits for quantized K: 45–46 dB measured on lavapipe; f16 55 dB).
#[test]
fn device_attention_matches_the_cpu() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(device) = vulkan() else { return };
    let (hd, heads, kv_heads, n_kv, n) = (64usize, 4usize, 2usize, 96usize, 3usize);
    let types = [DType::F32, DType::F16, DType::Q8_0, DType::Q5_1, DType::Q5_0, DType::Q4_1, DType::Q4_0, DType::IQ4NL];
    for kv in types.into_iter().filter(|&kv| device.attends(kv, kv, hd).unwrap()) {
        let mut rng = Rng::new(7);
        let k_bytes = kv.quantize(&rng.normals(hd * kv_heads * n_kv), hd).unwrap();
        let v_bytes = kv.quantize(&rng.normals(hd * kv_heads * n_kv), hd).unwrap();
        let q = rng.normals(hd * heads * n);
        let shape = [hd as i64, n_kv as i64, kv_heads as i64];
        let outputs = cpu_and_device(&device, &[(kv, &shape, &k_bytes), (kv, &shape, &v_bytes)], &q, |ctx, kv| {
            let q = ctx.new_tensor(DType::F32, &[hd as i64, n as i64, heads as i64]).unwrap();
            (q, ctx.flash_attn_ext(q, kv[0], kv[1], None, 1.0 / (hd as f32).sqrt()).unwrap())
        });
        let snr = snr_db(&outputs[0], &outputs[1]);
        eprintln!("{kv} K/V attention: device vs CPU {snr:.1} dB");
        assert!(snr >= 40.0, "{kv} K/V: device vs CPU attention {snr:.1} dB");
    }
}

/// Our own CPU kernels (here the split attention) have no device path: the graph is refused with
/// the op and the device named, before anything runs.
#[test]
fn cpu_only_ops_are_refused_by_name() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(device) = vulkan() else { return };
    let mut compute = ComputeBuffer::on(&device).unwrap();
    let ctx = compute.context(8, 8).unwrap();
    let w = ctx.new_tensor(DType::Q8_0, &[64, 16]).unwrap();
    let x = ctx.new_tensor(DType::F32, &[64, 2]).unwrap();
    let y = ctx.mul_mat_vnni(w, x).or_else(|_| {
        ctx.mul_mat_few_columns(ctx.new_tensor(DType::Q4_1, &[64, 16]).unwrap(), ctx.new_tensor(DType::F32, &[64, 4]).unwrap())
    });
    let Ok(y) = y else {
        eprintln!("no CPU-only kernel applies on this CPU: skipped");
        return;
    };
    let mut graph = ctx.new_graph(8).unwrap();
    graph.expand(y).unwrap();
    ctx.allocate(&graph).unwrap();
    let err = device.compute(&graph).unwrap_err().to_string();
    assert!(err.contains(device.name()) && err.contains("CUSTOM"), "{err}");
}

/// Which K/V cache types the device's attention takes, asked of the device (the types it takes run
/// in `device_attention_matches_the_cpu`). Every Vulkan flash-attention path takes f16, none has an
/// mxfp4 K (ggml-vulkan has no such shader): the answers must say so, and a real graph over a refused
/// type must be refused by `compute` as well, naming the op.
#[test]
fn the_device_says_which_cache_types_it_attends_over() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(device) = vulkan() else { return };
    let types = [DType::F32, DType::F16, DType::Q8_0, DType::Q5_1, DType::Q5_0, DType::Q4_1, DType::Q4_0, DType::IQ4NL];
    for hd in [64usize, 128] {
        let table: Vec<String> = types
            .iter()
            .flat_map(|&k| types.iter().map(move |&v| (k, v)))
            .map(|(k, v)| format!("{k}/{v}:{}", if device.attends(k, v, hd).unwrap() { "yes" } else { "no" }))
            .collect();
        eprintln!("head {hd}: {}", table.join(" "));
        assert!(device.attends(DType::F16, DType::F16, hd).unwrap(), "f16 at head size {hd}");
        assert!(!device.attends(DType::MXFP4, DType::F16, hd).unwrap(), "mxfp4 K at head size {hd}");
    }
    let mut compute = ComputeBuffer::on(&device).unwrap();
    let ctx = compute.context(8, 8).unwrap();
    let q = ctx.new_tensor(DType::F32, &[64, 1, 2]).unwrap();
    let (k, v) = (ctx.new_tensor(DType::MXFP4, &[64, 256, 1]).unwrap(), ctx.new_tensor(DType::F16, &[64, 256, 1]).unwrap());
    let mut graph = ctx.new_graph(8).unwrap();
    graph.expand(ctx.flash_attn_ext(q, k, v, None, 0.125).unwrap()).unwrap();
    ctx.allocate(&graph).unwrap();
    let err = device.compute(&graph).unwrap_err().to_string();
    assert!(err.contains(device.name()) && err.contains("FLASH_ATTN_EXT") && err.contains("mxfp4"), "{err}");
}
