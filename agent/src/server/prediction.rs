//! Predicted execution time, complexity and bin of a request, from an online model fitted to the
//! requests that finished. Pure: no clock, no HTTP.
//!
//! Output length is predicted per request class (chat or completion, a `max_tokens` bucket and
//! the optional `X-Task-Class`) as an exponentially weighted mean of the fraction of `max_tokens`
//! that finished requests of the class used. Time is `prompt × prefill time per token + output ×
//! decode time per token`, both per-token times also weighted means of what was observed.
//!
//! Bins: fixed bounds when the operator sets them, else [`AdaptiveBounds`] — the natural breaks
//! of recent predicted times, so that the same defaults split real traffic on a CPU (where
//! almost every request takes longer than the GPU-scale 100/500 ms) and on a GPU alike.

use crate::engine::scheduling::admission::Bin;
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
    /// Below this (and not fast): medium; slow above. Equal to `fast` when there is no medium
    /// class.
    pub medium: Duration,
}

impl Default for BinBounds {
    /// The GPU-scale reference of the product brief: 100 and 500 ms.
    fn default() -> Self {
        Self {
            fast: Duration::from_millis(100),
            medium: Duration::from_millis(500),
        }
    }
}

impl BinBounds {
    pub fn bin(&self, time: Duration) -> Bin {
        if time < self.fast {
            Bin::Fast
        } else if time < self.medium {
            Bin::Medium
        } else {
            Bin::Slow
        }
    }
}

/// How requests are put into bins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binning {
    /// These bounds, always (flags or the pool spec).
    Fixed(BinBounds),
    /// Bounds at the natural breaks of recent predicted times (the default).
    Adaptive,
}

/// Predicted times remembered for the adaptive bounds.
const WINDOW: usize = 256;
/// Below this many predictions the adaptive bounds see one class (every request fast).
const MIN_SAMPLES: usize = 32;
/// The adaptive bounds are recomputed after this many predictions.
const REFIT_EVERY: usize = 16;
/// Classes whose median times are less than this factor apart are one class.
const SEPARATION: f64 = 2.0;
/// A bound that nothing reaches, in seconds (a day).
const UNBOUNDED: f64 = 86_400.0;
/// The smallest share of the window a class must hold.
const MIN_CLASS_SHARE: f64 = 0.05;

/// Bin bounds from the recent predicted sizes — predicted times in units of the decode time per
/// token then learned, so that a machine that slows under load does not make one kind of
/// request look like two. Their logarithms are split into three, else two classes by least
/// squares (Jenks' natural breaks, exact for one dimension), a split kept only when its classes'
/// median sizes are at least [`SEPARATION`] apart and each holds [`MIN_CLASS_SHARE`] of the
/// window. A bound lies halfway (geometrically) between the two sizes it separates. Three classes
/// are fast, medium and slow; two are fast and slow; one is fast, with anything over twice its
/// largest size medium and over eight times slow. Identical requests therefore share one bin, a
/// mix of short and long requests is split where the gap is, on any hardware, and a class is
/// never cut in two by a bound that lies within it.
#[derive(Debug, Clone, Default)]
pub struct AdaptiveBounds {
    /// Recent predicted sizes, a ring.
    recent: Vec<f64>,
    next: usize,
    since_fit: usize,
    /// The fast and medium bounds in size units, once fitted.
    fitted: Option<(f64, f64)>,
}

impl AdaptiveBounds {
    /// The bounds in seconds where one size unit takes `unit` seconds. Until enough sizes were
    /// seen nothing tells requests apart, and all are fast (one class, as for identical
    /// requests); a fixed seed such as the GPU-scale 100/500 ms would put every request of a CPU,
    /// and every chat request of a GPU, in the slow bin.
    pub fn bounds(&self, unit: f64) -> BinBounds {
        let (fast, medium) = self.fitted.unwrap_or((f64::INFINITY, f64::INFINITY));
        let seconds = |size: f64| Duration::from_secs_f64((size * unit).min(UNBOUNDED));
        BinBounds {
            fast: seconds(fast),
            medium: seconds(medium),
        }
    }

    /// Remembers a predicted size; refits now and then.
    pub fn record(&mut self, size: f64) {
        let size = size.max(1e-6);
        if self.recent.len() < WINDOW {
            self.recent.push(size);
        } else {
            self.recent[self.next] = size;
        }
        self.next = (self.next + 1) % WINDOW;
        self.since_fit += 1;
        if self.recent.len() >= MIN_SAMPLES && self.since_fit >= REFIT_EVERY {
            self.since_fit = 0;
            self.fitted = Some(fit_bounds(&self.recent));
        }
    }
}

