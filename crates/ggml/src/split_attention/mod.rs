//! Attention of a few query rows over many cached cells, split across threads by cells: ggml's own
//! split-KV path takes F16/F32 caches only, so over a quantized cache decode work splits over query
//! heads alone (9 heads on 2 threads for SmolLM2) and every V row is dequantized once per query head.
//!
//! Two custom ops. `partials`: each part (a slice of the cells) decodes its K and V rows once per KV
//! head, in blocks of 32 cells, scores them against every (query row, head) pair of that head's group
//! in tiles of pairs that share each loaded key and value vector, and keeps an online softmax (max,
//! sum, weighted V sum) per pair. `merge`: the parts' results combined. `rows` turns cache rows into
//! f32, `math` holds the inner loops (`math256`: AVX2/FMA/F16C, `math512`: AVX-512, when the CPU has
//! them), whose per-pair sums run in one fixed order whatever the tile: while the cells split into
//! the same parts (up to `MIN_PARTS` always; past that the parts of long prompts are capped by
//! `PARTIALS_BYTES`), a row's result does not depend on the rows computed beside it.

mod math;
#[cfg(target_arch = "x86_64")]
mod math256;
#[cfg(target_arch = "x86_64")]
mod math512;
mod rows;

use std::os::raw::{c_int, c_void};
use std::ptr::NonNull;

use ggml_sys as sys;

use crate::context::{Context, Tensor};
use crate::error::{Error, Result};
use crate::DType;
use math::{Math, Portable};
use rows::RowKind;

/// Cells decoded and scored together.
const BLOCK: usize = 32;
/// Fewest cells per part worth a thread's share.
const CELLS_PER_PART: i64 = 128;
/// Most parts (the merge reads all of them).
const MAX_PARTS: i64 = 64;
/// Bytes of partial results above which parts are merged into fewer: many query rows (a prompt)
/// keep two threads busy with a few parts, and each part's results cost `n_q · n_head` columns.
const PARTIALS_BYTES: i64 = 16 << 20;
/// Fewest parts when there are cells enough: a causal prompt's later cells have fewer live rows,
/// so a few more parts than threads keep them balanced.
const MIN_PARTS: i64 = 8;

/// One set of cells attention reads: K `[hd, n_kv, n_head_kv]`, V `[hd_v, n_kv, n_head_kv]` (any row
/// type ggml dequantizes; views with any strides) and its f16 mask `[n_kv, >= n_q]`.
#[derive(Clone, Copy)]
pub struct AttentionSource<'c> {
    /// Keys of the cells, `[hd, n_kv, n_head_kv]`.
    pub k: Tensor<'c>,
    /// Values of the same cells, `[hd_v, n_kv, n_head_kv]`.
    pub v: Tensor<'c>,
    /// F16 mask added to the scores, `[n_kv, >= n_q]`: 0 where a query sees a cell, -inf where not.
    pub mask: Tensor<'c>,
}

