//! The int8 backend: the CPU engine's own kernels. Weights stay in int8 blocks (Q4_1 or Q8_0),
//! activations are quantized to int8 per 32-value block, and keys and values are cached in f32
//! or, with `--kv-cache-dtype int8`, in int8 with a scale per token and head.
//! Each output is one weight row against one activation row in a fixed order, so a sequence's
//! tokens do not depend on its batch.

pub mod kernels;
mod kv;
mod load;
mod model;

use super::{Executor, KvCacheType, RowOutput, SeqInput, StepOutput, argmax};
use crate::engine::error::{EngineError, Result};
use crate::engine::model::LlamaConfig;
use crate::engine::model::loader::ModelFiles;
use crate::engine::sampling::draw_token;
use kv::KvStore;
use model::{Llama, Workspace};

/// The int8 model, its KV memory and its buffers.
#[derive(Debug)]
pub struct Int8Executor {
    model: Llama,
    kv: Option<KvStore>,
    kv_type: KvCacheType,
    workspace: Workspace,
}

impl Int8Executor {
    pub fn load(files: &mut ModelFiles, kv_type: KvCacheType) -> Result<Self> {
        Ok(Self {
            model: load::build(files)?,
            kv: None,
            kv_type,
            workspace: Workspace::default(),
        })
    }
}

impl Executor for Int8Executor {
    fn config(&self) -> &LlamaConfig {
        &self.model.config
    }

    fn describe(&self) -> String {
        "int8 on cpu".into()
    }

    fn kv_dtype(&self) -> &'static str {
        match self.kv_type {
            KvCacheType::Auto => "float32",
            KvCacheType::Int8 => "int8",
        }
    }

    fn weight_bytes(&self) -> usize {
        self.model.weight_bytes()
    }

    fn kv_block_bytes(&self, block_size: usize) -> usize {
        let c = &self.model.config;
        KvStore::bytes_per_block(c.layers, block_size, c.kv_width(), c.head_dim, self.kv_type)
    }

    fn available_memory(&self) -> usize {
        available_memory()
    }

    fn allocate_kv(&mut self, blocks: usize, block_size: usize) -> Result<()> {
        let c = &self.model.config;
        self.kv = Some(KvStore::new(
            c.layers,
            blocks,
            block_size,
            c.kv_width(),
            c.head_dim,
            self.kv_type,
        ));
        Ok(())
    }

    fn execute(&mut self, batch: &[SeqInput<'_>]) -> Result<StepOutput> {
        let kv = self.kv.as_mut().ok_or_else(|| EngineError::Backend {
            backend: "int8",
            reason: "a step before the KV cache was allocated".into(),
        })?;
        let rows = self.model.forward(batch, kv, &mut self.workspace);
        let vocab = self.model.config.vocab_size;
        let wanted = batch.iter().filter(|s| s.output != RowOutput::None);
        if wanted.clone().all(|s| s.output == RowOutput::Logits) {
            return Ok(StepOutput {
                logits: rows,
                ..StepOutput::default()
            });
        }
        let mut out = StepOutput::default();
        for (seq, row) in wanted.zip(rows.chunks_exact(vocab)) {
            match seq.output {
                RowOutput::Logits => out.logits.extend_from_slice(row),
                RowOutput::Sample(draw) => out.argmax.push(draw_token(row, &draw)),
                _ => out.argmax.push(argmax(row)),
            }
        }
        Ok(out)
    }
}

/// `MemAvailable` from /proc/meminfo, or 1 GiB where it cannot be read.
pub fn available_memory() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        })
        .map_or(1 << 30, |kib| kib * 1024)
}
