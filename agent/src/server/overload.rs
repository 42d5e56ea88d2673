//! The bound on waiting work: at most `max_requests` requests and `max_tokens` prompt tokens wait
//! for their first step; beyond that a request is refused (429) with a `Retry-After` computed from
//! how fast the queue has been draining. A [`QueueSlot`] holds a request's place until its first
//! step, or until it is dropped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Starts remembered to measure the drain rate.
const DRAIN_WINDOW: usize = 64;

#[derive(Debug)]
pub struct QueueBudget {
    max_requests: usize,
    max_tokens: usize,
    requests: AtomicUsize,
    tokens: AtomicUsize,
    /// When the latest requests started.
    starts: Mutex<VecDeque<Instant>>,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    /// Seconds after which the queue should have room again.
    pub retry_after: u64,
}

impl QueueBudget {
    pub fn new(max_requests: usize, max_tokens: usize) -> Self {
        Self {
            max_requests,
            max_tokens,
            requests: AtomicUsize::new(0),
            tokens: AtomicUsize::new(0),
            starts: Mutex::new(VecDeque::with_capacity(DRAIN_WINDOW)),
        }
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// Takes a place for a request of `tokens` prompt tokens, or says why not.
    pub fn reserve(self: &Arc<Self>, tokens: usize) -> Result<QueueSlot, Refusal> {
        let requests = self.requests.fetch_add(1, Ordering::AcqRel) + 1;
        let queued_tokens = self.tokens.fetch_add(tokens, Ordering::AcqRel) + tokens;
        let slot = QueueSlot {
            budget: self.clone(),
            tokens,
            held: true,
        };
        let reason = if requests > self.max_requests {
            "queue_full"
        } else if queued_tokens > self.max_tokens && requests > 1 {
            // A single request larger than the bound still runs when nothing else waits.
            "queue_tokens"
        } else {
            return Ok(slot);
        };
        drop(slot);
        Err(Refusal {
            reason,
            retry_after: self.retry_after(Instant::now()),
        })
    }

    /// Seconds until the waiting requests should have started, at the recent drain rate
    /// (1 to 300; 1 when nothing has started yet).
    pub fn retry_after(&self, now: Instant) -> u64 {
        let starts = self.starts.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(first), n) = (starts.front(), starts.len()) else {
            return 1;
        };
        let span = now
            .saturating_duration_since(*first)
            .max(Duration::from_millis(100));
        let rate = n as f64 / span.as_secs_f64();
        (self.waiting() as f64 / rate).ceil().clamp(1.0, 300.0) as u64
    }

    fn record_start(&self, at: Instant) {
        let mut starts = self.starts.lock().unwrap_or_else(|e| e.into_inner());
        if starts.len() == DRAIN_WINDOW {
            starts.pop_front();
        }
        starts.push_back(at);
    }
}

/// A request's place in the waiting queue.
#[derive(Debug)]
pub struct QueueSlot {
    budget: Arc<QueueBudget>,
    tokens: usize,
    held: bool,
}

impl QueueSlot {
    /// The request ran its first step: its place is free.
    pub fn started(mut self, at: Instant) {
        self.budget.record_start(at);
        self.release();
    }

    fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            self.budget.requests.fetch_sub(1, Ordering::AcqRel);
            self.budget.tokens.fetch_sub(self.tokens, Ordering::AcqRel);
        }
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_refuses_beyond_its_bounds_and_frees_places_as_requests_start() {
        let budget = Arc::new(QueueBudget::new(2, 100));
        let a = budget.reserve(10).unwrap();
        let b = budget.reserve(10).unwrap();
        assert_eq!(budget.reserve(10).unwrap_err().reason, "queue_full");
        assert_eq!(budget.waiting(), 2, "a refusal takes no place");
        let t0 = Instant::now();
        a.started(t0);
        let c = budget.reserve(95).unwrap_err();
        assert_eq!(c.reason, "queue_tokens");
        drop(b);
        // Alone, even an oversized prompt may wait.
        let big = budget.reserve(500).unwrap();
        drop(big);
        assert_eq!(budget.waiting(), 0);
    }

    #[test]
    fn retry_after_follows_the_drain_rate() {
        let budget = Arc::new(QueueBudget::new(100, 1_000_000));
        let t0 = Instant::now();
        // Ten starts over one second: 10 per second.
        for i in 0..10 {
            budget
                .reserve(1)
                .unwrap()
                .started(t0 + Duration::from_millis(100 * i));
        }
        let waiting: Vec<_> = (0..50).map(|_| budget.reserve(1).unwrap()).collect();
        assert_eq!(budget.retry_after(t0 + Duration::from_secs(1)), 5);
        drop(waiting);
        assert_eq!(budget.retry_after(t0 + Duration::from_secs(1)), 1);
    }
}
