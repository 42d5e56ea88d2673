//! The reactive rules: scale up on a queue or slow requests, an emergency step on a long queue
//! or errors, scale down after utilization stays low; bounded steps, cooldowns and a
//! stabilization window for scaling down, as the HPA's `behavior` has. Only a pool without a
//! request for its idle period goes to zero groups: low utilization alone leaves one.

use super::signals::RouterReading;
use super::{Decision, Signals};

/// The rules' thresholds and pacing (the pool's `autoscaling` spec).
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// Scale up when more requests than this wait…
    pub up_queue: f64,
    /// …or p95 end-to-end latency is above this.
    pub up_p95_seconds: f64,
    /// Scale down when utilization stays below this…
    pub down_utilization: f64,
    /// …for this long.
    pub down_window_seconds: f64,
    /// An emergency step when more than this wait…
    pub emergency_queue: f64,
    /// …or more than this share of requests fail.
    pub emergency_errors: f64,
    /// The utilization a pool is sized for when the load is known.
    pub target_utilization: f64,
    /// Most groups added in one step, and the share of the current ones (the larger wins).
    pub up_step_groups: u32,
    pub up_step_share: f64,
    /// Most groups removed in one step, and the share of the current ones (the larger wins).
    pub down_step_groups: u32,
    pub down_step_share: f64,
    /// Least time between two scale-ups, and from any change to a scale-down.
    pub up_cooldown_seconds: f64,
    pub down_cooldown_seconds: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// With `min_replicas` 0: no request (arriving, waiting or running) for this long takes the
    /// pool to zero groups. None: never to zero.
    pub zero_after_seconds: Option<f64>,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            up_queue: 20.0,
            up_p95_seconds: 0.3,
            down_utilization: 0.6,
            down_window_seconds: 300.0,
            emergency_queue: 100.0,
            emergency_errors: 0.05,
            target_utilization: 0.6,
            up_step_groups: 4,
            up_step_share: 1.0,
            down_step_groups: 1,
            down_step_share: 0.25,
            up_cooldown_seconds: 60.0,
            down_cooldown_seconds: 300.0,
            min_replicas: 1,
            max_replicas: 10,
            zero_after_seconds: None,
        }
    }
}

/// What the rules remember between looks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    last_up: Option<f64>,
    last_change: Option<f64>,
    /// Since when utilization has been below the scale-down threshold.
    low_since: Option<f64>,
    /// Since when no request has arrived, waited or run.
    idle_since: Option<f64>,
}

impl Rules {
    fn clamp(&self, wanted: u32) -> (u32, bool) {
        let clamped = wanted.clamp(self.min_replicas, self.max_replicas.max(self.min_replicas));
        (clamped, clamped != wanted)
    }

    /// Groups needed for `rate` at the target utilization, when a group's capacity is known.
    pub fn needed(&self, rate: f64, capacity: Option<f64>) -> Option<u32> {
        let capacity = capacity.filter(|c| *c > 0.0)?;
        Some(
            (rate / (capacity * self.target_utilization))
                .ceil()
                .max(0.0) as u32,
        )
    }

    /// The rules' answer for a pool of `current` groups (ready or starting) given `signals`.
    pub fn decide(
        &self,
        state: &mut State,
        signals: &Signals,
        current: u32,
        capacity: Option<f64>,
    ) -> Decision {
        let now = signals.at;
        let step_up = self
            .up_step_groups
            .max((f64::from(current) * self.up_step_share).ceil() as u32)
            .max(1);
        let needed = self.needed(signals.request_rate, capacity);
        let decision = |replicas: u32, rule: &'static str, why: String| {
            let (replicas, limited) = self.clamp(replicas);
            Decision {
                replicas,
                rule,
                why,
                limited,
            }
        };

