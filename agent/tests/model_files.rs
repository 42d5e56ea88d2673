//! The tokenizer and chat template of the test model, and clear errors for bad model files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use parallax_agent::engine::model::loader;
use parallax_agent::engine::{self, BackendConfig, EngineError, Message, ModelSource, TextCodec};
use std::path::PathBuf;
use support::model_path;

fn codec() -> TextCodec {
    TextCodec::from_gguf(&loader::read_gguf(&model_path()).unwrap()).unwrap()
}

fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("parallax-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn text_round_trips_through_the_tokenizer() {
    let codec = codec();
    for text in [
        "Hello, world!",
        "  leading spaces and\ttabs\nnewlines",
        "Zahlen 12345 und Ümlaute — ünïcödé 日本語 🙂",
        "fn main() { println!(\"{}\", 1 + 2); }",
    ] {
        let ids = codec.encode(text).unwrap();
        assert_eq!(codec.decode(&ids).unwrap(), text);
    }
    // Digits are split one by one, as llama.cpp's SmolLM pre-tokenizer does.
    let digits = codec.encode("2024").unwrap();
    assert_eq!(digits.len(), 4, "{digits:?}");
    // Special tokens written in the text are single tokens; BOS is not added for this model.
    let ids = codec.encode("<|im_start|>user").unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!((codec.bos, codec.eos.as_slice()), (Some(1), &[2][..]));
}

