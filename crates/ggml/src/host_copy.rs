//! Byte copies between tensors, shared among threads: a session that starts from a cached prefix
//! takes every layer's rows at once (36.5 MB for a 1,586-token SmolLM2 prefix at f16), and one
//! thread's `memcpy` leaves the memory bus half used. Host tensors are copied in place; others go
//! through ggml's backend get/set.

use crate::context::Tensor;
use crate::error::{Error, Result};

/// The first `len` bytes of `src` copied to the start of `dst`.
#[derive(Clone, Copy)]
pub struct ByteCopy<'a> {
    /// Copied from (its first `len` bytes).
    pub src: Tensor<'a>,
    /// Copied to (its first `len` bytes).
    pub dst: Tensor<'a>,
    /// Bytes copied.
    pub len: usize,
}

/// Pieces smaller than this stay on one thread: starting a thread costs more than copying them.
const MIN_PIECE: usize = 1 << 20;

/// Makes every copy in `copies` (ranges checked first; destinations may not overlap any source or
/// other destination) with up to `threads` threads.
pub fn copy_bytes(copies: &[ByteCopy<'_>], threads: usize) -> Result<()> {
    const OP: &str = "copy_bytes";
    let mut host = Vec::with_capacity(copies.len());
    for c in copies {
        c.src.check_range(OP, 0, c.len)?;
        c.dst.check_range(OP, 0, c.len)?;
        match (c.src.host_data(), c.dst.host_data()) {
            (Some(s), Some(d)) => host.push((s, d, c.len)),
            _ => c.dst.write_bytes_at(0, &c.src.read_bytes_at(0, c.len)?)?,
        }
    }
    let overlaps = |a: usize, b: usize, len_a: usize, len_b: usize| a < b + len_b && b < a + len_a;
    for (i, &(_, d, len)) in host.iter().enumerate() {
        let clash =
            host.iter().enumerate().any(|(j, &(s2, d2, len2))| overlaps(d, s2, len, len2) || (i != j && overlaps(d, d2, len, len2)));
        if clash && len > 0 {
            return Err(Error::invalid(OP, "a destination overlaps a source or another destination"));
        }
    }
    let total: usize = host.iter().map(|h| h.2).sum();
    let threads = threads.clamp(1, total.div_ceil(MIN_PIECE).max(1));
    let share = total.div_ceil(threads);
    let run = |first: usize| copy_share(&host, first, (first + share).min(total));
    if threads == 1 {
        run(0);
    } else {
        std::thread::scope(|scope| {
            for t in 1..threads {
                scope.spawn(move || run(t * share));
            }
            run(0);
        });
    }
    Ok(())
}

/// Copies bytes `[from, to)` of the copies laid end to end.
fn copy_share(host: &[(usize, usize, usize)], from: usize, to: usize) {
    let mut at = 0;
    for &(src, dst, len) in host {
        let (start, end) = (from.max(at), to.min(at + len));
        if start < end {
            let offset = start - at;
            // SAFETY: both ranges lie inside allocated host tensors (checked by `copy_bytes`), the
            // destinations overlap no source and no other destination, and the threads' byte shares
            // are disjoint, so no two threads write the same bytes and none reads what another writes.
            unsafe { std::ptr::copy_nonoverlapping((src + offset) as *const u8, (dst + offset) as *mut u8, end - start) };
        }
        at += len;
    }
}
