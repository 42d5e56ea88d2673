//! Decode steps replayed from CUDA graphs (`--cuda-graphs`): a step of single-token rows costs the
//! host one launch of a captured graph instead of ~15 kernel launches a layer. The first step of
//! each shape (batch size, table width: `graphs::DecodePlan`) runs eagerly — which loads every
//! kernel and fills candle's cache of layout parameters, since a capture may not copy from the
//! host — and is then captured; later steps of that shape write their inputs into the fixed
//! buffer the graph reads and replay it. The graph's own allocations are freed inside it, so it
//! can replay at once; its logits land in a fixed buffer, of which the step reads its rows.
//! A capture that fails is logged and turns graphs off: every step runs eagerly from then on.

#![allow(unsafe_code)]

use super::super::graphs::{
    DecodePlan, IDS, MAX_GRAPH_BATCH, POSITIONS, ROWS, SLOTS, TABLES, TOKEN_SEQ, fixed_words,
    input_words,
};
use super::super::model::{AttentionInputs, Batch, LayerCache, Llama, PagedInputs};
use super::pointer;
use candle_core::cuda_backend::cudarc::driver::{CudaGraph, result, sys};
use candle_core::{DType, Device, Result, Tensor};
use std::collections::HashMap;
use std::time::Instant;

/// The captured graphs of one model over one KV cache, and the buffers they read and write.
pub struct DecodeGraphs {
    device: Device,
    block_size: usize,
    /// The most blocks a sequence can have: the widest table a graph takes.
    max_width: usize,
    /// u32 words, laid out as `graphs::{TOKEN_SEQ, ROWS, IDS, …}` say.
    inputs: Tensor,
    /// `[MAX_GRAPH_BATCH, vocab]` f32: every graph's logits.
    logits: Tensor,
    graphs: HashMap<(usize, usize), Captured>,
    /// Why capturing failed, once it has: then no step replays.
    failed: Option<String>,
}

/// A graph, used only by the thread that runs the executor's steps.
struct Captured(CudaGraph);

// SAFETY: a graph is not thread-safe, but it moves with the executor that owns it and is only
// ever used from inside that executor's steps, one at a time (`Executor::execute` takes `&mut`).
unsafe impl Send for Captured {}

impl std::fmt::Debug for DecodeGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeGraphs")
            .field("captured", &self.graphs.len())
            .field("failed", &self.failed)
            .finish()
    }
}

impl DecodeGraphs {
    /// The buffers for `vocab`-wide logits and tables up to `max_width` blocks, on `device`.
    pub fn new(device: &Device, vocab: usize, block_size: usize, max_width: usize) -> Result<Self> {
        let mut words = fixed_words();
        words.resize(input_words(max_width), 0);
        let n = words.len();
        Ok(Self {
            device: device.clone(),
            block_size,
            max_width,
            inputs: Tensor::from_vec(words, n, device)?,
            logits: Tensor::zeros((MAX_GRAPH_BATCH, vocab), DType::F32, device)?,
            graphs: HashMap::new(),
            failed: None,
        })
    }

    /// The most blocks a sequence's table may have here.
    pub fn max_width(&self) -> usize {
        self.max_width
    }

    /// Whether steps may replay (no capture has failed).
    pub fn working(&self) -> bool {
        self.failed.is_none()
    }

    /// Runs the step `plan` lays out: replays its graph, or runs it eagerly and captures one.
    /// The step's logits, `[plan.rows, vocab]` f32 (a view of the fixed buffer, until the next
    /// step), and whether a graph ran it.
    pub fn run(
        &mut self,
        model: &Llama,
        cache: &[LayerCache],
        plan: &DecodePlan,
    ) -> Result<(Tensor, bool)> {
        self.write_inputs(plan)?;
        let replayed = match self.graphs.get(&plan.key()) {
            Some(graph) => {
                graph.0.launch().map_err(candle_core::Error::wrap)?;
                true
            }
            None => {
                self.run_and_capture(model, cache, plan)?;
                false
            }
        };
        Ok((self.logits.narrow(0, 0, plan.rows)?, replayed))
    }

