//! Which waiting request runs next: the admission queue, pure and generic, without a model.
//!
//! `Fcfs` takes requests in arrival order. `MultiBin` keeps one queue per execution-time bin
//! (fast, medium, slow). A request's class is its bin and its *effective* priority — its own
//! priority raised one level for every `aging` it has waited. Among the bins whose running
//! share is below its maximum (and first among those below their minimum), classes share
//! admissions by weighted fair queueing: start-time fair queueing on the weight `bin weight ×
//! priority weight` (defaults 3:2:1 and high 4, medium 2, low 1), oldest first within a class.
//! Every class with work waiting gets its share, and aging lifts long waiters into heavier
//! classes, so no request waits unboundedly. Preempted requests resume before anything new.
//!
//! Shares are guarantees, not ceilings (work conservation): when no bin below its maximum has a
//! request ready, bins at or beyond their maximum borrow the places left, by the same fair
//! queueing. A bin gives borrowed places back by not being admitted while others wait (and, in
//! the scheduler, by preemption when another bin is below its guaranteed minimum).

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

/// What the queue needs to know of the running batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Batch {
    /// Running sequences by [`Bin`].
    pub running: [usize; 3],
    /// Bins that admit nothing now (a bin resting this step), by [`Bin`].
    pub closed: [bool; 3],
}

impl From<[usize; 3]> for Batch {
    fn from(running: [usize; 3]) -> Self {
        Self {
            running,
            closed: [false; 3],
        }
    }
}

/// Why a step admitted no more of the requests waiting: one reason per step that left requests
/// waiting, for metrics (`parallax_admission_stalls_total{reason}`). A bin's share is no reason:
/// shares are guarantees, and a bin at its maximum borrows places nobody else waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stall {
    /// The step's token budget was spent.
    TokenBudget,
    /// The batch holds `max_num_seqs` sequences (or the breaker's single-request limit).
    SequenceCap,
    /// The next request's tokens do not fit the free KV blocks, or the step had to preempt a
    /// running sequence for blocks.
    Blocks,
    /// The KV cache is over the pressure mark.
    KvPressure,
    /// The waiting requests' bins sit this step out (weighted steps).
    RestingBin,
    /// A request that runs alone is running, or waits for the batch to empty.
    Exclusive,
    /// The waiting requests hold out for a batch to join (`X-Batch-Preference: enable`).
    Held,
    /// The next request's prompt continues with a block another request is computing in this
    /// step: it waits for the block to be cached instead of computing it again.
    SharedPrefix,
}

impl Stall {
    pub const ALL: [Stall; 8] = [
        Stall::TokenBudget,
        Stall::SequenceCap,
        Stall::Blocks,
        Stall::KvPressure,
        Stall::RestingBin,
        Stall::Exclusive,
        Stall::Held,
        Stall::SharedPrefix,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::TokenBudget => "token_budget",
            Self::SequenceCap => "sequence_cap",
            Self::Blocks => "blocks",
            Self::KvPressure => "kv_pressure",
            Self::RestingBin => "resting_bin",
            Self::Exclusive => "exclusive",
            Self::Held => "held",
            Self::SharedPrefix => "shared_prefix",
        }
    }
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

/// The default step weights (fast, medium, slow); see [`QueuePolicy::step_weights`].
pub const STEP_WEIGHTS: [u32; 3] = [12, 4, 1];

/// The default [`QueuePolicy::slow_prefill_chunk`].
pub const SLOW_PREFILL_CHUNK: usize = 16;

