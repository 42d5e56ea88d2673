//! The agent binary as a process on loopback, as the operator's pods run it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use super::model_path;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port free on loopback now (the OS picks it; the agent binds it a moment later).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One agent process, killed when dropped; its log is kept for failures' messages.
pub struct Agent {
    pub child: Child,
    pub base: String,
    log: PathBuf,
}

impl Agent {
    pub fn spawn(name: &str, port: u16, args: &[String]) -> Self {
        Self::spawn_with(name, port, args, &[])
    }

    /// With `env` set (after the group's variables are cleared).
    pub fn spawn_with(name: &str, port: u16, args: &[String], env: &[(&str, String)]) -> Self {
        Self::spawn_model(name, port, &model_path().to_string_lossy(), args, env)
    }

    /// Serving `model`, with `env` set.
    pub fn spawn_model(
        name: &str,
        port: u16,
        model: &str,
        args: &[String],
        env: &[(&str, String)],
    ) -> Self {
        let log = std::env::temp_dir().join(format!(
            "parallax-group-{name}-{}-{port}.log",
            std::process::id()
        ));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_parallax-agent"))
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--served-model-name", "smollm2", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .args(args)
            // The group comes from `env` alone, whatever this environment says.
            .env_remove("PARALLAX_RANK")
            .env_remove("PARALLAX_WORLD_SIZE")
            .env_remove("PARALLAX_LEADER_ADDRESS")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("the agent binary starts");
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/ready` says 200, failing at once if the process ends.
    pub async fn ready(&mut self, client: &reqwest::Client, limit: Duration) {
        let until = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("{} ended ({status}):\n{}", self.base, self.log());
            }
            if let Ok(answer) = client.get(format!("{}/ready", self.base)).send().await
                && answer.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < until,
                "{} not ready within {limit:?}:\n{}",
                self.base,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the process to end, up to `limit`: its exit status.
    pub async fn ended(&mut self, limit: Duration) -> std::process::ExitStatus {
        let until = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < until,
                "{} still runs after {limit:?}:\n{}",
                self.base,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn get(&self, client: &reqwest::Client, path: &str) -> (u16, Value) {
        let answer = client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = answer.status().as_u16();
        (status, answer.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