impl Context {
    /// `softmax(q kᵀ · scale + mask) v` for few query rows, with the shapes and result layout of
    /// `flash_attn_ext`: q `[hd, n_q, n_head]` f32, k `[hd, n_kv, n_head_kv]`, v `[hd_v, n_kv, n_head_kv]`
    /// (any row type ggml dequantizes; views with any strides), mask f16 `[n_kv, >= n_q]`; result
    /// `[hd_v, n_head, n_q]`. The cells are split into parts computed in parallel and merged.
    pub fn split_attention<'c>(&'c self, q: Tensor<'c>, k: Tensor<'c>, v: Tensor<'c>, mask: Tensor<'c>, scale: f32) -> Result<Tensor<'c>> {
        self.split_attention_over(q, &[AttentionSource { k, v, mask }], scale)
    }

    /// `split_attention` over the union of several sets of cells (each in its own type, under its
    /// own mask), as one softmax: up to `SOURCES_PER_NODE` sources share one partials node (their
    /// parts split across the threads together), and one merge combines every part.
    pub fn split_attention_over<'c>(&'c self, q: Tensor<'c>, sources: &[AttentionSource<'c>], scale: f32) -> Result<Tensor<'c>> {
        const OP: &str = "split_attention";
        if self.builds_for_device() {
            return Err(Error::invalid(OP, "the split attention kernel runs on the CPU; a device graph attends with flash_attn_ext"));
        }
        let first = sources.first().ok_or_else(|| Error::shape(OP, "at least one source of cells", &[q.shape()]))?;
        for s in sources {
            if s.k.ne(2) != first.k.ne(2) || s.v.ne(0) != first.v.ne(0) {
                return Err(Error::shape(OP, "sources differ in kv heads or value width", &[first.k.shape(), s.k.shape(), s.v.shape()]));
            }
            check_source(q, *s, scale)?;
        }
        let mut joined: Option<Tensor<'c>> = None;
        for group in sources.chunks(SOURCES_PER_NODE) {
            let partials = self.attention_partials(q, group, scale)?;
            joined = Some(match joined {
                Some(prev) => self.concat(prev, partials, 3)?,
                None => partials,
            });
        }
        let partials = joined.expect("one source at least");
        let hd_v = first.v.ne(0);
        // SAFETY: one live f32 source of shape [2 + hd_v, n_head, n_q, parts], as `merge_kernel` reads;
        // it writes [hd_v, n_head, n_q]; no userdata.
        unsafe { self.custom_f32(OP, [hd_v, q.ne(2), q.ne(1), 1], &[partials], merge_kernel, -1, 0) }
    }

    /// The partials node of up to `SOURCES_PER_NODE` checked sources: `[2 + hd_v, n_head, n_q, parts]`
    /// (max, sum, Σ weight·v per part), each source's parts after the previous source's.
    fn attention_partials<'c>(&'c self, q: Tensor<'c>, sources: &[AttentionSource<'c>], scale: f32) -> Result<Tensor<'c>> {
        const OP: &str = "split_attention";
        let hd_v = sources[0].v.ne(0);
        let parts: i64 = sources.iter().map(|s| parts_of(s.k.ne(1), hd_v, q.ne(2), q.ne(1))).sum();
        let mut args = vec![q];
        args.extend(sources.iter().flat_map(|s| [s.k, s.v, s.mask]));
        // SAFETY: every source passed the checks flash attention makes (check_source), which is what
        // `partials_kernel` relies on; it writes [2 + hd_v, n_head, n_q, parts]; args holds
        // 1 + 3 × sources < GGML_MAX_SRC tensors; the scale travels as the userdata's bits.
        let partials = unsafe {
            self.custom_f32(OP, [2 + hd_v, q.ne(2), q.ne(1), parts], &args, partials_kernel, parts as c_int, scale.to_bits() as usize)
        }?;
        Ok(partials.set_name("attn_partials"))
    }
}

/// Sources one partials node takes (q and three tensors each: ggml takes fewer than 10 arguments).
const SOURCES_PER_NODE: usize = 2;

/// Parts a source of `n_kv` cells is split into (the kernel recomputes it to find each source's).
fn parts_of(n_kv: i64, hd_v: i64, n_head: i64, n_q: i64) -> i64 {
    let part_bytes = (2 + hd_v) * n_head * n_q * 4;
    (n_kv / CELLS_PER_PART).clamp(1, MAX_PARTS).min((PARTIALS_BYTES / part_bytes).max(MIN_PARTS))
}

/// The checks `partials_kernel` relies on for one source.
fn check_source(q: Tensor<'_>, source: AttentionSource<'_>, scale: f32) -> Result<()> {
    const OP: &str = "split_attention";
    let AttentionSource { k, v, mask } = source;
    crate::ops::check_attention(OP, q, k, v, Some(mask), scale)?;
    let sm = mask.shape();
    if q.ne(3) != 1 || sm[2] != 1 || sm[3] != 1 {
        return Err(Error::shape(OP, "one batch, and one mask row per query shared by every head", &[q.shape(), sm]));
    }
    for t in [k, v] {
        if RowKind::of(t.dtype()).is_none() {
            return Err(Error::Type { op: OP, got: t.dtype(), why: "ggml has no dequantizer for these rows" });
        }
    }
    Ok(())
}

/// A tensor's data pointer, sizes and byte strides.
#[derive(Clone, Copy)]
struct View {
    data: *const u8,
    nb: [usize; 4],
    ne: [i64; 4],
    dtype: DType,
}

impl View {
    /// # Safety
    /// `t` is a live, allocated tensor.
    unsafe fn of(t: *const sys::ggml_tensor) -> View {
        // SAFETY: the caller's contract.
        let t = unsafe { &*t };
        View { data: t.data as *const u8, nb: t.nb, ne: t.ne, dtype: DType::from_sys(t.type_).unwrap_or(DType::F32) }
    }

