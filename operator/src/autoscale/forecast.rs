//! The request-rate forecaster: additive Holt-Winters with a damped trend and a daily season,
//! on a series sampled at a fixed step. Robust to gaps (missing samples advance the clock, not
//! the state) and to outages (a sample that falls to almost nothing is clipped to a few typical
//! errors below the forecast before it updates anything; other moves are demand, followed). Its own error at the lead time is tracked
//! against a naive last-value forecast's, so the predictive policy can stand down when it does
//! worse.

use std::collections::VecDeque;

/// Smoothing: level, trend, season; trend damping.
const ALPHA: f64 = 0.35;
const BETA: f64 = 0.05;
const GAMMA: f64 = 0.2;
const PHI: f64 = 0.98;
/// Residuals beyond this many typical errors are clipped.
const CLIP: f64 = 4.0;

/// Holt-Winters on samples `step` seconds apart with a season of `season` samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Forecaster {
    season_len: usize,
    level: Option<f64>,
    trend: f64,
    season: Vec<f64>,
    /// Samples the season has seen at each position (it counts once every position has).
    season_seen: Vec<u32>,
    /// The index of the last sample taken or skipped.
    index: Option<u64>,
    /// Mean absolute one-step error (the clip's scale).
    typical_error: Option<f64>,
}

impl Forecaster {
    pub fn new(season_len: usize) -> Self {
        Self {
            season_len: season_len.max(1),
            level: None,
            trend: 0.0,
            season: vec![0.0; season_len.max(1)],
            season_seen: vec![0; season_len.max(1)],
            index: None,
            typical_error: None,
        }
    }

    /// The season at `index`, averaged over the half hour either side (a 48th of the season):
    /// one day's bursts should not read as the shape of every day.
    fn seasonal(&self, index: u64) -> f64 {
        if !self.season_seen.iter().all(|n| *n > 0) {
            return 0.0;
        }
        let len = self.season_len as u64;
        let k = len / 48;
        let sum: f64 = (0..=2 * k)
            .map(|d| self.season[((index + len - k + d) % len) as usize])
            .sum();
        sum / (2 * k + 1) as f64
    }

    /// Takes sample `index` (0, 1, 2, … in steps), `None` when it is missing.
    pub fn observe(&mut self, index: u64, value: Option<f64>) {
        // Missing samples in between: the level moves with the trend, nothing is learned.
        if let (Some(last), Some(level)) = (self.index, self.level.as_mut()) {
            for _ in last + 1..index {
                *level += self.trend * PHI;
                self.trend *= PHI;
            }
        }
        self.index = Some(index);
        let Some(value) = value.filter(|v| v.is_finite() && *v >= 0.0) else {
            return;
        };
        let at = (index % self.season_len as u64) as usize;
        let Some(level) = self.level else {
            self.level = Some(value);
            return;
        };
        // The first season sets the seasonal shape against the first sample's level.
        let ready = self.season_seen.iter().all(|n| *n > 0);
        if !ready && self.season_seen[at] == 0 {
            self.season[at] = value - level;
            self.season_seen[at] = 1;
            if self.season_seen.iter().all(|n| *n > 0) {
                // Centre the season; its mean goes into the level.
                let mean = self.season.iter().sum::<f64>() / self.season_len as f64;
                for s in &mut self.season {
                    *s -= mean;
                }
                self.level = Some(level + mean);
            }
            return;
        }
        let predicted = level + self.trend * PHI + self.seasonal(index);
        let mut residual = value - predicted;
        // A fall to almost nothing is more likely an outage than demand gone: it is clipped to
        // a few typical errors. Everything else is demand, and followed.
        if let Some(scale) = self.typical_error
            && value < 0.1 * predicted
        {
            residual = residual.max(-CLIP * scale.max(1e-9));
        }
        self.typical_error = Some(match self.typical_error {
            Some(e) => 0.95 * e + 0.05 * residual.abs(),
            None => residual.abs().max(value * 0.05),
        });
        let value = predicted + residual;
        let seasonal = self.seasonal(index);
        let new_level = ALPHA * (value - seasonal) + (1.0 - ALPHA) * (level + PHI * self.trend);
        self.trend = BETA * (new_level - level) + (1.0 - BETA) * PHI * self.trend;
        self.season[at] = GAMMA * (value - new_level) + (1.0 - GAMMA) * self.season[at];
        self.season_seen[at] += 1;
        self.level = Some(new_level);
    }

    /// The value `ahead` samples after the last one, never below zero; `None` before any sample.
    pub fn forecast(&self, ahead: u64) -> Option<f64> {
        let level = self.level?;
        let last = self.index?;
        let damped: f64 = (1..=ahead).map(|k| PHI.powi(k as i32)).sum();
        Some((level + self.trend * damped + self.seasonal(last + ahead)).max(0.0))
    }
}

