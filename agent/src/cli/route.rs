//! `route`: the router in front of a pool's groups.

use super::seconds;
use crate::router::members::Members;
use crate::router::{Router, RouterConfig};
use crate::server;
use anyhow::{Context, bail};
use clap::Args;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct RouteArgs {
    /// A group leader's base URL (`http://host:port`); repeat for each group.
    #[arg(long = "group", value_name = "URL")]
    pub groups: Vec<String>,
    /// A DNS name whose addresses are the group leaders (a headless Service's, as the operator
    /// makes one), `HOST:PORT`; resolved again every 5 s. Instead of --group.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "groups")]
    pub discover: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// How often the groups' /ready and /metrics are read, in milliseconds.
    #[arg(long, default_value_t = 250)]
    pub poll_interval_ms: u64,
    /// Seconds a request is held while no group is ready (a pool waking from zero) before 503.
    #[arg(long, default_value_t = 60.0)]
    pub hold_timeout: f64,
    /// Groups one request is sent to at most: the first, and others after refusals.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: usize,
    /// Queued requests at which a group counts as saturated (low priority is then shed).
    #[arg(long, default_value_t = 16.0)]
    pub queue_limit: f64,
    /// Requests more than the shortest queue a prefix match may cost.
    #[arg(long, default_value_t = 4.0)]
    pub affinity_slack: f64,
    /// Consecutive failures that open a group's circuit breaker.
    #[arg(long, default_value_t = 5)]
    pub breaker_failures: u32,
    /// Seconds a group's open circuit breaker waits before a trial request.
    #[arg(long, default_value_t = 10.0)]
    pub breaker_cooldown: f64,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Resolve the arguments, print what they resolve to, and exit without listening.
    #[arg(long)]
    pub check: bool,
}

impl RouteArgs {
    pub fn config(&self) -> anyhow::Result<RouterConfig> {
        let members = match &self.discover {
            Some(address) => {
                let (host, port) = address
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
                    .with_context(|| format!("--discover {address}: expected HOST:PORT"))?;
                Members::Dns {
                    host: host.to_owned(),
                    port,
                }
            }
            None if self.groups.is_empty() => {
                bail!("name the groups: --group URL or --discover HOST:PORT")
            }
            None => {
                for url in &self.groups {
                    let parsed = reqwest::Url::parse(url)
                        .with_context(|| format!("--group {url}: not a URL"))?;
                    if parsed.scheme() != "http" || parsed.host().is_none() {
                        bail!("--group {url}: expected http://HOST:PORT");
                    }
                }
                Members::Fixed(
                    self.groups
                        .iter()
                        .map(|u| u.trim_end_matches('/').to_owned())
                        .collect(),
                )
            }
        };
        if self.max_attempts == 0 {
            bail!("--max-attempts must be at least 1");
        }
        if self.poll_interval_ms == 0 {
            bail!("--poll-interval-ms must be at least 1");
        }
        let mut config = RouterConfig::new(members);
        config.poll_interval = Duration::from_millis(self.poll_interval_ms);
        config.hold_timeout = seconds(self.hold_timeout, "--hold-timeout")?;
        config.max_attempts = self.max_attempts;
        config.max_body_bytes = self.max_body_bytes;
        config.policy.queue_limit = self.queue_limit;
        config.policy.affinity_slack = self.affinity_slack;
        config.policy.breaker.failures = self.breaker_failures.max(1);
        config.policy.breaker.cooldown = seconds(self.breaker_cooldown, "--breaker-cooldown")?;
        Ok(config)
    }
}

pub fn route(args: &RouteArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    if args.check {
        println!(
            "groups {:?}; poll every {:?}; hold {:?}; {} attempts; saturated at {} queued or {}% KV",
            config.members,
            config.poll_interval,
            config.hold_timeout,
            config.max_attempts,
            config.policy.queue_limit,
            config.policy.kv_limit * 100.0
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        tracing::info!(address = %listener.local_addr()?, groups = ?config.members, "routing");
        Router::new(config)
            .run(listener, server::termination())
            .await?;
        tracing::info!("stopped");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        route: RouteArgs,
    }

    fn config(args: &[&str]) -> anyhow::Result<RouterConfig> {
        let mut argv = vec!["route"];
        argv.extend(args);
        Cli::try_parse_from(argv)?.route.config()
    }

    #[test]
    fn groups_come_from_urls_or_a_dns_name() {
        let fixed = config(&[
            "--group",
            "http://10.0.0.1:8000/",
            "--group",
            "http://b:8000",
        ]);
        assert_eq!(
            fixed.unwrap().members,
            Members::Fixed(vec!["http://10.0.0.1:8000".into(), "http://b:8000".into()])
        );
        let dns = config(&["--discover", "pool-leaders.ml.svc:8000"]).unwrap();
        assert_eq!(
            dns.members,
            Members::Dns {
                host: "pool-leaders.ml.svc".into(),
                port: 8000
            }
        );
    }

    #[test]
    fn bad_arguments_are_named() {
        let error = |args: &[&str]| config(args).unwrap_err().to_string();
        assert!(error(&[]).contains("--group URL or --discover"));
        assert!(error(&["--discover", "no-port"]).contains("--discover no-port"));
        assert!(error(&["--group", "ftp://x:1"]).contains("expected http://"));
        assert!(
            error(&["--group", "http://x:1", "--max-attempts", "0"]).contains("--max-attempts")
        );
        assert!(error(&["--group", "http://x:1", "--hold-timeout=-1"]).contains("--hold-timeout"));
    }
}
