//! Loading weights into the engine's layout — int8 blocks for every matrix, f32 norms — from a
//! GGUF file, a Hugging Face directory (config.json + safetensors), or random weights of a named
//! shape (`dummy`). candle reads and dequantizes the files; the engine owns the layout.

use super::error::{EngineError, Result};
use super::kernels::{BLOCK, Linear, Q8Matrix, Q8Panels, Q41Matrix, Rope, RopeStyle};
use super::model::{Layer, Llama, LlamaConfig};
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
struct RawTensor {
    name: String,
    dtype: GgmlDType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    /// The tensor as read, for dequantizing without reading it again.
    tensor: candle_core::quantized::QTensor,
}

impl RawTensor {
    fn dequantize(&self) -> Result<Vec<f32>> {
        let t = self
            .tensor
            .dequantize(&Device::Cpu)
            .map_err(unsupported(&self.name))?;
        Ok(to_vec(&self.name, &t)?.0)
    }
}

/// Reads named f32 tensors, whatever their stored type.
trait TensorReader {
    fn read(&mut self, name: &str) -> Result<(Vec<f32>, Vec<usize>)>;
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
    fn tensor(&mut self, name: &str) -> Result<candle_core::quantized::QTensor> {
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
    fn read(&mut self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self
            .tensor(name)?
            .dequantize(&Device::Cpu)
            .map_err(unsupported(name))?;
        to_vec(name, &t)
    }
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }
    fn read_raw(&mut self, name: &str) -> Result<Option<RawTensor>> {
        let q = self.tensor(name)?;
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
    fn read(&mut self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        if !self.has(name) {
            return Err(EngineError::MissingTensor(name.to_owned()));
        }
        let t = self
            .tensors
            .load(name, &Device::Cpu)
            .map_err(unsupported(name))?;
        to_vec(name, &t)
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
    layer: fn(usize, &str) -> String,
}

const GGUF_NAMES: Names = Names {
    embed: "token_embd.weight",
    norm: "output_norm.weight",
    lm_head: "output.weight",
    layer: |i, part| {
        let name = match part {
            "attn_norm" => "attn_norm",
            "q" => "attn_q",
            "k" => "attn_k",
            "v" => "attn_v",
            "o" => "attn_output",
            "ffn_norm" => "ffn_norm",
            "gate" => "ffn_gate",
            "up" => "ffn_up",
            _ => "ffn_down",
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
            "attn_norm" => "input_layernorm",
            "q" => "self_attn.q_proj",
            "k" => "self_attn.k_proj",
            "v" => "self_attn.v_proj",
            "o" => "self_attn.o_proj",
            "ffn_norm" => "post_attention_layernorm",
            "gate" => "mlp.gate_proj",
            "up" => "mlp.up_proj",
            _ => "mlp.down_proj",
        };
        format!("model.layers.{i}.{name}.weight")
    },
};

/// Loads a model and, for files that carry one, what the tokenizer needs.
pub fn load(source: &ModelSource) -> Result<(Llama, Option<gguf_file::Content>)> {
    match source {
        ModelSource::Gguf(path) => {
            let mut file = File::open(path).map_err(|source| EngineError::Io {
                path: path.clone(),
                source,
            })?;
            let content = read_content(path, &mut file)?;
            let config = gguf_config(path, &content)?;
            let mut reader = GgufReader {
                path: path.clone(),
                file,
                content,
            };
            let model = build(config, &mut reader, &GGUF_NAMES)?;
            Ok((model, Some(reader.content)))
        }
        ModelSource::HuggingFace(dir) => {
            let config = hf_config(dir)?;
            let files = safetensors_files(dir)?;
            // SAFETY of the mapping is candle's concern; files are opened read-only.
            let tensors = load_safetensors(&files)?;
            let names = tensors.tensors().into_iter().map(|(n, _)| n).collect();
            let mut reader = SafetensorsReader { tensors, names };
            Ok((build(config, &mut reader, &HF_NAMES)?, None))
        }
        ModelSource::Dummy(shape) => Ok((dummy(shape)?, None)),
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
        rope_theta: v["rope_theta"].as_f64().unwrap_or(10_000.0) as f32,
        rope_style: RopeStyle::HalfSplit,
        context_length: int("max_position_embeddings").unwrap_or(4096),
    })
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

fn matrix(reader: &mut dyn TensorReader, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
    let (data, shape) = reader.read(name)?;
    if shape != [rows, cols] {
        return Err(EngineError::ShapeMismatch {
            tensor: name.to_owned(),
            expected: vec![rows, cols],
            found: shape,
        });
    }
    Ok(data)
}

/// The matrices `parts` (name, rows) stacked by rows into one weight matrix of `cols` columns,
/// kept in their file's Q4_1 or Q8_0 blocks when they all share one, else requantized to Q8_0.
fn linear(reader: &mut dyn TensorReader, parts: &[(String, usize)], cols: usize) -> Result<Linear> {
    let rows: usize = parts.iter().map(|(_, r)| r).sum();
    let mut raws = Vec::with_capacity(parts.len());
    for (name, r) in parts {
        match reader.read_raw(name)? {
            Some(raw) if raw.shape == [*r, cols] => raws.push(raw),
            Some(raw) => {
                return Err(EngineError::ShapeMismatch {
                    tensor: name.clone(),
                    expected: vec![*r, cols],
                    found: raw.shape,
                });
            }
            None => break,
        }
    }
    if raws.len() == parts.len() {
        let bytes: Vec<u8> = raws.iter().flat_map(|r| r.bytes.iter().copied()).collect();
        if raws.iter().all(|r| r.dtype == GgmlDType::Q4_1) {
            if let Some(m) = Q41Matrix::from_ggml(&bytes, rows, cols) {
                return Ok(Linear::Q41(m));
            }
        } else if raws.iter().all(|r| r.dtype == GgmlDType::Q8_0)
            && let Some(m) = Q8Matrix::from_ggml(&bytes, rows, cols)
        {
            return Ok(Linear::Q8(Q8Panels::from_matrix(&m)));
        }
    }
    let mut data = Vec::with_capacity(rows * cols);
    if raws.len() == parts.len() {
        // Already read: dequantize what is in hand.
        for raw in &raws {
            data.extend(raw.dequantize()?);
        }
    } else {
        for (name, r) in parts {
            data.extend(matrix(reader, name, *r, cols)?);
        }
    }
    Ok(Linear::Q8(Q8Panels::from_matrix(&Q8Matrix::quantize(
        &data, rows, cols,
    ))))
}

/// A Q8_0 matrix: the file's own blocks when it has Q8_0, else requantized.
fn q8_matrix(
    reader: &mut dyn TensorReader,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Q8Panels> {
    match linear(reader, &[(name.to_owned(), rows)], cols)? {
        Linear::Q8(m) => Ok(m),
        Linear::Q41(_) => Ok(Q8Panels::from_matrix(&Q8Matrix::quantize(
            &matrix(reader, name, rows, cols)?,
            rows,
            cols,
        ))),
    }
}

fn vector(reader: &mut dyn TensorReader, name: &str, len: usize) -> Result<Vec<f32>> {
    let (data, shape) = reader.read(name)?;
    if shape != [len] {
        return Err(EngineError::ShapeMismatch {
            tensor: name.to_owned(),
            expected: vec![len],
            found: shape,
        });
    }
    Ok(data)
}

fn check_blocks(c: &LlamaConfig) -> Result<()> {
    for (what, n) in [
        ("hidden size", c.hidden_size),
        ("intermediate size", c.intermediate_size),
        ("heads × head dim", c.heads * c.head_dim),
    ] {
        if n % BLOCK != 0 {
            return Err(EngineError::UnsupportedTensor {
                tensor: what.into(),
                reason: format!("{n} is not a multiple of {BLOCK}"),
            });
        }
    }
    if !c.heads.is_multiple_of(c.kv_heads) {
        return Err(EngineError::MissingConfig(format!(
            "a head count ({}) divisible by the KV head count ({})",
            c.heads, c.kv_heads
        )));
    }
    Ok(())
}

fn build(config: LlamaConfig, reader: &mut dyn TensorReader, names: &Names) -> Result<Llama> {
    check_blocks(&config)?;
    let c = &config;
    let (h, hd) = (c.hidden_size, c.head_dim);
    let embed = Arc::new(q8_matrix(reader, names.embed, c.vocab_size, h)?);
    let lm_head = if reader.has(names.lm_head) {
        Arc::new(q8_matrix(reader, names.lm_head, c.vocab_size, h)?)
    } else {
        embed.clone()
    };
    let mut layers = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        // Progress in tenths, so a large model shows it is moving and a small one stays quiet.
        if i > 0 && (i * 10 / c.layers) != ((i - 1) * 10 / c.layers) {
            tracing::info!(layer = i, layers = c.layers, "loading weights");
        }
        let name = |part| (names.layer)(i, part);
        layers.push(Layer {
            attn_norm: vector(reader, &name("attn_norm"), h)?,
            qkv: linear(
                reader,
                &[
                    (name("q"), c.heads * hd),
                    (name("k"), c.kv_heads * hd),
                    (name("v"), c.kv_heads * hd),
                ],
                h,
            )?,
            out: linear(reader, &[(name("o"), h)], c.heads * hd)?,
            ffn_norm: vector(reader, &name("ffn_norm"), h)?,
            gate_up: linear(
                reader,
                &[
                    (name("gate"), c.intermediate_size),
                    (name("up"), c.intermediate_size),
                ],
                h,
            )?,
            down: linear(reader, &[(name("down"), h)], c.intermediate_size)?,
        });
    }
    let norm = vector(reader, names.norm, h)?;
    let rope = Rope::new(c.rope_style, hd, c.context_length, c.rope_theta);
    Ok(Llama {
        config,
        embed,
        layers,
        norm,
        lm_head,
        rope,
    })
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
        context_length: 8192,
    })
}

