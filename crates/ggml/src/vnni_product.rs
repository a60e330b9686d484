//! Products of Q8_0, Q4_0 and Q4_1 weights with many f32 columns (prompt rows, batched steps) on
//! AVX-512 VNNI. ggml's product (llamafile's tinyBLAS) spends about 7 instructions on each (weight
//! block, column block) pair: two sign fixes, a 256-bit dot, a conversion, a shuffle and a
//! multiply-add. Here the columns are laid out so that a vector holds one 4-byte group of 16
//! columns: a weight block's 4-byte groups, broadcast, meet 16 columns in 8 VNNI dots, each then
//! converted and added into its own accumulator — about 2 instructions a pair.
//!
//! The result is ggml's bit for bit: ggml's dot products (and tinyBLAS) keep 8 lanes per (row,
//! column), lane `g` adding block by block `d_row·d_column × (the dot of the block's group g of 4
//! bytes)` with one fused multiply-add, then sum the lanes in a fixed tree (Q4_1 adds its offsets'
//! sum last). Here lane `g` of each column is accumulator `g` of the tile — the same operations in
//! the same order, 16 columns at a time — so a prompt cut into other chunks, or a step batching other
//! sequences, gives every row the bits it gets alone.
//!
//! Two custom ops. `pack`: the columns quantized by ggml's own quantizer for the weight type (Q8_0,
//! or Q8_1 for Q4_1: the values and scaled sums its product uses), stored as unsigned bytes (+128) in
//! tiles of 16 columns, with their scales and scaled sums. `product`: each thread's rows, 64 at a
//! time unpacked to signed bytes, against every tile; the +128 is taken back exactly by starting each
//! group's dot from −128 × the weight group's byte sum.

use std::os::raw::{c_int, c_void};

use ggml_sys as sys;

use crate::context::{Context, Tensor};
use crate::error::{Error, Result};
use crate::DType;

/// Elements per block (of every weight type here, and of the packed columns).
const BLOCK: usize = 32;
/// Bytes of a Q8_0 block (f16 scale, 32 signed bytes).
const Q8_0_BYTES: usize = 34;
/// Columns a tile holds (one 512-bit vector of 4-byte groups).
const TILE: usize = 16;
/// Bytes of one block of one tile: 8 groups of 4 bytes for each of 16 columns.
const TILE_BLOCK_BYTES: usize = BLOCK * TILE;
/// Bytes of a Q8_1 block (f16 scale, f16 scale × sum, 32 signed bytes).
const Q8_1_BYTES: usize = 36;
/// Fewest columns the kernel takes (one column goes to ggml's dot products, as two or more go to
/// tinyBLAS there).
pub const MIN_VNNI_COLUMNS: i64 = 2;
/// Fewest columns `Context::product` sends here: below a tile of 16, packing the columns and
/// unpacking every weight row cost more than the dots save (4 CSM streams ran at half of ggml's
/// frames/s with their 4-column products here). The bits are ggml's either way.
pub(crate) const PRODUCT_VNNI_COLUMNS: i64 = TILE as i64;

impl Context {
    /// `mul_mat(w, x)` for Q8_0, Q4_0 or Q4_1 `w` `[k, m]` and f32 `x` `[k, n]` through the VNNI
    /// kernel (an error where it does not apply: see `vnni_product_applies`).
    pub fn mul_mat_vnni<'c>(&'c self, w: Tensor<'c>, x: Tensor<'c>) -> Result<Tensor<'c>> {
        const OP: &str = "mul_mat_vnni";
        if !vnni_product_applies(w, x, MIN_VNNI_COLUMNS) {
            return Err(Error::shape(
                OP,
                format!("needs q8_0, q4_0 or q4_1 weights and >= {MIN_VNNI_COLUMNS} contiguous f32 columns of a whole number of blocks, 2-D, on AVX-512 VNNI"),
                &[w.shape(), x.shape()],
            ));
        }
        let (k, n) = (x.ne(0) as usize, x.ne(1) as usize);
        let floats = packed_bytes(k, n).div_ceil(4) as i64;
        let q8_1 = w.dtype() == DType::Q4_1;
        // SAFETY: x is a contiguous 2-D f32 tensor of whole blocks (checked), which `pack_kernel`
        // reads; it writes `packed_bytes(k, n)` bytes into the new node of that many (rounded up) f32s;
        // the userdata is 2n, + 1 for Q8_1 columns.
        let packed = unsafe { self.custom_f32("vnni_pack", [floats, 1, 1, 1], &[x], pack_kernel, -1, 2 * n + q8_1 as usize) }?;
        let layout = match (w.is_repacked(), w.is_interleaved()) {
            (true, _) => REPACKED,
            (false, true) => INTERLEAVED,
            (false, false) => 0,
        };
        // SAFETY: w is a contiguous 2-D Q8_0/Q4_0/Q4_1 tensor with x's row length (Q4_0 possibly in
        // ggml's 8-row repack layout, Q4_1 possibly interleaved, which the userdata says), `packed`
        // holds x packed as `product_kernel` reads it (n is the result's column count); it writes the
        // [m, n] result.
        unsafe { self.custom_f32(OP, [w.ne(1), x.ne(1), 1, 1], &[w, packed], product_kernel, -1, layout) }
    }
}

