//! Ranks in other processes: the TCP link of a multi-pod tensor-parallel group. The leader
//! process (pod rank 0, which serves HTTP and schedules) listens on the group port; every worker
//! process connects to it, says which it is, loads its shards and reports ready. From then on
//! the leader sends each command (allocate the KV cache, run a step's plan) to every worker, and
//! each all-reduce runs in two hops: a worker process adds up its own ranks' partials and sends
//! the sum; the leader adds every process's sum to its own and sends the total back.
//!
//! Every wait has a deadline and every broken connection is an error, on both ends: a worker that
//! dies or stops answering fails the leader's group (the engine stops, readiness fails, the
//! operator restarts the group); a worker whose leader goes away ends.
//!
//! Right after the workers connect, the leader tells each how the group sums: on the host over
//! this link, or on the GPUs through NCCL, whose unique id (made by the leader) travels here.
//!
//! Frames: a kind byte, a little-endian u32 length, the payload.

use super::StepPlan;
use super::collective::Uplink;
use super::group::{Command, Rank, TensorParallel};
use crate::engine::backend::candle;
use crate::engine::backend::{Executor, FaultFlag};
use crate::engine::error::{EngineError, Result};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What travels between the leader and a worker process.
#[derive(Debug, Clone, PartialEq)]
enum Frame {
    /// A worker process introduces itself: its pod rank.
    Hello(u32),
    /// A worker process has loaded its shards.
    Ready,
    Failed(String),
    Allocate {
        blocks: u64,
        block_size: u64,
    },
    Step(Vec<u8>),
    /// A worker process's sum of one all-reduce.
    Partial(Vec<f32>),
    /// The group's total of one all-reduce.
    Total(Vec<f32>),
    /// A command finished.
    Done,
    Stop,
    /// How the group sums: the NCCL unique id, or empty for sums over this link.
    Collective(Vec<u8>),
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn write_frame(stream: &mut impl Write, frame: &Frame) -> io::Result<()> {
    let (kind, payload): (u8, Vec<u8>) = match frame {
        Frame::Hello(process) => (1, process.to_le_bytes().to_vec()),
        Frame::Ready => (2, Vec::new()),
        Frame::Failed(reason) => (3, reason.as_bytes().to_vec()),
        Frame::Allocate { blocks, block_size } => {
            (4, [blocks.to_le_bytes(), block_size.to_le_bytes()].concat())
        }
        Frame::Step(plan) => (5, plan.clone()),
        Frame::Partial(values) => (6, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        Frame::Total(values) => (7, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        Frame::Done => (8, Vec::new()),
        Frame::Stop => (9, Vec::new()),
        Frame::Collective(id) => (10, id.clone()),
    };
    let mut bytes = Vec::with_capacity(5 + payload.len());
    bytes.push(kind);
    bytes.extend((payload.len() as u32).to_le_bytes());
    bytes.extend(payload);
    stream.write_all(&bytes)?;
    stream.flush()
}

fn read_frame(stream: &mut impl Read) -> io::Result<Frame> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head)?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "a malformed frame");
    Ok(match head[0] {
        1 => Frame::Hello(u32::from_le_bytes(
            payload
                .get(..4)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        )),
        2 => Frame::Ready,
        3 => Frame::Failed(String::from_utf8_lossy(&payload).into_owned()),
        4 if len == 16 => Frame::Allocate {
            blocks: u64::from_le_bytes(payload[..8].try_into().map_err(|_| bad())?),
            block_size: u64::from_le_bytes(payload[8..].try_into().map_err(|_| bad())?),
        },
        5 => Frame::Step(payload),
        6 => Frame::Partial(floats(&payload)),
        7 => Frame::Total(floats(&payload)),
        8 => Frame::Done,
        9 => Frame::Stop,
        10 => Frame::Collective(payload),
        _ => return Err(bad()),
    })
}

fn link_error(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Backend {
        backend: "tensor parallel link",
        reason: format!("{what}: {e}"),
    }
}

/// The leader's end of one worker process's link.
#[derive(Debug)]
pub struct WorkerLink {
    process: u32,
    writer: Mutex<TcpStream>,
    partials: Mutex<Receiver<std::result::Result<Vec<f32>, String>>>,
    done: Mutex<Receiver<std::result::Result<(), String>>>,
}