    /// Copies the step's ids, positions, slots and tables into the input buffer (ordered on the
    /// stream after the previous step, before this one).
    fn write_inputs(&self, plan: &DecodePlan) -> Result<()> {
        let stream = self.device.as_cuda_device()?.cuda_stream();
        // The raw copy below does not make the context current on this thread itself.
        stream
            .context()
            .bind_to_thread()
            .map_err(candle_core::Error::wrap)?;
        let at = pointer(&self.inputs.narrow(0, IDS, plan.words.len())?, &stream)?;
        // SAFETY: `at` is `plan.words.len()` words into live device memory (the narrow above
        // checked the buffer holds them); the host words are staged before the call returns.
        unsafe { result::memcpy_htod_async(at, &plan.words, stream.cu_stream()) }
            .map_err(candle_core::Error::wrap)
    }

    /// The step's tensors: views of the input buffer at `plan`'s batch size and table width.
    fn batch(&self, plan: &DecodePlan) -> Result<Batch> {
        let rows = plan.batch;
        let words = |at: usize, n: usize| self.inputs.narrow(0, at, n);
        Ok(Batch {
            ids: words(IDS, rows)?,
            positions: words(POSITIONS, rows)?,
            last: Some(words(ROWS, rows)?),
            attention: AttentionInputs::Paged(PagedInputs {
                slots: words(SLOTS, rows)?,
                tables: words(TABLES, rows * plan.width)?.reshape((rows, plan.width))?,
                token_seq: words(TOKEN_SEQ, rows)?,
                block_size: self.block_size,
            }),
        })
    }

    /// What a graph holds: the forward pass, its logits copied into the fixed buffer. Every
    /// tensor it allocates is dropped before it returns.
    fn forward(&self, model: &Llama, cache: &[LayerCache], batch: &Batch) -> Result<()> {
        let logits = model
            .forward(batch, cache)?
            .ok_or_else(|| candle_core::Error::Msg("a decode graph without logits".into()))?;
        self.logits.slice_set(&logits, 0, 0)
    }

    /// The step, eagerly; then its capture for the steps of its shape to come.
    fn run_and_capture(
        &mut self,
        model: &Llama,
        cache: &[LayerCache],
        plan: &DecodePlan,
    ) -> Result<()> {
        let cuda = self.device.as_cuda_device()?.clone();
        // Layout parameters go to the device once and stay cached, for the capture to find.
        let _cached = cuda.enable_cuda_graph_htod_cache();
        let batch = self.batch(plan)?;
        self.forward(model, cache, &batch)?;
        let began = Instant::now();
        let stream = cuda.cuda_stream();
        let context = stream.context().clone();
        let captured = stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(candle_core::Error::wrap)
            .and_then(|()| {
                // The capture ends whatever the forward pass did, for the stream to run again.
                let recorded = self.forward(model, cache, &batch);
                // A tensor freed in a broken capture records its error on the context, where the
                // next call would find it — end_capture, which would then not end the capture.
                let freed = context.check_err().map_err(candle_core::Error::wrap);
                let graph = stream
                    .end_capture(sys::CUgraphInstantiate_flags(0))
                    .map_err(candle_core::Error::wrap);
                recorded?;
                freed?;
                let graph = graph?.ok_or_else(|| {
                    candle_core::Error::Msg("the capture recorded no graph".into())
                })?;
                graph.upload().map_err(candle_core::Error::wrap)?;
                Ok(graph)
            });
        let (batch_size, width) = plan.key();
        match captured {
            Ok(graph) => {
                self.graphs.insert(plan.key(), Captured(graph));
                tracing::info!(
                    batch = batch_size,
                    table_width = width,
                    graphs = self.graphs.len(),
                    ms = format!("{:.1}", began.elapsed().as_secs_f64() * 1e3),
                    "captured a decode step as a CUDA graph"
                );
            }
            Err(e) => {
                // Nothing a failed capture recorded may fail the eager steps that follow.
                let _ = context.check_err();
                tracing::warn!(
                    batch = batch_size,
                    table_width = width,
                    error = %e,
                    "capturing a decode step as a CUDA graph failed: steps run eagerly from now on"
                );
                self.graphs.clear();
                self.failed = Some(e.to_string());
            }
        }
        Ok(())
    }
}
