//! Where a graph's time goes: node timings (`ggml::Backend::profile`) summed per op kind.

use ggml::NodeTime;
use serde::Serialize;

/// The time of every node of one op kind.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OpTotal {
    /// ggml's op name (`MUL_MAT`, `FLASH_ATTN_EXT`, or the unary op's own name).
    pub op: String,
    /// Nodes of this op in the graph.
    pub nodes: usize,
    /// Their summed time, in seconds.
    pub seconds: f64,
}

/// Node times summed per op, the most expensive first.
pub fn by_op(times: &[NodeTime]) -> Vec<OpTotal> {
    let mut totals: Vec<OpTotal> = Vec::new();
    for t in times {
        match totals.iter_mut().find(|o| o.op == t.op) {
            Some(o) => {
                o.nodes += 1;
                o.seconds += t.seconds;
            }
            None => totals.push(OpTotal { op: t.op.clone(), nodes: 1, seconds: t.seconds }),
        }
    }
    totals.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    totals
}
