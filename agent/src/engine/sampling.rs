//! Choosing the next token: greedy, or temperature with top-k and top-p, from a per-request seeded
//! generator (the same seed gives the same tokens, whatever else is batched), and the top-n
//! log-probabilities. Before that, the logits processors vLLM's clients send: a bias per token,
//! the repetition, presence and frequency penalties, and end tokens held back until `min_tokens`.

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
    /// Tokens generated before an end token or a stop string may end the output.
    pub min_tokens: usize,
    /// Token ids that end the output (the model's EOS is added unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end the output; the text stops before them.
    pub stop: Vec<String>,
    /// Keep the stop string that ended the output in its text.
    pub include_stop_str_in_output: bool,
    pub ignore_eos: bool,
    /// How many top log-probabilities to return per token (0: none).
    pub logprobs: usize,
    /// Compute each sampled token's log-probability even without `logprobs` (to rank choices).
    pub score: bool,
    /// vLLM's: a token already in the prompt or the output has a positive logit divided by
    /// this, a negative one multiplied (1: off).
    pub repetition_penalty: f32,
    /// OpenAI's: subtracted from the logit of every token already in the output (0: off)…
    pub presence_penalty: f32,
    /// …and this times its count in the output.
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens.
    pub logit_bias: Vec<(u32, f32)>,
    /// Leave special tokens out of the text.
    pub skip_special_tokens: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            max_tokens: 16,
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            include_stop_str_in_output: false,
            ignore_eos: false,
            logprobs: 0,
            score: false,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            skip_special_tokens: true,
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
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(format!("{name} must be between -2 and 2, got {value}"));
            }
        }
        if self.min_tokens > self.max_tokens {
            return Err(format!(
                "min_tokens ({}) must not exceed max_tokens ({})",
                self.min_tokens, self.max_tokens
            ));
        }
        Ok(())
    }

    /// Whether the logits are changed before sampling (then the device's greedy pick will not
    /// do: the whole row is needed).
    pub fn processes_logits(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || !self.logit_bias.is_empty()
            || self.min_tokens > 0
    }
}

/// What a sequence has so far, for the logits processors.
#[derive(Debug, Clone, Copy)]
pub struct History<'a> {
    pub prompt: &'a [u32],
    pub output: &'a [u32],
    /// Tokens that would end the output (EOS unless ignored, and the stop tokens): held back
    /// while fewer than `min_tokens` were generated.
    pub end_tokens: &'a [u32],
}

