//! Choosing the next token: greedy, or temperature with top-k and top-p, from a per-request seeded
//! generator (the same seed gives the same tokens, whatever else is batched), and the top-n
//! log-probabilities.

/// How one request samples.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// 1.0 keeps every token.
    pub top_p: f32,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    /// Token ids that end the output (the model's EOS is added unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end the output; the text stops before them.
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// How many top log-probabilities to return per token (0: none).
    pub logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            max_tokens: 16,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: 0,
        }
    }
}

impl SamplingParams {
    /// Checks values, naming the first bad field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        if self.logprobs > 20 {
            return Err(format!(
                "logprobs must be at most 20, got {}",
                self.logprobs
            ));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err("stop strings must not be empty".into());
        }
        Ok(())
    }
}

/// A small, fast, reproducible generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// One sampled token and, if asked, its log-probability and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Samples from `logits` (one row of the vocabulary).
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> Sampled {
    let token = if params.temperature == 0.0 {
        argmax(logits)
    } else {
        sample_tempered(logits, params, rng)
    };
    let (logprob, top) = if params.logprobs > 0 {
        logprobs(logits, token, params.logprobs)
    } else {
        (0.0, Vec::new())
    };
    Sampled {
        token,
        logprob,
        top,
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn sample_tempered(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    let mut candidates: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, v)| (i as u32, v / params.temperature))
        .collect();
    let keep = if params.top_k > 0 {
        params.top_k.min(candidates.len())
    } else {
        candidates.len()
    };
    if keep < candidates.len() {
        candidates.select_nth_unstable_by(keep - 1, |a, b| b.1.total_cmp(&a.1));
        candidates.truncate(keep);
    }
    candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let max = candidates[0].1;
    let mut total = 0.0;
    for c in candidates.iter_mut() {
        c.1 = (c.1 - max).exp();
        total += c.1;
    }
    // Nucleus: the smallest prefix whose mass reaches top_p.
    if params.top_p < 1.0 {
        let mut mass = 0.0;
        let mut cut = candidates.len();
        for (i, c) in candidates.iter().enumerate() {
            mass += c.1 / total;
            if mass >= params.top_p {
                cut = i + 1;
                break;
            }
        }
        candidates.truncate(cut);
        total = candidates.iter().map(|c| c.1).sum();
    }
    let mut target = rng.next_f32() * total;
    for c in &candidates {
        target -= c.1;
        if target <= 0.0 {
            return c.0;
        }
    }
    candidates.last().map_or(0, |c| c.0)
}

fn logprobs(logits: &[f32], token: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = logits.iter().map(|v| (v - max).exp()).sum::<f32>().ln() + max;
    let mut top: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, v)| (i as u32, v - log_total))
        .collect();
    let n = n.min(top.len());
    top.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1));
    top.truncate(n);
    top.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    (logits[token as usize] - log_total, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_logit() {
        let s = sample(
            &[0.1, 3.0, -1.0],
            &SamplingParams::default(),
            &mut Rng::new(0),
        );
        assert_eq!(s.token, 1);
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams {
            temperature: 1.0,
            ..SamplingParams::default()
        };
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..20)
                .map(|_| sample(&logits, &params, &mut rng).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_choice() {
        let logits = [5.0, 4.9, 0.0, -1.0];
        let mut rng = Rng::new(1);
        let k1 = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..SamplingParams::default()
        };
        assert!((0..50).all(|_| sample(&logits, &k1, &mut rng).token == 0));
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            ..SamplingParams::default()
        };
        assert!((0..200).all(|_| sample(&logits, &p, &mut rng).token < 2));
    }

    #[test]
    fn logprobs_are_normalised_and_ordered() {
        let params = SamplingParams {
            logprobs: 2,
            ..SamplingParams::default()
        };
        let s = sample(&[0.0, 0.0f32.ln_1p(), 2.0], &params, &mut Rng::new(0));
        assert_eq!(s.token, 2);
        assert_eq!(s.top[0].0, 2);
        let total: f32 = [0.0f32, 0.0, 2.0].iter().map(|v| v.exp()).sum();
        assert!((s.logprob - (2.0 - total.ln())).abs() < 1e-5);
    }

    #[test]
    fn invalid_values_name_the_field() {
        let bad = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        };
        assert!(bad.validate().unwrap_err().starts_with("top_p"));
        let bad = SamplingParams {
            temperature: -1.0,
            ..SamplingParams::default()
        };
        assert!(bad.validate().unwrap_err().starts_with("temperature"));
    }
}