/// The fast and medium bounds for these predicted sizes (see [`AdaptiveBounds`]).
fn fit_bounds(sizes: &[f64]) -> (f64, f64) {
    let mut x: Vec<f64> = sizes.iter().map(|t| t.ln()).collect();
    x.sort_by(f64::total_cmp);
    let n = x.len();
    // Prefix sums: the squared error of a class x[a..b] in O(1).
    let mut sum = vec![0.0; n + 1];
    let mut squares = vec![0.0; n + 1];
    for (i, v) in x.iter().enumerate() {
        sum[i + 1] = sum[i] + v;
        squares[i + 1] = squares[i] + v * v;
    }
    // A class's median: robust to a few outliers that would drag a mean across a gap.
    let median = |a: usize, b: usize| (x[a + (b - a - 1) / 2] + x[a + (b - a) / 2]) / 2.0;
    let error = |a: usize, b: usize| {
        let s = sum[b] - sum[a];
        squares[b] - squares[a] - s * s / (b - a) as f64
    };
    let smallest = ((n as f64 * MIN_CLASS_SHARE).ceil() as usize).max(1);
    // A partition at these cuts, if its classes are large enough and far enough apart.
    let valid = |cuts: &[usize]| {
        let mut edges = Vec::with_capacity(cuts.len() + 2);
        edges.push(0);
        edges.extend_from_slice(cuts);
        edges.push(n);
        edges.windows(2).all(|w| w[1] - w[0] >= smallest)
            && edges
                .windows(3)
                .all(|w| median(w[1], w[2]) - median(w[0], w[1]) >= SEPARATION.ln())
    };
    let between = |i: usize| ((x[i - 1] + x[i]) / 2.0).exp();
    // Three classes: the pair of cuts with the least squared error, if valid.
    let three = (1..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .min_by(|&(a, b), &(c, d)| {
            let e = |i, j| error(0, i) + error(i, j) + error(j, n);
            e(a, b).total_cmp(&e(c, d))
        });
    if let Some((i, j)) = three
        && valid(&[i, j])
    {
        return (between(i), between(j));
    }
    // Two classes: the cut with the least squared error, if valid.
    let two =
        (1..n).min_by(|&a, &b| (error(0, a) + error(a, n)).total_cmp(&(error(0, b) + error(b, n))));
    if let Some(i) = two
        && valid(&[i])
    {
        return (between(i), between(i));
    }
    // One class.
    let largest = x.last().map_or(0.0, |v| v.exp());
    (2.0 * largest, 8.0 * largest)
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
    binning: Binning,
    adaptive: AdaptiveBounds,
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
    pub fn new(binning: Binning) -> Self {
        Self {
            binning,
            adaptive: AdaptiveBounds::default(),
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

    /// The bin bounds in force.
    pub fn bounds(&self) -> BinBounds {
        match self.binning {
            Binning::Fixed(bounds) => bounds,
            Binning::Adaptive => self.adaptive.bounds(self.decode_per_token),
        }
    }

    /// Predicts a request's time and bin; adaptive bounds learn the time.
    pub fn predict(
        &mut self,
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
        let bin = self.bounds().bin(time);
        if self.binning == Binning::Adaptive {
            self.adaptive
                .record(seconds / self.decode_per_token.max(1e-9));
        }
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
        let mut predictor = Predictor::new(Binning::Fixed(BinBounds::default()));
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
        let mut predictor = Predictor::new(Binning::Fixed(BinBounds::default()));
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

    /// The bounds after `times` (seconds, one second a size unit) were predicted, in that
    /// order.
    fn adapted(times: impl IntoIterator<Item = f64>) -> BinBounds {
        let mut adaptive = AdaptiveBounds::default();
        for t in times {
            adaptive.record(t);
        }
        adaptive.bounds(1.0)
    }

    /// `n` times around `center`, ±10 %, from a seeded generator.
    fn around(rng: &mut Rng, center: f64, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| center * (0.9 + 0.2 * f64::from(rng.next_f32())))
            .collect()
    }

    #[test]
    fn adaptive_bounds_split_a_mix_where_its_gap_is_on_any_hardware() {
        let mut rng = Rng::new(3);
        // 80 % short and 20 % long requests, at CPU scale (0.2 s and 2.5 s) and at GPU scale
        // (a hundred times faster): the same split, fast and slow.
        for scale in [1.0, 0.01] {
            let mut times = Vec::new();
            for _ in 0..40 {
                times.extend(around(&mut rng, 0.2 * scale, 4));
                times.extend(around(&mut rng, 2.5 * scale, 1));
            }
            let bounds = adapted(times.iter().copied());
            for t in &times {
                let expected = if *t < 1.0 * scale {
                    Bin::Fast
                } else {
                    Bin::Slow
                };
                assert_eq!(
                    bounds.bin(Duration::from_secs_f64(*t)),
                    expected,
                    "{t} s at {scale}"
                );
            }
        }
        // Three classes far apart: fast, medium, slow.
        let mut times = Vec::new();
        for _ in 0..30 {
            times.extend(around(&mut rng, 0.05, 3));
            times.extend(around(&mut rng, 0.5, 2));
            times.extend(around(&mut rng, 5.0, 1));
        }
        let bounds = adapted(times);
        let bin = |t: f64| bounds.bin(Duration::from_secs_f64(t));
        assert_eq!(
            [bin(0.05), bin(0.5), bin(5.0)],
            [Bin::Fast, Bin::Medium, Bin::Slow]
        );
    }

    #[test]
    fn adaptive_bounds_keep_one_class_together_and_start_with_one_class() {
        // Before enough predictions: every request fast.
        let unknown = adapted([0.01, 0.1, 1.0, 10.0, 100.0]);
        assert!(
            [0.01, 100.0, 10_000.0]
                .iter()
                .all(|t| unknown.bin(Duration::from_secs_f64(*t)) == Bin::Fast)
        );
        // Identical requests, or one class spread by ±10 %: all fast, never cut in two; one
        // far longer than any seen goes to a slower bin.
        let mut rng = Rng::new(5);
        for times in [vec![3.0; 64], around(&mut rng, 3.0, 64)] {
            let bounds = adapted(times.iter().copied());
            assert!(
                times
                    .iter()
                    .all(|t| bounds.bin(Duration::from_secs_f64(*t)) == Bin::Fast)
            );
            assert_eq!(bounds.bin(Duration::from_secs_f64(30.0)), Bin::Slow);
        }
        // A handful of outliers (under 5 %) make no class of their own.
        let mut times = around(&mut rng, 1.0, 100);
        times.extend([20.0, 25.0]);
        let bounds = adapted(times);
        assert_eq!(bounds.bin(Duration::from_secs_f64(1.05)), Bin::Fast);
    }

    #[test]
    fn a_machine_that_slows_under_load_does_not_split_a_class() {
        // Short requests (16 output tokens) while the learned decode time per token grows from
        // 25 ms to 150 ms (a batch that fills up), and now and then a long one (256 tokens).
        let mut predictor = Predictor::new(Binning::Adaptive);
        let short = RequestClass::new(false, 16, None);
        let long = RequestClass::new(false, 256, None);
        for i in 0..200u32 {
            let per_token = 0.025 + 0.125 * f64::from(i) / 200.0;
            let seen = |output_tokens: usize| Observation {
                prompt_tokens: 40,
                output_tokens,
                prefill: Duration::from_secs_f64(0.05),
                processing: Duration::from_secs_f64(0.05 + per_token * (output_tokens - 1) as f64),
            };
            let (class, max_tokens) = if i % 5 == 0 {
                (&long, 256)
            } else {
                (&short, 16)
            };
            let predicted = predictor.predict(class, 40, max_tokens);
            if i >= 64 {
                let expected = if max_tokens == 16 {
                    Bin::Fast
                } else {
                    Bin::Slow
                };
                assert_eq!(predicted.bin, expected, "request {i}");
            }
            predictor.observe(class, max_tokens, &predicted, &seen(max_tokens));
        }
    }

    #[test]
    fn fixed_bounds_win_over_adaptive_ones() {
        let fixed = BinBounds {
            fast: Duration::from_secs(10),
            medium: Duration::from_secs(20),
        };
        let mut predictor = Predictor::new(Binning::Fixed(fixed));
        let class = RequestClass::new(false, 16, None);
        for _ in 0..64 {
            predictor.predict(&class, 10, 16);
        }
        assert_eq!(predictor.bounds(), fixed);
        let mut adaptive = Predictor::new(Binning::Adaptive);
        for _ in 0..64 {
            adaptive.predict(&class, 10, 16);
        }
        assert_ne!(adaptive.bounds(), BinBounds::default(), "it adapted");
    }
}
