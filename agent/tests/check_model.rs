//! `parallax-agent check-model`, what the device check compares with transformers: its logits
//! file and greedy tokens agree with each other (the one-step path and the scheduler's), on the
//! backend the arguments choose; bad prompts are refused by name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use parallax_agent::engine::sampling::argmax;
use std::path::PathBuf;
use std::process::Command;
use support::cosine;

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "parallax-{}-check-model-{name}",
        std::process::id()
    ))
}

/// Runs check-model on the test model; its JSON summary and logit rows.
fn check_model(backend: &str, prompts: &[Vec<u32>]) -> (serde_json::Value, Vec<Vec<f32>>) {
    let (input, out) = (
        scratch(&format!("{backend}.json")),
        scratch(&format!("{backend}.f32")),
    );
    std::fs::write(&input, serde_json::to_vec(prompts).unwrap()).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_parallax-agent"))
        .args([
            "check-model",
            "--backend",
            backend,
            "--greedy",
            "4",
            "--model",
        ])
        .arg(support::model_path())
        .arg("--prompts")
        .arg(&input)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("the agent binary runs");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let vocab = summary["vocab"].as_u64().unwrap() as usize;
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(
        bytes.len(),
        prompts.len() * vocab * 4,
        "one f32 row per prompt"
    );
    let rows = bytes
        .chunks_exact(vocab * 4)
        .map(|row| {
            row.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        })
        .collect();
    std::fs::remove_file(input).unwrap();
    std::fs::remove_file(out).unwrap();
    (summary, rows)
}

#[test]
fn logits_and_greedy_tokens_agree_on_the_backend_asked_for() {
    // "The capital of France is", "1, 2, 3, 4," and `<|im_start|>` alone, as the test model's
    // token ids.
    let prompts = vec![
        vec![504, 3575, 282, 4649, 314],
        vec![33, 28, 216, 34, 28, 216, 35, 28, 216, 36, 28],
        vec![1],
    ];
    let (candle, candle_rows) = check_model("candle", &prompts);
    let (int8, int8_rows) = check_model("int8", &prompts);
    assert!(
        candle["backend"].as_str().unwrap().starts_with("candle"),
        "{candle}"
    );
    assert!(
        int8["backend"].as_str().unwrap().starts_with("int8"),
        "{int8}"
    );
    for (summary, rows) in [(&candle, &candle_rows), (&int8, &int8_rows)] {
        let greedy: Vec<Vec<u32>> = serde_json::from_value(summary["greedy"].clone()).unwrap();
        assert_eq!(greedy.len(), prompts.len());
        for (tokens, row) in greedy.iter().zip(rows) {
            assert_eq!(tokens.len(), 4, "{summary}");
            // The scheduler's first token is the one-step logits' best.
            assert_eq!(tokens[0], argmax(row), "{summary}");
        }
        // No CUDA graphs on the CPU.
        assert_eq!(summary["graph_steps"], 0, "{summary}");
    }
    // The int8 engine quantizes activations: close to candle's f32, not equal.
    for (a, b) in candle_rows.iter().zip(&int8_rows) {
        let c = cosine(a, b);
        assert!(c > 0.99 && a != b, "cosine {c}");
    }
}

#[test]
fn prompts_that_are_not_token_id_lists_are_refused_by_name() {
    let input = scratch("bad.json");
    std::fs::write(&input, br#"["not", "ids"]"#).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_parallax-agent"))
        .args([
            "check-model",
            "--model",
            "dummy:smollm2-135m",
            "--out",
            "/dev/null",
            "--prompts",
        ])
        .arg(&input)
        .output()
        .unwrap();
    std::fs::remove_file(&input).unwrap();
    assert!(!run.status.success());
    let error = String::from_utf8_lossy(&run.stderr);
    assert!(error.contains("not a list of token-id lists"), "{error}");
}