impl WorkerLink {
    fn send(&self, frame: &Frame) -> std::result::Result<(), String> {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *writer, frame)
            .map_err(|e| format!("worker process {} is unreachable: {e}", self.process))
    }
}

/// Accepts `processes` worker processes (pod ranks 1..=processes) on `listener`, within
/// `deadline`; each link's loss is recorded in `faults`.
pub fn accept_workers(
    listener: &TcpListener,
    processes: usize,
    deadline: Duration,
    faults: &FaultFlag,
) -> Result<Vec<Arc<WorkerLink>>> {
    let until = Instant::now() + deadline;
    listener
        .set_nonblocking(true)
        .map_err(|e| link_error("the group port", e))?;
    let mut links: Vec<Option<Arc<WorkerLink>>> = vec![None; processes];
    while links.iter().any(Option::is_none) {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= until {
                    let missing: Vec<usize> = (0..processes)
                        .filter(|p| links[*p].is_none())
                        .map(|p| p + 1)
                        .collect();
                    return Err(link_error(
                        "waiting for the group's workers",
                        format!("pod ranks {missing:?} did not connect within {deadline:?}"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(link_error("accepting a worker", e)),
        };
        stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_nodelay(true))
            .map_err(|e| link_error("a worker's connection", e))?;
        stream
            .set_read_timeout(Some(deadline))
            .map_err(|e| link_error("a worker's connection", e))?;
        let process = match read_frame(&mut stream) {
            Ok(Frame::Hello(p)) if (1..=processes as u32).contains(&p) => p,
            Ok(other) => {
                tracing::warn!(?other, "a connection to the group port that is no worker");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "a connection to the group port that said nothing");
                continue;
            }
        };
        stream
            .set_read_timeout(None)
            .map_err(|e| link_error("a worker's connection", e))?;
        let reader = stream
            .try_clone()
            .map_err(|e| link_error("a worker's connection", e))?;
        let (partial_tx, partials) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        spawn_leader_reader(process, reader, partial_tx, done_tx, faults.clone());
        links[process as usize - 1] = Some(Arc::new(WorkerLink {
            process,
            writer: Mutex::new(stream),
            partials: Mutex::new(partials),
            done: Mutex::new(done),
        }));
        tracing::info!(process, "a tensor-parallel worker process connected");
    }
    Ok(links.into_iter().flatten().collect())
}

/// Reads a worker process's frames into the leader's channels; its loss fails whatever waits on
/// it and is recorded for readiness.
fn spawn_leader_reader(
    process: u32,
    mut stream: TcpStream,
    partials: Sender<std::result::Result<Vec<f32>, String>>,
    done: Sender<std::result::Result<(), String>>,
    faults: FaultFlag,
) {
    std::thread::spawn(move || {
        // The group is over, whether the worker failed or went away: recorded for readiness and
        // for anything still joining the group (NCCL), and passed to whatever waits on it.
        let over = |reason: String| {
            record(&faults, &reason);
            let _ = done.send(Err(reason.clone()));
            let _ = partials.send(Err(reason));
        };
        loop {
            match read_frame(&mut stream) {
                Ok(Frame::Partial(values)) => {
                    let _ = partials.send(Ok(values));
                }
                Ok(Frame::Done | Frame::Ready) => {
                    let _ = done.send(Ok(()));
                }
                Ok(Frame::Failed(reason)) => over(format!("worker process {process}: {reason}")),
                Ok(other) => tracing::warn!(process, ?other, "an unexpected frame from a worker"),
                Err(e) => {
                    over(format!("worker process {process} went away: {e}"));
                    return;
                }
            }
        }
    });
}

/// Records `reason` in `faults` unless an earlier one is there (the first cause stays).
fn record(faults: &FaultFlag, reason: &str) {
    faults
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(|| reason.to_owned());
}

/// Waits on a link's channel, at most `deadline`.
fn receive<T>(
    channel: &Mutex<Receiver<std::result::Result<T, String>>>,
    deadline: Duration,
    what: &str,
) -> std::result::Result<T, String> {
    let channel = channel.lock().unwrap_or_else(|e| e.into_inner());
    match channel.recv_timeout(deadline) {
        Ok(result) => result,
        Err(RecvTimeoutError::Timeout) => Err(format!("{what} did not come within {deadline:?}")),
        Err(RecvTimeoutError::Disconnected) => Err(format!("{what}: the link is gone")),
    }
}

/// Tells every worker process how the group sums: through NCCL by `nccl_id`, or (`None`) over
/// the links.
pub fn send_collective(links: &[Arc<WorkerLink>], nccl_id: Option<&[u8]>) -> Result<()> {
    for link in links {
        link.send(&Frame::Collective(nccl_id.unwrap_or_default().to_vec()))
            .map_err(|e| link_error("telling the workers how to sum", e))?;
    }
    Ok(())
}

/// Waits until every worker process has loaded its shards.
pub fn wait_ready(links: &[Arc<WorkerLink>], deadline: Duration) -> Result<()> {
    for link in links {
        receive(
            &link.done,
            deadline,
            &format!("worker process {}'s shards", link.process),
        )
        .map_err(|e| link_error("loading", e))?;
    }
    Ok(())
}

/// The leader process's uplink: adds every worker process's sum to its own and sends the total
/// back.
#[derive(Debug)]
pub struct LeaderUplink {
    pub links: Vec<Arc<WorkerLink>>,
    pub deadline: Duration,
}

impl Uplink for LeaderUplink {
    fn reduce(&self, sum: &mut [f32]) -> std::result::Result<(), String> {
        for link in &self.links {
            let partial = receive(
                &link.partials,
                self.deadline,
                &format!("worker process {}'s partial sum", link.process),
            )?;
            if partial.len() != sum.len() {
                return Err(format!(
                    "worker process {} sent {} values for {}",
                    link.process,
                    partial.len(),
                    sum.len()
                ));
            }
            for (s, p) in sum.iter_mut().zip(&partial) {
                *s += p;
            }
        }
        for link in &self.links {
            link.send(&Frame::Total(sum.to_vec()))?;
        }
        Ok(())
    }
}

/// A worker process as one of the leader's [`Rank`]s.
#[derive(Debug)]
pub struct RemoteRank(pub Arc<WorkerLink>);

impl Rank for RemoteRank {
    fn send(&mut self, command: Command) -> std::result::Result<(), String> {
        self.0.send(&match command {
            Command::Allocate { blocks, block_size } => Frame::Allocate {
                blocks: blocks as u64,
                block_size: block_size as u64,
            },
            Command::Step(plan) => Frame::Step(plan.encode()),
        })
    }

    fn wait(&mut self, deadline: Duration) -> std::result::Result<(), String> {
        receive(
            &self.0.done,
            deadline,
            &format!("worker process {}", self.0.process),
        )
    }

    fn abort(&self, reason: &str) {
        let _ = self.0.send(&Frame::Failed(reason.to_owned()));
    }
}

/// The leader's group is gone (the engine stopped): its worker processes end too.
impl Drop for RemoteRank {
    fn drop(&mut self) {
        let _ = self.0.send(&Frame::Stop);
    }
}

/// A worker process's end of its link to the leader.
#[derive(Debug)]
pub struct LeaderLink {
    writer: Mutex<TcpStream>,
    totals: Mutex<Receiver<std::result::Result<Vec<f32>, String>>>,
    commands: Mutex<Receiver<std::result::Result<Frame, String>>>,
    /// Why the group is over for this process, once the leader failed it, stopped it or went
    /// away (what sums on the GPUs watches: it never passes through the link).
    lost: FaultFlag,
}

impl LeaderLink {
    fn send(&self, frame: &Frame) -> std::result::Result<(), String> {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *writer, frame).map_err(|e| format!("the leader is unreachable: {e}"))
    }

    /// Where the link records that the group is over for this process.
    pub fn lost(&self) -> FaultFlag {
        self.lost.clone()
    }

    /// Tells the leader this process failed (before it reported ready: loading its shards).
    pub fn fail(&self, reason: &str) {
        let _ = self.send(&Frame::Failed(reason.to_owned()));
    }
}

