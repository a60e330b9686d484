//! How many threads a graph runs on: no more than its work is worth, and no more than the cores other
//! programs leave free.
//!
//! Every graph wakes the thread pool's workers (they sleep between graphs) and every node ends at a
//! barrier, so more threads pay off only when a graph has work enough to share: tiny-csm's frames (32
//! small graphs each) ran 3.7× faster on one thread than on two. A graph's work is estimated from its
//! nodes (`graph_work`); clearly small and clearly large graphs are decided by the estimate, and for
//! the ones between, whose speed depends on what their nodes are (a Mimi frame's convolutions and
//! broadcast additions ran 1.5× faster on two threads at a work the estimate put below a matrix
//! chain's break-even), `ThreadTuner` times both choices and keeps the faster.
//!
//! ggml splits most nodes into equal parts, one per thread, and each node waits for its slowest part.
//! When another program keeps a core busy, the thread that shares that core gets a fraction of it and
//! every node waits for it: on 2 cores SmolLM2 decode with 2 threads ran at 0.38× its speed alone
//! beside one busy loop, and two such engines at once made 0.21× of one together. So before each
//! graph the backend looks at how many other threads want the machine's cores (`CoreShare`) and runs
//! on no more than the cores they leave: 0.75× and 1.48× (`docs/threads.md`).
//!
//! Results do not depend on the count: products split output rows between threads, our attention
//! kernel fixed parts of the cells (`crates/ccsm/tests/thread_counts.rs`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use ggml_sys as sys;

/// What a graph asks of the threads: its arithmetic (a matrix product's multiply-adds, one unit per
/// element read or written elsewhere) and the nodes that end at a barrier.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct GraphWork {
    pub units: f64,
    pub nodes: usize,
}

/// Work one more thread must take on to be worth waking, in `GraphWork` units: a fixed part for the
/// wake-up and a part per barrier. Measured with `examples/thread_crossover.rs` (chains of Q8_0
/// products of growing width, 72 nodes): a second thread cost ≈ 25 µs per graph and 0.17 µs per node,
/// one thread did ≈ 38 k units per µs, and two threads first beat one at ≈ 3 M units (at 3.2 M they
/// were 1.05× faster with one column, 1.07× slower with four; at 7 M 1.2× faster).
const UNITS_PER_WAKE: f64 = 1.9e6;
const UNITS_PER_BARRIER: f64 = 1.3e4;

/// The work of the graph's nodes (views and reshapes cost nothing).
pub(crate) fn graph_work(graph: *mut sys::ggml_cgraph) -> GraphWork {
    let mut work = GraphWork { units: 0.0, nodes: 0 };
    // SAFETY: the caller passes a live graph; its nodes and their sources are live tensors or null.
    let n = unsafe { sys::ggml_graph_n_nodes(graph) };
    for i in 0..n {
        // SAFETY: i < n_nodes of a live graph.
        let node = unsafe { &*sys::ggml_graph_node(graph, i) };
        if matches!(node.op, sys::GGML_OP_NONE | sys::GGML_OP_VIEW | sys::GGML_OP_RESHAPE | sys::GGML_OP_PERMUTE | sys::GGML_OP_TRANSPOSE) {
            continue;
        }
        work.nodes += 1;
        let elements = |t: &sys::ggml_tensor| t.ne.iter().map(|&d| d.max(1) as f64).product::<f64>();
        work.units += if node.op == sys::GGML_OP_MUL_MAT && !node.src[0].is_null() {
            // SAFETY: a product's first source is a live tensor.
            2.0 * unsafe { (*node.src[0]).ne[0] } as f64 * elements(node)
        } else {
            // SAFETY: non-null sources of a live node are live tensors.
            elements(node) + node.src.iter().filter(|s| !s.is_null()).map(|&s| elements(unsafe { &*s })).sum::<f64>()
        };
    }
    work
}

/// Threads worth running `work` on, at most `max`: each one past the first must take a share of the
/// work worth the wake-up and the barriers it adds.
pub(crate) fn threads_for(work: GraphWork, max: usize) -> usize {
    ((2.0 * work.units / overhead(work)) as usize).clamp(1, max.max(1))
}

/// What one more thread costs a graph, in work units.
fn overhead(work: GraphWork) -> f64 {
    UNITS_PER_WAKE + UNITS_PER_BARRIER * work.nodes as f64
}

