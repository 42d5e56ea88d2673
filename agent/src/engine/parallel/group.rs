//! A tensor-parallel group as one [`Executor`]: rank 0's executor runs in the engine thread, the
//! other ranks of this process each on a thread of their own ([`Rank`]), and ranks in other
//! processes behind a [`super::link`]. Every call goes to every rank — the KV cache allocation,
//! each step's plan — and only rank 0's output comes back (it alone computes logits). A rank
//! that fails, or does not answer within the deadline, fails the group for good: the step ends
//! with a device fault, so the runtime stops rather than retry on a group whose ranks no longer
//! agree.

use super::collective::{Collective, LocalGroup, Uplink};
use super::link::{self, LeaderLink, LeaderUplink, RemoteRank, WorkerUplink};
use super::watchdog::GroupWatch;
use super::{Shard, StepPlan};
use crate::engine::backend::candle::{self, CandleExecutor, NcclPlace};
use crate::engine::backend::{
    BackendConfig, BackendKind, DeviceMemory, Executor, FaultFlag, SeqInput, StepOutput,
};
use crate::engine::error::{EngineError, Result};
use crate::engine::model::LlamaConfig;
use crate::engine::model::loader::ModelFiles;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

/// How long a rank may take to answer — to reach an all-reduce, or to finish a command — before
/// the group is failed.
pub const RANK_DEADLINE: Duration = Duration::from_secs(120);

/// The model split over `backend.tensor_parallel_size` ranks of this process (threads; one GPU
/// each on CUDA), on the candle backend.
pub fn in_process(files: &mut ModelFiles, backend: &BackendConfig) -> Result<Box<dyn Executor>> {
    let world = backend.tensor_parallel_size.max(1);
    let place = Place {
        first: 0,
        local: world,
        remote: Vec::new(),
        uplink: None,
        nccl: group_nccl_id(backend)?,
        faults: None,
    };
    Ok(Box::new(this_process(files, backend, place)?))
}

/// A new NCCL unique id where the group sums through NCCL (see [`BackendConfig::uses_nccl`]).
fn group_nccl_id(backend: &BackendConfig) -> Result<Option<Vec<u8>>> {
    backend
        .uses_nccl()?
        .then(candle::nccl_unique_id)
        .transpose()
}

/// Where one process's ranks stand in their group.
#[derive(Debug)]
struct Place {
    /// Global rank of the first of this process's `local` ranks.
    first: usize,
    local: usize,
    /// Other processes' ranks this one commands (the leader's).
    remote: Vec<Box<dyn Rank>>,
    /// How this process's sums join the other processes'.
    uplink: Option<Box<dyn Uplink>>,
    /// The group's NCCL unique id, where the ranks sum on the GPUs.
    nccl: Option<Vec<u8>>,
    /// Where a lost link to another process is recorded (multi-pod groups).
    faults: Option<FaultFlag>,
}

/// The ranks of one process of a group of `backend.tensor_parallel_size`, as `place` says: a
/// thread each (one GPU each from `backend.device`), summing on the host through a
/// [`LocalGroup`] or on the GPUs through NCCL. The first local rank's executor answers for the
/// process.
fn this_process(
    files: &mut ModelFiles,
    backend: &BackendConfig,
    place: Place,
) -> Result<TensorParallel> {
    let world = backend.tensor_parallel_size.max(1);
    let Place {
        first,
        local,
        remote,
        uplink,
        nccl,
        faults,
    } = place;
    if backend.resolved_kind() == BackendKind::Int8 {
        return Err(EngineError::Unsupported(
            "tensor parallelism runs on the candle backend: use --backend candle (or auto)".into(),
        ));
    }
    Shard::check(&files.config, world)?;
    let group = LocalGroup::new(first, local, world, RANK_DEADLINE, uplink);
    let mut executors = Vec::with_capacity(local);
    for index in 0..local {
        executors.push(CandleExecutor::load_shard(
            files,
            backend.rank_device(index),
            backend.resolved_precision(),
            Shard {
                rank: first + index,
                world,
            },
            Some(group.rank(index)),
        )?);
    }
    if let Some(id) = &nccl {
        let (watched, failing) = (group.clone(), group.clone());
        let watch = GroupWatch {
            broken: Box::new(move || {
                watched.broken().or_else(|| {
                    faults
                        .as_ref()
                        .and_then(|f| f.lock().unwrap_or_else(|e| e.into_inner()).clone())
                })
            }),
            fail: Box::new(move |reason| failing.break_with(reason)),
        };
        let place = NcclPlace {
            id,
            first,
            world,
            join: JOIN_DEADLINE,
            deadline: RANK_DEADLINE,
        };
        candle::join_nccl(&mut executors, place, watch)?;
    }
    let mut executors = executors.into_iter();
    let leader = executors.next().expect("a process holds at least one rank");
    let mut ranks = executors
        .enumerate()
        .map(|(i, executor)| {
            ThreadRank::spawn(Box::new(executor), group.rank(i + 1))
                .map(|rank| Box::new(rank) as Box<dyn Rank>)
        })
        .collect::<Result<Vec<_>>>()?;
    ranks.extend(remote);
    Ok(TensorParallel::new(
        Box::new(leader),
        group.rank(0),
        ranks,
        files.config.clone(),
        RANK_DEADLINE,
    ))
}

