//! Predicted execution time, complexity and bin of a request, from an online model fitted to the
//! requests that finished. Pure: no clock, no HTTP.
//!
//! Output length is predicted per request class (chat or completion, a `max_tokens` bucket and
//! the optional `X-Task-Class`) as an exponentially weighted mean of the fraction of `max_tokens`
//! that finished requests of the class used. Time is `prompt × prefill time per token + output ×
//! decode time per token`, both per-token times also weighted means of what was observed.

use crate::engine::admission::Bin;
use std::collections::HashMap;
use std::time::Duration;

/// Weight of the newest observation in every running mean.
const ALPHA: f64 = 0.2;
/// Distinct task classes remembered; others share one class.
const MAX_TASK_CLASSES: usize = 64;

/// What a request's class is made of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestClass {
    pub chat: bool,
    /// log₂ bucket of `max_tokens`.
    pub bucket: u8,
    pub task: Option<String>,
}

impl RequestClass {
    pub fn new(chat: bool, max_tokens: usize, task: Option<&str>) -> Self {
        Self {
            chat,
            bucket: (usize::BITS - max_tokens.max(1).leading_zeros()) as u8,
            task: task.map(|t| t.chars().take(64).collect()),
        }
    }
}

/// Execution-time bin boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BinBounds {
    /// Below this: fast.
    pub fast: Duration,
    /// Below this (and not fast): medium; slow above.
    pub medium: Duration,
}

impl Default for BinBounds {
    fn default() -> Self {
        Self {
            fast: Duration::from_millis(100),
            medium: Duration::from_millis(500),
        }
    }
}

/// What the predictor says of a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    pub time: Duration,
    pub output_tokens: f64,
    /// 1 (a few milliseconds) to 10 (ten seconds or more), logarithmic in the predicted time.
    pub complexity: u8,
    pub bin: Bin,
}

/// What a finished request took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Time in the steps it ran in, up to its first token.
    pub prefill: Duration,
    /// Time in the steps it ran in, all of them: execution time, without waits (a bin that sat
    /// steps out would otherwise teach the predictor that its requests are slower than they are,
    /// and move requests of one class between bins).
    pub processing: Duration,
}

/// The online model.
#[derive(Debug, Clone)]
pub struct Predictor {
    bounds: BinBounds,
    /// Fraction of `max_tokens` used, per class.
    output_ratio: HashMap<RequestClass, f64>,
    /// Seconds per prompt token, and per output token after the first.
    prefill_per_token: f64,
    decode_per_token: f64,
}

fn mean(old: f64, new: f64) -> f64 {
    old + ALPHA * (new - old)
}

impl Predictor {
    /// Starts from a CPU-sized guess (2 ms per prompt token, 25 ms per output token) and a full
    /// `max_tokens`, both corrected by the first requests.
    pub fn new(bounds: BinBounds) -> Self {
        Self {
            bounds,
            output_ratio: HashMap::new(),
            prefill_per_token: 0.002,
            decode_per_token: 0.025,
        }
    }

    fn class_key(&self, class: &RequestClass) -> RequestClass {
        if class.task.is_some()
            && !self.output_ratio.contains_key(class)
            && self.output_ratio.len() >= MAX_TASK_CLASSES
        {
            RequestClass {
                task: Some("other".into()),
                ..class.clone()
            }
        } else {
            class.clone()
        }
    }

    pub fn predict(
        &self,
        class: &RequestClass,
        prompt_tokens: usize,
        max_tokens: usize,
    ) -> Prediction {
        let ratio = self
            .output_ratio
            .get(&self.class_key(class))
            .copied()
            .unwrap_or(1.0);
        let output_tokens = (ratio * max_tokens as f64).clamp(1.0, max_tokens.max(1) as f64);
        let seconds = prompt_tokens as f64 * self.prefill_per_token
            + (output_tokens - 1.0).max(0.0) * self.decode_per_token;
        let time = Duration::from_secs_f64(seconds.max(0.0));
        let bin = if time < self.bounds.fast {
            Bin::Fast
        } else if time < self.bounds.medium {
            Bin::Medium
        } else {
            Bin::Slow
        };
        let millis = (seconds * 1e3).max(1e-3);
        let complexity = (1.0 + ((millis / 10.0).log10() * 3.0).floor()).clamp(1.0, 10.0) as u8;
        Prediction {
            time,
            output_tokens,
            complexity,
            bin,
        }
    }