        // Emergency: at once, whatever the cooldown.
        let emergency = if signals.queue > self.emergency_queue {
            Some(format!(
                "queue {:.0} > {:.0}",
                signals.queue, self.emergency_queue
            ))
        } else if signals.error_rate > self.emergency_errors {
            Some(format!(
                "errors {:.1} % > {:.1} %",
                signals.error_rate * 100.0,
                self.emergency_errors * 100.0
            ))
        } else {
            None
        };
        // Groups already starting count: more are asked for only when they will not do (a
        // queue takes their startup to drain).
        let starting = current.saturating_sub(signals.ready);
        let wait_for_starting = |why: &str| {
            (starting > 0 && needed.is_none_or(|n| n <= current)).then(|| {
                decision(
                    current,
                    "hold",
                    format!("{why}, {starting} groups starting"),
                )
            })
        };
        if let Some(why) = emergency {
            if let Some(hold) = wait_for_starting(&why) {
                return hold;
            }
            let wanted = (current + step_up.max(2)).max(needed.unwrap_or(0));
            state.low_since = None;
            return self.changed(state, now, decision(wanted, "emergency", why), current);
        }

        let up = if signals.queue > self.up_queue {
            Some(format!("queue {:.0} > {:.0}", signals.queue, self.up_queue))
        } else {
            signals
                .p95_seconds
                .filter(|p95| *p95 > self.up_p95_seconds)
                .map(|p95| {
                    format!(
                        "p95 {:.0} ms > {:.0} ms",
                        p95 * 1e3,
                        self.up_p95_seconds * 1e3
                    )
                })
        };
        if let Some(why) = up {
            state.low_since = None;
            let cooled = state
                .last_up
                .is_none_or(|at| now - at >= self.up_cooldown_seconds);
            if !cooled {
                return decision(
                    current,
                    "hold",
                    format!("{why}, cooling down after a scale-up"),
                );
            }
            if let Some(hold) = wait_for_starting(&why) {
                return hold;
            }
            let wanted = needed.unwrap_or(0).clamp(current + 1, current + step_up);
            return self.changed(state, now, decision(wanted, "scale-up", why), current);
        }

        let idle = signals.request_rate == 0.0 && signals.queue == 0.0 && signals.running == 0.0;
        if !idle {
            state.idle_since = None;
        } else if let Some(after) = self.zero_after_seconds.filter(|_| self.min_replicas == 0) {
            let idle_for = now - *state.idle_since.get_or_insert(now);
            if current > 0 && idle_for >= after {
                let why = format!("no requests for {idle_for:.0} s");
                return self.changed(state, now, decision(0, "scale-to-zero", why), current);
            }
        }

