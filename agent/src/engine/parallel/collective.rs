//! All-reduce across tensor-parallel ranks. The ranks of one process meet in a [`LocalGroup`]:
//! each deposits its partial sum, the last to arrive adds them in rank order (so the result is
//! the same bits every time) and, in a group that spans processes, exchanges the process's sum
//! with the others over its [`Uplink`]; every rank then takes the total. A rank that fails, or a
//! group that waits past its deadline, breaks the group: every waiting and later call fails with
//! the reason, so no rank ever hangs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Sums buffers across the ranks of a tensor-parallel group.
pub trait Collective: Send + Sync + std::fmt::Debug {
    /// This rank's index and the group's size.
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Replaces `data` with its sum over every rank, each rank passing its own `data`.
    fn all_reduce(&self, data: &mut [f32]) -> Result<(), String>;
    /// Fails the group with `reason`: every rank's pending and later calls return it.
    fn abort(&self, reason: &str);
}

/// How a process's sum joins the other processes' (multi-pod groups).
pub trait Uplink: Send + Sync + std::fmt::Debug {
    /// Replaces `sum` (this process's ranks' sum) with the sum over every process.
    fn reduce(&self, sum: &mut [f32]) -> Result<(), String>;
}

/// Rank 0's all-reduces in this process: how many, and how long from its call to the total —
/// the wait for the slowest rank, the sum and the other processes' link included (through NCCL,
/// only the enqueue: the sum itself runs on the GPU's stream). What sharding costs a step, on
/// the metrics endpoint.
#[derive(Debug, Default)]
pub struct AllReduceStats {
    count: AtomicU64,
    nanos: AtomicU64,
}

pub static ALL_REDUCES: AllReduceStats = AllReduceStats {
    count: AtomicU64::new(0),
    nanos: AtomicU64::new(0),
};

