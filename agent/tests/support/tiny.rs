//! Tiny Llama checkpoints in the Hugging Face layout, written by the tests: config.json, weights
//! with known values (a seeded generator) as safetensors (one file, or shards with an index), and
//! a byte-level tokenizer.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The shape and storage of a tiny checkpoint.
#[derive(Debug, Clone)]
pub struct TinyLlama {
    pub vocab: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub context: usize,
    pub rope_theta: f64,
    /// config.json's `rope_scaling`, as written.
    pub rope_scaling: serde_json::Value,
    pub dtype: DType,
    /// An output head of its own, or the embedding's (`tie_word_embeddings`).
    pub tied: bool,
    /// Split the weights into this many safetensors files with an index (1: one file).
    pub shards: usize,
    pub seed: u32,
}

impl Default for TinyLlama {
    fn default() -> Self {
        Self {
            vocab: 300,
            hidden: 64,
            ffn: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            context: 256,
            rope_theta: 10_000.0,
            rope_scaling: serde_json::Value::Null,
            dtype: DType::BF16,
            tied: true,
            shards: 1,
            seed: 1,
        }
    }
}

impl TinyLlama {
    /// Every weight by its file name, f32 on the CPU.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        let mut seed = self.seed;
        let mut uniform = |n: usize, center: f32, spread: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    center + ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * spread
                })
                .collect()
        };
        let mut matrix = |rows: usize, cols: usize| {
            Tensor::from_vec(uniform(rows * cols, 0.0, 0.2), (rows, cols), &Device::Cpu).unwrap()
        };
        let (hidden, ffn) = (self.hidden, self.ffn);
        let hd = hidden / self.heads;
        let mut weights = HashMap::new();
        weights.insert(
            "model.embed_tokens.weight".to_owned(),
            matrix(self.vocab, hidden),
        );
        if !self.tied {
            weights.insert("lm_head.weight".to_owned(), matrix(self.vocab, hidden));
        }
        for i in 0..self.layers {
            let p = |s: &str| format!("model.layers.{i}.{s}.weight");
            weights.insert(p("self_attn.q_proj"), matrix(self.heads * hd, hidden));
            weights.insert(p("self_attn.k_proj"), matrix(self.kv_heads * hd, hidden));
            weights.insert(p("self_attn.v_proj"), matrix(self.kv_heads * hd, hidden));
            weights.insert(p("self_attn.o_proj"), matrix(hidden, self.heads * hd));
            weights.insert(p("mlp.gate_proj"), matrix(ffn, hidden));
            weights.insert(p("mlp.up_proj"), matrix(ffn, hidden));
            weights.insert(p("mlp.down_proj"), matrix(hidden, ffn));
        }
        // Norms near one, so that they matter without blowing activations up.
        let mut vector =
            |n: usize| Tensor::from_vec(uniform(n, 1.0, 0.4), n, &Device::Cpu).unwrap();
        for i in 0..self.layers {
            let p = |s: &str| format!("model.layers.{i}.{s}.weight");
            weights.insert(p("input_layernorm"), vector(hidden));
            weights.insert(p("post_attention_layernorm"), vector(hidden));
        }
        weights.insert("model.norm.weight".to_owned(), vector(hidden));
        weights
    }

    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": "llama", "vocab_size": self.vocab, "hidden_size": self.hidden,
            "intermediate_size": self.ffn, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-5, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.context, "tie_word_embeddings": self.tied,
            "rope_scaling": self.rope_scaling,
        })
    }

    /// config.json as transformers 5 writes it: theta and scaling together in
    /// `rope_parameters`, no `rope_theta` or `rope_scaling`.
    pub fn config_json_v5(&self) -> serde_json::Value {
        let mut config = self.config_json();
        let object = config.as_object_mut().unwrap();
        object.remove("rope_theta");
        let mut parameters = match object.remove("rope_scaling") {
            Some(serde_json::Value::Object(scaling)) => scaling,
            _ => serde_json::Map::from_iter([("rope_type".into(), "default".into())]),
        };
        parameters.insert("rope_theta".into(), self.rope_theta.into());
        object.insert("rope_parameters".into(), parameters.into());
        config
    }

    /// Writes the checkpoint into `dir`.
    pub fn write(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), self.config_json().to_string()).unwrap();
        let mut names: Vec<(String, Tensor)> = self
            .weights()
            .into_iter()
            .map(|(n, t)| (n, t.to_dtype(self.dtype).unwrap()))
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        if self.shards <= 1 {
            let all: HashMap<_, _> = names.into_iter().collect();
            candle_core::safetensors::save(&all, dir.join("model.safetensors")).unwrap();
        } else {
            let mut map = serde_json::Map::new();
            let per = names.len().div_ceil(self.shards);
            for (k, part) in names.chunks(per).enumerate() {
                let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, self.shards);
                for (n, _) in part {
                    map.insert(n.clone(), serde_json::json!(file));
                }
                let part: HashMap<_, _> = part.iter().cloned().collect();
                candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
            }
            let index = serde_json::json!({"metadata": {}, "weight_map": map});
            std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        }
        // A byte-level tokenizer whose 256 byte tokens need no merges.
        let bytes = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet();
        let mut alphabet: Vec<char> = bytes.into_iter().collect();
        alphabet.sort();
        let vocab_json: serde_json::Map<String, serde_json::Value> = alphabet
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), serde_json::json!(i)))
            .collect();
        let tokenizer = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "normalizer": null, "post_processor": null,
            "added_tokens": [{"id": 256, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab_json, "merges": []}
        });
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), serde_json::json!({"eos_token": "</s>", "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"}).to_string()).unwrap();
    }
}