/// How far from break-even the estimate decides alone: below 1/8 of a second thread's cost one thread,
/// above 8× it every thread; between, both are timed.
const SURE: f64 = 8.0;
/// Runs of each choice timed before the faster is kept, and how often (in runs) the slower is timed
/// again: a graph's cost drifts (attention over a growing cache) and the first runs pay for cold caches.
const TRIALS: u32 = 2;
const RETRY_EVERY: u32 = 64;
/// Kinds of graph remembered; past this the memory starts over.
const KINDS_KEPT: usize = 512;

/// Learns, per kind of graph, whether it runs faster on one thread or on more. A kind is a graph's node
/// count and work (in quarter octaves) under one limit on threads: a decode graph is the same kind step
/// after step until its cache grows by a fifth.
#[derive(Default)]
pub(crate) struct ThreadTuner {
    kinds: RefCell<HashMap<GraphKind, Timings>>,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct GraphKind {
    nodes: usize,
    work: i32,
    most: usize,
}

impl GraphKind {
    fn of(work: GraphWork, most: usize) -> Self {
        GraphKind { nodes: work.nodes, work: (work.units.max(1.0).log2() * 4.0).round() as i32, most }
    }
}

/// Runs of one kind, and seconds per run on one thread (`[0]`) and on more (`[1]`).
#[derive(Default)]
struct Timings {
    runs: u32,
    seconds: [Option<f64>; 2],
}

impl ThreadTuner {
    /// Threads for the next run of a graph of `work` when at most `most` may run: the estimate's choice
    /// where it is sure, else the faster of one and `many` as timed so far (trying each in turn first).
    pub(crate) fn choose(&self, work: GraphWork, most: usize) -> usize {
        let (many, sure) = Self::options(work, most);
        if let Some(threads) = sure {
            return threads;
        }
        let kinds = self.kinds.borrow();
        let Some(t) = kinds.get(&GraphKind::of(work, most)) else {
            return 1;
        };
        let pick = match t.seconds {
            _ if t.runs < TRIALS => 0,
            _ if t.runs < 2 * TRIALS => 1,
            [Some(one), Some(more)] => {
                let faster = usize::from(more < one);
                if t.runs % RETRY_EVERY == 0 {
                    1 - faster
                } else {
                    faster
                }
            }
            [None, _] => 0,
            [_, None] => 1,
        };
        if pick == 0 {
            1
        } else {
            many
        }
    }

    /// Records that a graph of `work` ran on `threads` in `seconds`.
    pub(crate) fn record(&self, work: GraphWork, most: usize, threads: usize, seconds: f64) {
        if Self::options(work, most).1.is_some() {
            return;
        }
        let mut kinds = self.kinds.borrow_mut();
        if kinds.len() >= KINDS_KEPT {
            kinds.clear();
        }
        let t = kinds.entry(GraphKind::of(work, most)).or_default();
        let slot = &mut t.seconds[usize::from(threads > 1)];
        *slot = Some(match *slot {
            // The trials keep their best (the first run of a graph pays for cold caches), later runs
            // move an average.
            Some(old) if t.runs < 2 * TRIALS => old.min(seconds),
            Some(old) => 0.75 * old + 0.25 * seconds,
            None => seconds,
        });
        t.runs += 1;
    }

    /// The many-thread choice for `work` and, where the estimate is sure, the answer.
    fn options(work: GraphWork, most: usize) -> (usize, Option<usize>) {
        let many = threads_for(work, most).max(2).min(most.max(1));
        if most <= 1 {
            return (1, Some(1));
        }
        let ratio = work.units / overhead(work);
        let sure = if ratio < 1.0 / SURE {
            Some(1)
        } else if ratio > SURE {
            Some(many)
        } else {
            None
        };
        (many, sure)
    }
}

/// Follows how many threads of other programs (or of other thread pools) want a core: the kernel's
/// count of runnable threads machine-wide (`/proc/loadavg`), less this process's own runnable ones
/// (`/proc/self/task/*/stat`, read only when the machine-wide count says some other thread may be
/// runnable), sampled before a graph at most every `SAMPLE_EVERY` and smoothed over `SMOOTHING`.
/// They are taken off the machine's online cores; this process may be allowed fewer (affinity, a
/// container's CPU quota), and other programs' threads are counted against the machine, not against
/// that allowance. Where the counts cannot be read (not Linux), no core is counted taken.
pub(crate) struct CoreShare {
    /// Cores this process may use, and cores the machine has online (at least as many).
    allowed: usize,
    machine: usize,
    count_others: fn() -> Option<usize>,
    others: Cell<f64>,
    sampled: Cell<Option<Instant>>,
}

const SAMPLE_EVERY: Duration = Duration::from_millis(10);
const SMOOTHING: Duration = Duration::from_millis(100);

impl CoreShare {
    pub(crate) fn new() -> Self {
        let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with(allowed, online_cores().unwrap_or(allowed), runnable_threads_of_others)
    }

