//! Model files: a GGUF file, a Hugging Face directory (config.json and safetensors, sharded with an
//! index or not), or random weights of a named shape (`dummy`). This reads configurations and
//! tensors (candle parses and dequantizes the files); each backend lays the weights out its own
//! way.

use super::{LlamaConfig, RopeScaling, RopeStyle};
use crate::engine::error::{EngineError, Result};
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Gguf(PathBuf),
    HuggingFace(PathBuf),
    Dummy(String),
}

impl ModelSource {
    /// `dummy:<shape>`, a `.gguf` file, or a directory with config.json.
    pub fn parse(text: &str) -> Result<Self> {
        if let Some(shape) = text.strip_prefix("dummy:") {
            return Ok(Self::Dummy(shape.to_owned()));
        }
        let path = PathBuf::from(text);
        if path.is_dir() {
            return Ok(Self::HuggingFace(path));
        }
        if !path.exists() {
            return Err(EngineError::Io {
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            });
        }
        Ok(Self::Gguf(path))
    }
}

/// A tensor as stored: GGML type, shape (rows first) and bytes.
#[derive(Debug)]
pub struct RawTensor {
    pub name: String,
    pub dtype: GgmlDType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
    /// The tensor as read, for dequantizing without reading it again.
    tensor: candle_core::quantized::QTensor,
}

impl RawTensor {
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        let t = self
            .tensor
            .dequantize(&Device::Cpu)
            .map_err(unsupported(&self.name))?;
        Ok(to_vec(&self.name, &t)?.0)
    }
}

/// Reads named tensors, whatever their stored type.
trait TensorReader {
    /// The tensor on the CPU, in its stored type (dequantized to f32 if quantized).
    fn tensor(&mut self, name: &str) -> Result<Tensor>;
    fn read(&mut self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        to_vec(name, &self.tensor(name)?)
    }
    fn has(&self, name: &str) -> bool;
    /// The stored bytes, where the format has quantized tensors.
    fn read_raw(&mut self, _name: &str) -> Result<Option<RawTensor>> {
        Ok(None)
    }
}

struct GgufReader {
    path: PathBuf,
    file: File,
    content: gguf_file::Content,
}

impl GgufReader {
    /// The tensor as stored, read from the file.
    fn qtensor(&mut self, name: &str) -> Result<candle_core::quantized::QTensor> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(EngineError::MissingTensor(name.to_owned()));
        }
        self.content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| EngineError::InvalidGguf {
                path: self.path.clone(),
                reason: format!("tensor {name}: {e}"),
            })
    }
}

fn unsupported(name: &str) -> impl Fn(candle_core::Error) -> EngineError + '_ {
    move |e| EngineError::UnsupportedTensor {
        tensor: name.to_owned(),
        reason: e.to_string(),
    }
}

impl TensorReader for GgufReader {
    fn tensor(&mut self, name: &str) -> Result<Tensor> {
        self.qtensor(name)?
            .dequantize(&Device::Cpu)
            .map_err(unsupported(name))
    }
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }
    fn read_raw(&mut self, name: &str) -> Result<Option<RawTensor>> {
        let q = self.qtensor(name)?;
        let bytes = q.data().map_err(unsupported(name))?.into_owned();
        Ok(Some(RawTensor {
            name: name.to_owned(),
            dtype: q.dtype(),
            shape: q.shape().dims().to_vec(),
            bytes,
            tensor: q,
        }))
    }
}

struct SafetensorsReader {
    tensors: candle_core::safetensors::MmapedSafetensors,
    names: std::collections::HashSet<String>,
}

impl TensorReader for SafetensorsReader {
    fn tensor(&mut self, name: &str) -> Result<Tensor> {
        if !self.has(name) {
            return Err(EngineError::MissingTensor(name.to_owned()));
        }
        self.tensors
            .load(name, &Device::Cpu)
            .map_err(unsupported(name))
    }
    fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}