/// How long a leader waits for its group's worker processes to connect and load.
pub const JOIN_DEADLINE: Duration = Duration::from_secs(1800);

/// The leader process (pod rank 0) of a group of `pods` processes: accepts the other processes
/// on `listener`, loads its own ranks (the first `tensor_parallel_size / pods`), and waits until
/// every process has loaded its shards. The executor answers for the whole group.
pub fn leader(
    files: &mut ModelFiles,
    backend: &BackendConfig,
    pods: usize,
    listener: &TcpListener,
) -> Result<Box<dyn Executor>> {
    let local = per_process(backend.tensor_parallel_size, pods)?;
    let nccl = group_nccl_id(backend)?;
    let faults = FaultFlag::default();
    let links = link::accept_workers(listener, pods - 1, JOIN_DEADLINE, &faults)?;
    link::send_collective(&links, nccl.as_deref())?;
    let remote = links
        .iter()
        .map(|l| Box::new(RemoteRank(l.clone())) as Box<dyn Rank>)
        .collect();
    let uplink = LeaderUplink {
        links: links.clone(),
        deadline: RANK_DEADLINE,
    };
    let place = Place {
        first: 0,
        local,
        remote,
        uplink: Some(Box::new(uplink)),
        nccl,
        faults: Some(faults.clone()),
    };
    let group = this_process(files, backend, place)?;
    link::wait_ready(&links, JOIN_DEADLINE)?;
    Ok(Box::new(group.with_faults(faults)))
}

/// Worker process `pod` of a group of `pods`: loads its ranks, calls `on_ready`, and serves the
/// leader's commands over `leader_link` until the leader stops it (`Ok`) or goes away (`Err`).
pub fn worker(
    files: &mut ModelFiles,
    backend: &BackendConfig,
    pod: usize,
    pods: usize,
    leader_link: Arc<LeaderLink>,
    on_ready: impl FnOnce(),
) -> Result<()> {
    let local = per_process(backend.tensor_parallel_size, pods)?;
    let nccl = link::receive_collective(&leader_link, JOIN_DEADLINE)?;
    let uplink = WorkerUplink {
        link: leader_link.clone(),
        deadline: RANK_DEADLINE,
    };
    let place = Place {
        first: pod * local,
        local,
        remote: Vec::new(),
        uplink: Some(Box::new(uplink)),
        nccl,
        faults: Some(leader_link.lost()),
    };
    let group = match this_process(files, backend, place) {
        Ok(group) => group,
        Err(e) => {
            leader_link.fail(&e.to_string());
            return Err(e);
        }
    };
    on_ready();
    link::serve_worker(&leader_link, group)
}

/// Ranks per process of a group of `world` ranks over `pods` processes.
fn per_process(world: usize, pods: usize) -> Result<usize> {
    if pods == 0 || world < pods || !world.is_multiple_of(pods) {
        return Err(EngineError::Unsupported(format!(
            "tensor parallel size {world} cannot be split evenly over {pods} pods"
        )));
    }
    Ok(world / pods)
}

/// What a rank is asked to do.
#[derive(Debug, Clone)]
pub enum Command {
    Allocate { blocks: usize, block_size: usize },
    Step(Arc<StepPlan>),
}

/// A rank of the group other than rank 0.
pub trait Rank: Send + std::fmt::Debug {
    /// Starts `command` on the rank.
    fn send(&mut self, command: Command) -> std::result::Result<(), String>;
    /// Waits for the rank to finish the command sent last.
    fn wait(&mut self, deadline: Duration) -> std::result::Result<(), String>;
    /// The group has failed: a rank in another process is told, so that it stops waiting on
    /// sums that will not come (ranks of this process see the collective's abort).
    fn abort(&self, _reason: &str) {}
}

/// A rank on a thread of this process, owning its executor.
#[derive(Debug)]
pub struct ThreadRank {
    commands: mpsc::Sender<Command>,
    done: mpsc::Receiver<std::result::Result<(), String>>,
}

