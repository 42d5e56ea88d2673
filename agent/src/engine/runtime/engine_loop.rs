//! The engine thread's loop: it owns the executor, the block pool and the scheduler, takes
//! submissions, drops cancelled requests, and runs steps — plan, execute, sample, emit.

use super::sequence::Sequence;
use super::{
    EngineStats, Event, KV_PRESSURE_OFF, KV_PRESSURE_ON, RunTime, StepObserver, StepReport,
    Submission,
};
use crate::engine::EngineError;
use crate::engine::backend::{Executor, RowOutput, SeqInput, StepOutput};
use crate::engine::model::tokenizer::{IncrementalDecoder, TextCodec};
use crate::engine::sampling::{History, Rng, Sampled, sample};
use crate::engine::scheduling::admission::Stall;
use crate::engine::scheduling::blocks::{BlockAllocator, BlockTable};
use crate::engine::scheduling::breaker::Breaker;
use crate::engine::scheduling::scheduler::{Preemption, Scheduled, Scheduler};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

pub(super) struct EngineLoop {
    pub executor: Box<dyn Executor>,
    pub codec: Arc<TextCodec>,
    pub allocator: BlockAllocator,
    pub scheduler: Scheduler<Sequence>,
    pub stats: Arc<EngineStats>,
    pub observer: Arc<dyn StepObserver>,
    pub breaker: Breaker,
    /// Tokens that make the forward pass fail (fault injection; none in builds without the
    /// `fault-injection` feature).
    pub fault: Faults,
    pub block_size: usize,
    pub next_id: u64,
}

/// Injected faults (tests): a token that makes the forward pass panic, and one that makes the
/// device fail for good.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Faults {
    pub poison: Option<u32>,
    pub device: Option<u32>,
}

/// The successful groups of a step (index of their first plan entry, their output) and the
/// plan entries it failed on.
type Executed = (Vec<(usize, StepOutput)>, Vec<usize>);

/// How a step went.
enum Stepped {
    Ran,
    /// Nothing could run.
    Idle,
    /// The device failed for good (the reason).
    DeviceFault(String),
}

/// What a step gave one scheduled sequence.
enum Outcome<'a> {
    /// The forward pass failed on it alone.
    Failed,
    /// It ran mid-prefill: nothing to sample.
    Ran,
    Logits(&'a [f32]),
    Token(u32),
}

