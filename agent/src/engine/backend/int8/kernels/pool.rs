//! The forward pass's fork-join pool. A step runs a few hundred parallel loops (every matrix
//! product, attention), each a few microseconds to a millisecond long and microseconds apart. A
//! general work-stealing pool puts its idle workers to sleep between them, and waking them costs
//! about as much as the loop: one thread ends up doing most of the work. Here the calling thread
//! and `threads - 1` helpers take a loop's tasks from one counter; helpers spin for a short while
//! after each loop, so the next finds them awake, and sleep when the engine is idle.
//!
//! The pool only ever helps: a caller claims tasks of its own loop until none are left and then
//! waits for those the helpers took, so concurrent callers (several engines in one process) and
//! loops nested in a task finish whatever the helpers do. A panic in a task is raised again in
//! the caller, as `std::thread::scope` does.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// How long a helper spins after a loop before it sleeps.
const SPIN: Duration = Duration::from_micros(300);

static POOL: OnceLock<Pool> = OnceLock::new();

/// Sets the number of threads loops use, the caller included; only before the first loop runs.
/// Returns false if the pool had already started (it keeps its size).
pub fn configure(threads: usize) -> bool {
    POOL.set(Pool::new(threads.max(1))).is_ok()
}

/// Threads a loop may use, the caller included.
pub fn threads() -> usize {
    pool().threads
}

/// Runs `task(i)` for every `i` in `0..tasks`, on the calling thread and the pool's helpers.
pub fn for_each(tasks: usize, task: impl Fn(usize) + Sync) {
    match tasks {
        0 => {}
        1 => task(0),
        _ => pool().run(tasks, &task),
    }
}

/// Runs `task(i, chunk)` for the `i`-th `size`-long chunk of `data` (the last may be shorter).
pub fn for_each_chunk<T: Send>(data: &mut [T], size: usize, task: impl Fn(usize, &mut [T]) + Sync) {
    assert!(size > 0, "chunks must not be empty");
    let (len, base) = (data.len(), SendPtr(data.as_mut_ptr()));
    for_each(len.div_ceil(size), |i| {
        // SAFETY: chunk i lies inside `data` and is disjoint from every other chunk; each index
        // runs once, and `data` stays borrowed until every task has finished.
        #[allow(unsafe_code)]
        let chunk = unsafe { base.chunk(len, i, size) };
        task(i, chunk)
    });
}

/// Runs `task(i, a, b, c)` for the `i`-th chunks of three slices cut into the same number of
/// chunks, of `sizes.0`, `sizes.1` and `sizes.2` elements (the last ones may be shorter): rows
/// of a matrix kept in three arrays.
pub fn for_each_chunk3<A: Send, B: Send, C: Send>(
    (a, b, c): (&mut [A], &mut [B], &mut [C]),
    sizes: (usize, usize, usize),
    task: impl Fn(usize, &mut [A], &mut [B], &mut [C]) + Sync,
) {
    assert!(
        sizes.0 > 0 && sizes.1 > 0 && sizes.2 > 0,
        "chunks must not be empty"
    );
    let tasks = a.len().div_ceil(sizes.0);
    assert!(
        tasks == b.len().div_ceil(sizes.1) && tasks == c.len().div_ceil(sizes.2),
        "the slices cut into different numbers of chunks"
    );
    let parts = (
        (a.len(), SendPtr(a.as_mut_ptr())),
        (b.len(), SendPtr(b.as_mut_ptr())),
        (c.len(), SendPtr(c.as_mut_ptr())),
    );
    for_each(tasks, |i| {
        // SAFETY: as in `for_each_chunk`, for each slice: chunk i lies inside it and is disjoint
        // from the others, each index runs once, and all stay borrowed until every task ends.
        #[allow(unsafe_code)]
        unsafe {
            task(
                i,
                parts.0.1.chunk(parts.0.0, i, sizes.0),
                parts.1.1.chunk(parts.1.0, i, sizes.1),
                parts.2.1.chunk(parts.2.0, i, sizes.2),
            )
        }
    });
}

/// A raw pointer the tasks may share: they only form disjoint slices from it.
struct SendPtr<T>(*mut T);

// SAFETY: the pointer is only used to form disjoint slices of `Send` elements, one per task.
#[allow(unsafe_code)]
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// Chunk `i` of `size` elements of the `len`-long slice this points at.
    ///
    /// # Safety
    /// The slice must be alive and no other reference to that chunk in use.
    #[allow(unsafe_code)]
    unsafe fn chunk<'a>(&self, len: usize, i: usize, size: usize) -> &'a mut [T] {
        let start = (i * size).min(len);
        let end = len.min(start + size);
        // SAFETY: `start..end` lies inside the slice; the caller guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), end - start) }
    }
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(std::thread::available_parallelism().map_or(1, |n| n.get())))
}