/// Step weights under which every running sequence is in every step.
pub const EVERY_STEP: [u32; 3] = [1, 1, 1];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePolicy {
    pub discipline: Discipline,
    /// Indexed by [`Bin`].
    pub shares: [BinShare; 3],
    /// Each priority's weight in the admission order, by [`Priority`] (low, medium, high).
    pub priority_weights: [u32; 3],
    /// A waiting request's priority rises one level per `aging` waited.
    pub aging: Duration,
    /// Each bin's weight in the steps, by [`Bin`]: while a faster bin has sequences running, a
    /// slower bin's running sequences join only `its step weight / the faster bin's` of the steps.
    /// Pays where a step's time grows with its rows (the CPU engine); equal weights put every
    /// running sequence in every step. Apart from the admission weights in `shares`: those order
    /// who gets a place, these how often a place runs.
    pub step_weights: [u32; 3],
    /// The most prompt tokens a medium or slow sequence prefills in one step (fast ones take up
    /// to the step budget): bounds how long a step makes a fast request that arrives meanwhile
    /// wait, and how much a slower bin's step adds to a fast request's.
    pub slow_prefill_chunk: usize,
}

impl QueuePolicy {
    /// The defaults of the InferencePool API (fast 32–64, medium 16–32, slow 4–16 sequences;
    /// weights 3:2:1), capped by the batch size; priorities weigh high 4, medium 2, low 1. Step
    /// weights 12:4:1: slow sequences run one step in twelve while fast ones run; medium and slow
    /// prompts prefill 16 tokens a step.
    pub fn multi_bin(max_batch: usize) -> Self {
        let share = |min: usize, max: usize, weight| BinShare {
            min: min.min(max_batch),
            max: max.min(max_batch),
            weight,
        };
        Self {
            discipline: Discipline::MultiBin,
            shares: [share(32, 64, 3), share(16, 32, 2), share(4, 16, 1)],
            priority_weights: [1, 2, 4],
            aging: Duration::from_secs(2),
            step_weights: STEP_WEIGHTS,
            slow_prefill_chunk: SLOW_PREFILL_CHUNK,
        }
    }

    pub fn fcfs(max_batch: usize) -> Self {
        Self {
            discipline: Discipline::Fcfs,
            ..Self::multi_bin(max_batch)
        }
    }