    fn with(allowed: usize, machine: usize, count_others: fn() -> Option<usize>) -> Self {
        CoreShare { allowed, machine: machine.max(allowed), count_others, others: Cell::new(0.0), sampled: Cell::new(None) }
    }

    /// Cores left to this pool (at least one), after a fresh sample when the last one is old.
    pub(crate) fn free_cores(&self) -> usize {
        self.free_cores_at(Instant::now())
    }

    fn free_cores_at(&self, now: Instant) -> usize {
        let last = self.sampled.get();
        if last.is_none_or(|at| now.saturating_duration_since(at) >= SAMPLE_EVERY) {
            if let Some(others) = (self.count_others)() {
                // The first sample counts whole; later ones move the average by their age's share.
                let weight =
                    last.map_or(1.0, |at| 1.0 - (-now.saturating_duration_since(at).as_secs_f64() / SMOOTHING.as_secs_f64()).exp());
                self.others.set(self.others.get() + weight * (others as f64 - self.others.get()));
            }
            self.sampled.set(Some(now));
        }
        self.machine.saturating_sub(self.others.get().round() as usize).clamp(1, self.allowed)
    }
}

/// Cores the machine has online (`/sys/devices/system/cpu/online`: ranges such as `0-3,8-11`).
fn online_cores() -> Option<usize> {
    parse_cpu_list(&std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?)
}

fn parse_cpu_list(list: &str) -> Option<usize> {
    let mut n = 0;
    for range in list.trim().split(',').filter(|r| !r.is_empty()) {
        n += match range.split_once('-') {
            Some((a, b)) => b.parse::<usize>().ok()?.checked_sub(a.parse::<usize>().ok()?)? + 1,
            None => range.parse::<usize>().map(|_| 1).ok()?,
        };
    }
    (n > 0).then_some(n)
}

/// Runnable threads on the machine that are not this process's (Linux).
fn runnable_threads_of_others() -> Option<usize> {
    let loadavg = std::fs::read_to_string("/proc/loadavg").ok()?;
    let running: usize = loadavg.split_whitespace().nth(3)?.split('/').next()?.parse().ok()?;
    if running <= 1 {
        return Some(0); // only the caller
    }
    // This process's other threads (a server's network threads, this pool's workers finishing the
    // last graph) are not competition: count them out.
    let own = std::fs::read_dir("/proc/self/task")
        .ok()?
        .flatten()
        .filter(|task| is_runnable(&std::fs::read_to_string(task.path().join("stat")).unwrap_or_default()))
        .count();
    Some(running.saturating_sub(own.max(1)))
}

/// Whether a `/proc/…/stat` line says its thread is runnable: the state follows the command name,
/// which is in parentheses and may itself hold parentheses, spaces or an `R`.
fn is_runnable(stat: &str) -> bool {
    stat.rfind(')').is_some_and(|i| stat[i + 1..].trim_start().starts_with('R'))
}

#[cfg(test)]
mod tests {
    use super::*;

    static OTHERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn others() -> Option<usize> {
        Some(OTHERS.load(std::sync::atomic::Ordering::Relaxed))
    }