/// How the leader said the group sums: `Some(NCCL unique id)`, or `None` over the link; an
/// error where the leader did not say within `deadline` or this process cannot use NCCL.
pub fn receive_collective(link: &LeaderLink, deadline: Duration) -> Result<Option<Vec<u8>>> {
    let frame = receive(
        &link.commands,
        deadline,
        "the leader's word on how the group sums",
    )
    .map_err(|e| link_error("joining the group", e))?;
    let id = match frame {
        Frame::Collective(id) if id.is_empty() => return Ok(None),
        Frame::Collective(id) => id,
        other => {
            return Err(link_error(
                "joining the group",
                format!("the leader sent {other:?} before saying how the group sums"),
            ));
        }
    };
    if !candle::nccl_present() {
        let reason = "the group sums through NCCL, which this pod cannot open (the CUDA build, \
                      with libnccl.so on LD_LIBRARY_PATH, is needed)";
        link.fail(reason);
        return Err(EngineError::Unsupported(reason.into()));
    }
    Ok(Some(id))
}

/// Connects worker process `process` to its leader at `address` (retrying until `deadline`:
/// the leader's pod may start later).
pub fn connect(address: &str, process: u32, deadline: Duration) -> Result<Arc<LeaderLink>> {
    let until = Instant::now() + deadline;
    let mut stream = loop {
        let attempt = address
            .to_socket_addrs()
            .map_err(|e| e.to_string())
            .and_then(|mut addrs| addrs.next().ok_or_else(|| "no address".to_owned()))
            .and_then(|addr| {
                TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())
            });
        match attempt {
            Ok(stream) => break stream,
            Err(e) if Instant::now() >= until => {
                return Err(link_error(
                    &format!("connecting to the leader at {address}"),
                    e,
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    stream
        .set_nodelay(true)
        .and_then(|()| write_frame(&mut stream, &Frame::Hello(process)))
        .map_err(|e| link_error("greeting the leader", e))?;
    let mut reader = stream
        .try_clone()
        .map_err(|e| link_error("the leader's connection", e))?;
    let (totals_tx, totals) = mpsc::channel();
    let (commands_tx, commands) = mpsc::channel();
    let lost = FaultFlag::default();
    let loses = lost.clone();
    std::thread::spawn(move || {
        loop {
            match read_frame(&mut reader) {
                Ok(Frame::Total(values)) => {
                    let _ = totals_tx.send(Ok(values));
                }
                // The group failed or stopped: a step under way ends at its next sum.
                Ok(frame @ (Frame::Failed(_) | Frame::Stop)) => {
                    let reason = match &frame {
                        Frame::Failed(reason) => format!("the leader failed the group: {reason}"),
                        _ => "the leader stopped the group".to_owned(),
                    };
                    record(&loses, &reason);
                    let _ = totals_tx.send(Err(reason));
                    if commands_tx.send(Ok(frame)).is_err() {
                        return;
                    }
                }
                Ok(frame) => {
                    if commands_tx.send(Ok(frame)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let reason = format!("the leader went away: {e}");
                    record(&loses, &reason);
                    let _ = totals_tx.send(Err(reason.clone()));
                    let _ = commands_tx.send(Err(reason));
                    return;
                }
            }
        }
    });
    Ok(Arc::new(LeaderLink {
        writer: Mutex::new(stream),
        totals: Mutex::new(totals),
        commands: Mutex::new(commands),
        lost,
    }))
}

/// A worker process's uplink: sends its ranks' sum to the leader and takes the total.
#[derive(Debug)]
pub struct WorkerUplink {
    pub link: Arc<LeaderLink>,
    pub deadline: Duration,
}

impl Uplink for WorkerUplink {
    fn reduce(&self, sum: &mut [f32]) -> std::result::Result<(), String> {
        self.link.send(&Frame::Partial(sum.to_vec()))?;
        let total = receive(&self.link.totals, self.deadline, "the group's total")?;
        if total.len() != sum.len() {
            return Err("the leader sent a total of another size".into());
        }
        sum.copy_from_slice(&total);
        Ok(())
    }
}

/// Serves the leader's commands on a worker process's ranks until the leader stops it (`Ok`) or
/// goes away, or a rank fails (`Err`).
pub fn serve_worker(link: &LeaderLink, mut group: TensorParallel) -> Result<()> {
    link.send(&Frame::Ready)
        .map_err(|e| link_error("reporting ready", e))?;
    loop {
        let frame = link
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recv()
            .map_err(|e| link_error("the leader's commands", e))?
            .map_err(|e| link_error("the leader's commands", e))?;
        let result = match frame {
            Frame::Allocate { blocks, block_size } => {
                group.allocate_kv(blocks as usize, block_size as usize)
            }
            Frame::Step(bytes) => {
                StepPlan::decode(&bytes).and_then(|plan| group.execute(&plan.inputs()).map(|_| ()))
            }
            Frame::Stop => return Ok(()),
            Frame::Failed(reason) => {
                return Err(link_error("the leader failed the group", reason));
            }
            other => {
                tracing::warn!(?other, "an unexpected frame from the leader");
                continue;
            }
        };
        match result {
            Ok(()) => link
                .send(&Frame::Done)
                .map_err(|e| link_error("reporting done", e))?,
            Err(e) => {
                let _ = link.send(&Frame::Failed(e.to_string()));
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_the_wire() {
        for frame in [
            Frame::Hello(3),
            Frame::Ready,
            Frame::Failed("no".into()),
            Frame::Allocate {
                blocks: 5,
                block_size: 16,
            },
            Frame::Step(vec![1, 2, 3, 4]),
            Frame::Partial(vec![1.5, -2.0]),
            Frame::Total(vec![0.25]),
            Frame::Done,
            Frame::Stop,
            Frame::Collective(vec![7; 128]),
            Frame::Collective(Vec::new()),
        ] {
            let mut bytes = Vec::new();
            write_frame(&mut bytes, &frame).unwrap();
            assert_eq!(read_frame(&mut bytes.as_slice()).unwrap(), frame);
        }
        assert!(read_frame(&mut [42u8, 0, 0, 0, 0].as_slice()).is_err());
        assert!(read_frame(&mut [6u8, 8, 0].as_slice()).is_err());
    }

    /// What a test's leader ends with: waiting for its worker to load, and the link.
    type Waited = (Result<()>, Vec<Arc<WorkerLink>>);

    /// A leader on loopback that accepts one worker process, tells it `nccl_id`, and hands back
    /// what waiting for it to load gives; its address and where it records faults.
    fn leader_saying(
        nccl_id: Option<Vec<u8>>,
    ) -> (String, FaultFlag, std::thread::JoinHandle<Waited>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let faults = FaultFlag::default();
        let recorded = faults.clone();
        let leader = std::thread::spawn(move || {
            let deadline = Duration::from_secs(20);
            let links = accept_workers(&listener, 1, deadline, &recorded).unwrap();
            send_collective(&links, nccl_id.as_deref()).unwrap();
            (wait_ready(&links, deadline), links)
        });
        (address, faults, leader)
    }

    #[test]
    fn a_pod_that_cannot_open_nccl_refuses_an_nccl_group_and_tells_the_leader_why() {
        if candle::nccl_present() {
            eprintln!("SKIPPED: NCCL opens here");
            return;
        }
        let (address, faults, leader) = leader_saying(Some(vec![7; 128]));
        let link = connect(&address, 1, Duration::from_secs(20)).unwrap();
        let error = receive_collective(&link, Duration::from_secs(20))
            .unwrap_err()
            .to_string();
        assert!(error.contains("sums through NCCL"), "{error}");
        let (ready, _links) = leader.join().unwrap();
        let error = ready.unwrap_err().to_string();
        assert!(
            error.contains("worker process 1") && error.contains("sums through NCCL"),
            "{error}"
        );
        // What the leader's group (its readiness, its own NCCL join) learns.
        let fault = faults.lock().unwrap().clone().unwrap_or_default();
        assert!(fault.contains("sums through NCCL"), "{fault}");
    }

    #[test]
    fn a_worker_summing_over_the_link_records_its_leader_going_away() {
        let (address, _, leader) = leader_saying(None);
        let link = connect(&address, 1, Duration::from_secs(20)).unwrap();
        assert_eq!(
            receive_collective(&link, Duration::from_secs(20)).unwrap(),
            None
        );
        assert!(link.lost().lock().unwrap().is_none());
        link.send(&Frame::Ready).unwrap();
        let (ready, links) = leader.join().unwrap();
        ready.unwrap();
        // The leader's process ends: its end of the link closes.
        links[0]
            .writer
            .lock()
            .unwrap()
            .shutdown(std::net::Shutdown::Both)
            .unwrap();
        let until = Instant::now() + Duration::from_secs(20);
        while link.lost().lock().unwrap().is_none() {
            assert!(Instant::now() < until, "the loss was never recorded");
            std::thread::yield_now();
        }
        let reason = link.lost().lock().unwrap().clone().unwrap();
        assert!(reason.contains("the leader went away"), "{reason}");
    }
}
