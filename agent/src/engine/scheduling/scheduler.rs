//! Iteration-level scheduling, without a model: which sequences run in the next step and how many
//! of their tokens, under a token budget (chunked prefill), a sequence cap and the free KV blocks.
//! Waiting sequences are admitted in the order the [`AdmissionQueue`] gives (first come first
//! served, or bins and priorities); a sequence admitted takes the longest cached prefix of its
//! tokens first. When blocks run out the most recently admitted sequence is preempted: its blocks
//! are freed and it resumes first, recomputed. A high-priority request that cannot be admitted
//! preempts the newest low-priority running sequence, and a bin below its guaranteed minimum
//! takes places back from bins running beyond their maximum; the victims wait again. Every step
//! that leaves requests waiting counts why ([`Stall`]).

use super::admission::{
    AdmissionQueue, Batch, Bin, Discipline, Priority, QueuePolicy, Queued, Stall,
};
use super::blocks::{BlockHash, BlockTable};
use std::time::Instant;

/// What the scheduler needs of a sequence.
pub trait Schedulable: Queued {
    /// Tokens known: prompt plus generated.
    fn total_tokens(&self) -> usize;
    /// Tokens whose keys and values are in the cache.
    fn computed(&self) -> usize;
    /// Forgets the cache (preemption): `computed` becomes 0.
    fn reset(&mut self);
    /// On admission, with nothing computed: takes the longest cached prefix of the tokens into
    /// the table and counts it as computed.
    fn reuse_cached_prefix(&mut self) {}
    /// The content hash of the KV block the sequence computes next (see
    /// [`BlockTable::frontier`]); `None` without prefix caching.
    fn frontier(&self) -> Option<BlockHash> {
        None
    }
    fn table(&mut self) -> &mut BlockTable;
    fn table_ref(&self) -> &BlockTable;
}

/// Limits of one step and the admission order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens in one forward pass (prefill chunks plus decode tokens).
    pub max_batched_tokens: usize,
    pub policy: QueuePolicy,
}

impl SchedulerConfig {
    pub fn new(max_num_seqs: usize, max_batched_tokens: usize) -> Self {
        Self {
            max_num_seqs,
            max_batched_tokens,
            policy: QueuePolicy::multi_bin(max_num_seqs),
        }
    }
}

/// One sequence's share of a step: `running()[index]` runs `tokens` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    pub index: usize,
    pub tokens: usize,
}

/// Why a sequence was preempted, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preemption {
    /// Its blocks were needed by an older sequence.
    OutOfBlocks,
    /// A high-priority request needed its place.
    Priority,
    /// A bin below its guaranteed minimum took back a place borrowed beyond another bin's
    /// maximum.
    BinShare,
}

impl Preemption {
    pub const ALL: [Preemption; 3] = [
        Preemption::OutOfBlocks,
        Preemption::Priority,
        Preemption::BinShare,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OutOfBlocks => "out_of_blocks",
            Self::Priority => "priority",
            Self::BinShare => "bin_share",
        }
    }
}

/// The waiting queue and the running set.
#[derive(Debug)]
pub struct Scheduler<S> {
    config: SchedulerConfig,
    waiting: AdmissionQueue<S>,
    running: Vec<S>,
    /// Indexed by [`Preemption`].
    preemptions: [u64; 3],
    /// Steps that left requests waiting, by why: indexed like [`Stall::ALL`].
    stalls: [u64; Stall::ALL.len()],
    /// Under memory pressure nothing new is admitted.
    pressure: bool,
    /// A lower cap on sequences per step than the configured one (the circuit breaker's
    /// single-request mode).
    limit: Option<usize>,
    /// Weighted steps: what each bin has earned towards its next step while a faster bin leads,
    /// in units of the leading bin's weight.
    step_credit: [u32; 3],
}

