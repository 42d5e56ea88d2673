//! `parallax-agent info`: what a user (or the device check) reads before serving — the device,
//! the profile, the build, how tensor-parallel ranks would sum, and the KV cache's type.

use std::process::Command;

fn info(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_parallax-agent"))
        .arg("info")
        .args(args)
        .env_remove("PARALLAX_COLLECTIVE")
        .output()
        .expect("the agent binary runs")
}

/// The JSON summary of a run that succeeded.
fn summary(args: &[&str]) -> serde_json::Value {
    let out = info(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("info --json prints JSON")
}

#[test]
fn info_says_how_tensor_parallel_ranks_sum_and_refuses_nccl_on_the_cpu_by_name() {
    let summary = summary(&["--json", "-t", "3"]);
    assert_eq!(summary["device"]["name"], "cpu");
    assert_eq!(
        summary["tensor_parallel"],
        serde_json::json!({"size": 3, "sums": "host"})
    );

    let out = info(&["--json", "--collective", "nccl"]);
    assert!(!out.status.success());
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(
        error.contains("--collective nccl") && error.contains("--device cuda"),
        "{error}"
    );
}

#[test]
fn info_shows_the_kv_cache_type_and_refuses_int8_where_it_is_not_built() {
    let summary = summary(&["--json", "--kv-cache-dtype", "int8"]);
    assert_eq!(summary["defaults"]["kv_cache_dtype"], "int8");
    assert_eq!(summary["backend"], "int8");

    let out = info(&["--json", "--kv-cache-dtype", "int8", "--backend", "candle"]);
    assert!(!out.status.success());
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(
        error.contains("--kv-cache-dtype int8") && error.contains("int8 backend"),
        "{error}"
    );
}
