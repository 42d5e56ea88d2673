//! Which waiting request runs next: the admission queue, pure and generic, without a model.
//!
//! `Fcfs` takes requests in arrival order. `MultiBin` keeps one queue per execution-time bin
//! (fast, medium, slow) and picks, among the bins whose running share is below its maximum (and
//! first among those below their minimum), the request with the highest *effective* priority —
//! its own priority raised one level for every `aging` it has waited, so no request waits
//! unboundedly — breaking ties by weighted fair queueing across bins (stride scheduling on the
//! bins' weights) and then by age. Preempted requests resume before anything new.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How urgent a request is (header `X-Request-Priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    Low = 0,
    #[default]
    Medium = 1,
    High = 2,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Medium, Priority::Low];

    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "high" => Some(Self::High),
            "medium" => Some(Self::Medium),
            "low" => Some(Self::Low),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Medium => "medium",
            Self::Low => "low",
        }
    }

    fn raised(self, levels: u32) -> Self {
        match self as u32 + levels {
            0 => Self::Low,
            1 => Self::Medium,
            _ => Self::High,
        }
    }
}

/// A request's predicted execution time class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Bin {
    #[default]
    Fast = 0,
    Medium = 1,
    Slow = 2,
}

impl Bin {
    pub const ALL: [Bin; 3] = [Bin::Fast, Bin::Medium, Bin::Slow];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fast => "fast",
            Self::Medium => "medium",
            Self::Slow => "slow",
        }
    }
}

/// What the queue knows of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub priority: Priority,
    pub bin: Bin,
    pub arrived: Instant,
    /// Runs alone: admitted only into an empty batch, and nothing joins it
    /// (`X-Batch-Preference: disable`).
    pub exclusive: bool,
    /// Waits, at most until then, for a batch to join rather than running alone
    /// (`X-Batch-Preference: enable` with `X-Max-Wait-Time`).
    pub hold_until: Option<Instant>,
}

impl Ticket {
    /// A medium-priority, fast-bin request with no batching preference.
    pub fn new(arrived: Instant) -> Self {
        Self {
            priority: Priority::Medium,
            bin: Bin::Fast,
            arrived,
            exclusive: false,
            hold_until: None,
        }
    }
}

pub trait Queued {
    fn ticket(&self) -> Ticket;
}

