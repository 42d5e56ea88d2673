//! Text ↔ tokens and chat prompts. The tokenizer comes from GGUF metadata (byte-level BPE from
//! `tokenizer.ggml.tokens` and `.merges`) or a `tokenizer.json`, through the `tokenizers` crate;
//! the chat template is the model's own Jinja template, rendered with minijinja.

use crate::engine::error::{EngineError, Result};
use candle_core::quantized::gguf_file::Content;
use serde::Serialize;
use serde_json::json;
use std::path::Path;

/// A chat message.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The model's tokenizer, its special tokens and its chat template.
#[derive(Debug)]
pub struct TextCodec {
    tokenizer: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    add_bos: bool,
    template: Option<String>,
}

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

impl TextCodec {
    /// From a GGUF file's metadata.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = &content.metadata;
        let string = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
        let model = string("tokenizer.ggml.model").unwrap_or_default();
        if model != "gpt2" {
            return Err(EngineError::Tokenizer(format!(
                "tokenizer.ggml.model {model:?} is not supported (byte-level BPE, \"gpt2\", is); point --model at a directory with tokenizer.json instead"
            )));
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            let values = md
                .get(k)
                .ok_or_else(|| EngineError::Tokenizer(format!("the GGUF has no {k}")))?
                .to_vec()
                .map_err(tok_err)?;
            values
                .iter()
                .map(|v| v.to_string().cloned().map_err(tok_err))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i32> = md
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|t| t.to_i32().unwrap_or(1)).collect())
            .unwrap_or_default();
        let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let pre = string("tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
        let pre_tokenizer = match pre.as_str() {
            // Digits one by one, then byte-level without a prefix space: ids equal llama.cpp's.
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]}),
            "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
            "default" | "gpt2" | "gpt-2" => {
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
            }
            other => {
                return Err(EngineError::Tokenizer(format!(
                    "pre-tokenizer tokenizer.ggml.pre = {other:?} is not supported (smollm, llama-bpe, gpt2 are)"
                )));
            }
        };
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        // Control (3) and user-defined (4) tokens are matched whole, before BPE.
        let added: Vec<serde_json::Value> = tokens.iter().enumerate().filter(|(i, _)| matches!(types.get(*i), Some(3 | 4))).map(|(i, t)| json!({
            "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": types[i] == 3
        })).collect();
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": pre_tokenizer, "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        let tokenizer =
            tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&spec).map_err(tok_err)?)
                .map_err(tok_err)?;
        let eos = id("tokenizer.ggml.eos_token_id")
            .into_iter()
            .chain(id("tokenizer.ggml.eot_token_id"))
            .collect();
        Ok(Self {
            tokenizer,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos,
            add_bos: md
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false),
            template: string("tokenizer.chat_template"),
        })
    }

    /// From a Hugging Face directory: tokenizer.json and tokenizer_config.json.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tokenizer =
            tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
                EngineError::Tokenizer(format!("{}: {e}", dir.join("tokenizer.json").display()))
            })?;
        let config: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let token_id = |key: &str| {
            let token = match &config[key] {
                serde_json::Value::String(s) => Some(s.clone()),
                v => v["content"].as_str().map(str::to_owned),
            };
            token.and_then(|t| tokenizer.token_to_id(&t))
        };
        let generation: serde_json::Value =
            std::fs::read_to_string(dir.join("generation_config.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
        let mut eos: Vec<u32> = token_id("eos_token").into_iter().collect();
        match &generation["eos_token_id"] {
            serde_json::Value::Number(n) => eos.extend(n.as_u64().map(|n| n as u32)),
            serde_json::Value::Array(ids) => {
                eos.extend(ids.iter().filter_map(|n| n.as_u64()).map(|n| n as u32))
            }
            _ => {}
        }
        eos.dedup();
        Ok(Self {
            bos: token_id("bos_token"),
            eos,
            add_bos: config["add_bos_token"].as_bool().unwrap_or(false),
            template: config["chat_template"].as_str().map(str::to_owned),
            tokenizer,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Token ids of `text`; special tokens written in the text are recognised, BOS is added
    /// when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Token ids of `text`, with the special tokens the model adds (its BOS, where it asks for
    /// one) only if `add_special_tokens`; special tokens written in the text are recognised
    /// either way (as Hugging Face tokenizers, and so vLLM, do).
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if self.add_bos && add_special_tokens {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, true)
    }

    /// Text of `ids`, special tokens left out if `skip_special_tokens`.
    pub fn decode_with(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(tok_err)
    }

    /// The text of one token, special tokens included (a piece of a multi-byte character shows
    /// as U+FFFD).
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders the model's chat template with a generation prompt.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<String> {
        let template = self
            .template
            .as_deref()
            .ok_or_else(|| EngineError::Template("the model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| EngineError::Template(e.to_string()))?;
        let token = |id: Option<u32>| {
            id.and_then(|id| self.tokenizer.id_to_token(id))
                .unwrap_or_default()
        };
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => token(self.bos),
            eos_token => token(self.eos.first().copied()),
        };
        env.get_template("chat")
            .and_then(|t| t.render(context))
            .map_err(|e| EngineError::Template(e.to_string()))
    }
}

/// Turns a growing list of ids into text pieces, holding back bytes of an incomplete UTF-8
/// character (the approach of TGI and vLLM: decode a window and emit what it adds).
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    prefix: usize,
    read: usize,
}

impl IncrementalDecoder {
    /// New text since the last call, given every id generated so far.
    pub fn step(&mut self, codec: &TextCodec, ids: &[u32], skip_special: bool) -> Result<String> {
        let before = codec.decode_with(&ids[self.prefix..self.read], skip_special)?;
        let after = codec.decode_with(&ids[self.prefix..], skip_special)?;
        if after.len() > before.len() && !after.ends_with('\u{fffd}') {
            let text = after[before.len()..].to_owned();
            self.prefix = self.read;
            self.read = ids.len();
            Ok(text)
        } else {
            Ok(String::new())
        }
    }
}