fn to_vec(name: &str, t: &Tensor) -> Result<(Vec<f32>, Vec<usize>)> {
    let err = unsupported(name);
    let shape = t.dims().to_vec();
    let data = t
        .to_dtype(DType::F32)
        .map_err(&err)?
        .flatten_all()
        .map_err(&err)?
        .to_vec1::<f32>()
        .map_err(&err)?;
    Ok((data, shape))
}

/// Tensor names of one architecture's files.
struct Names {
    embed: &'static str,
    norm: &'static str,
    lm_head: &'static str,
    layer: fn(usize, LayerWeight) -> String,
}

const GGUF_NAMES: Names = Names {
    embed: "token_embd.weight",
    norm: "output_norm.weight",
    lm_head: "output.weight",
    layer: |i, part| {
        let name = match part {
            LayerWeight::AttnNorm => "attn_norm",
            LayerWeight::Q => "attn_q",
            LayerWeight::K => "attn_k",
            LayerWeight::V => "attn_v",
            LayerWeight::O => "attn_output",
            LayerWeight::FfnNorm => "ffn_norm",
            LayerWeight::Gate => "ffn_gate",
            LayerWeight::Up => "ffn_up",
            LayerWeight::Down => "ffn_down",
        };
        format!("blk.{i}.{name}.weight")
    },
};

const HF_NAMES: Names = Names {
    embed: "model.embed_tokens.weight",
    norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    layer: |i, part| {
        let name = match part {
            LayerWeight::AttnNorm => "input_layernorm",
            LayerWeight::Q => "self_attn.q_proj",
            LayerWeight::K => "self_attn.k_proj",
            LayerWeight::V => "self_attn.v_proj",
            LayerWeight::O => "self_attn.o_proj",
            LayerWeight::FfnNorm => "post_attention_layernorm",
            LayerWeight::Gate => "mlp.gate_proj",
            LayerWeight::Up => "mlp.up_proj",
            LayerWeight::Down => "mlp.down_proj",
        };
        format!("model.layers.{i}.{name}.weight")
    },
};

/// GGUF's per-frequency rotary factors (Llama 3.1).
const ROPE_FREQS: &str = "rope_freqs.weight";

/// A model's files, opened: its configuration, and its tensors to read by [`Weight`].
pub struct ModelFiles {
    pub source: ModelSource,
    pub config: LlamaConfig,
    tensors: Tensors,
}

enum Tensors {
    Gguf(GgufReader),
    Safetensors(SafetensorsReader),
    /// Random weights of a named shape: each backend makes its own.
    Dummy,
}

