//! One scheduling step — batch formation and block allocation, no model — with 256 running
//! sequences decoding and a queue of waiting ones.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use parallax_agent::engine::scheduling::admission::{
    Bin, BinShare, EVERY_STEP, Priority, QueuePolicy, Queued, Ticket,
};
use parallax_agent::engine::scheduling::blocks::{BlockAllocator, BlockTable};
use parallax_agent::engine::scheduling::scheduler::{Schedulable, Scheduler, SchedulerConfig};
use std::hint::black_box;
use std::time::{Duration, Instant};

struct Seq {
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

/// 256 sequences of mixed bins and priorities that have each just sampled a token (so each
/// decodes one, and those at a block boundary need a new block), plus 44 waiting that do not fit:
/// the multi-bin admission order, with shares sized for a batch of 256, runs over all of them.
fn decoding_scheduler(allocator: &BlockAllocator) -> Scheduler<Seq> {
    let share = |min, max, weight| BinShare { min, max, weight };
    let mut scheduler = Scheduler::new(SchedulerConfig {
        max_num_seqs: 256,
        max_batched_tokens: 8192,
        policy: QueuePolicy {
            shares: [share(128, 256, 3), share(64, 128, 2), share(16, 64, 1)],
            // Every running sequence in the step: the most work a step can be.
            step_weights: EVERY_STEP,
            ..QueuePolicy::multi_bin(256)
        },
    });
    let t0 = Instant::now();
    for i in 0..300 {
        scheduler.add(Seq {
            len: 40 + i % 200,
            computed: 0,
            table: BlockTable::new(allocator, 16),
            ticket: Ticket {
                bin: Bin::ALL[i % 3],
                priority: Priority::ALL[i % 3],
                ..Ticket::new(t0 + Duration::from_micros(i as u64))
            },
        });
    }
    loop {
        let plan = scheduler.schedule();
        let running = scheduler.running_mut();
        for p in &plan {
            running[p.index].computed += p.tokens;
        }
        if running.len() == 256 && running.iter().all(|s| s.computed == s.len) {
            break;
        }
    }
    for seq in scheduler.running_mut() {
        seq.len += 1;
    }
    scheduler
}

fn step(c: &mut Criterion) {
    c.bench_function("schedule 256 decoding sequences", |b| {
        b.iter_batched_ref(
            || {
                let allocator = BlockAllocator::new(256 * 64);
                let scheduler = decoding_scheduler(&allocator);
                (allocator, scheduler)
            },
            |(_, scheduler)| black_box(scheduler.schedule().len()),
            BatchSize::LargeInput,
        )
    });
}

criterion_group!(benches, step);
criterion_main!(benches);
