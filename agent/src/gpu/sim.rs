//! A GPU source that plays a scripted file (`--gpu-source sim:FILE`): the inventory, then
//! readings and events at given seconds after start. It lets the whole health path run on a
//! machine without a GPU — in tests, and for anyone trying the agent.
//!
//! The file is JSON Lines: the first line names the GPUs, each later line is a reading or an
//! event of one GPU (`gpu` is its position in `gpus`), at `at` seconds after the agent started,
//! or as soon as it is read when `at` is left out. Lines appended while the agent runs are
//! played too: `echo '{"gpu": 0, "event": {"xid": 79}}' >> FILE` fails a GPU now.
//!
//! ```text
//! {"gpus": [{"index": 0, "uuid": "GPU-sim-0", "name": "Simulated H100", "memory_bytes": 85899345920, "compute_capability": "9.0", "driver_version": "sim"}]}
//! {"at": 0, "gpu": 0, "reading": {"utilization_gpu": 87, "temperature_celsius": 61}}
//! {"at": 2.5, "gpu": 0, "event": {"xid": 79}}
//! {"at": 3, "gpu": 0, "event": "double_bit_ecc"}
//! {"at": 4, "gpu": 0, "event": {"lost": "fell off the bus"}}
//! ```
//!
//! A reading holds from its time until the next one of its GPU; a `lost` event makes the GPU
//! unreadable until its next reading.

use super::{Event, GpuInfo, GpuSource, Reading};
use anyhow::{Context, bail};
use serde::Deserialize;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    gpus: Vec<GpuInfo>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    /// Seconds after the source starts; as soon as read when absent.
    #[serde(default)]
    at: Option<f64>,
    /// Position in `gpus`.
    gpu: usize,
    #[serde(default)]
    reading: Option<Reading>,
    #[serde(default)]
    event: Option<Event>,
}

/// Plays a script in real time from its creation.
#[derive(Debug)]
pub struct SimSource {
    gpus: Vec<GpuInfo>,
    /// Entries not played yet, by time.
    timeline: Vec<(f64, Entry)>,
    start: Instant,
    /// Each GPU's reading now, or why it cannot be read.
    current: Vec<Result<Reading, Event>>,
    /// The file lines are appended to, how far it has been read, and how many lines it had.
    file: Option<(PathBuf, u64, usize)>,
}

impl SimSource {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the GPU script {}", path.display()))?;
        // Only whole lines: a line being written is read once it ends.
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        let mut sim = Self::from_lines(&text[..whole])
            .with_context(|| format!("the GPU script {}", path.display()))?;
        let lines = text[..whole].lines().count();
        sim.file = Some((path.to_owned(), whole as u64, lines));
        Ok(sim)
    }

    pub fn from_lines(text: &str) -> anyhow::Result<Self> {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let Some((_, first)) = lines.next() else {
            bail!("the first line must name the GPUs: {{\"gpus\": [...]}}");
        };
        let header: Header = serde_json::from_str(first).context("line 1")?;
        if header.gpus.is_empty() {
            bail!("line 1: `gpus` lists no GPU");
        }
        let mut sim = Self {
            current: vec![Ok(Reading::default()); header.gpus.len()],
            gpus: header.gpus,
            timeline: Vec::new(),
            start: Instant::now(),
            file: None,
        };
        for (number, line) in lines {
            let entry = sim
                .parse(line)
                .with_context(|| format!("line {}", number + 1))?;
            sim.schedule(entry);
        }
        Ok(sim)
    }

    fn parse(&self, line: &str) -> anyhow::Result<Entry> {
        let entry: Entry = serde_json::from_str(line)?;
        if entry.gpu >= self.gpus.len() {
            bail!(
                "gpu {} is not one of the {} GPUs",
                entry.gpu,
                self.gpus.len()
            );
        }
        if entry.reading.is_some() == entry.event.is_some() {
            bail!("give either `reading` or `event`");
        }
        if entry.at.is_some_and(|at| !at.is_finite() || at < 0.0) {
            bail!("`at` must be seconds ≥ 0");
        }
        Ok(entry)
    }

    fn schedule(&mut self, entry: Entry) {
        let at = entry.at.unwrap_or_else(|| self.elapsed());
        let place = self.timeline.partition_point(|(t, _)| *t <= at);
        self.timeline.insert(place, (at, entry));
    }

    fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Reads lines appended to the file since last time; a bad one is logged and skipped.
    fn follow(&mut self) {
        let Some((path, offset, lines)) = self.file.clone() else {
            return;
        };
        let mut appended = String::new();
        let read = std::fs::File::open(&path).and_then(|mut file| {
            file.seek(SeekFrom::Start(offset))?;
            file.read_to_string(&mut appended)
        });
        if read.is_err() {
            return;
        }
        let whole = appended.rfind('\n').map_or(0, |i| i + 1);
        let mut number = lines;
        for line in appended[..whole].lines() {
            number += 1;
            if line.trim().is_empty() {
                continue;
            }
            match self.parse(line) {
                Ok(entry) => self.schedule(entry),
                Err(error) => tracing::warn!(
                    file = %path.display(),
                    line = number,
                    "skipping a GPU script line: {error:#}"
                ),
            }
        }
        self.file = Some((path, offset + whole as u64, number));
    }

    /// Plays the due entries: readings become current, events are returned. With
    /// `readings_only`, stops at the first due event (left for `wait_events`).
    fn play(&mut self, readings_only: bool) -> Vec<(usize, Event)> {
        self.follow();
        let now = self.elapsed();
        let mut events = Vec::new();
        while let Some((at, entry)) = self.timeline.first() {
            if *at > now || (readings_only && entry.event.is_some()) {
                break;
            }
            let (_, entry) = self.timeline.remove(0);
            if let Some(reading) = entry.reading {
                self.current[entry.gpu] = Ok(reading);
            }
            if let Some(event) = entry.event {
                if matches!(event, Event::Lost(_)) {
                    self.current[entry.gpu] = Err(event.clone());
                }
                events.push((entry.gpu, event));
            }
        }
        events
    }
}

