//! NCCL between the GPUs of a tensor-parallel group: each rank's partial sums are added on the
//! devices, in the model's type, on candle's stream — no copy to the host and back.
//!
//! Every communicator is non-blocking (NCCL's `blocking = 0`), so that no call waits without a
//! deadline: creating the communicators (which waits for every rank of the group, in this process
//! and in the others) and each all-reduce's enqueue are polled until done, failed, or past the
//! deadline. What the GPU does later is watched by [`watch`] (a [`watchdog`]): an event recorded
//! after each all-reduce that has not completed within the deadline (a peer that never joined the
//! sum), an error NCCL reports asynchronously (a peer process gone), or the group failed elsewhere
//! (a rank thread's error, a lost link) aborts every communicator of the process — NCCL's kernels
//! then stop waiting — and the ranks' next steps fail with the reason. No rank hangs on a sum.

#![allow(unsafe_code)]

use crate::engine::backend::candle::NcclPlace;
use crate::engine::parallel::watchdog::{self, GroupWatch, Watched};
use candle_core::cuda_backend::cudarc;
use candle_core::{DType, Tensor};
use cudarc::driver::{CudaEvent, CudaStream};
use cudarc::nccl::{result, sys};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Bytes of an NCCL unique id: what global rank 0's process makes and the others receive.
pub const ID_BYTES: usize = 128;

/// Whether libnccl can be opened: cudarc panics on first use otherwise.
pub fn present() -> bool {
    // SAFETY: only tries to open the library (dlopen) and closes it again.
    unsafe { sys::is_culib_present() }
}

fn nccl_error(what: &str, e: result::NcclError) -> String {
    format!("NCCL {what}: {:?}", e.0)
}