/// Applies the bias, the penalties and `min_tokens` to `logits` in place.
pub fn process(logits: &mut [f32], params: &SamplingParams, history: History<'_>) {
    let vocab = logits.len();
    for &(token, bias) in &params.logit_bias {
        if let Some(l) = logits.get_mut(token as usize) {
            *l += bias;
        }
    }
    if params.repetition_penalty != 1.0 {
        let mut seen = vec![false; vocab];
        for &t in history.prompt.iter().chain(history.output) {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        for (l, _) in logits.iter_mut().zip(&seen).filter(|(_, s)| **s) {
            *l = if *l > 0.0 {
                *l / params.repetition_penalty
            } else {
                *l * params.repetition_penalty
            };
        }
    }
    if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &t in history.output {
            *counts.entry(t).or_default() += 1;
        }
        for (token, count) in counts {
            if let Some(l) = logits.get_mut(token as usize) {
                *l -= params.presence_penalty + params.frequency_penalty * count as f32;
            }
        }
    }
    if history.output.len() < params.min_tokens {
        for &t in history.end_tokens {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
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

/// Samples from `logits` (one row of the vocabulary) after the logits processors; the
/// log-probabilities are of the processed logits, as vLLM reports them.
pub fn sample(
    logits: &[f32],
    params: &SamplingParams,
    rng: &mut Rng,
    history: History<'_>,
) -> Sampled {
    let processed;
    let logits = if params.processes_logits() {
        let mut row = logits.to_vec();
        process(&mut row, params, history);
        processed = row;
        &processed[..]
    } else {
        logits
    };
    let token = if params.temperature == 0.0 {
        argmax(logits)
    } else {
        sample_tempered(logits, params, rng)
    };
    let (logprob, top) = if params.logprobs > 0 || params.score {
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

/// The greedy token of a logits row: the first largest.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn sample_tempered(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    draw_token(logits, &Draw::new(params, rng.next_f32()))
}

/// One row's sampling as a device can do it alone: the distribution (temperature, top-k,
/// top-p) and the request's uniform draw for this token. `temperature` 0 is greedy.
#[derive(Debug, Clone, Copy)]
pub struct Draw {
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: u32,
    pub top_p: f32,
    /// In [0, 1): where in the kept distribution's mass the token lies.
    pub uniform: f32,
}

impl PartialEq for Draw {
    fn eq(&self, other: &Self) -> bool {
        self.words() == other.words()
    }
}

impl Eq for Draw {}

impl Draw {
    pub fn new(params: &SamplingParams, uniform: f32) -> Self {
        Self {
            temperature: params.temperature,
            top_k: params.top_k.min(u32::MAX as usize) as u32,
            top_p: params.top_p,
            uniform,
        }
    }

    /// The greedy pick.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            uniform: 0.0,
        }
    }

    /// As four 32-bit words (temperature, top_k, top_p, uniform; floats by their bits): what
    /// goes over a group link and into the CUDA kernel's parameter rows.
    pub fn words(&self) -> [u32; 4] {
        [
            self.temperature.to_bits(),
            self.top_k,
            self.top_p.to_bits(),
            self.uniform.to_bits(),
        ]
    }

    pub fn from_words(words: [u32; 4]) -> Self {
        Self {
            temperature: f32::from_bits(words[0]),
            top_k: words[1],
            top_p: f32::from_bits(words[2]),
            uniform: f32::from_bits(words[3]),
        }
    }
}

/// Samples one row as `draw` says, the way `sample_rows` in the CUDA kernels does (so a row gives
/// the same token whether the device or the host samples it, up to float rounding at a
/// boundary): the logits times the temperature's reciprocal; kept, the tokens at or above the k-th
/// largest (ties kept) and at or above the nucleus threshold — the largest value whose tokens at
/// or above it hold `top_p` of the kept mass; then the first token, in vocabulary order, at
/// which the kept weights' running sum reaches `uniform` × their total. Greedy at temperature
/// 0 (the first largest logit).
pub fn draw_token(logits: &[f32], draw: &Draw) -> u32 {
    if draw.temperature == 0.0 || logits.is_empty() {
        return argmax(logits);
    }
    let inverse = 1.0 / draw.temperature;
    let z = |l: &f32| l * inverse;
    let k = draw.top_k as usize;
    let (max, top_k) = if k > 0 && k < logits.len() {
        let mut sorted: Vec<f32> = logits.iter().map(z).collect();
        sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let max = sorted[..k]
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        (max, sorted[k - 1])
    } else {
        let max = logits.iter().map(z).fold(f32::NEG_INFINITY, f32::max);
        (max, f32::NEG_INFINITY)
    };
    // The tokens top-k keeps, in vocabulary order, with their weights.
    let kept: Vec<(u32, f32, f32)> = logits
        .iter()
        .map(z)
        .enumerate()
        .filter(|(_, v)| *v >= top_k)
        .map(|(i, v)| (i as u32, v, (v - max).exp()))
        .filter(|(_, _, w)| *w > 0.0)
        .collect();
    let mut threshold = top_k;
    if draw.top_p < 1.0 {
        let total: f32 = kept.iter().map(|c| c.2).sum();
        let mut by_value: Vec<(f32, f32)> = kept.iter().map(|c| (c.1, c.2)).collect();
        by_value.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let mut mass = 0.0;
        for (v, w) in by_value {
            mass += w;
            if mass >= draw.top_p * total {
                threshold = v;
                break;
            }
        }
    }
    let total: f32 = kept.iter().filter(|c| c.1 >= threshold).map(|c| c.2).sum();
    let target = draw.uniform * total;
    let mut sum = 0.0;
    let mut last = None;
    for &(i, v, w) in &kept {
        if v >= threshold {
            sum += w;
            last = Some(i);
            if sum >= target {
                return i;
            }
        }
    }
    last.unwrap_or_else(|| argmax(logits))
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
    if n == 0 {
        return (logits[token as usize] - log_total, Vec::new());
    }
    top.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1));
    top.truncate(n);
    top.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    (logits[token as usize] - log_total, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: History<'static> = History {
        prompt: &[],
        output: &[],
        end_tokens: &[],
    };

    #[test]
    fn greedy_takes_the_largest_logit() {
        let s = sample(
            &[0.1, 3.0, -1.0],
            &SamplingParams::default(),
            &mut Rng::new(0),
            NONE,
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
                .map(|_| sample(&logits, &params, &mut rng, NONE).token)
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
        assert!((0..50).all(|_| sample(&logits, &k1, &mut rng, NONE).token == 0));
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            ..SamplingParams::default()
        };
        assert!((0..200).all(|_| sample(&logits, &p, &mut rng, NONE).token < 2));
    }

    #[test]
    fn drawn_tokens_follow_the_tempered_distribution_and_its_cuts() {
        let logits = [2.0f32, 1.0, 0.0, 1.0];
        let mut rng = Rng::new(3);
        let draws = 40_000;
        let frequencies = |draw: &dyn Fn(f32) -> Draw, rng: &mut Rng| {
            let mut counts = [0u32; 4];
            for _ in 0..draws {
                counts[draw_token(&logits, &draw(rng.next_f32())) as usize] += 1;
            }
            counts.map(|c| c as f64 / draws as f64)
        };
        let softmax = |t: f64, kept: &[usize]| {
            let w: Vec<f64> = (0..4)
                .map(|i| {
                    if kept.contains(&i) {
                        (f64::from(logits[i]) / t).exp()
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = w.iter().sum();
            w.iter().map(|x| x / total).collect::<Vec<_>>()
        };
        let close = |seen: [f64; 4], want: Vec<f64>| {
            for (s, w) in seen.iter().zip(&want) {
                assert!((s - w).abs() < 0.01, "{seen:?} against {want:?}");
            }
        };
        let draw = |temperature, top_k, top_p| {
            move |uniform| Draw {
                temperature,
                top_k,
                top_p,
                uniform,
            }
        };
        close(
            frequencies(&draw(1.0, 0, 1.0), &mut rng),
            softmax(1.0, &[0, 1, 2, 3]),
        );
        close(
            frequencies(&draw(0.5, 0, 1.0), &mut rng),
            softmax(0.5, &[0, 1, 2, 3]),
        );
        // Top-2 keeps the largest and, tied for second, both ones.
        close(
            frequencies(&draw(1.0, 2, 1.0), &mut rng),
            softmax(1.0, &[0, 1, 3]),
        );
        // The largest holds 47.5 % of the mass: a nucleus of 0.4 is it alone, 0.6 adds the tie.
        close(
            frequencies(&draw(1.0, 0, 0.4), &mut rng),
            softmax(1.0, &[0]),
        );
        close(
            frequencies(&draw(1.0, 0, 0.6), &mut rng),
            softmax(1.0, &[0, 1, 3]),
        );
        assert_eq!(draw_token(&logits, &Draw::greedy()), 0);
        // The uniform walks the kept mass in vocabulary order.
        assert_eq!(draw_token(&logits, &draw(1.0, 0, 1.0)(0.0)), 0);
        assert_eq!(draw_token(&logits, &draw(1.0, 0, 1.0)(0.999_999)), 3);
        let d = draw(0.7, 40, 0.9)(0.25);
        assert_eq!(Draw::from_words(d.words()), d);
    }

    #[test]
    fn logprobs_are_normalised_and_ordered() {
        let params = SamplingParams {
            logprobs: 2,
            ..SamplingParams::default()
        };
        let s = sample(&[0.0, 0.0f32.ln_1p(), 2.0], &params, &mut Rng::new(0), NONE);
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

    #[test]
    fn penalties_bias_and_min_tokens_change_the_logits_as_vllm_documents() {
        let history = History {
            prompt: &[0],
            output: &[1, 1, 2],
            end_tokens: &[3],
        };
        let run = |params: SamplingParams| {
            let mut row = vec![2.0, 2.0, -2.0, 1.0, 0.5];
            process(&mut row, &params, history);
            row
        };
        // Repetition: prompt and output tokens, positive divided, negative multiplied.
        let r = run(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        });
        assert_eq!(r, vec![1.0, 1.0, -4.0, 1.0, 0.5]);
        // Presence once per output token, frequency per occurrence; the prompt is not counted.
        let r = run(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::default()
        });
        assert_eq!(r, vec![2.0, 1.0, -2.75, 1.0, 0.5]);
        let r = run(SamplingParams {
            logit_bias: vec![(4, 10.0)],
            ..SamplingParams::default()
        });
        assert_eq!(r[4], 10.5);
        // End tokens held back until min_tokens: 3 generated, min 4.
        let r = run(SamplingParams {
            min_tokens: 4,
            max_tokens: 8,
            ..SamplingParams::default()
        });
        assert_eq!(r[3], f32::NEG_INFINITY);
        let r = run(SamplingParams {
            min_tokens: 3,
            max_tokens: 8,
            ..SamplingParams::default()
        });
        assert_eq!(r[3], 1.0);
        // Greedy follows the processed logits.
        let biased = SamplingParams {
            logit_bias: vec![(4, 10.0)],
            ..SamplingParams::default()
        };
        assert_eq!(
            sample(
                &[2.0, 2.0, -2.0, 1.0, 0.5],
                &biased,
                &mut Rng::new(0),
                history
            )
            .token,
            4
        );
    }
}