/// Forecasts at a lead against what came, next to the naive last-value forecast, over a
/// rolling window of samples: mean absolute percentage errors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ErrorTracker {
    /// (target sample, forecast, naive forecast)
    pending: VecDeque<(u64, f64, f64)>,
    /// (forecast, naive forecast, actual) per target
    window: VecDeque<(f64, f64, f64)>,
    capacity: usize,
    /// Since target `overall_from`: summed absolute percentage errors (forecast, naive) and
    /// their count.
    overall: (f64, f64, u64),
    overall_from: u64,
}

impl ErrorTracker {
    pub fn new(window: usize) -> Self {
        Self {
            capacity: window.max(1),
            ..Self::default()
        }
    }

    /// A forecast for sample `target`, made when the last value was `naive`.
    pub fn predicted(&mut self, target: u64, forecast: f64, naive: f64) {
        self.pending.push_back((target, forecast, naive));
    }

    /// Sample `index` came in as `actual`.
    pub fn actual(&mut self, index: u64, actual: f64) {
        while let Some(&(target, forecast, naive)) = self.pending.front() {
            if target > index {
                break;
            }
            self.pending.pop_front();
            if target == index && actual > 0.0 {
                if target >= self.overall_from {
                    self.overall.0 += (forecast - actual).abs() / actual;
                    self.overall.1 += (naive - actual).abs() / actual;
                    self.overall.2 += 1;
                }
                self.window.push_back((forecast, naive, actual));
                if self.window.len() > self.capacity {
                    self.window.pop_front();
                }
            }
        }
    }

    /// (forecast MAPE, naive MAPE) over the window, once it has something.
    pub fn mape(&self) -> Option<(f64, f64)> {
        if self.window.is_empty() {
            return None;
        }
        let n = self.window.len() as f64;
        let (f, naive) = self
            .window
            .iter()
            .fold((0.0, 0.0), |(a, b), (f, n, actual)| {
                (
                    a + (f - actual).abs() / actual,
                    b + (n - actual).abs() / actual,
                )
            });
        Some((f / n, naive / n))
    }

    /// Counts targets from `index` on in [`Self::mape_overall`].
    pub fn overall_from(mut self, index: u64) -> Self {
        self.overall_from = index;
        self
    }

    /// (forecast MAPE, naive MAPE) over every target since `overall_from`.
    pub fn mape_overall(&self) -> Option<(f64, f64)> {
        let (f, naive, n) = self.overall;
        (n > 0).then(|| (f / n as f64, naive / n as f64))
    }

    /// How far demand came in above a forecast, as a share of it, at quantile `q` of the
    /// window: the margin that would have covered all but `1 − q` of the lead times. The
    /// naive forecast's with `naive`.
    pub fn shortfall(&self, q: f64, naive: bool) -> Option<f64> {
        let mut short: Vec<f64> = self
            .window
            .iter()
            .map(|(f, n, actual)| {
                let forecast = if naive { *n } else { *f };
                if forecast > 0.0 {
                    (actual / forecast - 1.0).max(0.0)
                } else {
                    1.0
                }
            })
            .collect();
        if short.is_empty() {
            return None;
        }
        short.sort_by(f64::total_cmp);
        let at = ((short.len() as f64 * q) as usize).min(short.len() - 1);
        Some(short[at])
    }
}

/// The share of lead times the provisioning margin covers.
const MARGIN_QUANTILE: f64 = 0.95;
/// The forecaster's sample, seconds, and its season (a day).
const SAMPLE: f64 = 300.0;
const SEASON: usize = (86_400.0 / SAMPLE) as usize;

/// The predictive part: a forecast of the rate one lead ahead, provisioned with a margin of the
/// forecast's recent errors; it stands down while it does worse than the naive forecast.
#[derive(Debug, Clone)]
pub struct Predictor {
    forecaster: Forecaster,
    errors: ErrorTracker,
    /// Samples ahead the groups asked for now must cover.
    lead: u64,
    sample: u64,
    sum: f64,
    count: u32,
    last: Option<f64>,
    wanted_rate: Option<f64>,
}

impl Predictor {
    /// Forecasts `lead_s` seconds ahead (a new group's startup and the decision's own lead).
    pub fn new(lead_s: f64) -> Self {
        Self {
            forecaster: Forecaster::new(SEASON),
            // Over the whole run, once the season has been seen a first time.
            errors: ErrorTracker::new(SEASON).overall_from(SEASON as u64),
            lead: (lead_s / SAMPLE).ceil().max(1.0) as u64,
            sample: 0,
            sum: 0.0,
            count: 0,
            last: None,
            wanted_rate: None,
        }
    }