/// Whether `mul_mat_vnni` takes these operands: Q8_0, Q4_0 or Q4_1 `w` in ggml's block layout, or Q4_0
/// re-laid out in ggml's repack buffer (on x86 its 8-row interleave, which ggml picks on every CPU
/// with AVX2 for rows in eights; other repacked tensors are ggml's alone), and f32 `x`, both 2-D and
/// contiguous, rows of whole blocks, at least `min_columns` columns, and a CPU with AVX-512 VNNI (on
/// builds whose ggml has AVX-512: a build for AVX2 machines keeps their product).
pub(crate) fn vnni_product_applies(w: Tensor<'_>, x: Tensor<'_>, min_columns: i64) -> bool {
    let two_d = |t: Tensor<'_>| t.ne(2) == 1 && t.ne(3) == 1 && t.is_contiguous();
    WeightKind::of(w.dtype()).is_some()
        && (!w.is_repacked() || (w.dtype() == DType::Q4_0 && w.ne(1) % 8 == 0))
        && (!w.is_interleaved() || matches!(w.dtype(), DType::Q4_1 | DType::Q8_0))
        && x.dtype() == DType::F32
        && two_d(w)
        && two_d(x)
        && w.ne(0) == x.ne(0)
        && (w.ne(0) as usize).is_multiple_of(BLOCK)
        && x.ne(1) >= min_columns.max(MIN_VNNI_COLUMNS)
        && has_vnni()
}

/// The weight block layouts the kernel unpacks.
#[derive(Clone, Copy, PartialEq)]
enum WeightKind {
    /// f16 scale, 32 signed bytes.
    Q8_0,
    /// f16 scale, 16 bytes of nibbles (low nibbles elements 0–15, high 16–31), each minus 8.
    Q4_0,
    /// f16 scale, f16 offset, 16 bytes of nibbles (as Q4_0, unsigned).
    Q4_1,
    /// Q4_0 in ggml's repack buffer: each 8 rows' blocks `b` side by side (`Q4_0X8_BYTES`: the 8
    /// scales, then each row's first 8 bytes of nibbles, then each row's last 8), the nibbles'
    /// top bits flipped (XOR 0x88).
    Q4_0x8,
    /// Q4_1 interleaved 16 rows at a time (`interleaved`): per 16 rows and block, their scales,
    /// minimums, then 4 quads of each row's 4 nibble bytes.
    Q4_1x16,
    /// Q8_0 interleaved 16 rows at a time: per 16 rows and block, their scales, then 8 groups of
    /// each row's 4 bytes, +128.
    Q8_0x16,
}

/// The product kernel's userdata: the weights' layout when not ggml's plain one.
const REPACKED: usize = 1;
const INTERLEAVED: usize = 2;

/// Bytes of 8 rows' interleaved Q4_0 blocks in ggml's repack buffer.
const Q4_0X8_BYTES: usize = 8 * 18;

impl WeightKind {
    fn of(dtype: DType) -> Option<WeightKind> {
        match dtype {
            DType::Q8_0 => Some(WeightKind::Q8_0),
            DType::Q4_0 => Some(WeightKind::Q4_0),
            DType::Q4_1 => Some(WeightKind::Q4_1),
            _ => None,
        }
    }