#[test]
fn the_models_chat_template_renders_chatml_with_its_default_system_prompt() {
    let codec = codec();
    assert!(codec.has_chat_template());
    let prompt = codec
        .chat_prompt(&[Message {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        }])
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    let with_system = codec
        .chat_prompt(&[
            Message {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            Message {
                role: "user".into(),
                content: "Hi".into(),
            },
        ])
        .unwrap();
    assert!(
        with_system.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"),
        "{with_system}"
    );
    // 37 prompt tokens, as llama.cpp counts for this prompt.
    assert_eq!(codec.encode(&prompt).unwrap().len(), 37);
}

fn load_error(path: &std::path::Path) -> EngineError {
    match engine::load(
        &ModelSource::Gguf(path.to_owned()),
        &BackendConfig::default(),
    ) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

#[test]
fn a_missing_file_names_the_path() {
    let err = ModelSource::parse("/nonexistent/model.gguf").unwrap_err();
    assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");
}

#[test]
fn a_truncated_or_corrupt_gguf_is_an_error_not_a_panic() {
    let real = std::fs::read(model_path()).unwrap();
    let truncated = scratch_file("truncated.gguf", &real[..real.len() / 2]);
    let err = load_error(&truncated);
    assert!(matches!(err, EngineError::InvalidGguf { .. }), "{err}");
    let header_only = scratch_file("header.gguf", &real[..64]);
    assert!(matches!(
        load_error(&header_only),
        EngineError::InvalidGguf { .. }
    ));
    let garbage = scratch_file(
        "garbage.gguf",
        b"this is not a model file at all, just text",
    );
    let err = load_error(&garbage);
    assert!(
        err.to_string().contains("not a readable GGUF file"),
        "{err}"
    );
    for p in [truncated, header_only, garbage] {
        std::fs::remove_file(p).unwrap();
    }
}

/// A tiny GGUF written with candle's writer.
fn tiny_gguf(name: &str, architecture: &str, dtype: candle_core::quantized::GgmlDType) -> PathBuf {
    use candle_core::quantized::{QTensor, gguf_file};
    use candle_core::{Device, Tensor};
    let path = std::env::temp_dir().join(format!("parallax-{}-{name}", std::process::id()));
    let mut file = std::fs::File::create(&path).unwrap();
    let arch = gguf_file::Value::String(architecture.into());
    let layers = gguf_file::Value::U32(1);
    let metadata = [
        ("general.architecture", &arch),
        ("llama.block_count", &layers),
        ("llama.embedding_length", &gguf_file::Value::U32(32)),
        ("llama.feed_forward_length", &gguf_file::Value::U32(64)),
        ("llama.attention.head_count", &gguf_file::Value::U32(1)),
        ("llama.context_length", &gguf_file::Value::U32(64)),
    ];
    let embed = QTensor::quantize(
        &Tensor::zeros((256, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        dtype,
    )
    .unwrap();
    gguf_file::write(&mut file, &metadata, &[("token_embd.weight", &embed)]).unwrap();
    path
}

#[test]
fn an_unsupported_architecture_is_named() {
    let path = tiny_gguf(
        "mamba.gguf",
        "mamba",
        candle_core::quantized::GgmlDType::F32,
    );
    let err = load_error(&path);
    assert!(
        err.to_string()
            .contains("architecture \"mamba\" is not supported"),
        "{err}"
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_file_missing_a_tensor_names_it() {
    let path = tiny_gguf(
        "partial.gguf",
        "llama",
        candle_core::quantized::GgmlDType::Q8_0,
    );
    let err = load_error(&path);
    assert!(err.to_string().contains("blk.0."), "{err}");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn an_unknown_quantization_type_is_an_error() {
    // A valid file whose only tensor claims GGML type 99.
    let path = tiny_gguf(
        "weird.gguf",
        "llama",
        candle_core::quantized::GgmlDType::F32,
    );
    let mut bytes = std::fs::read(&path).unwrap();
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    // After the name: u32 dimension count, two u64 dimensions, then the u32 type.
    let type_at = at + 4 + 16;
    assert_eq!(
        u32::from_le_bytes(bytes[type_at..type_at + 4].try_into().unwrap()),
        0,
        "F32 is type 0"
    );
    bytes[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = load_error(&path);
    assert!(
        err.to_string().contains("99") || err.to_string().to_lowercase().contains("dtype"),
        "{err}"
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn dummy_shapes_load_and_unknown_ones_are_named() {
    let err = engine::load(
        &ModelSource::Dummy("gpt-5".into()),
        &BackendConfig::default(),
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("unknown dummy shape \"gpt-5\""),
        "{err}"
    );
    let dummy = ModelSource::Dummy("smollm2-135m".into());
    for (name, backend) in support::backends() {
        let model = engine::load(&dummy, &backend).unwrap();
        let c = model.config();
        assert_eq!(
            (c.layers, c.hidden_size, c.kv_heads),
            (30, 576, 3),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hugging_face_directory_loads_and_generates() {
    let dir = std::env::temp_dir().join(format!("parallax-{}-hf", std::process::id()));
    support::tiny::TinyLlama::default().write(&dir);
    let source = ModelSource::parse(dir.to_str().unwrap()).unwrap();
    assert_eq!(source, ModelSource::HuggingFace(dir.clone()));
    let (model, codec) =
        engine::load_with_tokenizer(&source, None, &BackendConfig::default()).unwrap();
    let c = model.config();
    assert_eq!((c.layers, c.kv_heads, c.context_length), (2, 2, 256));
    assert_eq!(codec.eos, vec![256]);
    assert_eq!(
        codec
            .chat_prompt(&[Message {
                role: "user".into(),
                content: "hi".into()
            }])
            .unwrap(),
        "<user>hi<assistant>"
    );
    let handle = engine::start(model, codec, support::config(64, 32)).unwrap();
    let prompt = handle.codec.encode("héllo wörld").unwrap();
    assert_eq!(handle.codec.decode(&prompt).unwrap(), "héllo wörld");
    let a = support::collect(handle.submit(prompt.clone(), support::greedy(8)).unwrap()).await;
    let b = support::collect(handle.submit(prompt, support::greedy(8)).unwrap()).await;
    assert_eq!(a.completion_tokens, 8);
    assert_eq!(a.tokens, b.tokens, "greedy decoding is deterministic");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_sliding_window_shorter_than_the_context_bounds_what_is_served() {
    let dir = std::env::temp_dir().join(format!("parallax-{}-window", std::process::id()));
    let tiny = support::tiny::TinyLlama::default();
    tiny.write(&dir);
    let served = |extra: serde_json::Value| {
        let mut config = tiny.config_json();
        config["model_type"] = "mistral".into();
        for (key, value) in extra.as_object().unwrap() {
            config[key] = value.clone();
        }
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let source = ModelSource::HuggingFace(dir.clone());
        let model = engine::load(&source, &BackendConfig::default()).unwrap();
        model.config().context_length
    };
    // Mistral 7B v0.1 (a window of 4,096 in 32,768 positions), here 64 in 256.
    assert_eq!(served(serde_json::json!({"sliding_window": 64})), 64);
    // Later Mistrals write null; a window as long as the context changes nothing; Qwen2-style
    // configs switch it off.
    assert_eq!(served(serde_json::json!({"sliding_window": null})), 256);
    assert_eq!(served(serde_json::json!({"sliding_window": 4096})), 256);
    assert_eq!(
        served(serde_json::json!({"sliding_window": 64, "use_sliding_window": false})),
        256
    );
    std::fs::remove_dir_all(dir).unwrap();
}
