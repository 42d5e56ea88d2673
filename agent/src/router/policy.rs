//! Which group takes a request: a pure policy over what the router knows of each group — its
//! readiness, the load its agent last reported, the requests this router has sent it since, its
//! circuit breaker and the prefixes it was sent. No sockets and no clock: `now` is passed in.
//!
//! A pick, in order:
//! 1. Candidates: ready groups whose breaker admits a request and that this request has not
//!    tried yet.
//! 2. A low-priority request is shed when every candidate is saturated (its queue at the limit
//!    or its KV cache nearly full); high and medium go to the least saturated.
//! 3. Prefix affinity: the candidate sent the longest run of this prompt's leading chunks takes
//!    it, unless its queue is longer than the shortest by more than the slack.
//! 4. Otherwise capacity-aware smooth weighted round robin: each candidate weighted by its free
//!    batch places times its free KV share; when none has a free place, the shortest queue
//!    relative to its batch size.

use super::affinity::PrefixIndex;
use super::breaker::{Breaker, BreakerConfig};
use std::time::Instant;

/// What a group's agent last reported (vLLM's metric names, so vLLM servers can be routed too).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// `vllm:num_requests_running`.
    pub running: f64,
    /// `vllm:num_requests_waiting`.
    pub waiting: f64,
    /// `vllm:kv_cache_usage_perc`, 0–1.
    pub kv_usage: f64,
    /// `parallax_batch_limit`: sequences a step may run; unknown for other servers.
    pub batch_limit: Option<f64>,
}

impl Load {
    /// Reads the gauges out of a `/metrics` answer (Prometheus text or OpenMetrics).
    pub fn parse(text: &str) -> Option<Self> {
        let mut load = Self::default();
        let mut seen = false;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.trim().rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            match name {
                "vllm:num_requests_running" => load.running += value,
                "vllm:num_requests_waiting" => load.waiting += value,
                "vllm:kv_cache_usage_perc" => load.kv_usage = load.kv_usage.max(value),
                "parallax_batch_limit" => load.batch_limit = Some(value),
                _ => continue,
            }
            seen = true;
        }
        seen.then_some(load)
    }
}

/// A request's priority (`X-Request-Priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    High,
    Medium,
    Low,
}

/// What the policy needs of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestKey {
    /// Its prompt's chunk keys ([`super::affinity::chunk_keys`]).
    pub chunks: Vec<u64>,
    pub priority: Priority,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyConfig {
    /// Queued requests (reported waiting plus sent since) at which a group is saturated.
    pub queue_limit: f64,
    /// KV cache usage at which a group is saturated.
    pub kv_limit: f64,
    /// How many more queued requests than the shortest queue a prefix match may cost.
    pub affinity_slack: f64,
    /// The batch size of a group that does not report `parallax_batch_limit` (vLLM's default
    /// `max_num_seqs`).
    pub default_batch_limit: f64,
    pub breaker: BreakerConfig,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            queue_limit: 16.0,
            kv_limit: 0.95,
            affinity_slack: 4.0,
            default_batch_limit: 256.0,
            breaker: BreakerConfig::default(),
        }
    }
}

/// One group, as the router knows it.
#[derive(Debug, Clone)]
pub struct Group {
    /// Its base URL, `http://host:port`.
    pub url: String,
    /// Its `/ready` answered 200 at the last poll (and nothing since said otherwise).
    pub ready: bool,
    pub load: Option<Load>,
    /// Requests this router has on it now.
    pub in_flight: u32,
    /// `in_flight` when `load` was asked for: those are in the reading, later ones are not.
    in_flight_at_read: u32,
    pub breaker: Breaker,
    /// Smooth weighted round robin's running weight.
    current: f64,
}

impl Group {
    fn new(url: String) -> Self {
        Self {
            url,
            ready: false,
            load: None,
            in_flight: 0,
            in_flight_at_read: 0,
            breaker: Breaker::default(),
            current: 0.0,
        }
    }

    fn batch_limit(&self, config: &PolicyConfig) -> f64 {
        self.load
            .and_then(|l| l.batch_limit)
            .filter(|l| *l > 0.0)
            .unwrap_or(config.default_batch_limit)
    }

    /// Requests on it now, as best known: the reading plus what was sent since.
    fn demand(&self) -> (f64, f64) {
        let load = self.load.unwrap_or_default();
        let unseen = f64::from(self.in_flight.saturating_sub(self.in_flight_at_read));
        (load.running, load.waiting + unseen)
    }

    /// Requests that would wait for a batch place.
    pub fn queue(&self, config: &PolicyConfig) -> f64 {
        let (running, waiting) = self.demand();
        let free = (self.batch_limit(config) - running).max(0.0);
        // Waiting requests the batch has room for are about to run, unless the agent holds
        // them back (blocks run out): then its reported `waiting` is the queue.
        let load = self.load.unwrap_or_default();
        (waiting - free).max(load.waiting).max(0.0)
    }

