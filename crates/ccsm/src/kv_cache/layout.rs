//! Per-layer cache types: each layer's K and V may be stored in its own type (a mixed-precision
//! cache, what the planner chooses). A layout names the types of every layer, in order.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::CacheType;

/// The types one layer's K and V rows are stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerTypes {
    /// The type K rows are stored in.
    pub k: CacheType,
    /// The type V rows are stored in.
    pub v: CacheType,
}

impl LayerTypes {
    /// K stored as `k`, V as `v`.
    pub fn new(k: CacheType, v: CacheType) -> Self {
        LayerTypes { k, v }
    }

    /// The type of half `half` (K or V).
    pub fn get(self, half: Half) -> CacheType {
        match half {
            Half::K => self.k,
            Half::V => self.v,
        }
    }

    /// These types with half `half` set to `t`.
    pub fn with(self, half: Half, t: CacheType) -> Self {
        match half {
            Half::K => LayerTypes { k: t, ..self },
            Half::V => LayerTypes { v: t, ..self },
        }
    }
}

impl fmt::Display for LayerTypes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.k, self.v)
    }
}

/// One of a layer's two cached tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Half {
    /// The keys.
    K,
    /// The values.
    V,
}

impl Half {
    /// Both halves, K first: the order layers and profiles list them in.
    pub const BOTH: [Half; 2] = [Half::K, Half::V];

    /// `"k"` or `"v"`, as tensor names, messages and profiles spell it.
    pub fn name(self) -> &'static str {
        match self {
            Half::K => "k",
            Half::V => "v",
        }
    }
}

/// The types of every layer of a cache, in layer order (cheap to clone: shared).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KvLayout(Arc<[LayerTypes]>);

impl KvLayout {
    /// A layout of `layers`, layer 0 first.
    pub fn new(layers: Vec<LayerTypes>) -> Self {
        KvLayout(layers.into())
    }

    /// Every one of `n_layer` layers with the same types.
    pub fn uniform(n_layer: usize, k: CacheType, v: CacheType) -> Self {
        KvLayout::new(vec![LayerTypes::new(k, v); n_layer])
    }

    /// Each layer's types, layer 0 first.
    pub fn layers(&self) -> &[LayerTypes] {
        &self.0
    }

    /// Layers in the layout.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the layout names no layer.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The types every layer shares, if they all agree.
    pub fn uniform_types(&self) -> Option<LayerTypes> {
        let first = *self.0.first()?;
        self.0.iter().all(|&t| t == first).then_some(first)
    }

    /// This layout with every type replaced by `f(type)`.
    pub fn map(&self, f: impl Fn(CacheType) -> CacheType) -> Self {
        KvLayout::new(self.0.iter().map(|t| LayerTypes::new(f(t.k), f(t.v))).collect())
    }

    /// Mean storage bits per cached element over both halves of every layer (block scales included).
    pub fn bits_per_element(&self) -> f64 {
        let sum: f64 = self.0.iter().map(|t| t.k.dtype().bits_per_element() + t.v.dtype().bits_per_element()).sum();
        sum / (2 * self.0.len().max(1)) as f64
    }

    /// Parses `SPEC` for a model of `n_layer` layers: comma-separated `LAYERS:TYPES` entries, where
    /// LAYERS is `i`, `i-j` (inclusive) or `*` (every layer no other entry names) and TYPES is `k/v`
    /// or one type for both halves; or a bare TYPES for every layer. Every layer must be named once.
    pub fn parse(spec: &str, n_layer: usize) -> Result<Self, String> {
        let types = |s: &str| -> Result<LayerTypes, String> {
            let (k, v) = s.split_once('/').unwrap_or((s, s));
            Ok(LayerTypes::new(k.trim().parse()?, v.trim().parse()?))
        };
        let mut layers: Vec<Option<LayerTypes>> = vec![None; n_layer];
        let mut rest = None;
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((range, t)) = entry.split_once(':') else {
                if spec.contains(':') {
                    return Err(format!("layout entry `{entry}` has no `LAYERS:` before its types"));
                }
                rest = Some(types(entry)?);
                continue;
            };
            let t = types(t)?;
            if range.trim() == "*" {
                rest = Some(t);
                continue;
            }
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            let number = |s: &str| s.trim().parse::<usize>().map_err(|_| format!("`{s}` in layout entry `{entry}` is not a layer number"));
            let (a, b) = (number(a)?, number(b)?);
            if a > b || b >= n_layer {
                return Err(format!("layers {a}-{b} in layout entry `{entry}`: the model has layers 0-{}", n_layer.saturating_sub(1)));
            }
            for (l, slot) in layers.iter_mut().enumerate().take(b + 1).skip(a) {
                if slot.replace(t).is_some() {
                    return Err(format!("layer {l} is named twice in the layout"));
                }
            }
        }
        let layers: Option<Vec<LayerTypes>> = layers.into_iter().map(|t| t.or(rest)).collect();
        layers.map(KvLayout::new).ok_or_else(|| format!("the layout `{spec}` does not name every layer of {n_layer} (add `*:TYPE`)"))
    }
}

impl fmt::Display for KvLayout {
    /// The shortest `parse`-able spelling: runs of equal layers as ranges.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(t) = self.uniform_types() {
            return write!(f, "{t}");
        }
        let mut first = true;
        let mut start = 0;
        for end in 1..=self.0.len() {
            if end == self.0.len() || self.0[end] != self.0[start] {
                let sep = if first { "" } else { "," };
                let range = if end - 1 == start { start.to_string() } else { format!("{start}-{}", end - 1) };
                write!(f, "{sep}{range}:{}", self.0[start])?;
                first = false;
                start = end;
            }
        }
        Ok(())
    }
}

impl Serialize for KvLayout {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        let layout = KvLayout::parse("0:q8_0, 1-2:q5_1/q4_0, *:iq4_nl", 5).unwrap();
        let t = |k: CacheType, v: CacheType| LayerTypes::new(k, v);
        assert_eq!(
            layout.layers(),
            [
                t(CacheType::Q8_0, CacheType::Q8_0),
                t(CacheType::Q5_1, CacheType::Q4_0),
                t(CacheType::Q5_1, CacheType::Q4_0),
                t(CacheType::IQ4NL, CacheType::IQ4NL),
                t(CacheType::IQ4NL, CacheType::IQ4NL),
            ]
        );
        assert_eq!(layout.to_string(), "0:q8_0/q8_0,1-2:q5_1/q4_0,3-4:iq4_nl/iq4_nl");
        assert_eq!(KvLayout::parse(&layout.to_string(), 5).unwrap(), layout);
        assert_eq!(KvLayout::parse("q4_0/f16", 3).unwrap(), KvLayout::uniform(3, CacheType::Q4_0, CacheType::F16));
        // (8.5 + 8.5 + 2 * (6 + 4.5) + 2 * (4.5 + 4.5)) / 10
        assert!((layout.bits_per_element() - 5.6).abs() < 1e-12);
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (spec, says) in [
            ("0:q8_0", "does not name every layer"),
            ("0-5:q8_0", "the model has layers 0-3"),
            ("0:q8_0,0:q4_0,*:f16", "named twice"),
            ("x:q8_0", "not a layer number"),
            ("*:q5_K", "k-quant"),
            ("0:q8_0,q4_0", "no `LAYERS:`"),
        ] {
            let err = KvLayout::parse(spec, 4).unwrap_err();
            assert!(err.contains(says), "{spec}: {err}");
        }
    }
}
