//! KvCache bookkeeping: bytes against the block math, cells and positions, masks, refused layouts.

mod common;

use ccsm::kv_cache::{KvCache, KvCacheConfig, DECODE_WINDOW};
use ccsm::{CacheType, Error};
use common::bytes_per_element;

fn config(k: CacheType, v: CacheType, head_dim: usize, capacity: usize) -> KvCacheConfig {
    KvCacheConfig::uniform(3, head_dim, 2, capacity, k, v)
}

#[test]
fn allocated_bytes_follow_the_block_math_for_every_pair() {
    for k in CacheType::ALL {
        for v in CacheType::ALL {
            let c = config(k, v, 64, 100);
            let cache = KvCache::new(c.clone()).unwrap();
            let elements = (3 * 100 * 2 * 64) as f64;
            let want = elements * (bytes_per_element(k) + bytes_per_element(v));
            assert_eq!(cache.memory_usage() as f64, want, "{k}/{v}");
            assert_eq!(c.bytes().unwrap(), cache.memory_usage(), "{k}/{v}: sizing and allocation agree");
        }
    }
}

#[test]
fn quantized_types_need_whole_blocks_per_head() {
    for t in [CacheType::Q8_0, CacheType::Q4_0, CacheType::Q4_1] {
        match KvCache::new(config(t, CacheType::F16, 48, 16)) {
            Err(Error::CacheLayout { why, .. }) => assert!(why.contains("multiple of 32"), "{why}"),
            other => panic!("{t} with head dim 48: {:?}", other.map(|_| ())),
        }
        assert!(KvCache::new(config(CacheType::F16, t, 48, 16)).is_err());
    }
    assert!(KvCache::new(config(CacheType::F16, CacheType::F32, 48, 16)).is_ok());
    assert!(KvCache::new(config(CacheType::F16, CacheType::F16, 64, 0)).is_err());
}

#[test]
fn cells_positions_and_rollback() {
    let mut cache = KvCache::new(config(CacheType::F16, CacheType::F16, 32, 10)).unwrap();
    assert_eq!(cache.append(4).unwrap(), 0..4);
    assert_eq!(cache.append(3).unwrap(), 4..7);
    assert_eq!(cache.positions(), &[0, 1, 2, 3, 4, 5, 6]);
    assert!(matches!(cache.append(4), Err(Error::CacheFull { needed: 11, capacity: 10 })));
    cache.truncate(5);
    assert_eq!((cache.len(), cache.next_position()), (5, 5));
    cache.clear();
    assert!(cache.is_empty());
    assert_eq!(cache.next_position(), 0);
    assert_eq!(cache.capacity(), 10);
}

#[test]
fn masks_are_causal_over_positions_and_hide_padding() {
    let mut cache = KvCache::new(config(CacheType::F32, CacheType::F32, 32, 600)).unwrap();
    cache.append(3).unwrap();
    let mask = cache.attention_mask(&[1, 2], 5);
    let inf = f32::NEG_INFINITY;
    assert_eq!(mask, vec![0.0, 0.0, inf, inf, inf, 0.0, 0.0, 0.0, inf, inf]);
    assert_eq!(cache.decode_window(), DECODE_WINDOW);
    cache.append(DECODE_WINDOW).unwrap();
    assert_eq!(cache.decode_window(), 2 * DECODE_WINDOW);
    cache.append(400).unwrap_err();
    cache.append(600 - cache.len()).unwrap();
    assert_eq!(cache.decode_window(), 600, "never past the capacity");
}

/// Sizes that do not fit 64 bits are refused, never wrapped (a wrapped product once sized a cache
/// with a 2^62-wide head at 0 bytes).
#[test]
fn sizes_that_overflow_are_refused() {
    let huge = [
        KvCacheConfig::uniform(1, 1 << 62, 4, 16, CacheType::F32, CacheType::F32),
        KvCacheConfig::uniform(1 << 40, 64, 8, 1 << 20, CacheType::F16, CacheType::F16),
        KvCacheConfig::uniform(2, 64, 8, usize::MAX / 64, CacheType::Q4_0, CacheType::Q4_0),
    ];
    for c in huge {
        match c.bytes() {
            Err(Error::CacheLayout { why, .. }) => assert!(why.contains("overflows"), "{why}"),
            other => panic!("{c:?}: {other:?}"),
        }
        assert!(c.n_embd_kv().is_err() || c.head_dim * c.n_head_kv <= 1 << 20);
        assert!(KvCache::new(c).is_err());
    }
}
