//! `parallax-agent info`: what a user (or the device check) reads before serving — the device,
//! the profile, the build, and how tensor-parallel ranks would sum.

use std::process::Command;

fn info(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_parallax-agent"))
        .arg("info")
        .args(args)
        .env_remove("PARALLAX_COLLECTIVE")
        .output()
        .expect("the agent binary runs")
}

#[test]
fn info_says_how_tensor_parallel_ranks_sum_and_refuses_nccl_on_the_cpu_by_name() {
    let out = info(&["--json", "-t", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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