impl AllReduceStats {
    pub fn record(&self, took: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// All-reduces so far, and their time in seconds.
    pub fn totals(&self) -> (u64, f64) {
        (
            self.count.load(Ordering::Relaxed),
            self.nanos.load(Ordering::Relaxed) as f64 / 1e9,
        )
    }
}

#[derive(Debug)]
struct State {
    /// Rounds completed: a waiter's round is over once this moves.
    round: u64,
    arrived: usize,
    partials: Vec<Option<Vec<f32>>>,
    total: Arc<Vec<f32>>,
    broken: Option<String>,
}

/// The ranks of one process: `local` of them, global ranks `first..first + local` of `world`.
#[derive(Debug)]
pub struct LocalGroup {
    first: usize,
    local: usize,
    world: usize,
    state: Mutex<State>,
    turned: Condvar,
    deadline: Duration,
    uplink: Option<Box<dyn Uplink>>,
}

impl LocalGroup {
    /// A group of `local` ranks in this process, out of `world` (`first` the first's global
    /// rank); `uplink` joins the other processes when `local < world`. A rank waits at most
    /// `deadline` for the others.
    pub fn new(
        first: usize,
        local: usize,
        world: usize,
        deadline: Duration,
        uplink: Option<Box<dyn Uplink>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            first,
            local,
            world,
            state: Mutex::new(State {
                round: 0,
                arrived: 0,
                partials: vec![None; local],
                total: Arc::new(Vec::new()),
                broken: None,
            }),
            turned: Condvar::new(),
            deadline,
            uplink,
        })
    }

    /// The collective of local rank `index`.
    pub fn rank(self: &Arc<Self>, index: usize) -> Arc<dyn Collective> {
        Arc::new(RankHandle {
            group: self.clone(),
            index,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails the group for `reason` (the first reason stays): every waiting and later call of
    /// every rank returns it.
    pub fn break_with(&self, reason: &str) {
        let mut state = self.lock();
        state.broken.get_or_insert_with(|| reason.to_owned());
        self.turned.notify_all();
    }

    /// Why the group failed, once it has.
    pub fn broken(&self) -> Option<String> {
        self.lock().broken.clone()
    }

    fn all_reduce(&self, index: usize, data: &mut [f32]) -> Result<(), String> {
        let mut state = self.lock();
        if let Some(reason) = &state.broken {
            return Err(reason.clone());
        }
        let round = state.round;
        state.partials[index] = Some(data.to_vec());
        state.arrived += 1;
        if state.arrived == self.local {
            // The last to arrive adds the partials in rank order.
            let mut sum = state.partials[0].take().unwrap_or_default();
            for partial in state.partials[1..].iter_mut() {
                let partial = partial.take().unwrap_or_default();
                if partial.len() != sum.len() {
                    let reason = "ranks passed buffers of different sizes".to_owned();
                    state.broken = Some(reason.clone());
                    self.turned.notify_all();
                    return Err(reason);
                }
                for (s, p) in sum.iter_mut().zip(&partial) {
                    *s += p;
                }
            }
            if let Some(uplink) = &self.uplink
                && let Err(reason) = uplink.reduce(&mut sum)
            {
                state.broken = Some(reason.clone());
                self.turned.notify_all();
                return Err(reason);
            }
            state.total = Arc::new(sum);
            state.arrived = 0;
            state.round += 1;
            self.turned.notify_all();
        } else {
            let until = Instant::now() + self.deadline;
            while state.round == round && state.broken.is_none() {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let reason = format!(
                        "a tensor-parallel rank did not reach the all-reduce within {:?}",
                        self.deadline
                    );
                    state.broken = Some(reason);
                    self.turned.notify_all();
                    break;
                }
                state = self
                    .turned
                    .wait_timeout(state, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if state.round == round {
                return Err(state.broken.clone().unwrap_or_default());
            }
        }
        data.copy_from_slice(&state.total);
        Ok(())
    }
}

#[derive(Debug)]
struct RankHandle {
    group: Arc<LocalGroup>,
    index: usize,
}

impl Collective for RankHandle {
    fn rank(&self) -> usize {
        self.group.first + self.index
    }

    fn world(&self) -> usize {
        self.group.world
    }

    fn all_reduce(&self, data: &mut [f32]) -> Result<(), String> {
        if self.rank() != 0 {
            return self.group.all_reduce(self.index, data);
        }
        let began = Instant::now();
        let result = self.group.all_reduce(self.index, data);
        ALL_REDUCES.record(began.elapsed());
        result
    }

    fn abort(&self, reason: &str) {
        self.group.break_with(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(group: &Arc<LocalGroup>, inputs: Vec<Vec<f32>>) -> Vec<Result<Vec<f32>, String>> {
        let handles: Vec<_> = inputs
            .into_iter()
            .enumerate()
            .map(|(i, mut data)| {
                let rank = group.rank(i);
                std::thread::spawn(move || rank.all_reduce(&mut data).map(|()| data))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn every_rank_gets_the_sum_round_after_round() {
        let group = LocalGroup::new(0, 3, 3, Duration::from_secs(10), None);
        for round in 0..50 {
            let inputs = (0..3).map(|r| vec![r as f32 + round as f32, 1.0]).collect();
            for result in run(&group, inputs) {
                assert_eq!(result.unwrap(), vec![3.0 + 3.0 * round as f32, 3.0]);
            }
        }
    }

    #[test]
    fn an_aborted_or_late_rank_fails_the_group_instead_of_hanging() {
        let group = LocalGroup::new(0, 2, 2, Duration::from_secs(10), None);
        let waiter = {
            let rank = group.rank(0);
            std::thread::spawn(move || rank.all_reduce(&mut [1.0]))
        };
        group.rank(1).abort("rank 1 failed");
        assert_eq!(waiter.join().unwrap(), Err("rank 1 failed".into()));
        assert_eq!(
            group.rank(1).all_reduce(&mut [1.0]),
            Err("rank 1 failed".into())
        );

        // Nobody aborts, but rank 1 never comes: rank 0 gives up at the deadline.
        let group = LocalGroup::new(0, 2, 2, Duration::from_millis(50), None);
        let error = group.rank(0).all_reduce(&mut [1.0]).unwrap_err();
        assert!(error.contains("did not reach the all-reduce"), "{error}");
    }

    #[derive(Debug)]
    struct Doubling;
    impl Uplink for Doubling {
        fn reduce(&self, sum: &mut [f32]) -> Result<(), String> {
            // Another process with the same partials.
            sum.iter_mut().for_each(|v| *v *= 2.0);
            Ok(())
        }
    }

    #[test]
    fn a_group_across_processes_adds_the_other_processes_sums() {
        let group = LocalGroup::new(2, 2, 4, Duration::from_secs(10), Some(Box::new(Doubling)));
        assert_eq!((group.rank(1).rank(), group.rank(1).world()), (3, 4));
        for result in run(&group, vec![vec![1.0], vec![2.0]]) {
            assert_eq!(result.unwrap(), vec![6.0]);
        }
    }
}