impl EngineLoop {
    pub(super) fn run(mut self, submissions: std_mpsc::Receiver<Submission>) {
        let mut idle_step = false;
        loop {
            if self.scheduler.is_idle() {
                match submissions.recv() {
                    Ok(s) => self.admit(s),
                    Err(_) => return,
                }
            } else if idle_step {
                // Only requests holding out for company wait: sleep until one may go alone, or
                // until a new request arrives.
                let wait = self
                    .scheduler
                    .next_release()
                    .map_or(Duration::from_millis(5), |at| {
                        at.saturating_duration_since(Instant::now())
                    });
                match submissions.recv_timeout(wait) {
                    Ok(s) => self.admit(s),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(s) = submissions.try_recv() {
                self.admit(s);
            }
            // Requests whose receiver went away are dropped before the step (their blocks too).
            drop(self.scheduler.retain(|s| !s.events.is_closed()));
            match self.step() {
                Stepped::Ran => idle_step = false,
                Stepped::Idle => idle_step = true,
                Stepped::DeviceFault(reason) => return self.stop_for(reason),
            }
        }
    }

    fn admit(&mut self, s: Submission) {
        self.next_id += 1;
        let seed = s
            .params
            .seed
            .unwrap_or(self.next_id.wrapping_mul(0x2545_f491_4f6c_dd1d));
        self.stats
            .prompt_tokens
            .fetch_add(s.prompt.len() as u64, Ordering::Relaxed);
        self.scheduler.add(Sequence {
            ticket: s.ticket,
            started: None,
            run_time: RunTime::default(),
            prompt_len: s.prompt.len(),
            tokens: s.prompt,
            computed: 0,
            table: BlockTable::new(&self.allocator, self.block_size),
            lookup: None,
            cached_tokens: None,
            rng: Rng::new(seed),
            params: s.params,
            decoder: IncrementalDecoder::default(),
            pending: String::new(),
            events: s.events,
            finished: false,
        });
    }

    /// The device failed for good: every request ends with the reason, the fault is recorded
    /// for readiness and health, and the loop ends (no new work is taken).
    fn stop_for(&mut self, reason: String) {
        tracing::error!(%reason, "the device failed: the engine stops and readiness fails");
        *self.stats.fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.clone());
        for seq in self.scheduler.retain(|_| false) {
            let _ = seq.events.send(Event::Failed {
                message: format!("the device failed and the engine stopped: {reason}"),
            });
        }
        self.publish();
    }

    /// One step — plan, execute, sample, emit.
    fn step(&mut self) -> Stepped {
        let plan = self.plan();
        if plan.is_empty() {
            self.publish();
            return Stepped::Idle;
        }
        let began = Instant::now();
        let outputs: Vec<RowOutput> = plan
            .iter()
            .map(|p| self.scheduler.running_mut()[p.index].output(p.tokens))
            .collect();
        let (groups, failed) = match self.execute(&plan, &outputs) {
            Ok(executed) => executed,
            Err(reason) => return Stepped::DeviceFault(reason),
        };
        // The forward pass's time: the step log's and each sequence's run time.
        let took = began.elapsed();
        self.log_step(&plan, took);
        let outcomes = outcomes(
            &outputs,
            &groups,
            &failed,
            self.executor.config().vocab_size,
        );
        let outbox = self.advance(&plan, outcomes, began, took);
        drop(self.scheduler.retain(|s| !s.finished));
        self.observer.step(&StepReport {
            duration: began.elapsed(),
            sequences: plan.len(),
            tokens: plan.iter().map(|p| p.tokens).sum(),
            sampled: outputs.iter().filter(|o| **o != RowOutput::None).count(),
        });
        self.publish();
        // Events go out after the step's bookkeeping, so whoever sees a request finish also sees
        // the counters without it.
        for (events, event) in outbox {
            let _ = events.send(event);
        }
        Stepped::Ran
    }

    /// The step's plan (one request at a time while the breaker is open), its prefix-cache
    /// look-ups counted.
    fn plan(&mut self) -> Vec<Scheduled> {
        let now = Instant::now();
        let single = self.breaker.single_request(now);
        let outside = self.stats.batch_limit.load(Ordering::Relaxed);
        self.scheduler.set_batch_limit(if single {
            Some(1)
        } else {
            (outside > 0).then_some(outside)
        });
        self.stats
            .breaker_state
            .store(self.breaker.state(now).code(), Ordering::Relaxed);
        let plan = self.scheduler.schedule();
        if !plan.is_empty() {
            self.count_prefix_lookups(&plan);
            self.stats.steps.fetch_add(1, Ordering::Relaxed);
        }
        plan
    }

    /// Runs the plan on the executor, isolating the sequences it fails on; tells the breaker.
    /// A device fault is no request's: it ends the step, and the engine, with its reason.
    fn execute(&mut self, plan: &[Scheduled], outputs: &[RowOutput]) -> Result<Executed, String> {
        let began = Instant::now();
        let mut groups = Vec::new();
        let mut failed = Vec::new();
        let running = self.scheduler.running();
        let inputs: Vec<SeqInput<'_>> = plan
            .iter()
            .zip(outputs)
            .map(|(p, &output)| {
                let seq = &running[p.index];
                SeqInput {
                    tokens: &seq.tokens[seq.computed..seq.computed + p.tokens],
                    start: seq.computed,
                    blocks: seq.table.blocks(),
                    output,
                }
            })
            .collect();
        execute_isolating(
            self.executor.as_mut(),
            &inputs,
            self.fault,
            0,
            0,
            &mut groups,
            &mut failed,
        )?;
        let replayed = groups.iter().filter(|(_, output)| output.replayed).count();
        self.stats
            .graph_steps
            .fetch_add(replayed as u64, Ordering::Relaxed);
        if failed.is_empty() {
            self.breaker.success(began);
        } else {
            self.breaker.failure(Instant::now());
            self.stats.failed_steps.fetch_add(1, Ordering::Relaxed);
            self.stats
                .isolated_requests
                .fetch_add(failed.len() as u64, Ordering::Relaxed);
            tracing::warn!(
                failed = failed.len(),
                batch = plan.len(),
                breaker = self.breaker.state(Instant::now()).as_str(),
                "a step failed: the failing requests were isolated by bisection and end with an error"
            );
        }
        Ok((groups, failed))
    }

    /// Rows and prefill tokens by bin (fast, medium, slow), at debug level.
    fn log_step(&self, plan: &[Scheduled], took: Duration) {
        if !tracing::enabled!(target: "parallax::step", tracing::Level::DEBUG) {
            return;
        }
        let running = self.scheduler.running();
        let (mut rows, mut prefill) = ([0usize; 3], [0usize; 3]);
        for p in plan {
            let bin = running[p.index].ticket.bin as usize;
            if p.tokens > 1 {
                prefill[bin] += p.tokens;
            } else {
                rows[bin] += 1;
            }
        }
        tracing::debug!(
            target: "parallax::step",
            micros = took.as_micros() as u64,
            ?rows,
            ?prefill,
            "step"
        );
    }

    /// Moves every planned sequence on by what the step gave it: cache what ran, sample, stop.
    /// Returns the events to send.
    fn advance(
        &mut self,
        plan: &[Scheduled],
        outcomes: Vec<Outcome<'_>>,
        began: Instant,
        took: Duration,
    ) -> Vec<(tokio::sync::mpsc::UnboundedSender<Event>, Event)> {
        let context = self.executor.config().context_length;
        let mut outbox = Vec::new();
        let running = self.scheduler.running_mut();
        for (p, outcome) in plan.iter().zip(outcomes) {
            let seq = &mut running[p.index];
            seq.run_time.total += took;
            if seq.tokens.len() == seq.prompt_len {
                seq.run_time.prefill = seq.run_time.total;
            }
            if let Outcome::Failed = outcome {
                seq.finished = true;
                outbox.push((
                    seq.events.clone(),
                    Event::Failed {
                        message: "the model failed on this request (isolated from its batch; the other requests were not affected)".into(),
                    },
                ));
                continue;
            }
            if seq.started.is_none() {
                seq.started = Some(began);
                outbox.push((
                    seq.events.clone(),
                    Event::Started {
                        queue_time: began - seq.ticket.arrived,
                        batch_size: plan.len(),
                    },
                ));
            }
            seq.computed += p.tokens;
            seq.table.cache_computed(&seq.tokens, seq.computed);
            let sampled = match outcome {
                Outcome::Logits(row) => {
                    let (prompt, output) = seq.tokens.split_at(seq.prompt_len);
                    // The end tokens matter only while `min_tokens` holds them back.
                    let end_tokens = if output.len() >= seq.params.min_tokens {
                        Vec::new()
                    } else if seq.params.ignore_eos {
                        seq.params.stop_token_ids.clone()
                    } else {
                        [&self.codec.eos[..], &seq.params.stop_token_ids[..]].concat()
                    };
                    let history = History {
                        prompt,
                        output,
                        end_tokens: &end_tokens,
                    };
                    sample(row, &seq.params, &mut seq.rng, history)
                }
                Outcome::Token(token) => Sampled {
                    token,
                    logprob: 0.0,
                    top: Vec::new(),
                },
                Outcome::Ran | Outcome::Failed => continue,
            };
            self.stats.generation_tokens.fetch_add(1, Ordering::Relaxed);
            let events = seq.accept(sampled, &self.codec, context, began);
            outbox.extend(events.into_iter().map(|e| (seq.events.clone(), e)));
        }
        outbox
    }

    /// Counts the prefix-cache look-ups of the sequences admitted into this step; a request's
    /// first one is its `cached_tokens`.
    fn count_prefix_lookups(&mut self, plan: &[Scheduled]) {
        let running = self.scheduler.running_mut();
        for p in plan {
            let seq = &mut running[p.index];
            if let Some((queried, hit)) = seq.lookup.take() {
                self.stats
                    .prefix_queries
                    .fetch_add(queried as u64, Ordering::Relaxed);
                self.stats
                    .prefix_hits
                    .fetch_add(hit as u64, Ordering::Relaxed);
                seq.cached_tokens.get_or_insert(hit);
            }
        }
    }

    fn publish(&mut self) {
        let used = self.allocator.used();
        let usage = used as f64 / self.allocator.total().max(1) as f64;
        let pressure = self.scheduler.under_pressure();
        if !pressure && usage > KV_PRESSURE_ON {
            tracing::warn!(usage, "KV cache nearly full: admissions paused");
            self.scheduler.set_pressure(true);
        } else if pressure && usage < KV_PRESSURE_OFF {
            tracing::info!(usage, "KV cache usage down again: admissions resumed");
            self.scheduler.set_pressure(false);
        }
        self.stats
            .kv_pressure
            .store(self.scheduler.under_pressure(), Ordering::Relaxed);
        let depths = self.scheduler.queue_depths();
        for (bin, row) in depths.iter().enumerate() {
            for (priority, depth) in row.iter().enumerate() {
                self.stats.queue_depths[bin][priority].store(*depth, Ordering::Relaxed);
            }
        }
        for (counter, reason) in self.stats.preemptions.iter().zip(Preemption::ALL) {
            counter.store(self.scheduler.preemptions_for(reason), Ordering::Relaxed);
        }
        for (counter, reason) in self.stats.admission_stalls.iter().zip(Stall::ALL) {
            counter.store(self.scheduler.stalls(reason), Ordering::Relaxed);
        }
        self.stats
            .kv_blocks_cached
            .store(self.allocator.cached(), Ordering::Relaxed);
        self.stats.kv_blocks_used.store(used, Ordering::Relaxed);
        self.stats.kv_blocks_peak.fetch_max(used, Ordering::Relaxed);
        self.stats
            .running
            .store(self.scheduler.running().len(), Ordering::Relaxed);
        self.stats
            .waiting
            .store(self.scheduler.num_waiting(), Ordering::Relaxed);
    }
}

/// What the step gave each planned sequence, from the successful groups' outputs (in plan
/// order) and the failures.
fn outcomes<'a>(
    outputs: &[RowOutput],
    groups: &'a [(usize, StepOutput)],
    failed: &[usize],
    vocab: usize,
) -> Vec<Outcome<'a>> {
    let mut outcomes: Vec<Outcome<'a>> = outputs
        .iter()
        .enumerate()
        .map(|(k, _)| {
            if failed.contains(&k) {
                Outcome::Failed
            } else {
                Outcome::Ran
            }
        })
        .collect();
    for (i, (first, out)) in groups.iter().enumerate() {
        let end = groups.get(i + 1).map_or(outputs.len(), |g| g.0);
        let mut rows = out.logits.chunks_exact(vocab);
        let mut ids = out.argmax.iter();
        for k in *first..end {
            if matches!(outcomes[k], Outcome::Failed) {
                continue;
            }
            outcomes[k] = match outputs[k] {
                RowOutput::None => Outcome::Ran,
                RowOutput::Logits => rows.next().map_or(Outcome::Ran, Outcome::Logits),
                RowOutput::Argmax | RowOutput::Sample(_) => {
                    ids.next().map_or(Outcome::Ran, |id| Outcome::Token(*id))
                }
            };
        }
    }
    outcomes
}