impl ThreadRank {
    /// Starts the rank's thread; `collective` is aborted when the rank fails, so the others
    /// never wait for it.
    pub fn spawn(mut executor: Box<dyn Executor>, collective: Arc<dyn Collective>) -> Result<Self> {
        let (commands, inbox) = mpsc::channel::<Command>();
        let (outbox, done) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("parallax-rank-{}", collective.rank()))
            .spawn(move || {
                while let Ok(command) = inbox.recv() {
                    let result = match command {
                        Command::Allocate { blocks, block_size } => {
                            executor.allocate_kv(blocks, block_size)
                        }
                        Command::Step(plan) => executor.execute(&plan.inputs()).map(|_| ()),
                    }
                    .map_err(|e| e.to_string());
                    if let Err(reason) = &result {
                        collective.abort(&format!("rank {}: {reason}", collective.rank()));
                    }
                    if outbox.send(result).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| EngineError::Io {
                path: "tensor-parallel rank thread".into(),
                source: e,
            })?;
        Ok(Self { commands, done })
    }
}

impl Rank for ThreadRank {
    fn send(&mut self, command: Command) -> std::result::Result<(), String> {
        self.commands
            .send(command)
            .map_err(|_| "a rank's thread has ended".to_owned())
    }

    fn wait(&mut self, deadline: Duration) -> std::result::Result<(), String> {
        match self.done.recv_timeout(deadline) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(format!("a rank did not finish within {deadline:?}"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err("a rank's thread has ended".into()),
        }
    }
}

/// The group: rank 0 here, the others behind [`Rank`]s.
#[derive(Debug)]
pub struct TensorParallel {
    leader: Box<dyn Executor>,
    collective: Arc<dyn Collective>,
    ranks: Vec<Box<dyn Rank>>,
    /// The whole model's shape (the leader's is its slice).
    config: LlamaConfig,
    world: usize,
    deadline: Duration,
    /// Why the group failed, once it has.
    broken: Option<String>,
    /// Failures found between steps (a worker process that went away).
    faults: Option<FaultFlag>,
}

impl TensorParallel {
    pub fn new(
        leader: Box<dyn Executor>,
        collective: Arc<dyn Collective>,
        ranks: Vec<Box<dyn Rank>>,
        config: LlamaConfig,
        deadline: Duration,
    ) -> Self {
        let world = collective.world();
        Self {
            leader,
            collective,
            ranks,
            config,
            world,
            deadline,
            broken: None,
            faults: None,
        }
    }

    /// Records `faults` as where failures between steps land (see [`Executor::faults`]).
    pub fn with_faults(mut self, faults: FaultFlag) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Fails the step on every rank (once per step): no rank waits for the others' sums.
    fn abort(&self, reason: &str, aborted: &mut bool) {
        if !std::mem::replace(aborted, true) {
            self.collective.abort(reason);
            for rank in &self.ranks {
                rank.abort(reason);
            }
        }
    }

    /// Runs `command` on every other rank and `local` on rank 0, concurrently; any failure fails
    /// the group.
    fn everywhere<T>(
        &mut self,
        command: Command,
        local: impl FnOnce(&mut dyn Executor) -> Result<T>,
    ) -> Result<T> {
        if let Some(reason) = &self.broken {
            return Err(EngineError::DeviceFault(reason.clone()));
        }
        let mut failure = None;
        for rank in &mut self.ranks {
            if let Err(reason) = rank.send(command.clone()) {
                failure.get_or_insert(reason);
            }
        }
        let result = if failure.is_none() {
            local(self.leader.as_mut())
        } else {
            Err(EngineError::DeviceFault(String::new()))
        };
        let mut aborted = false;
        if let Err(e) = &result {
            let reason = failure.get_or_insert_with(|| format!("rank 0: {e}"));
            self.abort(reason, &mut aborted);
        }
        for index in 0..self.ranks.len() {
            if let Err(reason) = self.ranks[index].wait(self.deadline) {
                let reason = failure.get_or_insert(reason).clone();
                self.abort(&reason, &mut aborted);
            }
        }
        match failure {
            None => result,
            Some(reason) => {
                let reason = format!("the tensor-parallel group failed: {reason}");
                self.broken = Some(reason.clone());
                Err(EngineError::DeviceFault(reason))
            }
        }
    }
}

impl Executor for TensorParallel {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn describe(&self) -> String {
        format!(
            "{} × tensor parallel {}",
            self.leader.describe(),
            self.world
        )
    }

    fn kv_dtype(&self) -> &'static str {
        self.leader.kv_dtype()
    }

    /// Rank 0's share; every rank holds as much.
    fn weight_bytes(&self) -> usize {
        self.leader.weight_bytes()
    }

    /// Rank 0's: each rank caches its own KV heads for the same blocks.
    fn kv_block_bytes(&self, block_size: usize) -> usize {
        self.leader.kv_block_bytes(block_size)
    }

    fn available_memory(&self) -> usize {
        self.leader.available_memory()
    }