impl std::fmt::Debug for ModelFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFiles")
            .field("source", &self.source)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A weight of a Llama model, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weight {
    Embed,
    /// The final norm.
    Norm,
    /// The output head (absent when it is tied to the embedding).
    LmHead,
    Layer(usize, LayerWeight),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerWeight {
    AttnNorm,
    Q,
    K,
    V,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

impl ModelFiles {
    /// Opens `source`: reads its configuration (GGUF metadata or config.json) and indexes its
    /// tensors; weights are read when a backend asks for them.
    pub fn open(source: &ModelSource) -> Result<Self> {
        let (config, tensors) = match source {
            ModelSource::Gguf(path) => {
                let mut file = File::open(path).map_err(|source| EngineError::Io {
                    path: path.clone(),
                    source,
                })?;
                let content = read_content(path, &mut file)?;
                let mut config = gguf_config(path, &content)?;
                let mut reader = GgufReader {
                    path: path.clone(),
                    file,
                    content,
                };
                if reader.has(ROPE_FREQS) {
                    let (factors, _) = reader.read(ROPE_FREQS)?;
                    if factors.len() != config.head_dim / 2 {
                        return Err(EngineError::ShapeMismatch {
                            tensor: ROPE_FREQS.into(),
                            expected: vec![config.head_dim / 2],
                            found: vec![factors.len()],
                        });
                    }
                    config.rope_scaling = Some(RopeScaling::Factors(factors));
                }
                (config, Tensors::Gguf(reader))
            }
            ModelSource::HuggingFace(dir) => {
                let config = hf_config(dir)?;
                let files = safetensors_files(dir)?;
                let tensors = load_safetensors(&files)?;
                let names = tensors.tensors().into_iter().map(|(n, _)| n).collect();
                (
                    config,
                    Tensors::Safetensors(SafetensorsReader { tensors, names }),
                )
            }
            ModelSource::Dummy(shape) => (dummy_config(shape)?, Tensors::Dummy),
        };
        Ok(Self {
            source: source.clone(),
            config,
            tensors,
        })
    }

    /// Whether the weights are random (`dummy:<shape>`): backends generate them.
    pub fn is_dummy(&self) -> bool {
        matches!(self.tensors, Tensors::Dummy)
    }

    /// The GGUF header, for a GGUF file (its tokenizer lives there).
    pub fn gguf(&self) -> Option<&gguf_file::Content> {
        match &self.tensors {
            Tensors::Gguf(g) => Some(&g.content),
            _ => None,
        }
    }

    /// The file's name of a weight.
    pub fn name(&self, weight: Weight) -> String {
        let names = match self.tensors {
            Tensors::Safetensors(_) => &HF_NAMES,
            _ => &GGUF_NAMES,
        };
        match weight {
            Weight::Embed => names.embed.to_owned(),
            Weight::Norm => names.norm.to_owned(),
            Weight::LmHead => names.lm_head.to_owned(),
            Weight::Layer(i, part) => (names.layer)(i, part),
        }
    }

    pub fn has(&self, weight: Weight) -> bool {
        let name = self.name(weight);
        self.reader_ref().is_some_and(|r| r.has(&name))
    }

    fn reader_ref(&self) -> Option<&dyn TensorReader> {
        match &self.tensors {
            Tensors::Gguf(g) => Some(g),
            Tensors::Safetensors(s) => Some(s),
            Tensors::Dummy => None,
        }
    }

    fn reader(&mut self) -> Result<&mut dyn TensorReader> {
        match &mut self.tensors {
            Tensors::Gguf(g) => Ok(g),
            Tensors::Safetensors(s) => Ok(s),
            Tensors::Dummy => Err(EngineError::MissingTensor(
                "any: a dummy model has no files".into(),
            )),
        }
    }

    /// A weight as f32 values and its shape (rows first), dequantized if stored quantized.
    pub fn read(&mut self, weight: Weight) -> Result<(Vec<f32>, Vec<usize>)> {
        let name = self.name(weight);
        self.reader()?.read(&name)
    }

    /// A weight as stored, where the format keeps quantized blocks (GGUF).
    pub fn read_raw(&mut self, weight: Weight) -> Result<Option<RawTensor>> {
        let name = self.name(weight);
        self.reader()?.read_raw(&name)
    }

    /// Part of a weight, checked against its whole `shape`: `len` rows (dimension 0) or columns
    /// (dimension 1) from `start`, as a candle tensor of `dtype` on `device` (a tensor-parallel
    /// rank's slice; only the part reaches the device).
    #[allow(clippy::too_many_arguments)]
    pub fn tensor_part(
        &mut self,
        weight: Weight,
        shape: &[usize],
        dim: usize,
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let whole = self.tensor(weight, shape, DType::F32, &Device::Cpu)?;
        if start == 0 && len == shape[dim] {
            return whole
                .to_dtype(dtype)
                .and_then(|t| t.to_device(device))
                .map_err(unsupported(&self.name(weight)));
        }
        let name = self.name(weight);
        let err = unsupported(&name);
        whole
            .narrow(dim, start, len)
            .and_then(|t| t.contiguous())
            .and_then(|t| t.to_dtype(dtype))
            .and_then(|t| t.to_device(device))
            .map_err(err)
    }

    /// A weight as a candle tensor of `dtype` on `device`, checked against `shape`.
    pub fn tensor(
        &mut self,
        weight: Weight,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let name = self.name(weight);
        let err = unsupported(&name);
        let t = self.reader()?.tensor(&name)?;
        if t.dims() != shape {
            return Err(EngineError::ShapeMismatch {
                tensor: name.clone(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        t.to_dtype(dtype)
            .map_err(&err)?
            .to_device(device)
            .map_err(&err)
    }
}

#[allow(unsafe_code)]
fn load_safetensors(files: &[PathBuf]) -> Result<candle_core::safetensors::MmapedSafetensors> {
    // SAFETY: the files are memory-mapped read-only; like every loader of mapped weights, this
    // assumes nobody truncates them while the model loads. Tensors are copied out immediately.
    unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }.map_err(|e| {
        EngineError::InvalidGguf {
            path: files[0].clone(),
            reason: e.to_string(),
        }
    })
}

fn gguf_config(path: &Path, content: &gguf_file::Content) -> Result<LlamaConfig> {
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if arch != "llama" {
        return Err(EngineError::UnsupportedArchitecture {
            path: path.to_owned(),
            architecture: arch,
        });
    }
    let get = |key: &str| {
        md.get(&format!("llama.{key}"))
            .ok_or_else(|| EngineError::MissingConfig(format!("llama.{key}")))
    };
    let int = |key: &str| -> Result<usize> {
        Ok(get(key)?
            .to_u32()
            .map_err(|_| EngineError::MissingConfig(format!("llama.{key} as an integer")))?
            as usize)
    };
    let float = |key: &str| -> Result<f32> {
        get(key)?
            .to_f32()
            .map_err(|_| EngineError::MissingConfig(format!("llama.{key} as a float")))
    };
    let hidden = int("embedding_length")?;
    let heads = int("attention.head_count")?;
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .ok_or_else(|| EngineError::MissingTensor("token_embd.weight".into()))?;
    Ok(LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: int("feed_forward_length")?,
        layers: int("block_count")?,
        heads,
        kv_heads: int("attention.head_count_kv").unwrap_or(heads),
        head_dim: int("rope.dimension_count").unwrap_or(hidden / heads),
        rms_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
        rope_style: RopeStyle::Interleaved,
        // Llama 3.1 files carry per-frequency factors as a tensor, read when the file opens.
        rope_scaling: None,
        context_length: int("context_length").unwrap_or(4096),
    })
}

fn hf_config(dir: &Path) -> Result<LlamaConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
        path: path.clone(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| EngineError::MissingConfig(format!("valid config.json ({e})")))?;
    let arch = v["model_type"].as_str().unwrap_or_default();
    if !matches!(arch, "llama" | "mistral") {
        return Err(EngineError::UnsupportedArchitecture {
            path,
            architecture: arch.to_owned(),
        });
    }
    let int = |key: &str| {
        v[key]
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| EngineError::MissingConfig(key.to_owned()))
    };
    let hidden = int("hidden_size")?;
    let heads = int("num_attention_heads")?;
    Ok(LlamaConfig {
        vocab_size: int("vocab_size")?,
        hidden_size: hidden,
        intermediate_size: int("intermediate_size")?,
        layers: int("num_hidden_layers")?,
        heads,
        kv_heads: int("num_key_value_heads").unwrap_or(heads),
        head_dim: int("head_dim").unwrap_or(hidden / heads),
        rms_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32,
        // transformers 5 writes `rope_parameters` (theta and scaling together); earlier versions
        // `rope_theta` and `rope_scaling`.
        rope_theta: v["rope_theta"]
            .as_f64()
            .or(v["rope_parameters"]["rope_theta"].as_f64())
            .unwrap_or(10_000.0) as f32,
        rope_style: RopeStyle::HalfSplit,
        rope_scaling: hf_rope_scaling(if v["rope_parameters"].is_object() {
            &v["rope_parameters"]
        } else {
            &v["rope_scaling"]
        })?,
        context_length: hf_context_length(&v),
    })
}

/// Positions served: `max_position_embeddings`, or the `sliding_window` where it is shorter
/// (Mistral 7B v0.1: 4,096 of 32,768). Attention here reads every cached position, so past the
/// window it would attend where the model never does; a longer request is refused as too long
/// instead (what vLLM does where its attention has no window).
fn hf_context_length(v: &serde_json::Value) -> usize {
    let max = v["max_position_embeddings"]
        .as_u64()
        .map_or(4096, |n| n as usize);
    let window = v["sliding_window"].as_u64().map(|n| n as usize);
    match window {
        Some(window) if window < max && v["use_sliding_window"].as_bool() != Some(false) => {
            tracing::warn!(
                sliding_window = window,
                max_position_embeddings = max,
                "the model attends over a sliding window, which this engine does not: serving \
                 {window} positions, not {max}"
            );
            window
        }
        _ => max,
    }
}

/// config.json's `rope_scaling`: absent or null, or of type `llama3`; any other type is refused
/// by name rather than ignored.
fn hf_rope_scaling(v: &serde_json::Value) -> Result<Option<RopeScaling>> {
    if v.is_null() {
        return Ok(None);
    }
    let kind = v["rope_type"].as_str().or(v["type"].as_str()).unwrap_or("");
    if kind == "default" || (kind.is_empty() && v["factor"].is_null()) {
        return Ok(None);
    }
    if kind != "llama3" {
        return Err(EngineError::Unsupported(format!(
            "rope_scaling of type {kind:?} (supported: llama3)"
        )));
    }
    let number = |key: &str| {
        v[key]
            .as_f64()
            .ok_or_else(|| EngineError::MissingConfig(format!("rope_scaling.{key}")))
    };
    Ok(Some(RopeScaling::Llama3 {
        factor: number("factor")? as f32,
        low_freq_factor: number("low_freq_factor")? as f32,
        high_freq_factor: number("high_freq_factor")? as f32,
        original_max_position_embeddings: number("original_max_position_embeddings")? as usize,
    }))
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|source| EngineError::Io {
            path: index.clone(),
            source,
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            EngineError::MissingConfig(format!("valid model.safetensors.index.json ({e})"))
        })?;
        let mut files: Vec<PathBuf> = v["weight_map"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, f)| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        Ok(vec![single])
    } else {
        Err(EngineError::MissingConfig(
            "model.safetensors or model.safetensors.index.json".into(),
        ))
    }
}