    /// Free batch places times the free share of the KV cache.
    fn weight(&self, config: &PolicyConfig) -> f64 {
        let (running, waiting) = self.demand();
        let free = (self.batch_limit(config) - running - waiting).max(0.0);
        let kv_free = 1.0 - self.load.map_or(0.0, |l| l.kv_usage.clamp(0.0, 1.0));
        free * kv_free
    }

    pub fn saturated(&self, config: &PolicyConfig) -> bool {
        self.queue(config) >= config.queue_limit
            || self.load.is_some_and(|l| l.kv_usage >= config.kv_limit)
    }

    /// The reading of a poll that began with `in_flight_at_read` requests on the group.
    pub fn read(&mut self, ready: bool, load: Option<Load>, in_flight_at_read: u32) {
        self.ready = ready;
        if load.is_some() {
            self.load = load;
            self.in_flight_at_read = in_flight_at_read.min(self.in_flight);
        }
    }
}

/// Why a group was picked (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Affinity,
    Capacity,
    LeastLoaded,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Self::Affinity => "affinity",
            Self::Capacity => "capacity",
            Self::LeastLoaded => "least_loaded",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    Group {
        url: String,
        reason: Reason,
    },
    /// Every candidate is saturated and the request is low priority.
    Shed,
    /// No group can take it now.
    Nothing,
}

/// Every group of the pool and what was sent where.
#[derive(Debug)]
pub struct Groups {
    groups: Vec<Group>,
    affinity: PrefixIndex,
    pub config: PolicyConfig,
}

impl Groups {
    pub fn new(config: PolicyConfig) -> Self {
        Self {
            groups: Vec::new(),
            affinity: PrefixIndex::new(1 << 16),
            config,
        }
    }

    pub fn all(&self) -> &[Group] {
        &self.groups
    }

    pub fn get_mut(&mut self, url: &str) -> Option<&mut Group> {
        self.groups.iter_mut().find(|g| g.url == url)
    }

    /// The pool is now `urls`: new groups join (unready until polled), groups not listed leave.
    /// Whether anything changed.
    pub fn set_members(&mut self, urls: &[String]) -> bool {
        let before = self.groups.len();
        let mut left = Vec::new();
        self.groups.retain(|g| {
            let stays = urls.contains(&g.url);
            if !stays {
                left.push(g.url.clone());
            }
            stays
        });
        for url in left.iter() {
            self.affinity.forget(url);
        }
        for url in urls {
            if !self.groups.iter().any(|g| &g.url == url) {
                self.groups.push(Group::new(url.clone()));
            }
        }
        !left.is_empty() || self.groups.len() != before
    }