impl<S: Schedulable> Scheduler<S> {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            waiting: AdmissionQueue::new(config.policy),
            running: Vec::new(),
            preemptions: [0; 3],
            stalls: [0; Stall::ALL.len()],
            pressure: false,
            limit: None,
            step_credit: [0; 3],
        }
    }

    /// Caps the sequences in a step below the configured maximum (`None` lifts the cap). Running
    /// sequences beyond it wait, keeping their cache.
    pub fn set_batch_limit(&mut self, limit: Option<usize>) {
        self.limit = limit;
    }

    fn max_seqs(&self) -> usize {
        self.limit.map_or(self.config.max_num_seqs, |l| {
            l.min(self.config.max_num_seqs)
        })
    }

    pub fn add(&mut self, seq: S) {
        self.waiting.push(seq);
    }

    /// While set, running sequences continue but none is admitted (KV memory pressure).
    pub fn set_pressure(&mut self, on: bool) {
        self.pressure = on;
    }

    pub fn under_pressure(&self) -> bool {
        self.pressure
    }

    /// Waiting requests by bin and priority.
    pub fn queue_depths(&self) -> [[usize; 3]; 3] {
        self.waiting.depths()
    }

    /// When a request held for company stops waiting for it.
    pub fn next_release(&self) -> Option<Instant> {
        self.waiting.next_release()
    }

    /// Running sequences per bin.
    pub fn running_per_bin(&self) -> [usize; 3] {
        let mut counts = [0; 3];
        for seq in &self.running {
            counts[seq.ticket().bin as usize] += 1;
        }
        counts
    }

    pub fn running(&self) -> &[S] {
        &self.running
    }

    pub fn running_mut(&mut self) -> &mut [S] {
        &mut self.running
    }

    pub fn waiting(&self) -> impl Iterator<Item = &S> {
        self.waiting.iter()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Preemptions so far, all reasons.
    pub fn preemptions(&self) -> u64 {
        self.preemptions.iter().sum()
    }

    pub fn preemptions_for(&self, reason: Preemption) -> u64 {
        self.preemptions[reason as usize]
    }

    /// Steps so far that left requests waiting for this reason.
    pub fn stalls(&self, reason: Stall) -> u64 {
        self.stalls[reason as usize]
    }

    /// Removes (and so frees) every sequence, waiting or running, for which `keep` is false.
    pub fn retain(&mut self, mut keep: impl FnMut(&S) -> bool) -> Vec<S> {
        let mut removed = Vec::new();
        let running = std::mem::take(&mut self.running);
        for seq in running {
            if keep(&seq) {
                self.running.push(seq);
            } else {
                removed.push(seq);
            }
        }
        self.waiting.retain(keep, &mut removed);
        removed
    }

    fn preempt(&mut self, index: usize, reason: Preemption) {
        let mut victim = self.running.remove(index);
        victim.table().clear();
        victim.reset();
        self.preemptions[reason as usize] += 1;
        match reason {
            Preemption::OutOfBlocks => self.waiting.push_resumed(victim),
            Preemption::Priority | Preemption::BinShare => self.waiting.push(victim),
        }
    }

    /// Preempts to make room for waiting requests the policy owes a place: the newest
    /// low-priority running sequence when the next request is of high priority and cannot be
    /// admitted (the batch is full, or its prompt does not fit the free blocks); and sequences
    /// borrowed beyond their bin's maximum, newest first, while a bin with requests waiting is
    /// below its guaranteed minimum and the batch has no place for them.
    fn make_room(&mut self) {
        if self.pressure || self.config.policy.discipline == Discipline::Fcfs {
            return;
        }
        // The most urgent waiting request, whatever its bin's share: a preemption makes room.
        if let Some(head) = self.waiting.peek([0; 3], Instant::now())
            && head.ticket().priority == Priority::High
        {
            let wanted = head
                .total_tokens()
                .min(head.computed() + self.config.max_batched_tokens);
            let full = self.running.len() >= self.max_seqs();
            if (full || !head.table_ref().fits(wanted))
                && let Some(i) = self
                    .running
                    .iter()
                    .rposition(|s| s.ticket().priority == Priority::Low)
            {
                self.preempt(i, Preemption::Priority);
            }
        }
        self.return_borrowed_places();
    }

    /// Gives a bin below its minimum, with requests waiting, the places it is owed from bins
    /// running beyond their maximum (work conservation lends places; this takes them back).
    fn return_borrowed_places(&mut self) {
        let shares = self.config.policy.shares;
        let waiting = self.waiting.depths();
        for bin in 0..3 {
            let running = self.running_per_bin();
            let queued: usize = waiting[bin].iter().sum();
            let owed = queued.min(shares[bin].min.saturating_sub(running[bin]));
            let places = self.max_seqs().saturating_sub(self.running.len());
            for _ in places..owed {
                let running = self.running_per_bin();
                let Some(i) = self.running.iter().rposition(|s| {
                    let b = s.ticket().bin as usize;
                    b != bin && running[b] > shares[b].max
                }) else {
                    break;
                };
                self.preempt(i, Preemption::BinShare);
            }
        }
    }

    /// The bins that sit this step out, by step weight: the fastest bin with a running sequence,
    /// or with a waiting one that may be admitted, leads and runs every step (so the step that
    /// prefills a fast request leaves slower bins out); a slower bin earns its step weight each
    /// step and runs when it has earned the leader's (defaults 12:4:1 — slow sequences run one
    /// step in twelve while fast ones run, one in four while medium ones lead). A slower bin whose
    /// share is full while requests wait for it rests no step: resting would only lengthen its
    /// queue, so it runs with the leader until a place frees.
    fn resting_bins(&mut self) -> [bool; 3] {
        let mut resting = [false; 3];
        let policy = self.config.policy;
        if policy.discipline == Discipline::Fcfs {
            return resting;
        }
        let running = self.running_per_bin();
        let admitting = !self.pressure && self.running.len() < self.max_seqs();
        let waiting = self.waiting.depths();
        let full = |b: usize| running[b] >= policy.shares[b].max;
        let queued = |b: usize| waiting[b] != [0; 3];
        let Some(lead) = (0..3).find(|&b| running[b] > 0 || (admitting && !full(b) && queued(b)))
        else {
            return resting;
        };
        let lead_weight = policy.step_weights[lead].max(1);
        for b in lead + 1..3 {
            if running[b] == 0 || (full(b) && queued(b)) {
                continue;
            }
            let mut credit = self.step_credit[b].saturating_add(policy.step_weights[b].max(1));
            resting[b] = credit < lead_weight;
            if !resting[b] {
                credit -= lead_weight;
            }
            // What is left over carries to the next step, but no more than one step's worth.
            self.step_credit[b] = credit.min(lead_weight);
        }
        resting
    }

    /// Plans the next step. Running sequences go first, oldest first (those of a resting bin
    /// wait, keeping their cache); waiting ones are admitted in the queue's order while budget,
    /// sequence cap and blocks allow — but not in a step that had to preempt, so memory pressure
    /// is not made worse at once, and not into a resting bin.
    pub fn schedule(&mut self) -> Vec<Scheduled> {
        self.make_room();
        let resting = self.resting_bins();
        let (mut plan, mut stall) = self.plan(resting);
        if plan.is_empty() && resting.contains(&true) {
            // What led could not run (a waiting request that does not fit): nobody rests.
            (plan, stall) = self.plan([false; 3]);
        }
        if let Some(stall) = stall
            && !self.waiting.is_empty()
        {
            self.stalls[stall as usize] += 1;
        }
        plan
    }

    /// A cap, besides the step budget, on the tokens a sequence of `bin` runs in one step: with
    /// multi-bin, medium and slow prompts go in chunks of [`QueuePolicy::slow_prefill_chunk`].
    fn prefill_chunk(&self, bin: Bin) -> usize {
        let policy = &self.config.policy;
        if policy.discipline == Discipline::MultiBin && bin != Bin::Fast {
            policy.slow_prefill_chunk.max(1)
        } else {
            usize::MAX
        }
    }

    /// The step, with the bins in `resting` sitting it out, and why it admitted no more.
    fn plan(&mut self, resting: [bool; 3]) -> (Vec<Scheduled>, Option<Stall>) {
        let mut budget = self.config.max_batched_tokens;
        let mut plan = Vec::with_capacity(self.running.len() + 1);
        let mut preempted = false;
        let mut i = 0;
        let max_seqs = self.max_seqs();
        while i < self.running.len() && budget > 0 && plan.len() < max_seqs {
            if resting[self.running[i].ticket().bin as usize] {
                i += 1;
                continue;
            }
            let (len, computed) = (self.running[i].total_tokens(), self.running[i].computed());
            let bin = self.running[i].ticket().bin;
            let tokens = (len - computed).min(budget).min(self.prefill_chunk(bin));
            loop {
                if self.running[i].table().reserve(computed + tokens) {
                    plan.push(Scheduled { index: i, tokens });
                    budget -= tokens;
                    i += 1;
                    break;
                }
                // Out of blocks: preempt the newest running sequence, possibly this one.
                self.preempt(self.running.len() - 1, Preemption::OutOfBlocks);
                preempted = true;
                if self.running.len() == i {
                    break;
                }
            }
        }
        let stall = self.admit(&mut plan, budget, resting, preempted);
        (plan, stall)
    }

    /// Admits waiting sequences into the step under what is left of its `budget`, in the queue's
    /// order, none into a `resting` bin; says why it stopped.
    fn admit(
        &mut self,
        plan: &mut Vec<Scheduled>,
        budget: usize,
        resting: [bool; 3],
        preempted: bool,
    ) -> Option<Stall> {
        if preempted {
            return Some(Stall::Blocks);
        }
        if self.pressure {
            return Some(Stall::KvPressure);
        }
        // A sequence that runs alone admits no company.
        if self.running.iter().any(|s| s.ticket().exclusive) {
            return Some(Stall::Exclusive);
        }
        // The blocks being computed in this step, by the sequences that run in it.
        let mut in_flight: Vec<BlockHash> = plan
            .iter()
            .filter_map(|p| self.running[p.index].frontier())
            .collect();
        let mut deferred = Vec::new();
        let stall = self.admit_into(plan, budget, resting, &mut in_flight, &mut deferred);
        let waited_for_prefix = !deferred.is_empty();
        for seq in deferred {
            self.waiting.push(seq);
        }
        match stall {
            Some(Stall::Held) | None if waited_for_prefix => Some(Stall::SharedPrefix),
            stall => stall,
        }
    }

    /// The admission loop of [`Self::admit`]; sequences that wait for a block in flight go to
    /// `deferred`.
    fn admit_into(
        &mut self,
        plan: &mut Vec<Scheduled>,
        mut budget: usize,
        resting: [bool; 3],
        in_flight: &mut Vec<BlockHash>,
        deferred: &mut Vec<S>,
    ) -> Option<Stall> {
        let max_seqs = self.max_seqs();
        let now = Instant::now();
        loop {
            if budget == 0 {
                return Some(Stall::TokenBudget);
            }
            if self.running.len() >= max_seqs {
                return Some(Stall::SequenceCap);
            }
            let batch = Batch {
                running: self.running_per_bin(),
                closed: resting,
            };
            let Some(mut seq) = self.waiting.pop(batch, now) else {
                return self.waiting.why_waiting(batch);
            };
            let ticket = seq.ticket();
            if ticket.exclusive && !self.running.is_empty() {
                self.waiting.push_resumed(seq);
                return Some(Stall::Exclusive);
            }
            seq.reuse_cached_prefix();
            // A block another sequence is computing now will be cached after this step: wait for
            // it rather than compute it twice (a prompt shared by requests that arrive together).
            let frontier = seq.frontier();
            if frontier.is_some_and(|f| in_flight.contains(&f)) {
                seq.table().clear();
                seq.reset();
                deferred.push(seq);
                continue;
            }
            let (len, computed) = (seq.total_tokens(), seq.computed());
            let tokens = (len - computed)
                .min(budget)
                .min(self.prefill_chunk(ticket.bin));
            if !seq.table().reserve(computed + tokens) {
                // What it took from the prefix cache goes back until it can run.
                seq.table().clear();
                seq.reset();
                self.waiting.push_resumed(seq);
                return Some(Stall::Blocks);
            }
            budget -= tokens;
            plan.push(Scheduled {
                index: self.running.len(),
                tokens,
            });
            in_flight.extend(frontier);
            self.running.push(seq);
            if ticket.exclusive {
                return Some(Stall::Exclusive);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::scheduling::admission::{BinShare, EVERY_STEP, Ticket};
    use crate::engine::scheduling::blocks::BlockAllocator;

    #[derive(Debug)]
    struct Seq {
        id: usize,
        len: usize,
        computed: usize,
        table: BlockTable,
        ticket: Ticket,
    }

    impl Queued for Seq {
        fn ticket(&self) -> Ticket {
            self.ticket
        }
    }

    impl Schedulable for Seq {
        fn total_tokens(&self) -> usize {
            self.len
        }
        fn computed(&self) -> usize {
            self.computed
        }
        fn reset(&mut self) {
            self.computed = 0;
        }
        fn table(&mut self) -> &mut BlockTable {
            &mut self.table
        }
        fn table_ref(&self) -> &BlockTable {
            &self.table
        }
    }

    fn seq(allocator: &BlockAllocator, id: usize, prompt: usize) -> Seq {
        Seq {
            id,
            len: prompt,
            computed: 0,
            table: BlockTable::new(allocator, 16),
            ticket: Ticket::new(Instant::now()),
        }
    }

    fn seq_in(allocator: &BlockAllocator, id: usize, prompt: usize, bin: Bin) -> Seq {
        let mut q = seq(allocator, id, prompt);
        q.ticket.bin = bin;
        q
    }

    /// Applies a plan as the engine would: cache what ran, append a token to finished prefills.
    fn run(s: &mut Scheduler<Seq>, plan: &[Scheduled]) {
        for p in plan {
            let seq = &mut s.running_mut()[p.index];
            seq.computed += p.tokens;
            if seq.computed == seq.len {
                seq.len += 1;
            }
        }
    }

    #[test]
    fn prefill_is_chunked_under_the_token_budget() {
        let allocator = BlockAllocator::new(100);
        let mut s = Scheduler::new(SchedulerConfig::new(8, 32));
        s.add(seq(&allocator, 0, 50));
        s.add(seq(&allocator, 1, 10));
        let plan = s.schedule();
        assert_eq!(
            plan,
            vec![Scheduled {
                index: 0,
                tokens: 32
            }]
        );
        run(&mut s, &plan);
        let plan = s.schedule();
        assert_eq!(
            plan,
            vec![
                Scheduled {
                    index: 0,
                    tokens: 18
                },
                Scheduled {
                    index: 1,
                    tokens: 10
                }
            ]
        );
        run(&mut s, &plan);
        let plan = s.schedule();
        assert_eq!(
            plan,
            vec![
                Scheduled {
                    index: 0,
                    tokens: 1
                },
                Scheduled {
                    index: 1,
                    tokens: 1
                }
            ],
            "both decode"
        );
    }

    #[test]
    fn the_sequence_cap_holds_back_admissions() {
        let allocator = BlockAllocator::new(100);
        let mut s = Scheduler::new(SchedulerConfig::new(2, 1000));
        for id in 0..3 {
            s.add(seq(&allocator, id, 4));
        }
        assert_eq!(s.schedule().len(), 2);
        assert_eq!(s.num_waiting(), 1);
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_frees_its_blocks() {
        // 4 blocks of 16: two sequences of 32 tokens fill them; the next token needs a fifth.
        let allocator = BlockAllocator::new(4);
        let mut s = Scheduler::new(SchedulerConfig::new(8, 1000));
        s.add(seq(&allocator, 0, 31));
        s.add(seq(&allocator, 1, 32));
        let plan = s.schedule();
        run(&mut s, &plan);
        assert_eq!(allocator.free(), 0);
        // Sequence 0 now has 32 tokens (fits), sequence 1 has 33 (needs a block): 1 is preempted.
        let plan = s.schedule();
        assert_eq!(
            plan,
            vec![Scheduled {
                index: 0,
                tokens: 1
            }]
        );
        assert_eq!(s.preemptions(), 1);
        assert_eq!(s.waiting().next().map(|q| (q.id, q.computed)), Some((1, 0)));
        assert_eq!(
            allocator.free(),
            2,
            "the preempted sequence's two blocks came back"
        );
    }

    #[test]
    fn a_sequence_that_preempts_itself_waits_for_blocks() {
        let allocator = BlockAllocator::new(1);
        let mut s = Scheduler::new(SchedulerConfig::new(8, 1000));
        s.add(seq(&allocator, 0, 16));
        let plan = s.schedule();
        run(&mut s, &plan);
        assert!(s.schedule().is_empty());
        assert_eq!(
            (s.running().len(), s.num_waiting(), allocator.free()),
            (0, 1, 1)
        );
    }

    #[test]
    fn removed_sequences_free_their_blocks() {
        let allocator = BlockAllocator::new(10);
        let mut s = Scheduler::new(SchedulerConfig::new(8, 1000));
        s.add(seq(&allocator, 0, 40));
        s.add(seq(&allocator, 1, 40));
        s.schedule();
        assert_eq!(allocator.free(), 4);
        let removed = s.retain(|q| q.id == 1);
        assert_eq!(removed.len(), 1);
        drop(removed);
        assert_eq!(allocator.free(), 7);
    }

    #[test]
    fn a_high_priority_request_preempts_the_newest_low_priority_sequence_when_the_batch_is_full() {
        let allocator = BlockAllocator::new(100);
        let mut s = Scheduler::new(SchedulerConfig::new(2, 1000));
        let with = |id, priority| {
            let mut q = seq(&allocator, id, 4);
            q.ticket.priority = priority;
            q
        };
        s.add(with(0, Priority::Low));
        s.add(with(1, Priority::Low));
        let plan = s.schedule();
        run(&mut s, &plan);
        s.add(with(2, Priority::Medium));
        // A medium request waits for a place.
        assert_eq!(s.schedule().len(), 2);
        assert_eq!(s.preemptions(), 0);
        s.add(with(3, Priority::High));
        let plan = s.schedule();
        let running: Vec<usize> = s.running().iter().map(|q| q.id).collect();
        assert_eq!(
            running,
            [0, 3],
            "the newest low-priority sequence made room"
        );
        assert_eq!(plan.len(), 2);
        assert_eq!(s.preemptions_for(Preemption::Priority), 1);
        // The victim waits again, its cache forgotten, and keeps its place in arrival order.
        let waiting: Vec<(usize, usize)> = s.waiting().map(|q| (q.id, q.computed)).collect();
        assert_eq!(waiting, [(1, 0), (2, 0)]);
    }

    #[test]
    fn a_sequence_that_runs_alone_admits_no_company() {
        let allocator = BlockAllocator::new(100);
        let mut s = Scheduler::new(SchedulerConfig::new(8, 1000));
        let mut alone = seq(&allocator, 0, 4);
        alone.ticket.exclusive = true;
        s.add(alone);
        s.add(seq(&allocator, 1, 4));
        assert_eq!(s.schedule().len(), 1);
        assert_eq!(s.num_waiting(), 1);
        assert_eq!(s.schedule().len(), 1, "still alone");
        drop(s.retain(|q| q.id != 0));
        assert_eq!(s.schedule().len(), 1, "then the next one runs");
    }

    #[test]
    fn under_memory_pressure_running_sequences_continue_and_none_is_admitted() {
        let allocator = BlockAllocator::new(100);
        let mut s = Scheduler::new(SchedulerConfig::new(8, 1000));
        s.add(seq(&allocator, 0, 4));
        let plan = s.schedule();
        run(&mut s, &plan);
        s.add(seq(&allocator, 1, 4));
        s.set_pressure(true);
        assert_eq!(s.schedule().len(), 1);
        s.set_pressure(false);
        assert_eq!(s.schedule().len(), 2);
    }

    /// Steps each sequence id takes part in over `steps` steps.
    fn steps_taken(s: &mut Scheduler<Seq>, steps: usize) -> Vec<usize> {
        let mut taken = vec![0; 8];
        for _ in 0..steps {
            let plan = s.schedule();
            for p in &plan {
                taken[s.running()[p.index].id] += 1;
            }
            run(s, &plan);
        }
        taken
    }

    #[test]
    fn medium_and_slow_prompts_prefill_in_small_chunks_fast_ones_in_the_step_budget() {
        let allocator = BlockAllocator::new(100);
        let in_bin = |id, bin| seq_in(&allocator, id, 40, bin);
        let chunks = |policy: QueuePolicy, bin| {
            let mut s = Scheduler::new(SchedulerConfig {
                policy,
                ..SchedulerConfig::new(8, 512)
            });
            s.add(in_bin(0, bin));
            let mut chunks = Vec::new();
            while s.running().first().is_none_or(|q| q.computed < 40) {
                let plan = s.schedule();
                chunks.push(plan[0].tokens);
                run(&mut s, &plan);
            }
            chunks
        };
        let multi_bin = QueuePolicy::multi_bin(8);
        assert_eq!(chunks(multi_bin, Bin::Slow), [16, 16, 8]);
        assert_eq!(chunks(multi_bin, Bin::Medium), [16, 16, 8]);
        assert_eq!(chunks(multi_bin, Bin::Fast), [40]);
        assert_eq!(chunks(QueuePolicy::fcfs(8), Bin::Slow), [40]);
        let coarse = QueuePolicy {
            slow_prefill_chunk: 32,
            ..multi_bin
        };
        assert_eq!(chunks(coarse, Bin::Slow), [32, 8]);
    }

    #[test]
    fn the_step_that_admits_a_fast_request_leaves_slower_bins_out_unless_it_cannot_run() {
        let allocator = BlockAllocator::new(4);
        let in_bin = |id, prompt, bin| seq_in(&allocator, id, prompt, bin);
        let ids = |s: &Scheduler<Seq>, plan: &[Scheduled]| -> Vec<usize> {
            plan.iter().map(|p| s.running()[p.index].id).collect()
        };
        let mut s = Scheduler::new(SchedulerConfig::new(8, 1000));
        s.add(in_bin(0, 8, Bin::Slow));
        let plan = s.schedule();
        run(&mut s, &plan);
        s.add(in_bin(1, 4, Bin::Fast));
        let plan = s.schedule();
        assert_eq!(ids(&s, &plan), vec![1], "only the fast prefill");
        run(&mut s, &plan);
        // A fast request whose prompt never fits the free blocks waits; slow 0 keeps its one
        // step in twelve beside fast 1.
        s.add(in_bin(2, 70, Bin::Fast));
        let mut slow_ran = 0;
        for _ in 0..12 {
            let plan = s.schedule();
            slow_ran += usize::from(ids(&s, &plan).contains(&0));
            run(&mut s, &plan);
        }
        assert_eq!((slow_ran, s.num_waiting()), (1, 1));
        // With nothing fast running, what cannot be admitted does not hold the slow one back.
        drop(s.retain(|q| q.id != 1));
        let plan = s.schedule();
        assert_eq!(ids(&s, &plan), vec![0]);
    }

    #[test]
    fn slower_bins_sit_out_steps_by_weight_while_a_faster_one_runs() {
        let allocator = BlockAllocator::new(100);
        let in_bin = |id, bin| seq_in(&allocator, id, 4, bin);
        let weighted = |step_weights| SchedulerConfig {
            policy: QueuePolicy {
                step_weights,
                ..QueuePolicy::multi_bin(8)
            },
            ..SchedulerConfig::new(8, 1000)
        };
        let mut s = Scheduler::new(weighted([3, 2, 1]));
        s.add(in_bin(0, Bin::Slow));
        assert_eq!(steps_taken(&mut s, 4)[0], 4, "alone, slow runs every step");
        // Medium (weight 2) leads: slow (1) runs every second step, and a slow request that
        // arrives meanwhile is admitted only in a step its bin runs.
        s.add(in_bin(1, Bin::Medium));
        assert_eq!(steps_taken(&mut s, 1)[1], 1, "admitted at once");
        s.add(in_bin(2, Bin::Slow));
        let taken = steps_taken(&mut s, 12);
        assert_eq!((taken[0], taken[1], taken[2]), (6, 12, 6));
        // Fast (3) leads: medium runs two steps in three, slow one in three.
        s.add(in_bin(3, Bin::Fast));
        steps_taken(&mut s, 1);
        let taken = steps_taken(&mut s, 12);
        assert_eq!(&taken[..4], &[4, 8, 4, 12]);
        // Every sequence stayed running: resting keeps a sequence's place and cache.
        assert_eq!(s.running().len(), 4);

        // The defaults, 12:4:1: slow one step in twelve beside fast, medium one in three.
        let mut s = Scheduler::new(SchedulerConfig::new(8, 1000));
        s.add(in_bin(0, Bin::Fast));
        s.add(in_bin(1, Bin::Medium));
        s.add(in_bin(2, Bin::Slow));
        steps_taken(&mut s, 1);
        assert_eq!(&steps_taken(&mut s, 24)[..3], &[24, 8, 2]);

        // A slow bin whose share (here 2) is full while a slow request waits (the batch of 3
        // has no place to lend) runs every step, and rests again once nothing waits for it.
        let mut policy = QueuePolicy::multi_bin(3);
        policy.shares[Bin::Slow as usize] = BinShare {
            min: 0,
            max: 2,
            weight: 1,
        };
        let mut s = Scheduler::new(SchedulerConfig {
            policy,
            ..SchedulerConfig::new(3, 1000)
        });
        s.add(in_bin(0, Bin::Fast));
        s.add(in_bin(1, Bin::Slow));
        s.add(in_bin(2, Bin::Slow));
        s.add(in_bin(3, Bin::Slow));
        steps_taken(&mut s, 1);
        assert_eq!(&steps_taken(&mut s, 12)[..4], &[12, 12, 12, 0]);
        drop(s.retain(|q| q.id != 3));
        assert_eq!(&steps_taken(&mut s, 12)[..3], &[12, 1, 1]);

        for config in [
            SchedulerConfig {
                policy: QueuePolicy::fcfs(8),
                ..SchedulerConfig::new(8, 1000)
            },
            weighted(EVERY_STEP),
        ] {
            let mut s = Scheduler::new(config);
            s.add(in_bin(0, Bin::Slow));
            s.add(in_bin(1, Bin::Fast));
            assert_eq!(&steps_taken(&mut s, 6)[..2], &[6, 6], "{:?}", config.policy);
        }
    }

    #[test]
    fn identical_slow_requests_fill_the_batch_beyond_the_slow_bins_maximum() {
        // The default shares (slow 4–16) with a batch of 64: 48 long requests all run.
        let allocator = BlockAllocator::new(1000);
        let mut s = Scheduler::new(SchedulerConfig::new(64, 512));
        for id in 0..48 {
            s.add(seq_in(&allocator, id, 40, Bin::Slow));
        }
        let mut most = 0;
        for _ in 0..8 {
            let plan = s.schedule();
            run(&mut s, &plan);
            most = most.max(s.running().len());
        }
        assert_eq!((most, s.num_waiting()), (48, 0));
    }

    #[test]
    fn a_faster_bin_arriving_later_takes_its_guaranteed_places_back_at_once() {
        // A batch of 16 full of slow sequences (slow share 1–4, so 12 borrowed); then fast
        // requests arrive, their bin guaranteed 6 places.
        let allocator = BlockAllocator::new(1000);
        let mut policy = QueuePolicy::multi_bin(16);
        policy.shares = [
            BinShare {
                min: 6,
                max: 16,
                weight: 3,
            },
            BinShare {
                min: 0,
                max: 16,
                weight: 2,
            },
            BinShare {
                min: 1,
                max: 4,
                weight: 1,
            },
        ];
        let mut s = Scheduler::new(SchedulerConfig {
            policy,
            ..SchedulerConfig::new(16, 1000)
        });
        for id in 0..20 {
            s.add(seq_in(&allocator, id, 8, Bin::Slow));
        }
        let plan = s.schedule();
        run(&mut s, &plan);
        assert_eq!(s.running_per_bin(), [0, 0, 16]);
        for id in 100..110 {
            s.add(seq_in(&allocator, id, 8, Bin::Fast));
        }
        // The next step admits six fast requests: six borrowed slow places went back (their
        // sequences wait again), and no more than that.
        let plan = s.schedule();
        assert_eq!(s.running_per_bin(), [6, 0, 10]);
        assert_eq!(s.preemptions_for(Preemption::BinShare), 6);
        assert_eq!(plan.len(), 16);
        // A bin at its minimum takes nothing more back: the other fast requests wait for places.
        run(&mut s, &plan);
        s.schedule();
        assert_eq!(s.running_per_bin(), [6, 0, 10]);
        assert_eq!(s.preemptions_for(Preemption::BinShare), 6);
        // Fast requests get the next free places before slow ones, which borrow again only
        // when no fast request waits.
        drop(s.retain(|q| q.id >= 100 || q.id % 2 == 0));
        let plan = s.schedule();
        run(&mut s, &plan);
        assert_eq!(s.running_per_bin(), [10, 0, 6]);
    }

    #[test]
    fn each_step_that_leaves_requests_waiting_counts_why() {
        let total = |s: &Scheduler<Seq>| Stall::ALL.iter().map(|r| s.stalls(*r)).sum::<u64>();
        let allocator = BlockAllocator::new(100);
        let mut s = Scheduler::new(SchedulerConfig::new(2, 20));
        for id in 0..3 {
            s.add(seq(&allocator, id, 16));
        }
        // 16 + 4 tokens spend the budget; then two running are the cap.
        let plan = s.schedule();
        run(&mut s, &plan);
        assert_eq!(s.stalls(Stall::TokenBudget), 1);
        let plan = s.schedule();
        run(&mut s, &plan);
        assert_eq!(s.stalls(Stall::SequenceCap), 1);
        // With nothing left waiting, a full batch is no stall.
        drop(s.retain(|q| q.id == 2));
        s.schedule();
        assert_eq!((s.num_waiting(), total(&s)), (0, 2));
        s.set_pressure(true);
        s.add(seq(&allocator, 3, 4));
        s.schedule();
        assert_eq!(s.stalls(Stall::KvPressure), 1);

        // One block: the second prompt does not fit.
        let allocator = BlockAllocator::new(1);
        let mut s = Scheduler::new(SchedulerConfig::new(8, 100));
        s.add(seq(&allocator, 0, 16));
        s.add(seq(&allocator, 1, 4));
        s.schedule();
        assert_eq!(s.stalls(Stall::Blocks), 1);

        // A request that runs alone.
        let allocator = BlockAllocator::new(100);
        let mut s = Scheduler::new(SchedulerConfig::new(8, 100));
        let mut alone = seq(&allocator, 0, 4);
        alone.ticket.exclusive = true;
        s.add(alone);
        s.add(seq(&allocator, 1, 4));
        s.schedule();
        assert_eq!(s.stalls(Stall::Exclusive), 1);

        // A slow request waiting while the slow bin rests (fast 12 : slow 1).
        let mut s = Scheduler::new(SchedulerConfig::new(8, 100));
        s.add(seq_in(&allocator, 0, 4, Bin::Fast));
        s.add(seq_in(&allocator, 1, 4, Bin::Slow));
        let plan = s.schedule();
        run(&mut s, &plan);
        s.add(seq_in(&allocator, 2, 4, Bin::Slow));
        let plan = s.schedule();
        assert!(
            plan.iter().all(|p| s.running()[p.index].id == 0),
            "slow ones rest"
        );
        assert_eq!(s.stalls(Stall::RestingBin), 1);
    }
}