    /// Learns from a finished request; returns the relative error of what was predicted for it.
    pub fn observe(
        &mut self,
        class: &RequestClass,
        max_tokens: usize,
        predicted: &Prediction,
        seen: &Observation,
    ) -> f64 {
        let actual = seen.processing.as_secs_f64();
        let error = (predicted.time.as_secs_f64() - actual).abs() / actual.max(1e-3);
        let key = self.class_key(class);
        let ratio = seen.output_tokens as f64 / max_tokens.max(1) as f64;
        let entry = self.output_ratio.entry(key).or_insert(ratio);
        *entry = mean(*entry, ratio);
        if seen.prompt_tokens > 0 {
            self.prefill_per_token = mean(
                self.prefill_per_token,
                seen.prefill.as_secs_f64() / seen.prompt_tokens as f64,
            );
        }
        if seen.output_tokens > 1 {
            let decode = seen.processing.saturating_sub(seen.prefill).as_secs_f64();
            self.decode_per_token = mean(
                self.decode_per_token,
                decode / (seen.output_tokens - 1) as f64,
            );
        }
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampling::Rng;

    #[test]
    fn the_predictor_converges_on_a_synthetic_workload() {
        // Two kinds of work: summaries use about 30 % of max_tokens, stories 90 %; the machine
        // prefills at 1 ms and decodes at 20 ms per token, with ±10 % noise.
        let mut predictor = Predictor::new(BinBounds::default());
        let mut rng = Rng::new(7);
        let classes = [
            (RequestClass::new(false, 200, Some("summary")), 200, 0.3),
            (RequestClass::new(true, 200, Some("story")), 200, 0.9),
        ];
        let mut late_errors = Vec::new();
        for i in 0..400 {
            let (class, max_tokens, ratio) = &classes[i % 2];
            let prompt = 50 + (rng.next_u64() % 100) as usize;
            let noise = |rng: &mut Rng| 0.9 + 0.2 * f64::from(rng.next_f32());
            let output = ((*max_tokens as f64) * ratio * noise(&mut rng)).round() as usize;
            let prefill = Duration::from_secs_f64(prompt as f64 * 0.001 * noise(&mut rng));
            let decode = Duration::from_secs_f64((output - 1) as f64 * 0.020 * noise(&mut rng));
            let predicted = predictor.predict(class, prompt, *max_tokens);
            let error = predictor.observe(
                class,
                *max_tokens,
                &predicted,
                &Observation {
                    prompt_tokens: prompt,
                    output_tokens: output,
                    prefill,
                    processing: prefill + decode,
                },
            );
            if i >= 300 {
                late_errors.push(error);
            }
        }
        let mean_error = late_errors.iter().sum::<f64>() / late_errors.len() as f64;
        assert!(mean_error < 0.1, "mean relative error {mean_error}");
        // The two classes are told apart: a story is predicted three times a summary.
        let summary = predictor.predict(&classes[0].0, 100, 200);
        let story = predictor.predict(&classes[1].0, 100, 200);
        let ratio = story.time.as_secs_f64() / summary.time.as_secs_f64();
        assert!((2.5..3.5).contains(&ratio), "story/summary {ratio}");
        assert_eq!(story.bin, Bin::Slow);
    }

    #[test]
    fn bins_and_complexity_follow_the_predicted_time() {
        let predictor = Predictor::new(BinBounds::default());
        let class = RequestClass::new(false, 1, None);
        // One output token: only the prompt costs (2 ms a token before any observation).
        let short = predictor.predict(&class, 10, 1);
        assert_eq!((short.bin, short.complexity), (Bin::Fast, 1));
        let medium = predictor.predict(&class, 100, 1);
        assert_eq!(medium.bin, Bin::Medium);
        let long = predictor.predict(&RequestClass::new(false, 1000, None), 10, 1000);
        assert_eq!((long.bin, long.complexity), (Bin::Slow, 10));
        assert!(short.complexity < medium.complexity && medium.complexity < long.complexity);
    }
}