    /// Takes the rate seen in the interval that ended at `t` (seconds on any clock starting
    /// at zero); at each sample's end, forecasts again.
    pub fn observe(&mut self, t: f64, rate: f64) {
        self.sum += rate;
        self.count += 1;
        if t < (self.sample + 1) as f64 * SAMPLE {
            return;
        }
        let value = self.sum / f64::from(self.count.max(1));
        self.errors.actual(self.sample, value);
        self.forecaster.observe(self.sample, Some(value));
        let ahead: Vec<f64> = (1..=self.lead)
            .filter_map(|h| self.forecaster.forecast(h))
            .collect();
        if let Some(at_lead) = self.forecaster.forecast(self.lead) {
            self.errors
                .predicted(self.sample + self.lead, at_lead, value);
        }
        // Cover the highest forecast until the groups asked for now are ready, with the margin
        // that would have covered all but 5 % of the last day's lead times. While the forecast
        // does worse than the last value, the last value is what is provisioned for, with its
        // own margin.
        let naive = self.standing_down();
        let margin = self
            .errors
            .shortfall(MARGIN_QUANTILE, naive)
            .unwrap_or(0.2)
            .min(1.0);
        let base = if naive {
            Some(value)
        } else {
            ahead
                .iter()
                .copied()
                .reduce(f64::max)
                .map(|peak| peak.max(value))
        };
        self.wanted_rate = base.map(|rate| rate * (1.0 + margin));
        self.last = Some(value);
        self.sample += 1;
        self.sum = 0.0;
        self.count = 0;
    }

    /// Forecasts `lead_s` ahead from now on (a new group's startup, as measured, and the
    /// decision's lead).
    pub fn set_lead(&mut self, lead_s: f64) {
        self.lead = (lead_s / SAMPLE).ceil().max(1.0) as u64;
    }

    /// The rate to provision for now: the highest forecast until the lead, with a margin.
    pub fn wanted_rate(&self) -> Option<f64> {
        self.wanted_rate
    }

    /// (forecast MAPE, naive MAPE) at the lead over the last day.
    pub fn mape(&self) -> Option<(f64, f64)> {
        self.errors.mape()
    }

    /// (forecast MAPE, naive MAPE) at the lead since the first day (the season's first
    /// sight).
    pub fn mape_overall(&self) -> Option<(f64, f64)> {
        self.errors.mape_overall()
    }

    /// Whether the forecast has lately done worse than the naive one.
    pub fn standing_down(&self) -> bool {
        self.errors
            .mape()
            .is_some_and(|(ours, naive)| ours > naive && self.sample as usize > SEASON)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A day of 24 samples: base 100, a daily wave of ±40, a trend of +0.5 per sample.
    fn series(index: u64) -> f64 {
        let phase = (index % 24) as f64 / 24.0 * std::f64::consts::TAU;
        100.0 + 40.0 * phase.sin() + 0.5 * index as f64
    }

    fn mape_after(f: &mut Forecaster, from: u64, to: u64, ahead: u64) -> f64 {
        let mut errors = Vec::new();
        for i in from..to {
            if let Some(forecast) = f.forecast(ahead) {
                let target = i - 1 + ahead;
                errors.push((forecast - series(target)).abs() / series(target));
            }
            f.observe(i, Some(series(i)));
        }
        errors.iter().sum::<f64>() / errors.len() as f64
    }

    #[test]
    fn a_season_and_a_trend_are_learned_and_beat_the_naive_forecast() {
        let mut f = Forecaster::new(24);
        for i in 0..24 * 10 {
            f.observe(i, Some(series(i)));
        }
        let ours = mape_after(&mut f, 240, 24 * 14, 3);
        // The naive forecast: the value 3 samples before.
        let naive: f64 = (240..24 * 14)
            .map(|i| (series(i - 3) - series(i)).abs() / series(i))
            .sum::<f64>()
            / (24.0 * 4.0);
        assert!(ours < 0.02, "MAPE {ours}");
        assert!(ours < naive / 3.0, "MAPE {ours} against naive {naive}");
    }

    #[test]
    fn gaps_and_an_outage_do_not_derail_it() {
        let mut f = Forecaster::new(24);
        for i in 0..24 * 8 {
            // Every fifth sample missing; a six-sample outage reading zero on day 5.
            let value = if i % 5 == 0 {
                None
            } else if (24 * 5..24 * 5 + 6).contains(&i) {
                Some(0.0)
            } else {
                Some(series(i))
            };
            f.observe(i, value);
        }
        let ours = mape_after(&mut f, 24 * 8, 24 * 10, 1);
        assert!(ours < 0.05, "MAPE {ours} after gaps and an outage");
        // A long gap: the forecast stays near the series' level, not wild.
        let mut f2 = f.clone();
        f2.observe(24 * 13, Some(series(24 * 13)));
        let after_gap = f2.forecast(1).unwrap();
        let truth = series(24 * 13 + 1);
        assert!(
            (after_gap - truth).abs() / truth < 0.25,
            "{after_gap} vs {truth}"
        );
    }

    #[test]
    fn the_tracker_compares_the_forecast_with_the_naive_one() {
        let mut t = ErrorTracker::new(10);
        t.predicted(5, 110.0, 80.0);
        t.predicted(6, 90.0, 100.0);
        assert_eq!(t.mape(), None);
        t.actual(5, 100.0);
        t.actual(6, 100.0);
        let (ours, naive) = t.mape().unwrap();
        assert!((ours - 0.1).abs() < 1e-12 && (naive - 0.1).abs() < 1e-12);
    }
}
