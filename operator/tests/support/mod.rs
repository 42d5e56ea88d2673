//! Shared by the operator's integration tests.
#![allow(dead_code, clippy::unwrap_used)]

pub mod fake_api;

use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;

/// Logs to the test's output when `RUST_LOG` is set.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
}

/// Waits until `check` holds, re-checking after every change the fake API server records, and
/// fails the test with `what` after `timeout`.
pub async fn eventually<F, Fut>(
    what: &str,
    changes: &mut watch::Receiver<u64>,
    timeout: Duration,
    mut check: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let wait = async {
        loop {
            changes.borrow_and_update();
            if check().await {
                return;
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    };
    if tokio::time::timeout(timeout, wait).await.is_err() {
        panic!("timed out after {timeout:?} waiting until {what}");
    }
}