    fn block_bytes(self) -> usize {
        match self {
            WeightKind::Q8_0 => Q8_0_BYTES,
            WeightKind::Q4_0 => 18,
            WeightKind::Q4_1 => 20,
            WeightKind::Q4_0x8 => Q4_0X8_BYTES,
            WeightKind::Q4_1x16 => crate::interleaved::group_block_bytes(DType::Q4_1),
            WeightKind::Q8_0x16 => crate::interleaved::group_block_bytes(DType::Q8_0),
        }
    }
}

/// Whether the CPU has AVX-512 F, BW and VNNI and ggml's build has AVX-512.
pub(crate) fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::split_attention::has_avx512()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Bytes of `n` columns of `k` packed: each tile's blocks (`TILE_BLOCK_BYTES` each), then each tile's
/// scales (`TILE` f32 per block), then each tile's scaled sums (Q8_1's f16 `d · Σ values`, `TILE` f32
/// per block: what Q4_1's offsets multiply).
fn packed_bytes(k: usize, n: usize) -> usize {
    n.div_ceil(TILE) * (k / BLOCK) * (TILE_BLOCK_BYTES + 2 * TILE * 4)
}

/// Thread `ith` of `nth` packs its share of the tiles: every column quantized by ggml's quantizer
/// (Q8_0, or Q8_1 when `userdata` is odd), its bytes +128 (as unsigned) at `[tile][block][group][column
/// in tile][4]`, its scales at `[tile][block][column in tile]` after all the bytes, then Q8_1's scaled
/// sums the same way; columns past `n` zero with scale 0.
unsafe extern "C" fn pack_kernel(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, userdata: *mut c_void) {
    // SAFETY: ggml calls this with the node built in `mul_mat_vnni`: dst holds packed_bytes(k, n)
    // bytes and its source is the contiguous f32 x [k, n]; userdata is 2n (+ 1 for Q8_1).
    let (dst, x) = unsafe { (&*dst, &*(*dst).src[0]) };
    let (k, n, q8_1) = (x.ne[0] as usize, userdata as usize / 2, userdata as usize % 2 == 1);
    let (blocks, tiles) = (k / BLOCK, n.div_ceil(TILE));
    let (dtype, block_bytes, qs) = if q8_1 { (DType::Q8_1, Q8_1_BYTES, 4) } else { (DType::Q8_0, Q8_0_BYTES, 2) };
    // SAFETY: ggml's CPU type traits are static; from_float is the quantizer ggml's product uses for
    // these weights' columns, writing k / 32 blocks from k floats.
    let Some(quantize) = (unsafe { (*sys::ggml_get_type_traits_cpu(dtype.to_sys())).from_float }) else { return };
    let mut column = vec![0u8; blocks * block_bytes];
    let base = dst.data as *mut u8;
    let scales_at = tiles * blocks * TILE_BLOCK_BYTES;
    let half = |b: &[u8], at: usize| crate::dtype::f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]));
    for tile in (ith.max(0) as usize..tiles).step_by(nth.max(1) as usize) {
        for lane in 0..TILE {
            let c = tile * TILE + lane;
            if c < n {
                // SAFETY: column c of x holds k contiguous floats; `column` holds its blocks.
                unsafe { quantize((x.data as *const u8).add(c * x.nb[1]) as *const f32, column.as_mut_ptr() as *mut c_void, k as i64) };
            } else {
                column.iter_mut().for_each(|b| *b = 0);
            }
            for (b, block) in column.chunks_exact(block_bytes).enumerate() {
                let tile_block = (tile * blocks + b) * TILE_BLOCK_BYTES;
                for (group, bytes) in block[qs..].chunks_exact(4).enumerate() {
                    let at = tile_block + group * TILE * 4 + lane * 4;
                    let unsigned = [bytes[0] ^ 0x80, bytes[1] ^ 0x80, bytes[2] ^ 0x80, bytes[3] ^ 0x80];
                    // SAFETY: at + 4 <= scales_at <= packed_bytes (tile < tiles, b < blocks).
                    unsafe { std::ptr::copy_nonoverlapping(unsigned.as_ptr(), base.add(at), 4) };
                }
                let at = (tile * blocks + b) * TILE + lane;
                // SAFETY: the scales and then the sums regions hold tiles × blocks × TILE f32s each
                // after the bytes.
                unsafe {
                    let scales = base.add(scales_at) as *mut f32;
                    scales.add(at).write_unaligned(half(block, 0));
                    scales.add(tiles * blocks * TILE + at).write_unaligned(if q8_1 { half(block, 2) } else { 0.0 });
                }
            }
        }
    }
}