    #[test]
    fn busy_cores_are_left_to_their_programs_after_a_smoothing_time() {
        let share = CoreShare::with(2, 2, others);
        let start = Instant::now();
        assert_eq!(share.free_cores_at(start), 2);
        // One other runnable thread (a busy loop): within a few smoothing times only one core is ours.
        OTHERS.store(1, std::sync::atomic::Ordering::Relaxed);
        let after = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(share.free_cores_at(after(10)), 2, "one sample does not move the average past one half");
        assert_eq!(share.free_cores_at(after(200)), 1);
        // Samples closer together than SAMPLE_EVERY are not taken.
        OTHERS.store(0, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(share.free_cores_at(after(201)), 1);
        assert_eq!(share.free_cores_at(after(500)), 2);
        // Never fewer than one core, however many others.
        OTHERS.store(9, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(share.free_cores_at(after(1000)), 1);
    }

    #[test]
    fn others_count_against_the_machine_not_against_this_process_allowance() {
        // A container allowed 4 of a 64-core machine's cores, 50 threads of other programs runnable.
        let share = CoreShare::with(4, 64, || Some(50));
        assert_eq!(share.free_cores(), 4);
        let crowded = CoreShare::with(4, 64, || Some(62));
        assert_eq!(crowded.free_cores(), 2);
    }

    /// Runs `runs` graphs of `work` through the tuner, timing one thread at `one` seconds and more at
    /// `more`; returns the threads of each run.
    fn tune(tuner: &ThreadTuner, work: GraphWork, runs: usize, one: f64, more: f64) -> Vec<usize> {
        (0..runs)
            .map(|_| {
                let threads = tuner.choose(work, 2);
                tuner.record(work, 2, threads, if threads == 1 { one } else { more });
                threads
            })
            .collect()
    }

    #[test]
    fn graphs_near_break_even_run_on_whichever_count_was_timed_faster() {
        // A Mimi frame: 2.4 M units in 152 nodes, 0.73 ms on one thread and 0.48 on two.
        let mimi = GraphWork { units: 2.4e6, nodes: 152 };
        let tuner = ThreadTuner::default();
        let threads = tune(&tuner, mimi, 200, 0.73e-3, 0.48e-3);
        assert_eq!(threads[..4], [1, 1, 2, 2], "each choice is timed twice first");
        let ones = threads[4..].iter().filter(|&&t| t == 1).count();
        assert!((1..=4).contains(&ones), "two threads kept, one retried now and then: {ones} of 196 on one");
        // The same work where one thread is faster keeps one thread.
        let tuner = ThreadTuner::default();
        let threads = tune(&tuner, mimi, 200, 0.40e-3, 0.48e-3);
        assert!(threads[4..].iter().filter(|&&t| t == 2).count() <= 4);
        // Clear cases are never timed: tiny graphs stay on one thread, big ones take every thread.
        let tuner = ThreadTuner::default();
        assert!(tune(&tuner, GraphWork { units: 1.0e5, nodes: 100 }, 20, 1.0, 0.1).iter().all(|&t| t == 1));
        assert!(tune(&tuner, GraphWork { units: 2.7e8, nodes: 900 }, 20, 0.1, 1.0).iter().all(|&t| t == 2));
        // One core left: nothing to choose.
        assert_eq!(tuner.choose(mimi, 1), 1);
    }

    #[test]
    fn a_drifting_cost_is_followed() {
        let work = GraphWork { units: 2.4e6, nodes: 152 };
        let tuner = ThreadTuner::default();
        tune(&tuner, work, 100, 0.73e-3, 0.48e-3);
        // Two threads get slower than one (say the machine's other core got busy elsewhere).
        let threads = tune(&tuner, work, 200, 0.73e-3, 1.5e-3);
        assert!(threads[100..].iter().filter(|&&t| t == 2).count() <= 4, "one thread kept once two got slower");
    }

    #[test]
    fn online_cores_are_read_from_ranges() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(2));
        assert_eq!(parse_cpu_list("0-3,8-11"), Some(8));
        assert_eq!(parse_cpu_list("5"), Some(1));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn a_thread_is_runnable_by_the_state_after_its_name() {
        assert!(is_runnable("4242 (ccsm-infer) R 1 4242 4242 0 -1"));
        assert!(!is_runnable("4242 (ccsm-infer) S 1 4242 4242 0 -1"));
        // A name may hold ") R (" itself: only the state after the last parenthesis counts.
        assert!(!is_runnable("4243 (a) R (b) S 1 4243 4243 0 -1"));
        assert!(is_runnable("4243 (x) S) R 1 4243 4243 0 -1"));
        assert!(!is_runnable(""));
    }

    #[test]
    fn small_graphs_keep_one_thread_and_large_ones_take_all() {
        assert_eq!(threads_for(GraphWork { units: 5.0e4, nodes: 40 }, 2), 1);
        assert_eq!(threads_for(GraphWork { units: 2.7e8, nodes: 900 }, 2), 2);
        assert_eq!(threads_for(GraphWork { units: 2.7e8, nodes: 900 }, 16), 16);
        assert_eq!(threads_for(GraphWork { units: 0.0, nodes: 0 }, 0), 1);
    }
}