    fn at(&self, i1: i64, i2: i64, i3: i64) -> *const u8 {
        // The offset of an element the caller knows to be inside the tensor.
        self.data.wrapping_add(i1 as usize * self.nb[1] + i2 as usize * self.nb[2] + i3 as usize * self.nb[3])
    }
}

/// One partials node: its operands and the sizes the loops run over.
struct Job {
    out: View,
    q: View,
    k: View,
    v: View,
    mask: View,
    k_rows: RowKind,
    v_rows: RowKind,
    scale: f32,
    hd: usize,
    hd_v: usize,
    group: usize,
    per_part: i64,
    /// This source's parts, and the first of them among the node's.
    parts: i64,
    first_part: i64,
}

/// Per-thread buffers: a block's decoded rows (the keys also as columns), the queries, the live pairs
/// of the block, their scores and weights, and the online-softmax state (max, sum, Σ weight·v) of
/// every pair.
struct Scratch {
    keys: Aligned,
    keys_t: Aligned,
    values: Aligned,
    pairs: Vec<usize>,
    queries: Aligned,
    weights: Vec<f32>,
    acc: Aligned,
    state: Vec<(f32, f32)>,
    /// Each query row's mask over the block, and whether any of its cells is visible.
    masks: Vec<f32>,
    live: Vec<bool>,
}

/// Zeroed f32s starting on a 64-byte boundary, so rows of a multiple of 16 floats never straddle
/// cache lines (a 512-bit load across two lines costs two).
struct Aligned {
    buf: Vec<f32>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn zeros(len: usize) -> Aligned {
        let buf = vec![0.0f32; len + 16];
        let start = (16 - (buf.as_ptr() as usize / 4) % 16) % 16;
        Aligned { buf, start, len }
    }
}

impl std::ops::Deref for Aligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// Whether our AVX2 kernels can run here.
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Thread `ith` of `nth` computes the parts `ith, ith + nth, …` of the cells for every query row and
/// head: (max, sum, Σ weight·v) of an online softmax over the part's cells.
unsafe extern "C" fn partials_kernel(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, userdata: *mut c_void) {
    let Some(dst) = NonNull::new(dst) else { return };
    // SAFETY: ggml calls this for the node built by `attention_partials`: dst, q and each source's K,
    // V and mask are live and allocated, with the shapes and types `check_source` checked; unused
    // source slots are null.
    let (out, q, sources) = unsafe {
        let d = dst.as_ref();
        let n = d.src.iter().skip(1).take_while(|s| !s.is_null()).count() / 3;
        let sources: Vec<[View; 3]> =
            (0..n).map(|i| [View::of(d.src[1 + 3 * i]), View::of(d.src[2 + 3 * i]), View::of(d.src[3 + 3 * i])]).collect();
        (View::of(d), View::of(d.src[0]), sources)
    };
    let mut jobs = Vec::with_capacity(sources.len());
    let mut first_part = 0;
    for [k, v, mask] in sources {
        let (Some(k_rows), Some(v_rows)) = (RowKind::of(k.dtype), RowKind::of(v.dtype)) else { return };
        let parts = parts_of(k.ne[1], v.ne[0], q.ne[2], q.ne[1]);
        jobs.push(Job {
            out,
            q,
            k,
            v,
            mask,
            k_rows,
            v_rows,
            scale: f32::from_bits(userdata as usize as u32),
            hd: q.ne[0] as usize,
            hd_v: v.ne[0] as usize,
            group: (q.ne[2] / k.ne[2]) as usize,
            per_part: (k.ne[1] + parts - 1) / parts,
            parts,
            first_part,
        });
        first_part += parts;
    }
    if jobs.is_empty() || first_part != out.ne[3] {
        return; // not the node `attention_partials` built
    }
    let (first, step) = (ith.max(0) as i64, nth.max(1) as i64);
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C (checked); the jobs' views are as
        // `run_parts` needs.
        unsafe { run_parts_avx512(&jobs, first, step) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked); the jobs' views are as `run_parts` needs.
        unsafe { run_parts_avx2(&jobs, first, step) };
        return;
    }
    // SAFETY: the jobs' views are as `run_parts` needs.
    unsafe { run_parts::<Portable>(&jobs, first, step) };
}