struct Pool {
    threads: usize,
    shared: Arc<Shared>,
}

struct Shared {
    /// Bumped (under `slot`'s lock) for every loop published.
    generation: AtomicU64,
    slot: Mutex<Slot>,
    wake: Condvar,
}

struct Slot {
    job: Option<Arc<Job>>,
    sleepers: usize,
}

/// One loop. `task` points at the caller's closure, which lives until `pending` reaches zero;
/// it is called only for a claimed index below `tasks`, and the caller does not return before
/// every such call has finished.
struct Job {
    task: *const (dyn Fn(usize) + Sync + 'static),
    tasks: usize,
    next: AtomicUsize,
    pending: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `task` is `Sync` and only called while its owner waits (see `Job`).
#[allow(unsafe_code)]
unsafe impl Send for Job {}
// SAFETY: as above; every other field is thread-safe.
#[allow(unsafe_code)]
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs tasks until none are left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.tasks {
                return;
            }
            // SAFETY: index i < tasks was claimed once, so the caller is still waiting on it and
            // the closure is alive (see `Job`).
            #[allow(unsafe_code)]
            let task = unsafe { &*self.task };
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| task(i))) {
                let mut slot = self.panic.lock().unwrap_or_else(PoisonError::into_inner);
                slot.get_or_insert(panic);
            }
            self.pending.fetch_sub(1, Ordering::Release);
        }
    }
}

impl Pool {
    fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            slot: Mutex::new(Slot {
                job: None,
                sleepers: 0,
            }),
            wake: Condvar::new(),
        });
        for i in 1..threads {
            let shared = shared.clone();
            // A helper that cannot start only means less help.
            let _ = std::thread::Builder::new()
                .name(format!("parallax-forward-{i}"))
                .spawn(move || helper(&shared));
        }
        Self { threads, shared }
    }

    fn run(&self, tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        // SAFETY: only the lifetime is erased; `Job` documents why the closure outlives its use.
        #[allow(unsafe_code)]
        let task: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(task) };
        let job = Arc::new(Job {
            task,
            tasks,
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(tasks),
            panic: Mutex::new(None),
        });
        if self.threads > 1 {
            let mut slot = self
                .shared
                .slot
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            slot.job = Some(job.clone());
            self.shared.generation.fetch_add(1, Ordering::Release);
            if slot.sleepers > 0 {
                self.shared.wake.notify_all();
            }
        }
        job.work();
        while job.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        let panic = job
            .panic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(panic) = panic {
            resume_unwind(panic);
        }
    }
}

fn helper(shared: &Shared) {
    let mut seen = 0;
    loop {
        let spun = Instant::now();
        let mut spins = 0u32;
        while shared.generation.load(Ordering::Acquire) == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && spun.elapsed() > SPIN {
                break;
            }
        }
        let job = {
            let mut slot = shared.slot.lock().unwrap_or_else(PoisonError::into_inner);
            while shared.generation.load(Ordering::Acquire) == seen {
                slot.sleepers += 1;
                slot = shared
                    .wake
                    .wait(slot)
                    .unwrap_or_else(PoisonError::into_inner);
                slot.sleepers -= 1;
            }
            seen = shared.generation.load(Ordering::Acquire);
            slot.job.clone()
        };
        if let Some(job) = job {
            job.work();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once() {
        for tasks in [0, 1, 2, 7, 1000] {
            let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            for_each(tasks, |i| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                "{tasks} tasks"
            );
        }
    }

    #[test]
    fn chunks_cover_the_slice_and_loops_nest_and_run_concurrently() {
        let callers: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut data = vec![0usize; 1001];
                    for_each_chunk(&mut data, 10, |i, chunk| {
                        for_each(3, |_| {});
                        for (j, v) in chunk.iter_mut().enumerate() {
                            *v = i * 10 + j + t;
                        }
                    });
                    assert!(data.iter().enumerate().all(|(i, v)| *v == i + t));
                })
            })
            .collect();
        for caller in callers {
            caller.join().unwrap();
        }
    }

    #[test]
    fn a_panicking_task_panics_the_caller() {
        let result = catch_unwind(|| {
            for_each(64, |i| {
                assert!(i != 40, "task forty");
            })
        });
        let message = result.unwrap_err();
        assert_eq!(message.downcast_ref::<&str>(), Some(&"task forty"));
        // The pool still works afterwards.
        let sum = AtomicUsize::new(0);
        for_each(10, |i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 45);
    }
}