    /// Picks a group for `request` at `now`, none of `tried`; the pick is counted as sent.
    pub fn pick(&mut self, now: Instant, request: &RequestKey, tried: &[String]) -> Pick {
        let config = self.config;
        let candidates: Vec<usize> = (0..self.groups.len())
            .filter(|&i| {
                let g = &self.groups[i];
                g.ready && g.breaker.admits(now) && !tried.contains(&g.url)
            })
            .collect();
        if candidates.is_empty() {
            return Pick::Nothing;
        }
        let open: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| !self.groups[i].saturated(&config))
            .collect();
        if open.is_empty() && request.priority == Priority::Low {
            return Pick::Shed;
        }
        let pool = if open.is_empty() { candidates } else { open };
        let (index, reason) = self
            .by_affinity(&pool, &request.chunks)
            .map(|i| (i, Reason::Affinity))
            .unwrap_or_else(|| self.by_capacity(&pool));
        let group = &mut self.groups[index];
        group.breaker.sent(now);
        group.in_flight += 1;
        let url = group.url.clone();
        self.affinity.record(&request.chunks, &url);
        Pick::Group { url, reason }
    }

    fn by_affinity(&self, pool: &[usize], chunks: &[u64]) -> Option<usize> {
        let config = &self.config;
        let shortest = pool
            .iter()
            .map(|&i| self.groups[i].queue(config))
            .fold(f64::INFINITY, f64::min);
        pool.iter()
            .map(|&i| (i, self.affinity.matched(chunks, &self.groups[i].url)))
            .filter(|&(i, matched)| {
                matched > 0 && self.groups[i].queue(config) <= shortest + config.affinity_slack
            })
            .max_by_key(|&(_, matched)| matched)
            .map(|(i, _)| i)
    }

    fn by_capacity(&mut self, pool: &[usize]) -> (usize, Reason) {
        let config = self.config;
        let weights: Vec<f64> = pool
            .iter()
            .map(|&i| self.groups[i].weight(&config))
            .collect();
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            let relative = |i: usize| {
                let g = &self.groups[i];
                g.queue(&config) / g.batch_limit(&config)
            };
            let least = pool
                .iter()
                .copied()
                .min_by(|&a, &b| relative(a).total_cmp(&relative(b)))
                .unwrap_or(pool[0]);
            return (least, Reason::LeastLoaded);
        }
        // Only groups with a free place take part: a full one's running weight from before
        // must not win it another request.
        let weighted: Vec<(usize, f64)> = pool
            .iter()
            .copied()
            .zip(weights)
            .filter(|(_, weight)| *weight > 0.0)
            .collect();
        for &(i, weight) in &weighted {
            self.groups[i].current += weight;
        }
        let chosen = weighted
            .iter()
            .map(|&(i, _)| i)
            .max_by(|&a, &b| self.groups[a].current.total_cmp(&self.groups[b].current))
            .unwrap_or(pool[0]);
        self.groups[chosen].current -= total;
        (chosen, Reason::Capacity)
    }

    /// A request sent to `url` ended (its guard dropped).
    pub fn finished(&mut self, url: &str) {
        if let Some(g) = self.get_mut(url) {
            g.in_flight = g.in_flight.saturating_sub(1);
            g.in_flight_at_read = g.in_flight_at_read.min(g.in_flight);
        }
    }

    /// `url` answered (`ok`), or failed (no answer, a 500, a 502). Whether its breaker opened.
    pub fn outcome(&mut self, now: Instant, url: &str, ok: bool) -> bool {
        let config = self.config.breaker;
        let Some(g) = self.get_mut(url) else {
            return false;
        };
        if ok {
            g.breaker.succeeded();
            false
        } else {
            g.breaker.failed(now, &config)
        }
    }

    /// `url` said it takes nothing now (503): it is unready until a poll says otherwise.
    pub fn unready(&mut self, url: &str) {
        if let Some(g) = self.get_mut(url) {
            g.ready = false;
        }
    }

    /// Whether any group could take a request now, ignoring what one request tried.
    pub fn any_available(&self, now: Instant) -> bool {
        self.groups.iter().any(|g| g.ready && g.breaker.admits(now))
    }
}

#[cfg(test)]
mod tests {
    use super::super::affinity::{CHUNK_BYTES, chunk_keys};
    use super::*;

    fn pool(loads: &[Option<Load>]) -> Groups {
        let mut groups = Groups::new(PolicyConfig::default());
        let urls: Vec<String> = (0..loads.len()).map(|i| format!("g{i}")).collect();
        groups.set_members(&urls);
        for (url, load) in urls.iter().zip(loads) {
            groups.get_mut(url).unwrap().read(true, *load, 0);
        }
        groups
    }

    fn load(running: f64, waiting: f64, kv_usage: f64) -> Option<Load> {
        Some(Load {
            running,
            waiting,
            kv_usage,
            batch_limit: Some(8.0),
        })
    }

    fn plain(priority: Priority) -> RequestKey {
        RequestKey {
            chunks: Vec::new(),
            priority,
        }
    }

    fn picked(pick: Pick) -> String {
        match pick {
            Pick::Group { url, .. } => url,
            other => panic!("expected a group, got {other:?}"),
        }
    }

    /// Picks `n` requests that each finish before the next.
    fn spread(groups: &mut Groups, n: usize) -> Vec<usize> {
        let mut counts = vec![0; groups.all().len()];
        for _ in 0..n {
            let url = picked(groups.pick(Instant::now(), &plain(Priority::Medium), &[]));
            counts[url[1..].parse::<usize>().unwrap()] += 1;
            groups.finished(&url);
        }
        counts
    }

    #[test]
    fn requests_go_in_proportion_to_free_capacity() {
        // Free places: 8, 4 (4 running), 8 at half the KV cache → weights 8, 4, 4.
        let mut groups = pool(&[
            load(0.0, 0.0, 0.0),
            load(4.0, 0.0, 0.0),
            load(0.0, 0.0, 0.5),
        ]);
        assert_eq!(spread(&mut groups, 160), vec![80, 40, 40]);
    }

    #[test]
    fn requests_in_flight_count_until_the_next_reading() {
        let mut groups = pool(&[load(0.0, 0.0, 0.0), load(0.0, 0.0, 0.0)]);
        // Nothing finishes: each pick fills a place the readings do not know of yet.
        let urls: Vec<String> = (0..16)
            .map(|_| picked(groups.pick(Instant::now(), &plain(Priority::Medium), &[])))
            .collect();
        assert_eq!(urls.iter().filter(|u| *u == "g0").count(), 8);
        assert!(groups.all().iter().all(|g| g.queue(&groups.config) == 0.0));
        // Both full: the next waits in the shorter queue, relative to the batch.
        let next = picked(groups.pick(Instant::now(), &plain(Priority::Medium), &[]));
        assert_eq!(
            groups
                .get_mut(&next)
                .unwrap()
                .queue(&PolicyConfig::default()),
            1.0
        );
        // A reading taken with all of them on board counts them once.
        let config = groups.config;
        let g = groups.get_mut("g0").unwrap();
        let on_board = g.in_flight;
        g.read(true, load(8.0, f64::from(on_board) - 8.0, 0.3), on_board);
        assert_eq!(g.queue(&config), f64::from(on_board) - 8.0);
    }