/// Random int8 weights with small scales, generated straight into the engine's layout.
fn dummy(shape: &str) -> Result<Llama> {
    let config = dummy_config(shape)?;
    let c = &config;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |rows: usize, cols: usize| {
        let mut quants = vec![0i8; rows * cols];
        for q in quants.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *q = (seed >> 56) as i8;
        }
        let scale = 0.5 / (127.0 * (cols as f32).sqrt());
        Q8Panels::from_matrix(&Q8Matrix {
            rows,
            cols,
            quants,
            scales: vec![scale; rows * cols / BLOCK],
            sums: Vec::new(),
        })
    };
    let hd = c.head_dim;
    let embed = Arc::new(random(c.vocab_size, c.hidden_size));
    let layers = (0..c.layers)
        .map(|_| Layer {
            attn_norm: vec![1.0; c.hidden_size],
            qkv: Linear::Q8(random((c.heads + 2 * c.kv_heads) * hd, c.hidden_size)),
            out: Linear::Q8(random(c.hidden_size, c.heads * hd)),
            ffn_norm: vec![1.0; c.hidden_size],
            gate_up: Linear::Q8(random(2 * c.intermediate_size, c.hidden_size)),
            down: Linear::Q8(random(c.hidden_size, c.intermediate_size)),
        })
        .collect();
    let rope = Rope::new(c.rope_style, hd, c.context_length, c.rope_theta);
    Ok(Llama {
        norm: vec![1.0; c.hidden_size],
        lm_head: embed.clone(),
        embed,
        layers,
        rope,
        config,
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