/// Runs the step for `inputs` (the plan from index `first` on); if it fails (an error or a
/// panic), splits the batch in two and retries each half after an exponential backoff, down to
/// single sequences, which are the failures. A sequence's outputs do not depend on its batch, so
/// the others' tokens are unchanged; their cache writes are simply repeated. Successful groups
/// land in `groups` as (index of their first plan entry, their output), in plan order; failures
/// in `failed`. A device fault is not retried (a poisoned CUDA context fails whatever runs next):
/// its reason comes back as the error.
fn execute_isolating(
    executor: &mut dyn Executor,
    inputs: &[SeqInput<'_>],
    fault: Faults,
    first: usize,
    depth: u32,
    groups: &mut Vec<(usize, StepOutput)>,
    failed: &mut Vec<usize>,
) -> Result<(), String> {
    let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let has =
            |token: Option<u32>| token.filter(|t| inputs.iter().any(|i| i.tokens.contains(t)));
        if let Some(poison) = has(fault.poison) {
            panic!("injected fault: token {poison} is in the batch");
        }
        if let Some(token) = has(fault.device) {
            return Err(EngineError::DeviceFault(format!(
                "injected device fault: token {token} is in the batch"
            )));
        }
        executor.execute(inputs)
    }));
    let error = match attempt {
        Ok(Ok(output)) => {
            groups.push((first, output));
            return Ok(());
        }
        Ok(Err(EngineError::DeviceFault(reason))) => return Err(reason),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "a panic".to_owned(),
    };
    if inputs.len() == 1 {
        tracing::warn!(%error, "the forward pass failed on one request alone");
        failed.push(first);
        return Ok(());
    }
    // A transient failure gets time to pass; a real one is found in log₂(batch) rounds.
    std::thread::sleep(Duration::from_millis(1 << depth.min(6)));
    let mid = inputs.len() / 2;
    for (part, at) in [(&inputs[..mid], first), (&inputs[mid..], first + mid)] {
        execute_isolating(executor, part, fault, at, depth + 1, groups, failed)?;
    }
    Ok(())
}