    #[test]
    fn low_priority_is_shed_only_when_every_group_is_saturated() {
        let full = load(8.0, 16.0, 0.5);
        let mut groups = pool(&[full, load(8.0, 0.0, 0.96)]);
        assert_eq!(
            groups.pick(Instant::now(), &plain(Priority::Low), &[]),
            Pick::Shed
        );
        // High priority goes to the least loaded of them.
        assert_eq!(
            picked(groups.pick(Instant::now(), &plain(Priority::High), &[])),
            "g1"
        );
        let mut groups = pool(&[full, load(2.0, 0.0, 0.2)]);
        assert_eq!(
            picked(groups.pick(Instant::now(), &plain(Priority::Low), &[])),
            "g1"
        );
    }

    #[test]
    fn a_prompt_returns_to_its_group_unless_that_queue_is_much_longer() {
        let mut groups = pool(&[load(0.0, 0.0, 0.0), load(0.0, 0.0, 0.0)]);
        let prompt: Vec<u8> = (0..4 * CHUNK_BYTES)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        let request = RequestKey {
            chunks: chunk_keys("m", &prompt),
            priority: Priority::Medium,
        };
        let first = picked(groups.pick(Instant::now(), &request, &[]));
        groups.finished(&first);
        for _ in 0..5 {
            let Pick::Group { url, reason } = groups.pick(Instant::now(), &request, &[]) else {
                panic!("a group is free");
            };
            assert_eq!((url.as_str(), reason), (first.as_str(), Reason::Affinity));
            groups.finished(&url);
        }
        // Its group now has a queue longer than the slack: capacity decides.
        let config = groups.config;
        groups
            .get_mut(&first)
            .unwrap()
            .read(true, load(8.0, config.affinity_slack + 1.0, 0.5), 0);
        let Pick::Group { url, reason } = groups.pick(Instant::now(), &request, &[]) else {
            panic!("a group is free");
        };
        assert_ne!(url, first);
        assert_eq!(reason, Reason::Capacity);
    }

    #[test]
    fn unready_tried_and_broken_groups_are_passed_over() {
        let mut groups = pool(&[
            load(0.0, 0.0, 0.0),
            load(0.0, 0.0, 0.0),
            load(0.0, 0.0, 0.0),
        ]);
        let now = Instant::now();
        groups.unready("g0");
        for _ in 0..groups.config.breaker.failures {
            groups.outcome(now, "g1", false);
        }
        let request = plain(Priority::High);
        assert_eq!(picked(groups.pick(now, &request, &[])), "g2");
        assert_eq!(groups.pick(now, &request, &["g2".into()]), Pick::Nothing);
        assert!(groups.any_available(now));
        // The breaker lets one trial through after its cooldown.
        let later = now + groups.config.breaker.cooldown;
        assert_eq!(picked(groups.pick(later, &request, &["g2".into()])), "g1");
        assert_eq!(groups.pick(later, &request, &["g2".into()]), Pick::Nothing);
    }

    #[test]
    fn members_come_and_go() {
        let mut groups = pool(&[load(0.0, 0.0, 0.0)]);
        assert!(!groups.set_members(&["g0".into()]));
        assert!(groups.set_members(&["g0".into(), "g1".into()]));
        assert!(
            !groups.all()[1].ready,
            "a new group waits for its first poll"
        );
        assert!(groups.set_members(&["g1".into()]));
        assert_eq!(groups.all().len(), 1);
        assert_eq!(
            groups.pick(Instant::now(), &plain(Priority::High), &[]),
            Pick::Nothing
        );
    }

    #[test]
    fn the_load_is_read_from_vllm_and_parallax_metrics() {
        let text = "# HELP vllm:num_requests_running Requests\n\
            vllm:num_requests_running{model_name=\"m\"} 3\n\
            vllm:num_requests_waiting{model_name=\"m\"} 2\n\
            vllm:kv_cache_usage_perc{model_name=\"m\"} 0.25\n\
            parallax_batch_limit{model_name=\"m\"} 64\n\
            vllm:num_requests_running_other 99\n";
        assert_eq!(
            Load::parse(text),
            Some(Load {
                running: 3.0,
                waiting: 2.0,
                kv_usage: 0.25,
                batch_limit: Some(64.0),
            })
        );
        assert_eq!(Load::parse("# nothing\nup 1\n"), None);
    }
}
