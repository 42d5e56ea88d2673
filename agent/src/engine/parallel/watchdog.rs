//! A watchdog over a group's sums that run where the host cannot wait on them (NCCL's, on the
//! GPUs): it looks every so often, and the first trouble — one of the watched's own, or the group
//! failed elsewhere — aborts every watched and fails the group, so nothing waits on a sum that
//! will not come. It ends when the watched are dropped.

use std::sync::Weak;
use std::time::Duration;

/// What a watchdog watches: one rank's device-side sums.
pub trait Watched: Send + Sync {
    /// What is wrong, if anything (an error the library reports, a sum overdue).
    fn trouble(&self) -> Option<String>;
    /// Stops the sums for `reason`: what waits on them ends, later ones fail with the reason.
    fn abort(&self, reason: &str);
}

/// The group a watchdog answers to.
pub struct GroupWatch {
    /// Why the group failed, once it has.
    pub broken: Box<dyn Fn() -> Option<String> + Send>,
    /// Fails the group for `reason`.
    pub fail: Box<dyn Fn(&str) + Send>,
}

impl std::fmt::Debug for GroupWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupWatch")
    }
}

/// Starts a thread `name` that looks at `watched` and `group` every `every` until the watched
/// are dropped or the first trouble, which aborts them all and is passed to `group.fail`.
pub fn spawn(
    name: &str,
    watched: Vec<Weak<dyn Watched>>,
    every: Duration,
    group: GroupWatch,
) -> Result<std::thread::JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let Some(live) = watched
                    .iter()
                    .map(Weak::upgrade)
                    .collect::<Option<Vec<_>>>()
                else {
                    return;
                };
                let reason = (group.broken)().or_else(|| live.iter().find_map(|w| w.trouble()));
                if let Some(reason) = reason {
                    tracing::error!(%reason, "the tensor-parallel group's device sums are aborted");
                    for w in &live {
                        w.abort(&reason);
                    }
                    (group.fail)(&reason);
                    return;
                }
            }
        })
        .map_err(|e| format!("the {name} thread: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, mpsc};

    /// A rank whose sums go wrong at its `fails_at`-th look (never at 0).
    #[derive(Default)]
    struct Fake {
        looks: AtomicUsize,
        fails_at: usize,
        aborted: Mutex<Option<String>>,
    }

    impl Watched for Fake {
        fn trouble(&self) -> Option<String> {
            let look = self.looks.fetch_add(1, Ordering::SeqCst) + 1;
            (self.fails_at != 0 && look >= self.fails_at).then(|| "a sum is overdue".to_owned())
        }
        fn abort(&self, reason: &str) {
            self.aborted
                .lock()
                .unwrap()
                .get_or_insert(reason.to_owned());
        }
    }

    /// Starts a watchdog over `fakes` whose group is broken once `broken` holds a reason;
    /// what it fails the group with arrives on the receiver.
    fn start(
        fakes: &[Arc<Fake>],
        broken: Arc<Mutex<Option<String>>>,
    ) -> (std::thread::JoinHandle<()>, mpsc::Receiver<String>) {
        let (failed, failures) = mpsc::channel();
        let failed = Mutex::new(failed);
        let watched = fakes
            .iter()
            .map(|f| Arc::downgrade(f) as Weak<dyn Watched>)
            .collect();
        let group = GroupWatch {
            broken: Box::new(move || broken.lock().unwrap().clone()),
            fail: Box::new(move |reason| {
                let _ = failed.lock().unwrap().send(reason.to_owned());
            }),
        };
        let thread = spawn("test-watch", watched, Duration::from_millis(1), group).unwrap();
        (thread, failures)
    }

    const LIMIT: Duration = Duration::from_secs(20);

    /// The group was failed for `reason`, the watchdog ended, and every rank was aborted for it.
    fn all_aborted_for(
        fakes: &[Arc<Fake>],
        thread: std::thread::JoinHandle<()>,
        failures: &mpsc::Receiver<String>,
        reason: &str,
    ) {
        assert_eq!(failures.recv_timeout(LIMIT).unwrap(), reason);
        thread.join().unwrap();
        for fake in fakes {
            assert_eq!(fake.aborted.lock().unwrap().as_deref(), Some(reason));
        }
    }

    #[test]
    fn one_ranks_trouble_aborts_every_rank_and_fails_the_group() {
        let fakes = [
            Arc::new(Fake::default()),
            Arc::new(Fake {
                fails_at: 5,
                ..Fake::default()
            }),
        ];
        let (thread, failures) = start(&fakes, Arc::default());
        all_aborted_for(&fakes, thread, &failures, "a sum is overdue");
    }

    #[test]
    fn the_group_failing_elsewhere_aborts_every_rank() {
        let fakes = [Arc::new(Fake::default()), Arc::new(Fake::default())];
        let broken = Arc::new(Mutex::new(None));
        let (thread, failures) = start(&fakes, broken.clone());
        // Healthy: looked at, left alone.
        let until = std::time::Instant::now() + LIMIT;
        while fakes[1].looks.load(Ordering::SeqCst) < 3 {
            assert!(std::time::Instant::now() < until, "never looked");
            std::thread::yield_now();
        }
        assert!(fakes[0].aborted.lock().unwrap().is_none());
        *broken.lock().unwrap() = Some("worker process 1 went away".into());
        all_aborted_for(&fakes, thread, &failures, "worker process 1 went away");
    }

    #[test]
    fn the_watchdog_ends_quietly_when_its_ranks_are_gone() {
        let fakes = vec![Arc::new(Fake::default())];
        let (thread, failures) = start(&fakes, Arc::default());
        drop(fakes);
        thread.join().unwrap();
        assert!(failures.try_recv().is_err(), "nothing failed");
    }
}