        match signals.utilization {
            Some(utilization) if utilization < self.down_utilization => {
                let since = *state.low_since.get_or_insert(now);
                let low_for = now - since;
                let cooled = state
                    .last_change
                    .is_none_or(|at| now - at >= self.down_cooldown_seconds);
                if low_for >= self.down_window_seconds && cooled {
                    let step = self
                        .down_step_groups
                        .max((f64::from(current) * self.down_step_share).floor() as u32)
                        .max(1);
                    // Down to what the load needs at the target, a step at most.
                    let fits =
                        (f64::from(current) * utilization / self.target_utilization).ceil() as u32;
                    // Never below one group: only the idle rule empties a pool.
                    let wanted = fits.max(current.saturating_sub(step)).max(1).min(current);
                    let why = format!(
                        "utilization {:.0} % < {:.0} % for {:.0} s",
                        utilization * 100.0,
                        self.down_utilization * 100.0,
                        low_for
                    );
                    return self.changed(state, now, decision(wanted, "scale-down", why), current);
                }
            }
            _ => state.low_since = None,
        }
        decision(current, "hold", "within the rules".into())
    }

    /// A pool at zero groups wakes (to one, or `min_replicas`) when its routers hold a request
    /// or turned one away since the last look (`before`, when there was one).
    pub fn wake(&self, now: &RouterReading, before: Option<&RouterReading>) -> Option<Decision> {
        let turned_away = before.map_or(0.0, |b| now.turned_away_since(b));
        let requests = |n: f64| match n.round() as u64 {
            1 => "1 request".to_owned(),
            n => format!("{n} requests"),
        };
        let why = if now.held > 0.0 {
            format!("{} held by the router", requests(now.held))
        } else if turned_away > 0.0 {
            format!("{} found no group", requests(turned_away))
        } else {
            return None;
        };
        let (replicas, limited) = self.clamp(self.min_replicas.max(1));
        Some(Decision {
            replicas,
            rule: "wake",
            why,
            limited,
        })
    }

    fn changed(&self, state: &mut State, now: f64, decision: Decision, current: u32) -> Decision {
        if decision.replicas > current {
            state.last_up = Some(now);
        }
        if decision.replicas != current {
            state.last_change = Some(now);
            state.low_since = None;
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn look(at: f64) -> Signals {
        Signals {
            at,
            request_rate: 10.0,
            queue: 0.0,
            running: 4.0,
            p95_seconds: Some(0.1),
            error_rate: 0.0,
            utilization: Some(0.7),
            ready: 4,
        }
    }

    #[test]
    fn a_queue_or_slow_requests_scale_up_within_the_step_and_the_cooldown() {
        let rules = Rules::default();
        let mut state = State::default();
        let queued = Signals {
            queue: 35.0,
            ..look(0.0)
        };
        let d = rules.decide(&mut state, &queued, 4, None);
        assert_eq!(
            (d.replicas, d.rule, d.why.as_str()),
            (5, "scale-up", "queue 35 > 20")
        );
        // Within the cooldown: held.
        let d = rules.decide(&mut state, &Signals { at: 30.0, ..queued }, 5, None);
        assert_eq!((d.replicas, d.rule), (5, "hold"));
        // A known capacity sizes the step, bounded by it (4 groups or 100 %).
        let slow = Signals {
            at: 60.0,
            p95_seconds: Some(0.45),
            request_rate: 100.0,
            ..look(60.0)
        };
        let d = rules.decide(&mut state, &slow, 5, Some(2.0));
        assert_eq!((d.replicas, d.why.as_str()), (10, "p95 450 ms > 300 ms"));
    }

    #[test]
    fn an_emergency_steps_at_once_and_max_replicas_limits() {
        let rules = Rules {
            max_replicas: 8,
            ..Rules::default()
        };
        let mut state = State::default();
        rules.decide(
            &mut state,
            &Signals {
                queue: 30.0,
                ..look(0.0)
            },
            4,
            None,
        );
        let failing = Signals {
            error_rate: 0.08,
            ready: 5,
            ..look(10.0)
        };
        let d = rules.decide(&mut state, &failing, 5, None);
        assert_eq!((d.replicas, d.rule), (8, "emergency"));
        assert!(d.limited, "10 wanted, 8 allowed");
        assert_eq!(d.why, "errors 8.0 % > 5.0 %");
        let flooded = Signals {
            queue: 150.0,
            ready: 2,
            ..look(20.0)
        };
        assert_eq!(rules.decide(&mut state, &flooded, 2, None).replicas, 6);
        // Groups already starting count: no second step until they are ready.
        let d = rules.decide(
            &mut state,
            &Signals {
                ready: 2,
                ..flooded
            },
            6,
            None,
        );
        assert_eq!((d.replicas, d.rule), (6, "hold"));
        assert_eq!(d.why, "queue 150 > 100, 4 groups starting");
    }

    #[test]
    fn low_utilization_scales_down_only_after_the_window_and_a_step_at_a_time() {
        let rules = Rules::default();
        let mut state = State::default();
        let idle = |at| Signals {
            utilization: Some(0.2),
            ..look(at)
        };
        assert_eq!(rules.decide(&mut state, &idle(0.0), 8, None).rule, "hold");
        assert_eq!(rules.decide(&mut state, &idle(299.0), 8, None).rule, "hold");
        let d = rules.decide(&mut state, &idle(300.0), 8, None);
        assert_eq!(
            (d.replicas, d.rule),
            (6, "scale-down"),
            "a quarter of 8 at most"
        );
        assert_eq!(d.why, "utilization 20 % < 60 % for 300 s");
        // The window starts again after a change; a busy look resets it too.
        assert_eq!(rules.decide(&mut state, &idle(400.0), 6, None).rule, "hold");
        rules.decide(&mut state, &look(500.0), 6, None);
        assert_eq!(rules.decide(&mut state, &idle(700.0), 6, None).rule, "hold");
        // Never below min_replicas.
        let one = Rules {
            min_replicas: 2,
            ..Rules::default()
        };
        let mut state = State::default();
        one.decide(&mut state, &idle(0.0), 2, None);
        let d = one.decide(&mut state, &idle(400.0), 2, None);
        assert_eq!((d.replicas, d.limited), (2, true));
    }

    #[test]
    fn only_a_pool_without_requests_for_its_idle_period_goes_to_zero() {
        let rules = Rules {
            min_replicas: 0,
            zero_after_seconds: Some(600.0),
            down_window_seconds: 0.0,
            down_cooldown_seconds: 0.0,
            ..Rules::default()
        };
        let mut state = State::default();
        // Light traffic at low utilization: down to one group, never to zero.
        let light = |at| Signals {
            request_rate: 0.01,
            running: 0.0,
            utilization: Some(0.01),
            ..look(at)
        };
        let d = rules.decide(&mut state, &light(0.0), 2, None);
        assert_eq!((d.replicas, d.rule), (1, "scale-down"));
        assert_eq!(
            rules.decide(&mut state, &light(1000.0), 1, None).replicas,
            1
        );
        // Nothing arrives, waits or runs: zero once the idle period has passed.
        let idle = |at| Signals {
            request_rate: 0.0,
            running: 0.0,
            utilization: Some(0.0),
            ..look(at)
        };
        assert_eq!(rules.decide(&mut state, &idle(1100.0), 1, None).replicas, 1);
        // A request still running (a long one) is not idle: the period starts over.
        let running = Signals {
            running: 1.0,
            ..idle(1500.0)
        };
        assert_eq!(rules.decide(&mut state, &running, 1, None).replicas, 1);
        assert_eq!(rules.decide(&mut state, &idle(1600.0), 1, None).replicas, 1);
        let d = rules.decide(&mut state, &idle(2200.0), 1, None);
        assert_eq!((d.replicas, d.rule), (0, "scale-to-zero"));
        assert_eq!(d.why, "no requests for 600 s");
        // Without the idle period, or with a floor, never.
        for rules in [
            Rules {
                zero_after_seconds: None,
                ..rules.clone()
            },
            Rules {
                min_replicas: 1,
                ..rules.clone()
            },
        ] {
            let mut state = State::default();
            rules.decide(&mut state, &idle(0.0), 1, None);
            assert_eq!(rules.decide(&mut state, &idle(5000.0), 1, None).replicas, 1);
        }
    }

    #[test]
    fn a_pool_at_zero_wakes_for_a_held_or_turned_away_request() {
        let rules = Rules {
            min_replicas: 0,
            ..Rules::default()
        };
        let quiet = RouterReading {
            held: 0.0,
            turned_away: 3.0,
        };
        assert_eq!(rules.wake(&quiet, None), None);
        assert_eq!(rules.wake(&quiet, Some(&quiet)), None);
        let held = RouterReading { held: 2.0, ..quiet };
        let d = rules.wake(&held, Some(&quiet)).unwrap();
        assert_eq!((d.replicas, d.rule), (1, "wake"));
        assert_eq!(d.why, "2 requests held by the router");
        let missed = RouterReading {
            turned_away: 4.0,
            ..quiet
        };
        assert_eq!(
            rules.wake(&missed, Some(&quiet)).unwrap().why,
            "1 request found no group"
        );
        // A restarted router counts from zero.
        let restarted = RouterReading {
            turned_away: 1.0,
            ..quiet
        };
        assert!(rules.wake(&restarted, Some(&quiet)).is_some());
        let floor = Rules {
            min_replicas: 2,
            ..rules
        };
        assert_eq!(floor.wake(&held, None).unwrap().replicas, 2);
    }
}