/// A new unique id for a group's communicators (global rank 0 makes it; every rank joins by it).
pub fn unique_id() -> Result<Vec<u8>, String> {
    let id = result::get_uniqueid().map_err(|e| nccl_error("unique id", e))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// NCCL's `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every field NCCL should choose left
/// undefined (`INT_MIN`, null). The library reads as many fields as `size` says (at most its
/// own struct's) and takes its defaults for fields newer than `version` (2.28: `blocking` is
/// from 2.14, and every later field is left to NCCL anyway), so an older or newer libnccl than
/// these bindings' reads it right.
fn non_blocking_config() -> sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    sys::ncclConfig_t {
        size: size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 22800,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// The state of a non-blocking communicator's last operation.
fn async_state(raw: sys::ncclComm_t) -> sys::ncclResult_t {
    let mut state = sys::ncclResult_t::ncclSuccess;
    // SAFETY: `raw` is a live communicator (callers hold it under its lock); NCCL allows this
    // call from any thread.
    let called = unsafe { sys::ncclCommGetAsyncError(raw, &mut state) };
    if called != sys::ncclResult_t::ncclSuccess {
        return called;
    }
    state
}

/// Polls `raw` until its operation in progress has finished: `Err` with the reason on an error,
/// past `until`, or once `abandon` gives a reason; `pause` between looks (none: yield).
fn settle(
    raw: sys::ncclComm_t,
    until: Instant,
    pause: Option<Duration>,
    abandon: &dyn Fn() -> Option<String>,
    what: &str,
) -> Result<(), String> {
    loop {
        match async_state(raw) {
            sys::ncclResult_t::ncclSuccess => return Ok(()),
            sys::ncclResult_t::ncclInProgress if Instant::now() < until => {
                if let Some(reason) = abandon() {
                    return Err(format!("{what}: {reason}"));
                }
                match pause {
                    Some(pause) => std::thread::sleep(pause),
                    None => std::thread::yield_now(),
                }
            }
            sys::ncclResult_t::ncclInProgress => return Err(format!("{what} did not finish")),
            error => return Err(format!("{what}: {error:?}")),
        }
    }
}

/// How often joining the group looks again: other processes may take minutes to load.
const JOIN_PAUSE: Duration = Duration::from_millis(10);

/// One rank's communicator, on the stream its model runs on.
#[derive(Debug)]
pub struct Comm {
    /// `None` once aborted. Locked for each call into NCCL.
    raw: Mutex<Option<Raw>>,
    stream: Arc<CudaStream>,
    rank: usize,
    deadline: Duration,
    /// Recorded after each all-reduce (re-recorded: it stands for the last); `pending` is when
    /// that all-reduce was enqueued, until the watchdog sees the event complete.
    recorded: CudaEvent,
    pending: Mutex<Option<Instant>>,
    failure: Mutex<Option<String>>,
}

/// A communicator handle, aborted when dropped (aborting frees it without waiting on other
/// ranks). NCCL lets a communicator be used from any one thread at a time; every use here is
/// under [`Comm::raw`]'s lock.
#[derive(Debug)]
struct Raw(sys::ncclComm_t);
// SAFETY: see above — the handle moves between threads but is used by one at a time.
unsafe impl Send for Raw {}

impl Drop for Raw {
    fn drop(&mut self) {
        // SAFETY: the handle's one owner; nobody uses it again.
        unsafe {
            let _ = result::comm_abort(self.0);
        }
    }
}

/// Creates the communicators of this process's ranks — global ranks from `place.first`, each on
/// its stream (one GPU each) — within `place.join` (every rank of the group, in every process,
/// must join by then) unless `abandon` gives a reason first (the group failed elsewhere).
pub fn init(
    streams: &[Arc<CudaStream>],
    place: &NcclPlace<'_>,
    abandon: &dyn Fn() -> Option<String>,
) -> Result<Vec<Arc<Comm>>, String> {
    let NcclPlace {
        id,
        first,
        world,
        join,
        deadline,
    } = *place;
    let internal: [std::ffi::c_char; ID_BYTES] = id
        .iter()
        .map(|&b| b as std::ffi::c_char)
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| format!("an NCCL unique id of {} bytes, not {ID_BYTES}", id.len()))?;
    let id = sys::ncclUniqueId { internal };
    let until = Instant::now() + join;
    let mut raws = Vec::with_capacity(streams.len());
    // Several ranks of one thread join in one NCCL group call.
    let started = result::group_start().map_err(|e| nccl_error("group start", e));
    let mut failure = started.err();
    for (index, stream) in streams.iter().enumerate() {
        if failure.is_some() {
            break;
        }
        if let Err(e) = stream.context().bind_to_thread() {
            failure = Some(format!("binding GPU {}: {e:?}", stream.context().ordinal()));
            break;
        }
        let mut config = non_blocking_config();
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` and `config` outlive the call; NCCL fills `raw`.
        match unsafe {
            result::comm_init_rank_config(
                &mut raw,
                world as i32,
                id,
                (first + index) as i32,
                &mut config,
            )
        } {
            Ok(_) => raws.push(Raw(raw)),
            Err(e) => failure = Some(nccl_error("communicator", e)),
        }
    }
    if let Err(e) = result::group_end() {
        failure.get_or_insert(nccl_error("group end", e));
    }
    if failure.is_none() {
        for raw in &raws {
            let what = "joining the group's NCCL communicator";
            if let Err(e) = settle(raw.0, until, Some(JOIN_PAUSE), abandon, what) {
                failure = Some(format!("{e} (within {join:?})"));
                break;
            }
        }
    }
    if let Some(reason) = failure {
        return Err(reason);
    }
    raws.into_iter()
        .zip(streams)
        .enumerate()
        .map(|(index, (raw, stream))| {
            let recorded = stream
                .record_event(Some(
                    cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING,
                ))
                .map_err(|e| format!("an event on GPU {}: {e:?}", stream.context().ordinal()))?;
            Ok(Arc::new(Comm {
                raw: Mutex::new(Some(raw)),
                stream: stream.clone(),
                rank: first + index,
                deadline,
                recorded,
                pending: Mutex::new(None),
                failure: Mutex::new(None),
            }))
        })
        .collect()
}

fn data_type(dtype: DType) -> Option<sys::ncclDataType_t> {
    Some(match dtype {
        DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
        DType::F16 => sys::ncclDataType_t::ncclFloat16,
        DType::F32 => sys::ncclDataType_t::ncclFloat32,
        _ => return None,
    })
}

impl Comm {
    /// Why the group's communicators were aborted, once they have been.
    pub fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }

    /// Replaces `partial` — a contiguous tensor on this rank's GPU that nothing else holds (a
    /// projection's fresh output) — with its sum over every rank, in place, on the stream.
    pub fn all_reduce(&self, partial: &Tensor) -> candle_core::Result<()> {
        let Some(data_type) = data_type(partial.dtype()) else {
            candle_core::bail!("NCCL sums bf16, f16 and f32, not {:?}", partial.dtype());
        };
        let address = super::pointer(partial, &self.stream)?;
        let raw = lock(&self.raw);
        let Some(Raw(comm)) = raw.as_ref() else {
            candle_core::bail!(
                "{}",
                self.failure()
                    .unwrap_or_else(|| "the NCCL communicator is closed".into())
            );
        };
        let comm = *comm;
        let enqueued = Instant::now();
        // SAFETY: `address` is `partial`'s first element, `elem_count` of them, on this
        // communicator's device; NCCL reads and writes it on candle's stream, in order with the
        // kernels that wrote it and those that read it next.
        let called = unsafe {
            result::all_reduce(
                address as *const std::ffi::c_void,
                address as *mut std::ffi::c_void,
                partial.elem_count(),
                data_type,
                sys::ncclRedOp_t::ncclSum,
                comm,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        };
        let settled = match called {
            Ok(result::NcclStatus::InProgress) => settle(
                comm,
                enqueued + self.deadline,
                None,
                &|| None,
                "an all-reduce's enqueue",
            ),
            Ok(_) => Ok(()),
            Err(e) => Err(nccl_error("all-reduce", e)),
        };
        drop(raw);
        if let Err(reason) = settled {
            let reason = format!("rank {}: {reason}", self.rank);
            self.abort(&reason);
            candle_core::bail!("{reason}");
        }
        if self.rank == 0 {
            crate::engine::parallel::collective::ALL_REDUCES.record(enqueued.elapsed());
        }
        let mut pending = lock(&self.pending);
        self.recorded
            .record(&self.stream)
            .map_err(candle_core::Error::wrap)?;
        *pending = Some(enqueued);
        Ok(())
    }
}

impl Watched for Comm {
    /// NCCL's asynchronous error, or an all-reduce the GPU has not finished within the deadline.
    fn trouble(&self) -> Option<String> {
        if let Ok(raw) = self.raw.try_lock()
            && let Some(Raw(comm)) = raw.as_ref()
        {
            match async_state(*comm) {
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => {}
                error => return Some(format!("rank {}: NCCL reports {error:?}", self.rank)),
            }
        }
        let mut pending = lock(&self.pending);
        // The event's query runs in the watchdog's thread, on the rank's context.
        if self.stream.context().bind_to_thread().is_err() {
            return None;
        }
        if self.recorded.is_complete() {
            *pending = None;
        } else if let Some(since) = *pending
            && since.elapsed() > self.deadline
        {
            return Some(format!(
                "rank {}: an all-reduce did not finish on the GPU within {:?} (a rank that \
                 never joined the sum)",
                self.rank, self.deadline
            ));
        }
        None
    }

    /// Aborts the communicator: NCCL's kernels waiting on other ranks end, and this rank's
    /// later sums fail with the reason.
    fn abort(&self, reason: &str) {
        lock(&self.failure).get_or_insert_with(|| reason.to_owned());
        // Dropping the handle aborts it.
        lock(&self.raw).take();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How often the watchdog looks.
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// Watches this process's communicators until they are dropped (see [`watchdog`]): the first
/// trouble — one of theirs, or the group failed elsewhere — aborts them all and fails the group
/// for the ranks that sum on the host side of it.
pub fn watch(comms: &[Arc<Comm>], group: GroupWatch) -> Result<(), String> {
    let watched = comms
        .iter()
        .map(|c| Arc::downgrade(c) as Weak<dyn Watched>)
        .collect();
    watchdog::spawn("parallax-nccl-watch", watched, WATCH_EVERY, group).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NCCL makes unique ids without a GPU, wherever libnccl.so opens (`scripts/build-cuda
    /// --test` installs one): the id global rank 0's process sends its group.
    #[test]
    fn unique_ids_come_from_libnccl_fresh_each_time() {
        if !present() {
            eprintln!("SKIPPED: libnccl.so cannot be opened here");
            return;
        }
        let (a, b) = (unique_id().unwrap(), unique_id().unwrap());
        assert_eq!((a.len(), b.len()), (ID_BYTES, ID_BYTES));
        assert_ne!(a, b);
    }

    #[test]
    fn an_id_of_another_size_is_refused_by_its_size_before_nccl_is_asked() {
        let place = NcclPlace {
            id: &[1, 2, 3],
            first: 0,
            world: 1,
            join: Duration::from_secs(1),
            deadline: Duration::from_secs(1),
        };
        let error = init(&[], &place, &|| None).unwrap_err();
        assert!(error.contains("3 bytes, not 128"), "{error}");
    }
}