/// Whether our AVX-512 loops run here: the CPU has AVX-512F and ggml was built for it too (so that a
/// build for AVX2 machines, `CCSM_GGML_MARCH=x86-64-v3`, runs what those machines run).
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static BUILT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        has_avx2() && std::arch::is_x86_feature_detected!("avx512f") && *BUILT.get_or_init(|| crate::cpu_features().contains(&"AVX512"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// # Safety
/// As `run_parts`, on a CPU with AVX-512F, AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn run_parts_avx512(jobs: &[Job], first: i64, step: i64) {
    // SAFETY: the caller's contract.
    unsafe { run_parts::<math512::Avx512>(jobs, first, step) }
}

/// # Safety
/// As `run_parts`, on a CPU with AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_parts_avx2(jobs: &[Job], first: i64, step: i64) {
    // SAFETY: the caller's contract.
    unsafe { run_parts::<math256::Avx2>(jobs, first, step) }
}

/// # Safety
/// The jobs' views are the live operands `split_attention_over` checked (one query tensor, one
/// value width and KV head count for all); the CPU has `M`'s features.
#[inline(always)]
unsafe fn run_parts<M: Math>(jobs: &[Job], first: i64, step: i64) {
    let job = &jobs[0];
    let (hd, hd_v, rows) = (job.hd, job.hd_v, (job.q.ne[1] * job.q.ne[2]) as usize);
    let mut s = Scratch {
        keys: Aligned::zeros(BLOCK * hd),
        keys_t: Aligned::zeros(BLOCK * hd),
        values: Aligned::zeros(BLOCK * hd_v),
        pairs: Vec::with_capacity(rows),
        queries: Aligned::zeros(rows * hd),
        weights: vec![0.0; job.q.ne[1] as usize * job.group * BLOCK],
        acc: Aligned::zeros(rows * hd_v),
        state: vec![(f32::NEG_INFINITY, 0.0); rows],
        masks: vec![0.0; job.q.ne[1] as usize * BLOCK],
        live: vec![false; job.q.ne[1] as usize],
    };
    let mut part = first;
    while part < job.out.ne[3] {
        let Some(job) = jobs.iter().find(|j| part < j.first_part + j.parts) else { return };
        // SAFETY: the caller's contract.
        unsafe { one_part::<M>(job, &mut s, part - job.first_part) };
        part += step;
    }
}