/// Shapes of the `dummy` load format.
pub fn dummy_config(shape: &str) -> Result<LlamaConfig> {
    let (vocab, hidden, ffn, layers, heads, kv_heads, theta) = match shape {
        "smollm2-135m" => (49152, 576, 1536, 30, 9, 3, 100_000.0),
        "llama-3.2-1b" => (128_256, 2048, 8192, 16, 32, 8, 500_000.0),
        "llama-3.1-8b" => (128_256, 4096, 14336, 32, 32, 8, 500_000.0),
        other => return Err(EngineError::UnknownShape(other.to_owned())),
    };
    Ok(LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: ffn,
        layers,
        heads,
        kv_heads,
        head_dim: hidden / heads,
        rms_eps: 1e-5,
        rope_theta: theta,
        rope_style: RopeStyle::HalfSplit,
        rope_scaling: None,
        context_length: 8192,
    })
}

/// Reads a GGUF file's header: metadata and tensor index, no weights.
pub fn read_gguf(path: &Path) -> Result<gguf_file::Content> {
    let mut file = File::open(path).map_err(|source| EngineError::Io {
        path: path.to_owned(),
        source,
    })?;
    read_content(path, &mut file)
}

fn read_content(path: &Path, file: &mut File) -> Result<gguf_file::Content> {
    gguf_file::Content::read(file).map_err(|e| EngineError::InvalidGguf {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}