/// Thread `ith` of `nth` computes its share of the rows (in runs of `CHUNK_ROWS`) for every column.
unsafe extern "C" fn product_kernel(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, userdata: *mut c_void) {
    // SAFETY: ggml calls this with the node built in `mul_mat_vnni`: dst f32 [m, n], w the contiguous
    // weights [k, m] of a `WeightKind` (userdata 1: Q4_0 in the 8-row repack layout), and the packed
    // columns, all allocated.
    let (dst, w, packed) = unsafe { (&*dst, &*(*dst).src[0], &*(*dst).src[1]) };
    let (k, m, n) = (w.ne[0] as usize, w.ne[1] as usize, dst.ne[1] as usize);
    let (ith, nth) = (ith.max(0) as usize, nth.max(1) as usize);
    let per = m.div_ceil(nth);
    let (first, last) = ((ith * per).min(m), ((ith + 1) * per).min(m));
    let Some(kind) = DType::from_sys(w.type_).ok().and_then(WeightKind::of) else { return };
    let kind = match (userdata as usize, kind) {
        (REPACKED, _) => WeightKind::Q4_0x8,
        (INTERLEAVED, WeightKind::Q8_0) => WeightKind::Q8_0x16,
        (INTERLEAVED, _) => WeightKind::Q4_1x16,
        (_, kind) => kind,
    };
    let job = Job {
        kind,
        weights: w.data as *const u8,
        row_bytes: w.nb[1],
        blocks: k / BLOCK,
        columns: packed.data as *const u8,
        n,
        out: dst.data as *mut f32,
        m,
    };
    #[cfg(target_arch = "x86_64")]
    if has_vnni() {
        // SAFETY: the CPU has the features (checked); rows first..last lie inside w and dst.
        unsafe { rows_vnni(&job, first, last) };
    }
}

/// One product's operands: the weight rows, the packed columns, the result `[m, n]`.
struct Job {
    kind: WeightKind,
    weights: *const u8,
    row_bytes: usize,
    blocks: usize,
    columns: *const u8,
    n: usize,
    out: *mut f32,
    m: usize,
}

impl Job {
    /// Where row `row`'s block `b` lies, and the row's place among the 8 rows interleaved with it
    /// (0 outside the repack layout).
    fn block(&self, row: usize, b: usize) -> (*const u8, usize) {
        match self.kind {
            WeightKind::Q4_0x8 => (self.weights.wrapping_add(((row / 8) * self.blocks + b) * Q4_0X8_BYTES), row % 8),
            WeightKind::Q4_1x16 | WeightKind::Q8_0x16 => {
                let rows = crate::interleaved::ROWS;
                (self.weights.wrapping_add(((row / rows) * self.blocks + b) * self.kind.block_bytes()), row % rows)
            }
            kind => (self.weights.wrapping_add(row * self.row_bytes + b * kind.block_bytes()), 0),
        }
    }
}

/// Rows `first..last` of the product, `CHUNK_ROWS` at a time: the chunk's rows unpacked once (they
/// stay in L2), then each tile of columns (a few tens of KiB, in L1) meets every row of the chunk.
///
/// # Safety
/// The job's pointers are the live operands `mul_mat_vnni` checked; rows first..last exist; the CPU
/// has AVX-512 F, BW and VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn rows_vnni(job: &Job, first: usize, last: usize) {
    let mut chunk = Unpacked::new(job.blocks);
    let tiles = job.n.div_ceil(TILE);
    let mut row = first;
    while row < last {
        let count = CHUNK_ROWS.min(last - row);
        // SAFETY: the caller's contract, for rows row..row + count.
        unsafe { chunk.fill(job, row, count) };
        for tile in 0..tiles {
            for r in 0..count {
                // SAFETY: as above; tile < tiles; r < count rows were filled.
                unsafe { vnni::row_tile(job, &chunk, r, row + r, tile) };
            }
        }
        row += count;
    }
}

/// Rows a pass over the tiles takes together.
const CHUNK_ROWS: usize = 64;
/// 4-byte groups of a block.
const GROUPS: usize = BLOCK / 4;