/// Every query row and head over the cells of `part`, block by block: each KV head's K and V rows of
/// a block are decoded once for all query rows and the KV head's group of query heads (a block's cells
/// hold every KV head's rows side by side, so memory is read in order). The (query row, head) pairs
/// are indexed `qi * n_head + h` in the scratch buffers.
///
/// # Safety
/// As `run_parts`.
#[inline(always)]
unsafe fn one_part<M: Math>(job: &Job, s: &mut Scratch, part: i64) {
    let (hd, hd_v, group) = (job.hd, job.hd_v, job.group);
    let (n_q, n_head) = (job.q.ne[1] as usize, job.q.ne[2] as usize);
    for (i, row) in s.queries.chunks_exact_mut(hd).enumerate() {
        // SAFETY: query row i / n_head of head i % n_head is hd contiguous f32 values (checked layout).
        let src = unsafe { std::slice::from_raw_parts(job.q.at((i / n_head) as i64, (i % n_head) as i64, 0).cast::<f32>(), hd) };
        row.iter_mut().zip(src).for_each(|(d, &x)| *d = x * job.scale);
    }
    s.state.iter_mut().for_each(|st| *st = (f32::NEG_INFINITY, 0.0));
    s.acc.iter_mut().for_each(|a| *a = 0.0);
    let (c0, c1) = (part * job.per_part, ((part + 1) * job.per_part).min(job.k.ne[1]));
    let mut c = c0;
    while c < c1 {
        let n = ((c1 - c) as usize).min(BLOCK);
        let first = c;
        c += n as i64;
        for (qi, (mask, live)) in s.masks.chunks_exact_mut(BLOCK).zip(s.live.iter_mut()).enumerate() {
            // SAFETY: row qi of the f16 mask holds n_kv halves (checked shape); first + n <= n_kv.
            unsafe { M::halves(job.mask.at(qi as i64, 0, 0).cast::<u16>().add(first as usize), &mut mask[..n]) };
            *live = mask[..n].iter().any(|m| *m != f32::NEG_INFINITY);
        }
        if !s.live.contains(&true) {
            continue;
        }
        for g in 0..job.k.ne[2] as usize {
            for j in 0..n {
                // SAFETY: cell first + j of KV head g is a row of hd elements of the cache type in k.
                unsafe { rows::decode_row::<M>(job.k_rows, job.k.at(first + j as i64, g as i64, 0), &mut s.keys[j * hd..(j + 1) * hd]) };
            }
            M::transpose(&s.keys, hd, &mut s.keys_t);
            s.pairs.clear();
            for qi in (0..n_q).filter(|&qi| s.live[qi]) {
                s.pairs.extend((g * group..(g + 1) * group).map(|h| qi * n_head + h));
            }
            M::scores(&s.queries, hd, &s.pairs, &s.keys_t, &mut s.weights);
            for (&i, w) in s.pairs.iter().zip(s.weights.chunks_exact_mut(BLOCK)) {
                let mask = &s.masks[(i / n_head) * BLOCK..][..n];
                let (max, sum) = &mut s.state[i];
                if let Some(rescale) = M::softmax_block(&mut w[..n], mask, max, sum) {
                    if rescale != 1.0 {
                        s.acc[i * hd_v..(i + 1) * hd_v].iter_mut().for_each(|a| *a *= rescale);
                    }
                }
            }
            for j in 0..n {
                // SAFETY: as for the keys, in v.
                unsafe {
                    rows::decode_row::<M>(job.v_rows, job.v.at(first + j as i64, g as i64, 0), &mut s.values[j * hd_v..(j + 1) * hd_v])
                };
            }
            M::accumulate(&mut s.acc, hd_v, &s.pairs, &s.weights, n, &s.values);
        }
    }
    for (i, (&(max, sum), acc)) in s.state.iter().zip(s.acc.chunks_exact(hd_v)).enumerate() {
        let at = job.out.at((i % n_head) as i64, (i / n_head) as i64, job.first_part + part);
        // SAFETY: dst is [2 + hd_v, n_head, n_q, parts] f32; this writes one column of this source's part.
        let column = unsafe { std::slice::from_raw_parts_mut(at as *mut f32, 2 + hd_v) };
        column[0] = max;
        column[1] = sum;
        column[2..].copy_from_slice(acc);
    }
}

/// Thread `ith` of `nth` merges the parts of its share of (query row, head) columns.
unsafe extern "C" fn merge_kernel(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, _userdata: *mut c_void) {
    let Some(dst) = NonNull::new(dst) else { return };
    // SAFETY: ggml calls this for the merge node built by `split_attention`: dst [hd_v, n_head, n_q]
    // and its source, the partials [2 + hd_v, n_head, n_q, parts], are live and allocated f32 tensors.
    let (out, partials) = unsafe { (View::of(dst.as_ptr()), View::of(dst.as_ref().src[0])) };
    let (hd_v, n_head, n_q, parts) = (out.ne[0] as usize, out.ne[1], out.ne[2], partials.ne[3]);
    let columns = n_head * n_q;
    let part = |h: i64, qi: i64, p: i64| -> &[f32] {
        // SAFETY: as above; each part's column is 2 + hd_v floats.
        unsafe { std::slice::from_raw_parts(partials.at(h, qi, p).cast::<f32>(), 2 + hd_v) }
    };
    for column in (ith.max(0) as i64..columns).step_by(nth.max(1) as usize) {
        let (h, qi) = (column % n_head, column / n_head);
        // SAFETY: as above; the output column is hd_v floats, written by this thread only.
        let target = unsafe { std::slice::from_raw_parts_mut(out.at(h, qi, 0) as *mut f32, hd_v) };
        target.iter_mut().for_each(|t| *t = 0.0);
        let max = (0..parts).map(|p| part(h, qi, p)[0]).fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            continue; // every cell masked: ggml's kernels give zeros too
        }
        let mut sum = 0.0;
        for r in (0..parts).map(|p| part(h, qi, p)).filter(|r| r[0] != f32::NEG_INFINITY) {
            let w = crate::custom::exp_nonpositive(r[0] - max);
            sum += w * r[1];
            for (t, &a) in target.iter_mut().zip(&r[2..]) {
                *t += w * a;
            }
        }
        target.iter_mut().for_each(|t| *t /= sum);
    }
}