    fn device_memory(&self) -> Option<DeviceMemory> {
        self.leader.device_memory()
    }

    fn allocate_kv(&mut self, blocks: usize, block_size: usize) -> Result<()> {
        self.everywhere(Command::Allocate { blocks, block_size }, |leader| {
            leader.allocate_kv(blocks, block_size)
        })
    }

    fn execute(&mut self, batch: &[SeqInput<'_>]) -> Result<StepOutput> {
        let plan = Arc::new(StepPlan::from_inputs(batch));
        self.everywhere(Command::Step(plan), |leader| leader.execute(batch))
    }

    fn faults(&self) -> Option<FaultFlag> {
        self.faults.clone()
    }

    fn tensor_parallel_size(&self) -> usize {
        self.world
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::RowOutput;
    use crate::engine::model::RopeStyle;

    /// A rank that all-reduces its rank number once a step — or fails, or never comes back.
    #[derive(Debug)]
    struct FakeRank {
        collective: Arc<dyn Collective>,
        config: LlamaConfig,
        behaviour: Behaviour,
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Behaviour {
        Works,
        Fails,
        Hangs,
    }

    impl Executor for FakeRank {
        fn config(&self) -> &LlamaConfig {
            &self.config
        }
        fn describe(&self) -> String {
            "fake".into()
        }
        fn kv_dtype(&self) -> &'static str {
            "float32"
        }
        fn weight_bytes(&self) -> usize {
            0
        }
        fn kv_block_bytes(&self, _: usize) -> usize {
            1
        }
        fn available_memory(&self) -> usize {
            0
        }
        fn allocate_kv(&mut self, _: usize, _: usize) -> Result<()> {
            Ok(())
        }
        fn execute(&mut self, _: &[SeqInput<'_>]) -> Result<StepOutput> {
            match self.behaviour {
                Behaviour::Fails => Err(EngineError::InvalidRequest("injected".into())),
                Behaviour::Hangs => {
                    std::thread::sleep(Duration::from_secs(3600));
                    unreachable!()
                }
                Behaviour::Works => {
                    let mut data = [self.collective.rank() as f32 + 1.0];
                    self.collective
                        .all_reduce(&mut data)
                        .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
                    Ok(StepOutput {
                        logits: data.to_vec(),
                        ..StepOutput::default()
                    })
                }
            }
        }
    }

    fn group(behaviours: &[Behaviour], deadline: Duration) -> TensorParallel {
        let world = behaviours.len();
        let local = LocalGroup::new(0, world, world, deadline, None);
        let config = LlamaConfig {
            vocab_size: 1,
            hidden_size: 32,
            intermediate_size: 32,
            layers: 1,
            heads: 4,
            kv_heads: 4,
            head_dim: 8,
            rms_eps: 1e-5,
            rope_theta: 1e4,
            rope_style: RopeStyle::HalfSplit,
            rope_scaling: None,
            context_length: 16,
        };
        let fake = |rank: usize| FakeRank {
            collective: local.rank(rank),
            config: config.clone(),
            behaviour: behaviours[rank],
        };
        let ranks = (1..world)
            .map(|r| {
                Box::new(ThreadRank::spawn(Box::new(fake(r)), local.rank(r)).unwrap())
                    as Box<dyn Rank>
            })
            .collect();
        TensorParallel::new(
            Box::new(fake(0)),
            local.rank(0),
            ranks,
            config.clone(),
            deadline,
        )
    }

    fn step(group: &mut TensorParallel) -> Result<StepOutput> {
        group.execute(&[SeqInput {
            tokens: &[1],
            start: 0,
            blocks: &[0],
            output: RowOutput::Logits,
        }])
    }

    #[test]
    fn every_rank_runs_each_step_and_rank_0_answers() {
        let mut group = group(&[Behaviour::Works; 3], Duration::from_secs(10));
        for _ in 0..20 {
            assert_eq!(step(&mut group).unwrap().logits, vec![6.0]);
        }
    }

    #[test]
    fn a_failing_or_silent_rank_fails_the_group_for_good_without_hanging() {
        for behaviours in [
            [Behaviour::Works, Behaviour::Fails, Behaviour::Works],
            [Behaviour::Works, Behaviour::Works, Behaviour::Hangs],
            [Behaviour::Fails, Behaviour::Works, Behaviour::Works],
        ] {
            let mut group = group(&behaviours, Duration::from_millis(300));
            let started = std::time::Instant::now();
            let error = step(&mut group).unwrap_err();
            assert!(
                matches!(error, EngineError::DeviceFault(_)),
                "{behaviours:?}: {error}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{behaviours:?}: it hung"
            );
            // Broken for good: the next step fails at once.
            assert!(matches!(step(&mut group), Err(EngineError::DeviceFault(_))));
        }
    }
}