/// A chunk of weight rows as signed bytes, with each block's scale and offset (Q4_1's minimum; else
/// 0) and each group's −128 × byte sum (what takes the columns' +128 back), `[row][block]`.
struct Unpacked {
    blocks: usize,
    values: Vec<[i8; BLOCK]>,
    scales: Vec<f32>,
    mins: Vec<f32>,
    starts: Vec<[i32; GROUPS]>,
}

impl Unpacked {
    fn new(blocks: usize) -> Unpacked {
        let n = blocks * CHUNK_ROWS;
        Unpacked { blocks, values: vec![[0; BLOCK]; n], scales: vec![0.0; n], mins: vec![0.0; n], starts: vec![[0; GROUPS]; n] }
    }

    /// Unpacks rows `row..row + count` (count ≤ `CHUNK_ROWS`).
    ///
    /// # Safety
    /// Those rows exist in the job's weights; AVX2 is present.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn fill(&mut self, job: &Job, row: usize, count: usize) {
        for r in 0..count {
            for b in 0..self.blocks {
                let i = r * self.blocks + b;
                let (block, lane) = job.block(row + r, b);
                // SAFETY: the caller's contract: row + r is a row of whole blocks, so its block b (or
                // its group's interleaved block) lies inside the weights; AVX2 as above.
                (self.scales[i], self.mins[i]) = unsafe { vnni::unpack(job.kind, block, lane, &mut self.values[i], &mut self.starts[i]) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{Job, Unpacked, WeightKind, BLOCK, GROUPS, TILE, TILE_BLOCK_BYTES};

    /// One weight block as 32 signed bytes (Q4_0's nibbles minus 8, Q4_1's as they are; elements 0–15
    /// from the low nibbles, 16–31 from the high ones, as ggml orders them) and each 4-byte group's
    /// −128 × byte sum; returns the block's scale and offset (Q4_1's minimum; else 0). For
    /// `Q4_0x8`, `block` is the 8 rows' interleaved block and `lane` the row's place among them.
    ///
    /// # Safety
    /// `block` points at one whole block of `kind`; AVX2 is present.
    #[inline(always)]
    pub(super) unsafe fn unpack(
        kind: WeightKind,
        block: *const u8,
        lane: usize,
        values: &mut [i8; BLOCK],
        starts: &mut [i32; GROUPS],
    ) -> (f32, f32) {
        let half = |at: usize| {
            // SAFETY: the scale (and Q4_1's minimum) are the block's first 2 (4) bytes; the 8 rows'
            // scales lead an interleaved block.
            let bits = unsafe { (block.add(at) as *const u16).read_unaligned() };
            crate::dtype::f16_to_f32(bits)
        };
        // SAFETY: the caller's contract bounds the reads; `values` and `starts` are 32 bytes each.
        unsafe {
            let bytes = match kind {
                WeightKind::Q8_0 => _mm256_loadu_si256(block.add(2) as *const __m256i),
                WeightKind::Q8_0x16 => {
                    use crate::interleaved::{GROUP_BYTES, Q8_0_GROUPS_AT};
                    let group = |g: usize| (block.add(Q8_0_GROUPS_AT + g * GROUP_BYTES + 4 * lane) as *const i32).read_unaligned();
                    let stored = _mm256_set_epi32(group(7), group(6), group(5), group(4), group(3), group(2), group(1), group(0));
                    _mm256_xor_si256(stored, _mm256_set1_epi8(0x80u8 as i8))
                }
                WeightKind::Q4_0 | WeightKind::Q4_1 | WeightKind::Q4_0x8 | WeightKind::Q4_1x16 => {
                    let packed = match kind {
                        WeightKind::Q4_0x8 => {
                            let first = (block.add(16 + 8 * lane) as *const i64).read_unaligned();
                            let last = (block.add(16 + 64 + 8 * lane) as *const i64).read_unaligned();
                            _mm_xor_si128(_mm_set_epi64x(last, first), _mm_set1_epi8(0x88u8 as i8))
                        }
                        WeightKind::Q4_1x16 => {
                            use crate::interleaved::{GROUP_BYTES, Q4_1_QUADS_AT};
                            let quad = |q: usize| (block.add(Q4_1_QUADS_AT + q * GROUP_BYTES + 4 * lane) as *const i32).read_unaligned();
                            _mm_set_epi32(quad(3), quad(2), quad(1), quad(0))
                        }
                        _ => _mm_loadu_si128(block.add(if kind == WeightKind::Q4_0 { 2 } else { 4 }) as *const __m128i),
                    };
                    let low = _mm_set1_epi8(0x0f);
                    let nibbles = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(packed), low), _mm_and_si128(packed, low));
                    if !matches!(kind, WeightKind::Q4_1 | WeightKind::Q4_1x16) {
                        _mm256_sub_epi8(nibbles, _mm256_set1_epi8(8))
                    } else {
                        nibbles
                    }
                }
            };
            _mm256_storeu_si256(values.as_mut_ptr() as *mut __m256i, bytes);
            let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), bytes), _mm256_set1_epi16(-128));
            _mm256_storeu_si256(starts.as_mut_ptr() as *mut __m256i, sums);
        }
        match kind {
            WeightKind::Q4_0x8 => (half(2 * lane), 0.0),
            WeightKind::Q4_1 => (half(0), half(2)),
            WeightKind::Q4_1x16 => (half(2 * lane), half(crate::interleaved::Q4_1_MINS_AT + 2 * lane)),
            WeightKind::Q8_0x16 => (half(2 * lane), 0.0),
            _ => (half(0), 0.0),
        }
    }

    /// Row `r` of the chunk (the product's row `out_row`) against tile `tile`: per block and group g
    /// of 4 bytes, the row's group broadcast into a VNNI dot with the tile's (from the group's start),
    /// then `lane_g += (d_row · d_column) × f32(dot)` as ggml's lane g; Q4_1 also `offsets += m_row ·
    /// s_column`. At the end ggml's tree over the 8 lanes, plus the offsets.
    ///
    /// # Safety
    /// As `rows_vnni`; row r of the chunk is filled; tile < the job's tiles; AVX-512 F, BW and VNNI
    /// are present.
    #[inline(always)]
    pub(super) unsafe fn row_tile(job: &Job, chunk: &Unpacked, r: usize, out_row: usize, tile: usize) {
        let blocks = job.blocks;
        let tiles = job.n.div_ceil(TILE);
        let with_mins = matches!(job.kind, super::WeightKind::Q4_1 | super::WeightKind::Q4_1x16);
        // SAFETY: the caller's contract bounds every access: the tile's packed blocks with their
        // scales and sums, result columns < n of a row < m.
        unsafe {
            let column_scales = job.columns.add(tiles * blocks * TILE_BLOCK_BYTES) as *const f32;
            let column_sums = column_scales.add(tiles * blocks * TILE);
            let mut lanes = [_mm512_setzero_ps(); GROUPS];
            let mut offsets = _mm512_setzero_ps();
            for b in 0..blocks {
                let i = r * blocks + b;
                let groups = job.columns.add((tile * blocks + b) * TILE_BLOCK_BYTES);
                let at = (tile * blocks + b) * TILE;
                let scale = _mm512_mul_ps(_mm512_set1_ps(chunk.scales[i]), _mm512_loadu_ps(column_scales.add(at)));
                let values = chunk.values[i].as_ptr();
                for (g, lane) in lanes.iter_mut().enumerate() {
                    let columns = _mm512_loadu_si512(groups.add(g * TILE * 4) as *const _);
                    let weights = _mm512_set1_epi32((values.add(4 * g) as *const i32).read_unaligned());
                    let dot = _mm512_dpbusd_epi32(_mm512_set1_epi32(chunk.starts[i][g]), columns, weights);
                    *lane = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), *lane);
                }
                if with_mins {
                    offsets = _mm512_add_ps(offsets, _mm512_mul_ps(_mm512_set1_ps(chunk.mins[i]), _mm512_loadu_ps(column_sums.add(at))));
                }
            }
            let l = &lanes;
            // ggml's hsum_float_8: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
            let even = _mm512_add_ps(_mm512_add_ps(l[0], l[4]), _mm512_add_ps(l[2], l[6]));
            let odd = _mm512_add_ps(_mm512_add_ps(l[1], l[5]), _mm512_add_ps(l[3], l[7]));
            let mut sum = _mm512_add_ps(even, odd);
            if with_mins {
                sum = _mm512_add_ps(sum, offsets);
            }
            let mut out = [0f32; TILE];
            _mm512_storeu_ps(out.as_mut_ptr(), sum);
            for (lane, &v) in out.iter().enumerate().take(job.n - tile * TILE) {
                *job.out.add((tile * TILE + lane) * job.m + out_row) = v;
            }
        }
    }
}
