//! How a GPU's memory is shared, the way vLLM does it: a fraction of the card
//! (`--gpu-memory-utilization`, the pool's `kvCache.gpuMemoryFraction`) is the budget; what is
//! already in use once the weights are loaded and the largest step has run once (weights, the
//! CUDA context and libraries, anything else on the card) and that step's activation peak come
//! off it; the rest is KV blocks. Pure arithmetic, so it is tested without a card.

use crate::engine::error::{EngineError, Result};

/// The numbers behind the KV cache's size, logged at start and exported as metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryPlan {
    pub total: usize,
    pub utilization: f64,
    /// In use before the KV cache: weights, context, libraries, other processes.
    pub in_use: usize,
    pub weights: usize,
    /// The largest step's activations at their peak.
    pub activation_peak: usize,
    pub kv_bytes: usize,
    pub kv_blocks: usize,
}

impl MemoryPlan {
    /// The plan for a card of `total` bytes with `free` bytes free after loading and profiling,
    /// or an error with the numbers when not even one block fits.
    pub fn new(
        total: usize,
        free: usize,
        weights: usize,
        activation_peak: usize,
        utilization: f64,
        block_bytes: usize,
    ) -> Result<Self> {
        let budget = (total as f64 * utilization) as usize;
        let in_use = total.saturating_sub(free);
        let kv_bytes = budget.saturating_sub(in_use + activation_peak);
        let kv_blocks = kv_bytes / block_bytes.max(1);
        if kv_blocks == 0 {
            return Err(EngineError::DoesNotFit(format!(
                "{:.0}% of the card's {} is {}; {} are in use (weights {}) and the largest step \
                 peaks at {}, which leaves {} for the KV cache, less than one block ({}): raise \
                 --gpu-memory-utilization, lower --max-num-batched-tokens or --max-num-seqs, or \
                 use more GPUs",
                utilization * 100.0,
                gib(total),
                gib(budget),
                gib(in_use),
                gib(weights),
                gib(activation_peak),
                gib(kv_bytes),
                gib(block_bytes),
            )));
        }
        Ok(Self {
            total,
            utilization,
            in_use,
            weights,
            activation_peak,
            kv_bytes,
            kv_blocks,
        })
    }
}

fn gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: usize = 1 << 30;

    #[test]
    fn the_kv_cache_gets_the_budget_minus_what_is_in_use_and_the_peak() {
        // An 80 GiB card, 16 GiB of weights and 1 GiB of context in use, a 2 GiB peak, 90 %.
        let plan = MemoryPlan::new(80 * GIB, 63 * GIB, 16 * GIB, 2 * GIB, 0.9, 2 << 20).unwrap();
        assert_eq!(plan.in_use, 17 * GIB);
        assert_eq!(plan.kv_bytes, 72 * GIB - 19 * GIB);
        assert_eq!(plan.kv_blocks, (53 * GIB) / (2 << 20));
    }

    #[test]
    fn a_model_that_does_not_fit_fails_with_the_numbers() {
        // A 24 GiB card with 22 GiB in use (19 of them weights): 90 % leaves nothing.
        let error = MemoryPlan::new(24 * GIB, 2 * GIB, 19 * GIB, GIB, 0.9, 2 << 20)
            .unwrap_err()
            .to_string();
        for needle in [
            "24.00 GiB",
            "21.60 GiB",
            "22.00 GiB",
            "19.00 GiB",
            "1.00 GiB",
            "--gpu-memory-utilization",
        ] {
            assert!(error.contains(needle), "{needle} in {error}");
        }
    }
}