    /// A class's weight: its bin's times its priority's.
    fn weight(&self, bin: usize, priority: Priority) -> f64 {
        f64::from(self.shares[bin].weight.max(1))
            * f64::from(self.priority_weights[priority as usize].max(1))
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
    /// Fair queueing: each class's (bin × effective priority) finish tag, which grows by
    /// 1/weight per admission from its start tag.
    finish: [[f64; 3]; 3],
    /// The virtual time: the start tag of the last admission. A class that was idle starts
    /// from it, not from credit saved up.
    clock: f64,
}

/// The oldest ready request of one class.
#[derive(Debug, Clone, Copy)]
struct Head {
    bin: usize,
    index: usize,
    priority: Priority,
    arrived: Instant,
}

impl<T: Queued> AdmissionQueue<T> {
    pub fn new(policy: QueuePolicy) -> Self {
        Self {
            policy,
            resumed: VecDeque::new(),
            queues: Default::default(),
            finish: [[0.0; 3]; 3],
            clock: 0.0,
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
        let queue = &mut self.queues[item.ticket().bin as usize];
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

    /// Where the next request to admit is, given the running batch: `None` for nothing,
    /// `Some(None)` for the first resumed request, else the chosen class's head.
    fn choose(&self, batch: Batch, now: Instant) -> Option<Option<Head>> {
        if !self.resumed.is_empty() {
            return Some(None);
        }
        if self.policy.discipline == Discipline::Fcfs {
            return (0..3)
                .filter_map(|b| {
                    let ticket = self.queues[b].front()?.ticket();
                    Some(Head {
                        bin: b,
                        index: 0,
                        priority: ticket.priority,
                        arrived: ticket.arrived,
                    })
                })
                .min_by_key(|h| h.arrived)
                .map(Some);
        }
        self.choose_multi_bin(batch, now).map(Some)
    }

    /// The start tag a class would be admitted at.
    fn start(&self, head: &Head) -> f64 {
        self.finish[head.bin][head.priority as usize].max(self.clock)
    }

    /// Each class's oldest ready request, in the open bins that `admits`.
    fn heads(&self, batch: Batch, now: Instant, admits: impl Fn(usize) -> bool) -> Vec<Head> {
        // A request holding out for company may go once there is a batch to join, or its wait
        // is over.
        let company = batch.running.iter().sum::<usize>() > 0;
        let ready = |t: &Ticket| company || t.hold_until.is_none_or(|h| h <= now);
        let mut heads = Vec::with_capacity(9);
        for b in (0..3).filter(|&b| !batch.closed[b] && admits(b)) {
            let mut found = [false; 3];
            // Queues are in arrival order.
            for (index, item) in self.queues[b].iter().enumerate() {
                let ticket = item.ticket();
                let priority = self.policy.effective(&ticket, now);
                if !ready(&ticket) || found[priority as usize] {
                    continue;
                }
                found[priority as usize] = true;
                heads.push(Head {
                    bin: b,
                    index,
                    priority,
                    arrived: ticket.arrived,
                });
                if found == [true; 3] {
                    break;
                }
            }
        }
        heads
    }

    fn choose_multi_bin(&self, batch: Batch, now: Instant) -> Option<Head> {
        let running = batch.running;
        let shares = &self.policy.shares;
        // Bins below their maximum first; when none of them has a request ready, the places
        // left are borrowed (work conservation).
        let mut heads = self.heads(batch, now, |b| running[b] < shares[b].max);
        if heads.is_empty() {
            heads = self.heads(batch, now, |_| true);
        }
        let below_min = |h: &Head| running[h.bin] < shares[h.bin].min;
        let pool_below_min = heads.iter().any(below_min);
        heads
            .into_iter()
            .filter(|h| !pool_below_min || below_min(h))
            .min_by(|x, y| {
                self.start(x)
                    .total_cmp(&self.start(y))
                    .then(y.priority.cmp(&x.priority))
                    .then(x.arrived.cmp(&y.arrived))
            })
    }

    /// Why nothing may be admitted while requests wait (when [`Self::pop`] gives nothing):
    /// their bins rest, or they hold out for company.
    pub fn why_waiting(&self, batch: Batch) -> Option<Stall> {
        if self.is_empty() {
            return None;
        }
        let resting = (0..3).any(|b| batch.closed[b] && !self.queues[b].is_empty());
        Some(if resting {
            Stall::RestingBin
        } else {
            Stall::Held
        })
    }

    /// The request that should run next, without taking it.
    pub fn peek(&self, batch: impl Into<Batch>, now: Instant) -> Option<&T> {
        match self.choose(batch.into(), now)? {
            None => self.resumed.front(),
            Some(head) => self.queues[head.bin].get(head.index),
        }
    }

    /// Takes the request that should run next, given the running batch.
    pub fn pop(&mut self, batch: impl Into<Batch>, now: Instant) -> Option<T> {
        let Some(head) = self.choose(batch.into(), now)? else {
            return self.resumed.pop_front();
        };
        let start = self.start(&head);
        self.clock = start;
        self.finish[head.bin][head.priority as usize] =
            start + 1.0 / self.policy.weight(head.bin, head.priority);
        self.queues[head.bin].remove(head.index)
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

    /// Fair queueing's shares are exact up to where the last tag ties fall.
    fn assert_within_one(counts: [usize; 3], expected: [usize; 3]) {
        assert!(
            counts.iter().zip(expected).all(|(c, e)| c.abs_diff(e) <= 1),
            "{counts:?}, expected {expected:?} ± 1"
        );
    }

    /// Admissions over a run of mixed arrivals, more than fit, where each running request
    /// finishes after its bin's service time (fast ones drain at once, so slower bins often
    /// have places to borrow).
    #[test]
    fn shares_order_admissions_and_places_are_borrowed_only_when_no_bin_below_its_maximum_waits() {
        let t0 = Instant::now();
        let policy = QueuePolicy::multi_bin(64);
        let shares = policy.shares;
        let mut queue = AdmissionQueue::new(policy);
        let mut id = 0;
        // Mixed arrivals: 70 % fast, 20 % medium, 10 % slow.
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
        let mut borrowed = 0;
        for step in 0..200 {
            running.retain(|&(_, end)| end > step);
            let now = t0 + Duration::from_secs(1);
            while running.len() < 64 {
                let mut counts = [0; 3];
                for (b, _) in &running {
                    counts[*b as usize] += 1;
                }
                let waiting = queue.depths().map(|d| d.iter().sum::<usize>());
                let Some(next) = queue.pop(counts, now) else {
                    assert_eq!(waiting, [0; 3], "step {step}: a place stayed idle");
                    break;
                };
                let b = next.0.bin as usize;
                if counts[b] >= shares[b].max {
                    borrowed += 1;
                    assert!(
                        (0..3).all(|o| waiting[o] == 0 || counts[o] >= shares[o].max),
                        "step {step}: {counts:?} borrowed while {waiting:?} waited"
                    );
                }
                let below_min = |o: usize| waiting[o] > 0 && counts[o] < shares[o].min;
                assert!(
                    below_min(b) || !(0..3).any(below_min),
                    "step {step}: {counts:?}, bin {b} went before a bin below its minimum"
                );
                running.push((next.0.bin, step + service[b]));
            }
            for i in 0..20 {
                let bin = [Bin::Fast, Bin::Fast, Bin::Medium, Bin::Slow][i % 4];
                queue.push(req(id, bin, Priority::Medium, t0 + Duration::from_secs(1)));
                id += 1;
            }
        }
        assert!(borrowed > 0, "the run never had a place to lend");
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
        // The slow bin is at its maximum share: the fast request goes first, though it came
        // last.
        let next = queue
            .pop([0, 0, 16], t0 + Duration::from_millis(5))
            .unwrap();
        assert_eq!(next.1, 999);
        // With nothing else waiting, the slow bin borrows the places left; a resting bin
        // borrows nothing.
        let next = queue.pop([1, 0, 16], t0).unwrap();
        assert_eq!(next.0.bin, Bin::Slow);
        let resting = Batch {
            running: [1, 0, 17],
            closed: [false, false, true],
        };
        assert!(queue.pop(resting, t0).is_none());
        assert_eq!(queue.why_waiting(resting), Some(Stall::RestingBin));
    }

    #[test]
    fn low_priority_requests_get_their_share_and_aging_bounds_their_wait() {
        let t0 = Instant::now();
        let policy = QueuePolicy::multi_bin(64);
        let mut queue = AdmissionQueue::new(policy);
        for id in 0..100 {
            queue.push(req(id, Bin::Fast, Priority::Low, t0));
        }
        // One admission per 10 ms and two new high-priority requests per 10 ms: high ones alone
        // could take every admission.
        let tick = Duration::from_millis(10);
        let mut id = 100;
        let mut low_admitted = Vec::new();
        for step in 1..10_000u32 {
            let now = t0 + tick * step;
            for _ in 0..2 {
                queue.push(req(id, Bin::Fast, Priority::High, now));
                id += 1;
            }
            if queue.pop([0; 3], now).unwrap().1 < 100 {
                low_admitted.push(now - t0);
            }
            if low_admitted.len() == 100 {
                break;
            }
        }
        // Before aging lifts them, weights 1 against 4: one admission in five.
        let early = low_admitted.iter().filter(|w| **w < policy.aging).count();
        assert!(
            (38..=41).contains(&early),
            "{early} low admissions in the first 2 s"
        );
        // Then raised to medium (2 against 4), the rest go within the second aging period; at
        // one in five they would need 5 s in all.
        let last = *low_admitted.last().expect("every low-priority request ran");
        assert!(last < policy.aging * 2, "the last one waited {last:?}");
    }

    #[test]
    fn priorities_share_admissions_by_weight() {
        let t0 = Instant::now();
        let mut queue = AdmissionQueue::new(QueuePolicy::multi_bin(1000));
        for i in 0..300 {
            queue.push(req(i, Bin::Fast, Priority::ALL[i % 3], t0));
        }
        let mut counts = [0usize; 3];
        for _ in 0..70 {
            counts[queue.pop([40, 0, 0], t0).unwrap().0.priority as usize] += 1;
        }
        // Low, medium, high at 1:2:4.
        assert_within_one(counts, [10, 20, 40]);
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
        assert_within_one(counts, [60, 40, 20]);
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
