//! Admission into one shared budget: which cache layout a new session starts with, whether it waits
//! for memory, or whether it could never fit. The layouts are tried in the optimizer's escalation
//! order (`ESCALATION`), so a server under pressure narrows new sessions' caches as a budgeted run
//! narrows its own.

use crate::CacheType;

/// The types the memory optimizer narrows caches to, in order, when a budget demands it (and what a
/// server admits sessions at, under pressure, before making them wait).
pub const ESCALATION: [CacheType; 2] = [CacheType::Q8_0, CacheType::Q4_0];

/// Bytes every running session's caches share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Bytes in all.
    pub total: usize,
    /// Bytes running sessions hold.
    pub used: usize,
}

impl Budget {
    /// A budget of `total` bytes with nothing taken.
    pub fn new(total: usize) -> Self {
        Budget { total, used: 0 }
    }

    /// Whether `bytes` more fit.
    pub fn fits(&self, bytes: usize) -> bool {
        self.used.saturating_add(bytes) <= self.total
    }

    /// Counts `bytes` as held.
    pub fn take(&mut self, bytes: usize) {
        self.used += bytes;
    }

    /// Returns `bytes` a session held.
    pub fn give_back(&mut self, bytes: usize) {
        self.used = self.used.saturating_sub(bytes);
    }
}

/// What admission decides for a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission<L> {
    /// Start now with caches of this layout and bytes.
    Start {
        /// The layout its caches get.
        layout: L,
        /// Their bytes, taken from the budget.
        bytes: usize,
    },
    /// Not now: wait until running sessions give memory back.
    Wait,
    /// Never within this budget: even alone at the smallest layout it needs these bytes.
    Never {
        /// Bytes of its smallest layout.
        smallest: usize,
    },
}

/// The layouts admission tries, best first: the configured one, then (with `adapt`) the `fallbacks`
/// smaller than it, in order (`ESCALATION`'s types, or the planner's layouts at their bytes). `bytes_of`
/// sizes a layout (`None`: not possible for this session).
pub fn admit<L: Clone>(
    configured: &L,
    fallbacks: &[L],
    adapt: bool,
    budget: &Budget,
    bytes_of: impl Fn(&L) -> Option<usize>,
) -> Admission<L> {
    let mut layouts = vec![configured.clone()];
    if adapt {
        layouts.extend(fallbacks.iter().filter(|l| bytes_of(l) < bytes_of(configured)).cloned());
    }
    let sized: Vec<(L, usize)> = layouts.into_iter().filter_map(|l| bytes_of(&l).map(|b| (l, b))).collect();
    if let Some((layout, bytes)) = sized.iter().find(|l| budget.fits(l.1)) {
        return Admission::Start { layout: layout.clone(), bytes: *bytes };
    }
    let smallest = sized.iter().map(|l| l.1).min().unwrap_or(usize::MAX);
    if smallest <= budget.total {
        Admission::Wait
    } else {
        Admission::Never { smallest }
    }
}

/// `ESCALATION` as uniform (K, V) layouts.
pub fn uniform_fallbacks() -> Vec<(CacheType, CacheType)> {
    ESCALATION.iter().map(|&t| (t, t)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CacheType::{F16, Q4_0, Q8_0};

    /// Bytes by ggml's block math for a toy cache of 32 cells × 64 elements: f16 2 bytes per element,
    /// q8_0 34 bytes per 32, q4_0 18 bytes per 32.
    fn bytes(&(k, v): &(CacheType, CacheType)) -> Option<usize> {
        let row = |t| match t {
            F16 => Some(128),
            Q8_0 => Some(68),
            Q4_0 => Some(36),
            _ => None,
        };
        Some(32 * (row(k)? + row(v)?))
    }

    #[test]
    fn admission_takes_the_best_layout_that_fits_and_waits_or_refuses_otherwise() {
        let b = |total, used| Budget { total, used };
        let admit = |configured, adapt, budget: &Budget| admit(&configured, &uniform_fallbacks(), adapt, budget, bytes);
        let start = |k, v, bytes| Admission::Start { layout: (k, v), bytes };
        assert_eq!(admit((F16, F16), true, &b(10_000, 0)), start(F16, F16, 8192));
        assert_eq!(admit((F16, F16), true, &b(10_000, 4000)), start(Q8_0, Q8_0, 4352));
        assert_eq!(admit((F16, F16), true, &b(10_000, 7000)), start(Q4_0, Q4_0, 2304));
        assert_eq!(admit((F16, F16), true, &b(10_000, 9000)), Admission::Wait);
        assert_eq!(admit((F16, F16), false, &b(10_000, 4000)), Admission::Wait);
        assert_eq!(admit((F16, F16), true, &b(2000, 0)), Admission::Never { smallest: 2304 });
        // Already smaller than q8_0: no escalation to a larger layout.
        assert_eq!(admit((Q4_0, Q4_0), true, &b(2000, 0)), Admission::Never { smallest: 2304 });
    }
}
