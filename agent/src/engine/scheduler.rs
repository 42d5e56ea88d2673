//! Iteration-level scheduling, without a model: which sequences run in the next step and how many
//! of their tokens, under a token budget (chunked prefill), a sequence cap and the free KV blocks.
//! When blocks run out the most recently admitted sequence is preempted: its blocks are freed and
//! it goes back to the head of the queue to be recomputed.

use super::kv_cache::BlockTable;
use std::collections::VecDeque;

/// What the scheduler needs of a sequence.
pub trait Schedulable {
    /// Tokens known: prompt plus generated.
    fn total_tokens(&self) -> usize;
    /// Tokens whose keys and values are in the cache.
    fn computed(&self) -> usize;
    /// Forgets the cache (preemption): `computed` becomes 0.
    fn reset(&mut self);
    fn table(&mut self) -> &mut BlockTable;
}

/// Limits of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens in one forward pass (prefill chunks plus decode tokens).
    pub max_batched_tokens: usize,
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
    OutOfBlocks,
}

/// The waiting queue and the running set.
#[derive(Debug)]
pub struct Scheduler<S> {
    config: SchedulerConfig,
    waiting: VecDeque<S>,
    running: Vec<S>,
    preemptions: u64,
}

impl<S: Schedulable> Scheduler<S> {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
        }
    }

    pub fn add(&mut self, seq: S) {
        self.waiting.push_back(seq);
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

    /// Preemptions so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Removes (and so frees) every sequence, waiting or running, for which `keep` is false.
    pub fn retain(&mut self, mut keep: impl FnMut(&S) -> bool) -> Vec<S> {
        let mut removed = Vec::new();
        for queue in [0, 1] {
            let items: Vec<S> = if queue == 0 {
                self.running.drain(..).collect()
            } else {
                self.waiting.drain(..).collect()
            };
            for seq in items {
                if keep(&seq) {
                    if queue == 0 {
                        self.running.push(seq)
                    } else {
                        self.waiting.push_back(seq)
                    }
                } else {
                    removed.push(seq);
                }
            }
        }
        removed
    }

    /// Plans the next step. Running sequences go first, oldest first; waiting ones are admitted
    /// in arrival order while budget, sequence cap and blocks allow — but not in a step that had
    /// to preempt, so memory pressure is not made worse at once.
    pub fn schedule(&mut self) -> Vec<Scheduled> {
        let mut budget = self.config.max_batched_tokens;
        let mut plan = Vec::with_capacity(self.running.len() + 1);
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let (len, computed) = (self.running[i].total_tokens(), self.running[i].computed());
            let tokens = (len - computed).min(budget);
            loop {
                if self.running[i].table().reserve(computed + tokens) {
                    plan.push(Scheduled { index: i, tokens });
                    budget -= tokens;
                    i += 1;
                    break;
                }
                // Out of blocks: preempt the newest running sequence, possibly this one.
                let mut victim = self.running.pop().expect("sequence i is running");
                victim.table().clear();
                victim.reset();
                self.waiting.push_front(victim);
                self.preemptions += 1;
                preempted = true;
                if self.running.len() == i {
                    break;
                }
            }
        }
        if preempted {
            return plan;
        }
        while budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            let (len, computed) = (seq.total_tokens(), seq.computed());
            let tokens = (len - computed).min(budget);
            if !seq.table().reserve(computed + tokens) {
                self.waiting.push_front(seq);
                break;
            }
            budget -= tokens;
            plan.push(Scheduled {
                index: self.running.len(),
                tokens,
            });
            self.running.push(seq);
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kv_cache::BlockAllocator;

    #[derive(Debug)]
    struct Seq {
        id: usize,
        len: usize,
        computed: usize,
        table: BlockTable,
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
    }

    fn seq(allocator: &BlockAllocator, id: usize, prompt: usize) -> Seq {
        Seq {
            id,
            len: prompt,
            computed: 0,
            table: BlockTable::new(allocator, 16),
        }
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
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 8,
            max_batched_tokens: 32,
        });
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
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 2,
            max_batched_tokens: 1000,
        });
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
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 8,
            max_batched_tokens: 1000,
        });
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
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 8,
            max_batched_tokens: 1000,
        });
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
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 8,
            max_batched_tokens: 1000,
        });
        s.add(seq(&allocator, 0, 40));
        s.add(seq(&allocator, 1, 40));
        s.schedule();
        assert_eq!(allocator.free(), 4);
        let removed = s.retain(|q| q.id == 1);
        assert_eq!(removed.len(), 1);
        drop(removed);
        assert_eq!(allocator.free(), 7);
    }
}