/// One bin's share of the running batch and its weight in the admission order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BinShare {
    pub min: usize,
    pub max: usize,
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Discipline {
    /// First come, first served.
    Fcfs,
    /// Bins, priorities, aging and weighted fair queueing.
    #[default]
    MultiBin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePolicy {
    pub discipline: Discipline,
    /// Indexed by [`Bin`].
    pub shares: [BinShare; 3],
    /// A waiting request's priority rises one level per `aging` waited.
    pub aging: Duration,
    /// While a faster bin has sequences running, a slower bin's running sequences join only
    /// `its weight / the faster bin's weight` of the steps. Pays where a step's time grows with
    /// its rows (the CPU engine); off, every running sequence is in every step.
    pub weighted_steps: bool,
}

impl QueuePolicy {
    /// The defaults of the InferencePool API (fast 32–64, medium 16–32, slow 4–16 sequences;
    /// weights 3:2:1), capped by the batch size.
    pub fn multi_bin(max_batch: usize) -> Self {
        let share = |min: usize, max: usize, weight| BinShare {
            min: min.min(max_batch),
            max: max.min(max_batch),
            weight,
        };
        Self {
            discipline: Discipline::MultiBin,
            shares: [share(32, 64, 3), share(16, 32, 2), share(4, 16, 1)],
            aging: Duration::from_secs(2),
            weighted_steps: true,
        }
    }

    pub fn fcfs(max_batch: usize) -> Self {
        Self {
            discipline: Discipline::Fcfs,
            ..Self::multi_bin(max_batch)
        }
    }

    /// `priority` after waiting since `arrived`.
    pub fn effective(&self, ticket: &Ticket, now: Instant) -> Priority {
        if self.aging.is_zero() {
            return Priority::High;
        }
        let waited = now.saturating_duration_since(ticket.arrived);
        let levels = (waited.as_nanos() / self.aging.as_nanos()).min(2) as u32;
        ticket.priority.raised(levels)
    }
}

/// The waiting requests.
#[derive(Debug)]
pub struct AdmissionQueue<T> {
    policy: QueuePolicy,
    /// Preempted to free memory: they resume first, in order.
    resumed: VecDeque<T>,
    /// One queue per bin, in arrival order.
    queues: [VecDeque<T>; 3],
    /// Stride-scheduling pass per bin: grows by 1/weight per admission.
    pass: [f64; 3],
}

impl<T: Queued> AdmissionQueue<T> {
    pub fn new(policy: QueuePolicy) -> Self {
        Self {
            policy,
            resumed: VecDeque::new(),
            queues: Default::default(),
            pass: [0.0; 3],
        }
    }

    pub fn len(&self) -> usize {
        self.resumed.len() + self.queues.iter().map(VecDeque::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.resumed.iter().chain(self.queues.iter().flatten())
    }

    /// A new request, or one sent back to wait again (it keeps its arrival time).
    pub fn push(&mut self, item: T) {
        let bin = item.ticket().bin as usize;
        if self.queues[bin].is_empty() {
            // A bin that was idle joins at the current virtual time, not with credit saved up.
            let now = self
                .queues
                .iter()
                .zip(self.pass)
                .filter(|(q, _)| !q.is_empty())
                .map(|(_, p)| p)
                .fold(f64::INFINITY, f64::min);
            if now.is_finite() {
                self.pass[bin] = self.pass[bin].max(now);
            }
        }
        let queue = &mut self.queues[bin];
        // Keep arrival order (a request sent back is older than those that came after it).
        let at = queue.partition_point(|q| q.ticket().arrived <= item.ticket().arrived);
        queue.insert(at, item);
    }

    /// A request preempted to free memory: it resumes before any other.
    pub fn push_resumed(&mut self, item: T) {
        self.resumed.push_front(item);
    }

    /// Removes every request for which `keep` is false.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool, removed: &mut Vec<T>) {
        for queue in std::iter::once(&mut self.resumed).chain(self.queues.iter_mut()) {
            let mut kept = VecDeque::with_capacity(queue.len());
            for item in queue.drain(..) {
                if keep(&item) {
                    kept.push_back(item);
                } else {
                    removed.push(item);
                }
            }
            *queue = kept;
        }
    }

    /// Where the next request to admit is, given how many of each bin are running.
    fn choose(&self, running: [usize; 3], now: Instant) -> Option<(usize, usize)> {
        if !self.resumed.is_empty() {
            return Some((3, 0));
        }
        if self.policy.discipline == Discipline::Fcfs {
            return (0..3)
                .filter_map(|b| Some((b, self.queues[b].front()?.ticket().arrived)))
                .min_by_key(|&(_, arrived)| arrived)
                .map(|(b, _)| (b, 0));
        }
        self.choose_multi_bin(running, now)
    }

    fn choose_multi_bin(&self, running: [usize; 3], now: Instant) -> Option<(usize, usize)> {
        // A request holding out for company may go once there is a batch to join, or its wait
        // is over.
        let batch = running.iter().sum::<usize>() > 0;
        let ready = |t: &Ticket| batch || t.hold_until.is_none_or(|h| h <= now);
        // Each bin's best request: highest effective priority, then oldest.
        let heads: Vec<(usize, usize, Priority, Instant)> = (0..3)
            .filter(|&b| running[b] < self.policy.shares[b].max)
            .filter_map(|b| {
                let (i, item) = self.queues[b]
                    .iter()
                    .enumerate()
                    .filter(|(_, q)| ready(&q.ticket()))
                    .max_by(|(_, x), (_, y)| {
                        let (x, y) = (x.ticket(), y.ticket());
                        self.policy
                            .effective(&x, now)
                            .cmp(&self.policy.effective(&y, now))
                            .then(y.arrived.cmp(&x.arrived))
                    })?;
                let ticket = item.ticket();
                Some((b, i, self.policy.effective(&ticket, now), ticket.arrived))
            })
            .collect();
        let below_min: Vec<_> = heads
            .iter()
            .filter(|(b, ..)| running[*b] < self.policy.shares[*b].min)
            .copied()
            .collect();
        let pool = if below_min.is_empty() {
            heads
        } else {
            below_min
        };
        pool.into_iter()
            .max_by(|x, y| {
                x.2.cmp(&y.2)
                    .then(self.pass[y.0].total_cmp(&self.pass[x.0]))
                    .then(y.3.cmp(&x.3))
            })
            .map(|(b, i, ..)| (b, i))
    }

    /// The request that should run next, without taking it.
    pub fn peek(&self, running: [usize; 3], now: Instant) -> Option<&T> {
        let (b, i) = self.choose(running, now)?;
        if b == 3 {
            self.resumed.front()
        } else {
            self.queues[b].get(i)
        }
    }

    /// Takes the request that should run next.
    pub fn pop(&mut self, running: [usize; 3], now: Instant) -> Option<T> {
        let (b, i) = self.choose(running, now)?;
        if b == 3 {
            return self.resumed.pop_front();
        }
        self.pass[b] += 1.0 / f64::from(self.policy.shares[b].weight.max(1));
        self.queues[b].remove(i)
    }

    /// When the first request held for company stops waiting for it.
    pub fn next_release(&self) -> Option<Instant> {
        self.iter().filter_map(|q| q.ticket().hold_until).min()
    }

    /// Waiting requests by bin and priority (for metrics).
    pub fn depths(&self) -> [[usize; 3]; 3] {
        let mut depths = [[0; 3]; 3];
        for item in self.iter() {
            let t = item.ticket();
            depths[t.bin as usize][t.priority as usize] += 1;
        }
        depths
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq)]
    struct Req(Ticket, usize);

    impl Queued for Req {
        fn ticket(&self) -> Ticket {
            self.0
        }
    }

    fn req(id: usize, bin: Bin, priority: Priority, arrived: Instant) -> Req {
        Req(
            Ticket {
                priority,
                bin,
                ..Ticket::new(arrived)
            },
            id,
        )
    }

    /// Admissions over a run where every bin always has more waiting than it can take, and
    /// each running request finishes after its bin's service time.
    #[test]
    fn bin_shares_hold_under_mixed_arrivals() {
        let t0 = Instant::now();
        let policy = QueuePolicy::multi_bin(64);
        let mut queue = AdmissionQueue::new(policy);
        let mut id = 0;
        // Mixed arrivals: 70 % fast, 20 % medium, 10 % slow, far more than fit.
        for i in 0..1000 {
            let bin = match i % 10 {
                0..=6 => Bin::Fast,
                7 | 8 => Bin::Medium,
                _ => Bin::Slow,
            };
            queue.push(req(
                id,
                bin,
                Priority::Medium,
                t0 + Duration::from_millis(i),
            ));
            id += 1;
        }
        // Running: (bin, finishes at step).
        let mut running: Vec<(Bin, usize)> = Vec::new();
        let service = [1, 5, 20];
        for step in 0..200 {
            running.retain(|&(_, end)| end > step);
            let now = t0 + Duration::from_secs(1);
            loop {
                let mut counts = [0; 3];
                for (b, _) in &running {
                    counts[*b as usize] += 1;
                }
                if running.len() >= 64 {
                    for b in Bin::ALL {
                        let share = policy.shares[b as usize];
                        assert!(counts[b as usize] <= share.max, "step {step}: {counts:?}");
                    }
                    // Every bin that has work waiting holds at least its minimum.
                    let depths = queue.depths();
                    for b in Bin::ALL {
                        let share = policy.shares[b as usize];
                        let waiting: usize = depths[b as usize].iter().sum();
                        assert!(
                            waiting == 0 || counts[b as usize] >= share.min,
                            "step {step}: {counts:?}, {waiting} waiting in {b:?}"
                        );
                    }
                    break;
                }
                let Some(next) = queue.pop(counts, now) else {
                    break;
                };
                running.push((next.0.bin, step + service[next.0.bin as usize]));
            }
            for i in 0..20 {
                let bin = [Bin::Fast, Bin::Fast, Bin::Medium, Bin::Slow][i % 4];
                queue.push(req(id, bin, Priority::Medium, t0 + Duration::from_secs(1)));
                id += 1;
            }
        }
    }

    #[test]
    fn a_fast_request_does_not_wait_behind_a_queue_of_slow_ones() {
        let t0 = Instant::now();
        let mut queue = AdmissionQueue::new(QueuePolicy::multi_bin(64));
        for i in 0..100 {
            queue.push(req(i, Bin::Slow, Priority::Medium, t0));
        }
        queue.push(req(
            999,
            Bin::Fast,
            Priority::Medium,
            t0 + Duration::from_millis(5),
        ));
        // The slow bin is at its maximum share: only the fast request may go.
        let next = queue
            .pop([0, 0, 16], t0 + Duration::from_millis(5))
            .unwrap();
        assert_eq!(next.1, 999);
        assert!(queue.pop([1, 0, 16], t0).is_none());
    }

    #[test]
    fn aging_bounds_the_wait_of_a_low_priority_request_under_a_stream_of_high_ones() {
        let t0 = Instant::now();
        let policy = QueuePolicy::multi_bin(64);
        let mut queue = AdmissionQueue::new(policy);
        queue.push(req(0, Bin::Fast, Priority::Low, t0));
        // One admission per 10 ms, and two new high-priority requests per 10 ms: without aging
        // the low one would never run.
        let tick = Duration::from_millis(10);
        let mut id = 1;
        let mut admitted_at = None;
        for step in 1..10_000u32 {
            let now = t0 + tick * step;
            for _ in 0..2 {
                queue.push(req(id, Bin::Fast, Priority::High, now));
                id += 1;
            }
            let next = queue.pop([0; 3], now).unwrap();
            if next.1 == 0 {
                admitted_at = Some(now - t0);
                break;
            }
        }
        let waited = admitted_at.expect("the low-priority request ran");
        // Two levels of aging, then it is the oldest high-priority request.
        assert!(waited <= policy.aging * 2 + tick, "waited {waited:?}");
        assert!(
            waited >= policy.aging * 2,
            "it did not jump the queue: {waited:?}"
        );
    }

    #[test]
    fn higher_priority_goes_first_and_fcfs_ignores_it() {
        let t0 = Instant::now();
        for (policy, expected) in [
            (QueuePolicy::multi_bin(64), [2, 1, 0]),
            (QueuePolicy::fcfs(64), [0, 1, 2]),
        ] {
            let mut queue = AdmissionQueue::new(policy);
            queue.push(req(0, Bin::Fast, Priority::Low, t0));
            queue.push(req(
                1,
                Bin::Medium,
                Priority::Medium,
                t0 + Duration::from_millis(1),
            ));
            queue.push(req(
                2,
                Bin::Slow,
                Priority::High,
                t0 + Duration::from_millis(2),
            ));
            let now = t0 + Duration::from_millis(3);
            let order: Vec<usize> = (0..3).map(|_| queue.pop([0; 3], now).unwrap().1).collect();
            assert_eq!(order, expected, "{:?}", policy.discipline);
        }
    }

    #[test]
    fn weights_share_admissions_between_bins_of_equal_priority() {
        let t0 = Instant::now();
        let mut queue = AdmissionQueue::new(QueuePolicy::multi_bin(1000));
        for i in 0..700 {
            queue.push(req(i, Bin::ALL[i % 3], Priority::Medium, t0));
        }
        let mut counts = [0usize; 3];
        // Bins above their minimum, far from their maximum: weights 3:2:1 decide.
        let running = [40, 20, 8];
        for _ in 0..120 {
            let next = queue.pop(running, t0).unwrap();
            counts[next.0.bin as usize] += 1;
        }
        assert_eq!(counts, [60, 40, 20]);
    }

    #[test]
    fn a_request_holding_out_for_a_batch_waits_until_one_runs_or_its_wait_ends() {
        let t0 = Instant::now();
        let mut queue = AdmissionQueue::new(QueuePolicy::multi_bin(64));
        let mut held = req(0, Bin::Fast, Priority::Medium, t0);
        held.0.hold_until = Some(t0 + Duration::from_millis(50));
        queue.push(held);
        assert!(queue.pop([0; 3], t0 + Duration::from_millis(10)).is_none());
        assert_eq!(queue.next_release(), Some(t0 + Duration::from_millis(50)));
        // Something is running: it joins that batch.
        assert!(
            queue
                .peek([1, 0, 0], t0 + Duration::from_millis(10))
                .is_some()
        );
        // Or its wait ends.
        assert_eq!(
            queue.pop([0; 3], t0 + Duration::from_millis(50)).unwrap().1,
            0
        );
    }

    #[test]
    fn resumed_requests_go_first_and_requests_sent_back_keep_their_place() {
        let t0 = Instant::now();
        let mut queue = AdmissionQueue::new(QueuePolicy::fcfs(64));
        queue.push(req(
            1,
            Bin::Fast,
            Priority::Medium,
            t0 + Duration::from_millis(1),
        ));
        queue.push(req(
            2,
            Bin::Fast,
            Priority::Medium,
            t0 + Duration::from_millis(2),
        ));
        queue.push(req(0, Bin::Fast, Priority::Medium, t0));
        queue.push_resumed(req(
            9,
            Bin::Slow,
            Priority::Low,
            t0 + Duration::from_secs(9),
        ));
        let order: Vec<usize> = (0..4).map(|_| queue.pop([0; 3], t0).unwrap().1).collect();
        assert_eq!(order, [9, 0, 1, 2]);
        assert!(queue.is_empty());
    }
}