impl GpuSource for SimSource {
    fn inventory(&self) -> &[GpuInfo] {
        &self.gpus
    }

    fn sample(&mut self) -> Vec<Result<Reading, Event>> {
        self.play(true);
        self.current.clone()
    }

    fn wait_events(&mut self, timeout: Duration) -> Vec<(usize, Event)> {
        let deadline = Instant::now() + timeout;
        loop {
            let due = self.play(false);
            let left = deadline.saturating_duration_since(Instant::now());
            if !due.is_empty() || left.is_zero() {
                return due;
            }
            // Appended lines are looked for every 50 ms.
            let next = self
                .timeline
                .first()
                .map(|(at, _)| Duration::from_secs_f64((at - self.elapsed()).max(0.0)));
            let nap = next
                .unwrap_or(left)
                .min(left)
                .min(Duration::from_millis(50));
            std::thread::sleep(nap);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPU: &str = r#"{"gpus": [{"index": 0, "uuid": "u", "name": "n", "memory_bytes": 1, "compute_capability": "9.0", "driver_version": "d"}]}"#;

    #[test]
    fn a_script_is_checked_before_it_plays() {
        let err = |text: &str| format!("{:#}", SimSource::from_lines(text).unwrap_err());
        assert!(err("").contains("the first line must name the GPUs"));
        assert!(err(r#"{"gpus": []}"#).contains("no GPU"));
        assert!(
            err(&format!(
                "{GPU}\n{{\"gpu\": 1, \"event\": \"double_bit_ecc\"}}"
            ))
            .contains("line 2: gpu 1 is not one of the 1 GPUs")
        );
        assert!(err(&format!("{GPU}\n{{\"gpu\": 0}}")).contains("either `reading` or `event`"));
        assert!(
            err(&format!(
                "{GPU}\n{{\"gpu\": 0, \"event\": {{\"xid\": \"x\"}}}}"
            ))
            .contains("invalid type")
        );
    }

    #[test]
    fn due_readings_and_events_play_in_order() {
        let mut sim = SimSource::from_lines(&format!(
            "{GPU}
{{\"at\": 3600, \"gpu\": 0, \"event\": \"double_bit_ecc\"}}
{{\"at\": 0, \"gpu\": 0, \"event\": {{\"xid\": 79}}}}
{{\"at\": 0, \"gpu\": 0, \"reading\": {{\"utilization_gpu\": 50}}}}
{{\"at\": 0, \"gpu\": 0, \"event\": {{\"lost\": \"gone\"}}}}"
        ))
        .unwrap();
        assert_eq!(
            sim.wait_events(Duration::ZERO),
            [(0, Event::Xid(79)), (0, Event::Lost("gone".into()))]
        );
        assert_eq!(sim.sample(), [Err(Event::Lost("gone".into()))]);
        // Nothing more is due within the timeout.
        assert!(sim.wait_events(Duration::from_millis(1)).is_empty());
    }

    #[test]
    fn lines_appended_to_the_file_are_played_and_bad_ones_skipped() {
        let path = std::env::temp_dir().join(format!("parallax-sim-{}.jsonl", std::process::id()));
        std::fs::write(&path, format!("{GPU}\n")).unwrap();
        let mut sim = SimSource::from_file(&path).unwrap();
        assert!(sim.wait_events(Duration::ZERO).is_empty());
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        use std::io::Write;
        writeln!(file, "not json").unwrap();
        writeln!(file, r#"{{"gpu": 0, "event": {{"xid": 48}}}}"#).unwrap();
        // A line still being written waits for its end.
        write!(file, r#"{{"gpu": 0, "event": "#).unwrap();
        assert_eq!(sim.wait_events(Duration::ZERO), [(0, Event::Xid(48))]);
        writeln!(file, r#""double_bit_ecc"}}"#).unwrap();
        assert_eq!(sim.wait_events(Duration::ZERO), [(0, Event::DoubleBitEcc)]);
        std::fs::remove_file(&path).unwrap();
    }
}
