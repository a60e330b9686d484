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

/// Follows how many cores other programs keep busy: the machine's busy time (`/proc/stat`: user, nice,
/// system, irq and softirq of every core) less this process's own CPU time, over the wall time
/// between two samples, sampled before a graph at most every `SAMPLE_EVERY` and averaged over
/// `SMOOTHING`. Counting time used rather than threads runnable keeps this process's other threads
/// out without a race (a server's network threads wake for every token, just before the next graph).
/// Busy cores are taken off the machine's online cores; this process may be allowed fewer (affinity,
/// a container's CPU quota), and other programs count against the machine, not against that allowance.
/// Where the times cannot be read (not Linux), no core is counted taken.
pub(crate) struct CoreShare {
    /// Cores this process may use, and cores the machine has online (at least as many).
    allowed: usize,
    machine: usize,
    read_times: fn() -> Option<CpuTimes>,
    /// The last sample, and the average number of cores others kept busy.
    last: Cell<Option<(Instant, CpuTimes)>>,
    others: Cell<f64>,
}

/// Seconds of CPU time spent so far: by every program on the machine, and by this process.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct CpuTimes {
    pub machine: f64,
    pub own: f64,
}

/// `/proc/stat` counts in ticks of 10 ms, so a sample spans several (50 ms on 2 cores holds 10).
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
const SMOOTHING: Duration = Duration::from_millis(200);

impl CoreShare {
    pub(crate) fn new() -> Self {
        let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with(allowed, online_cores().unwrap_or(allowed), read_cpu_times)
    }

    fn with(allowed: usize, machine: usize, read_times: fn() -> Option<CpuTimes>) -> Self {
        CoreShare { allowed, machine: machine.max(allowed), read_times, last: Cell::new(None), others: Cell::new(0.0) }
    }

    /// Cores left to this pool (at least one), after a fresh sample when the last one is old.
    pub(crate) fn free_cores(&self) -> usize {
        self.free_cores_at(Instant::now())
    }

    fn free_cores_at(&self, now: Instant) -> usize {
        let last = self.last.get();
        if last.is_none_or(|(at, _)| now.saturating_duration_since(at) >= SAMPLE_EVERY) {
            if let Some(times) = (self.read_times)() {
                if let Some((at, before)) = last {
                    let wall = now.saturating_duration_since(at).as_secs_f64();
                    let others = ((times.machine - before.machine) - (times.own - before.own)).max(0.0) / wall;
                    let weight = 1.0 - (-wall / SMOOTHING.as_secs_f64()).exp();
                    self.others.set(self.others.get() + weight * (others - self.others.get()));
                }
                self.last.set(Some((now, times)));
            }
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

/// The machine's busy seconds (`/proc/stat`) and this process's CPU seconds (Linux).
fn read_cpu_times() -> Option<CpuTimes> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let machine = machine_busy_seconds(stat.lines().next()?, ticks_per_second()?)?;
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer and returns -1 on failure.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0;
    ok.then_some(CpuTimes { machine, own: ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9 })
}

/// `/proc/stat`'s unit (USER_HZ).
fn ticks_per_second() -> Option<f64> {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then_some(ticks as f64)
}

/// Busy seconds in `/proc/stat`'s `cpu` line: user, nice, system, irq and softirq (not idle, iowait,
/// or steal: time the hypervisor gave other machines is not taken by programs here).
fn machine_busy_seconds(cpu_line: &str, ticks_per_second: f64) -> Option<f64> {
    let mut fields = cpu_line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<f64> = fields.take(7).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    let [user, nice, system, _idle, _iowait, irq, softirq] = ticks[..] else {
        return None;
    };
    Some((user + nice + system + irq + softirq) / ticks_per_second)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Fake CPU clocks, in microseconds: the machine's busy time and this process's.
    static MACHINE_US: AtomicU64 = AtomicU64::new(0);
    static OWN_US: AtomicU64 = AtomicU64::new(0);

    fn fake_times() -> Option<CpuTimes> {
        Some(CpuTimes { machine: MACHINE_US.load(Ordering::Relaxed) as f64 * 1e-6, own: OWN_US.load(Ordering::Relaxed) as f64 * 1e-6 })
    }

    /// Advances the fake clocks by `ms` of wall time with `own` and `others` cores busy.
    fn spend(ms: u64, own: u64, others: u64) {
        OWN_US.fetch_add(ms * 1000 * own, Ordering::Relaxed);
        MACHINE_US.fetch_add(ms * 1000 * (own + others), Ordering::Relaxed);
    }

    /// Both tests below move the same fake clocks: one at a time.
    static CLOCKS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn busy_cores_are_left_to_their_programs_after_a_smoothing_time() {
        let _clocks = CLOCKS.lock().unwrap();
        let share = CoreShare::with(2, 2, fake_times);
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(share.free_cores_at(at(0)), 2);
        // This process alone with both cores busy (a server's network threads too): nothing taken.
        spend(100, 2, 0);
        assert_eq!(share.free_cores_at(at(100)), 2);
        // Another program keeps a core busy: after a few samples only one core is this pool's.
        let mut now = 100;
        let run = |now: &mut u64, samples: usize, own: u64, others: u64| {
            for _ in 0..samples {
                *now += 60;
                spend(60, own, others);
                share.free_cores_at(at(*now));
            }
            share.free_cores_at(at(*now))
        };
        assert_eq!(run(&mut now, 6, 1, 1), 1);
        // The other program ends: both cores come back.
        assert_eq!(run(&mut now, 8, 2, 0), 2);
        // Never fewer than one core, however busy the others.
        assert_eq!(run(&mut now, 8, 1, 5), 1);
        // Samples closer together than SAMPLE_EVERY are not taken.
        spend(10, 2, 0);
        assert_eq!(share.free_cores_at(at(now + 10)), 1);
    }

    #[test]
    fn others_count_against_the_machine_not_against_this_process_allowance() {
        let _clocks = CLOCKS.lock().unwrap();
        // A container allowed 4 of a 64-core machine's cores, other programs keeping 50 busy.
        let share = CoreShare::with(4, 64, fake_times);
        let start = Instant::now();
        share.free_cores_at(start);
        spend(1000, 4, 50);
        assert_eq!(share.free_cores_at(start + Duration::from_secs(1)), 4);
        spend(1000, 2, 62);
        assert_eq!(share.free_cores_at(start + Duration::from_secs(2)), 2);
    }

    #[test]
    fn the_cpu_line_gives_busy_seconds() {
        assert_eq!(machine_busy_seconds("cpu  100 20 30 5000 40 6 7 800 0 0", 100.0), Some(1.63));
        assert_eq!(machine_busy_seconds("cpu0 100 20 30 5000 40 6 7 800 0 0", 100.0), None);
        assert_eq!(machine_busy_seconds("cpu 100 20", 100.0), None);
        assert_eq!(machine_busy_seconds("cpu 1 2 3 4 5 x 7", 100.0), None);
        // This machine's own counters read, and this process has spent some CPU time.
        assert!(read_cpu_times().is_some_and(|t| t.machine > 0.0 && t.own > 0.0));
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
    fn small_graphs_keep_one_thread_and_large_ones_take_all() {
        assert_eq!(threads_for(GraphWork { units: 5.0e4, nodes: 40 }, 2), 1);
        assert_eq!(threads_for(GraphWork { units: 2.7e8, nodes: 900 }, 2), 2);
        assert_eq!(threads_for(GraphWork { units: 2.7e8, nodes: 900 }, 16), 16);
        assert_eq!(threads_for(GraphWork { units: 0.0, nodes: 0 }, 0), 1);
    }
}
