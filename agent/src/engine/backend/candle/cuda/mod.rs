//! The candle backend's own CUDA kernels (`kernels.cu`), compiled at start-up with NVRTC for the
//! device's compute capability and the model's head size and grouping, and launched on candle's
//! stream over candle's device memory: the rotary embedding fused with the KV-cache write, and
//! paged attention read through the block tables. Also what the device says of itself (name,
//! memory) and a probe for the driver, made before anything can panic for its absence.

#![allow(unsafe_code)]

use super::model::PagedKernels;
use crate::engine::model::{LlamaConfig, RopeStyle};
use crate::engine::sampling::Draw;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};

use candle_core::cuda_backend::cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, cudarc};
use candle_core::{DType, Device, Result, Storage, Tensor, bail};

pub mod graphs;
pub mod nccl;

const SOURCE: &str = include_str!("kernels.cu");
/// Paged-attention blocks from which a launch fills the device (four blocks of 4 warps on each of
/// a large card's ~130 multiprocessors): from there on a block has 4 warps; a smaller grid (a
/// decode step of a few sequences has one block per KV head) gives each block as many as the
/// shape allows, so that each warp walks fewer of the positions.
const FULL_GRID_BLOCKS: usize = 512;
/// Fixes the warps of every paged-attention block (a power of two up to the shape's most), for
/// the device check to time and check each launch shape on any grid.
const WARPS_VARIABLE: &str = "PARALLAX_ATTENTION_WARPS";
/// Splits each token's positions over this many paged-attention blocks on a grid that does not
/// fill the device (a decode step of a few sequences: one block per KV head otherwise), their
/// partial results merged by a second kernel; unset or 1, one block a token and KV head. For the
/// device check to time against the default.
const SPLITS_VARIABLE: &str = "PARALLAX_ATTENTION_SPLITS";
/// Threads of a block that merges split attention.
const MERGE_THREADS: u32 = 256;
/// Threads of a SiLU-and-multiply block: each computes one output.
const SILU_THREADS: usize = 256;
/// Threads of a sampling block (`SAMPLE_THREADS` in `kernels.cu`).
const SAMPLE_THREADS: u32 = 1024;

/// Whether the CUDA driver library can be opened: cudarc would panic on first use otherwise.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library (dlopen) and closes it again.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// What the device says of itself.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceFacts {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    pub free_memory: usize,
}

pub fn facts(device: &Device) -> Result<DeviceFacts> {
    let cuda = device.as_cuda_device()?;
    let stream = cuda.cuda_stream();
    let context = stream.context();
    let (free, total) = context.mem_get_info().map_err(candle_core::Error::wrap)?;
    Ok(DeviceFacts {
        name: context.name().map_err(candle_core::Error::wrap)?,
        compute_capability: context
            .compute_capability()
            .map_err(candle_core::Error::wrap)?,
        total_memory: total,
        free_memory: free,
    })
}

/// The kernels, compiled for one model on one device.
#[derive(Debug)]
pub struct Kernels {
    device: CudaDevice,
    module: String,
    ptx: String,
    suffix: &'static str,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    interleaved: bool,
    /// The most warps a paged-attention block of this shape may have (`WARPS`).
    max_warps: usize,
    /// `PARALLAX_ATTENTION_WARPS`, where set.
    fixed_warps: Option<usize>,
    /// `PARALLAX_ATTENTION_SPLITS`, 1 where unset.
    splits: usize,
}

/// The most warps a paged-attention block may have: up to 16, as many as keep the block's
/// partial results (warps × group × head size f32) within 32 KiB of shared memory.
fn max_attention_warps(head_dim: usize, group: usize) -> usize {
    let mut warps = 16;
    while warps > 1 && warps * group * head_dim * 4 > 32 * 1024 {
        warps /= 2;
    }
    warps
}

/// Shared memory of a paged-attention block: each warp's GROUP maxima and sums, and its
/// accumulators, f32.
fn attention_shared_bytes(warps: usize, group: usize, head_dim: usize) -> u32 {
    (warps * group * (head_dim + 2) * 4) as u32
}

/// `PARALLAX_ATTENTION_WARPS`: unset, or a power of two from 1 to `max`.
fn fixed_warps(value: Option<&str>, max: usize) -> Result<Option<usize>> {
    let Some(value) = value else {
        return Ok(None);
    };
    match value.parse::<usize>() {
        Ok(n) if n.is_power_of_two() && n <= max => Ok(Some(n)),
        _ => bail!("{WARPS_VARIABLE}={value}: a power of two from 1 to {max} for this model"),
    }
}

/// `PARALLAX_ATTENTION_SPLITS`: unset (1), or a count from 1 to 64.
fn attention_splits(value: Option<&str>) -> Result<usize> {
    let Some(value) = value else {
        return Ok(1);
    };
    match value.parse::<usize>() {
        Ok(n) if (1..=64).contains(&n) => Ok(n),
        _ => bail!("{SPLITS_VARIABLE}={value}: a count of blocks from 1 to 64"),
    }
}

/// NVRTC's `--gpu-architecture` for a compute capability.
fn architecture(capability: (i32, i32)) -> Result<&'static str> {
    Ok(match capability {
        (9, 0) => "sm_90",
        (8, 9) => "sm_89",
        (8, 6) => "sm_86",
        (8, 0) => "sm_80",
        (7, 5) => "sm_75",
        (7, 0) => "sm_70",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        other => bail!("no kernels for compute capability {}.{}", other.0, other.1),
    })
}

impl Kernels {
    /// Compiles the kernels for `config` in `dtype` on `device` (NVRTC, no nvcc).
    pub fn compile(device: &Device, config: &LlamaConfig, dtype: DType) -> Result<Self> {
        let cuda = device.as_cuda_device()?.clone();
        let (heads, kv_heads, head_dim) = (config.heads, config.kv_heads, config.head_dim);
        if head_dim % 32 != 0 || head_dim > 256 {
            bail!(
                "the CUDA kernels need a head size that is a multiple of 32 up to 256, not {head_dim}"
            );
        }
        let group = heads / kv_heads;
        if group > 16 {
            bail!("the CUDA kernels take up to 16 query heads per KV head, not {group}");
        }
        let suffix = match dtype {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
            other => bail!("no CUDA kernels for {other:?}"),
        };
        let max_warps = max_attention_warps(head_dim, group);
        let fixed_warps = fixed_warps(std::env::var(WARPS_VARIABLE).ok().as_deref(), max_warps)?;
        let splits = attention_splits(std::env::var(SPLITS_VARIABLE).ok().as_deref())?;
        let capability = facts(device)?.compute_capability;
        let ptx = ptx(head_dim, group, max_warps, architecture(capability)?)?;
        Ok(Self {
            device: cuda,
            module: format!("parallax_d{head_dim}_g{group}_w{max_warps}"),
            ptx,
            suffix,
            heads,
            kv_heads,
            head_dim,
            interleaved: config.rope_style == RopeStyle::Interleaved,
            max_warps,
            fixed_warps,
            splits,
        })
    }

    /// Warps per paged-attention block for a launch of `blocks` blocks.
    fn attention_warps(&self, blocks: usize) -> usize {
        self.fixed_warps.unwrap_or(if blocks >= FULL_GRID_BLOCKS {
            self.max_warps.min(4)
        } else {
            self.max_warps
        })
    }

    /// Launches kernel `name` (of this model's type) on candle's stream.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number, order and type, and every pointer
    /// must be into live device memory as large as the launch reads and writes.
    unsafe fn launch(&self, name: &str, config: LaunchConfig, args: &[Arg]) -> Result<()> {
        // SAFETY: as the caller promises.
        unsafe { self.launch_named(&format!("{name}_{}", self.suffix), config, args) }
    }

    /// Launches kernel `name`, whatever the model's type.
    ///
    /// # Safety
    /// As for [`Kernels::launch`].
    unsafe fn launch_named(&self, name: &str, config: LaunchConfig, args: &[Arg]) -> Result<()> {
        let function = self
            .device
            .get_or_load_custom_func(name, &self.module, &self.ptx)?;
        let mut launch = function.builder();
        for arg in args {
            match arg {
                Arg::U64(v) => launch.arg(v),
                Arg::I32(v) => launch.arg(v),
                Arg::F32(v) => launch.arg(v),
            };
        }
        // SAFETY: as the caller promises.
        unsafe { launch.launch(config) }.map_err(candle_core::Error::wrap)?;
        Ok(())
    }
}

impl PagedKernels for Kernels {
    /// Rotates the query and key heads of `qkv` (`[tokens, (heads + 2 kv) × dim]`, contiguous) in
    /// place at `positions`, and writes keys and values into the caches at `slots`.
    fn rope_and_cache(
        &self,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        positions: &Tensor,
        slots: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
    ) -> Result<()> {
        let tokens = qkv.dim(0)?;
        if tokens == 0 {
            return Ok(());
        }
        let stream = self.device.cuda_stream();
        let mut args = pointers(
            &[qkv, cos, sin, positions, slots, k_cache, v_cache],
            &stream,
        )?;
        args.extend([
            Arg::I32(self.heads as i32),
            Arg::I32(self.kv_heads as i32),
            Arg::I32(i32::from(self.interleaved)),
        ]);
        let config = LaunchConfig {
            grid_dim: (tokens as u32, (self.heads + self.kv_heads) as u32, 1),
            block_dim: ((self.head_dim / 2) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments are the kernel's parameters in number, order and type; every
        // pointer is into live device memory of the sizes the shapes say (contiguous tensors of
        // the model's widths, u32 positions below the rotary tables' length, slots below the
        // caches' rows: the executor builds them so).
        unsafe { self.launch("rope_and_cache", config, &args) }
    }

    /// Attention of every token over its sequence's cached positions `0..=position`: `qkv` holds
    /// the rotated queries (`[tokens, (heads + 2 kv) × dim]`); `tables` is `[sequences,
    /// max_blocks]`, `token_seq` and `token_pos` `[tokens]` (u32). `[tokens, heads × dim]`.
    fn paged_attention(
        &self,
        qkv: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        tables: &Tensor,
        token_seq: &Tensor,
        token_pos: &Tensor,
        block_size: usize,
    ) -> Result<Tensor> {
        let (tokens, width) = qkv.dims2()?;
        let out = Tensor::zeros(
            (tokens, self.heads * self.head_dim),
            qkv.dtype(),
            qkv.device(),
        )?;
        if tokens == 0 {
            return Ok(out);
        }
        // A grid that fills the device keeps one block a token and KV head.
        let splits = if tokens * self.kv_heads < FULL_GRID_BLOCKS {
            self.splits
        } else {
            1
        };
        let group = self.heads / self.kv_heads;
        // Each split block's maximum, sum and weighted values per query head, for the merge.
        let split_out = (splits > 1)
            .then(|| {
                let count = tokens * self.kv_heads * splits * group;
                Tensor::zeros(count * (2 + self.head_dim), DType::F32, qkv.device())
            })
            .transpose()?;
        let stream = self.device.cuda_stream();
        let mut args = pointers(&[&out, qkv], &stream)?;
        args.push(Arg::U64(width as u64));
        args.extend(pointers(
            &[k_cache, v_cache, tables, token_seq, token_pos],
            &stream,
        )?);
        args.extend([
            Arg::F32(1.0 / (self.head_dim as f32).sqrt()),
            Arg::I32(self.kv_heads as i32),
            Arg::I32(block_size as i32),
            Arg::I32(tables.dim(1)? as i32),
            Arg::U64(match &split_out {
                Some(parts) => pointer(parts, &stream)?,
                None => 0,
            }),
        ]);
        let warps = self.attention_warps(tokens * self.kv_heads * splits);
        let config = LaunchConfig {
            grid_dim: (tokens as u32, self.kv_heads as u32, splits as u32),
            block_dim: (32 * warps as u32, 1, 1),
            // Each warp's maxima, sums and accumulators: within 48 KiB, as `max_attention_warps`
            // keeps the accumulators within 32.
            shared_mem_bytes: attention_shared_bytes(warps, group, self.head_dim),
        };
        // SAFETY: as for `rope_and_cache`; `out` is a fresh contiguous tensor of the output's
        // size, every block-table entry the tokens' positions reach is a block of the caches,
        // and `split_out` (null with one split) holds the f32 results of every split block.
        unsafe { self.launch("paged_attention", config, &args)? };
        if let Some(parts) = &split_out {
            let mut args = pointers(&[&out, parts], &stream)?;
            args.extend([Arg::I32(self.kv_heads as i32), Arg::I32(splits as i32)]);
            let config = LaunchConfig {
                grid_dim: (tokens as u32, self.kv_heads as u32, 1),
                block_dim: (MERGE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `out` as above; `parts` holds the results the launch above wrote for
            // `tokens` tokens, `kv_heads` heads and `splits` splits.
            unsafe { self.launch("paged_attention_merge", config, &args)? };
        }
        Ok(out)
    }

    /// One block per (token, 256 outputs): each reads its token's gate and up once.
    fn silu_and_mul(&self, gate_up: &Tensor) -> Result<Tensor> {
        let (tokens, width) = gate_up.dims2()?;
        let ffn = width / 2;
        let out = Tensor::zeros((tokens, ffn), gate_up.dtype(), gate_up.device())?;
        if tokens == 0 || ffn == 0 {
            return Ok(out);
        }
        let stream = self.device.cuda_stream();
        let mut args = pointers(&[&out, gate_up], &stream)?;
        args.push(Arg::I32(ffn as i32));
        let config = LaunchConfig {
            grid_dim: (tokens as u32, ffn.div_ceil(SILU_THREADS) as u32, 1),
            block_dim: (SILU_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments are the kernel's parameters in number, order and type; `gate_up`
        // is a contiguous `[tokens, 2 × ffn]` tensor of the model's type (a GEMM's output) and
        // `out` a fresh contiguous `[tokens, ffn]` one.
        unsafe { self.launch("silu_and_mul", config, &args)? };
        Ok(out)
    }

    /// One block per row; the draws go over as four words a row, the ids come back alone.
    fn sample_rows(&self, logits: &Tensor, draws: &[Draw]) -> Result<Vec<u32>> {
        let (rows, vocab) = logits.dims2()?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        if draws.len() != rows {
            bail!("{} draws for {rows} rows", draws.len());
        }
        let logits = logits.to_dtype(DType::F32)?.contiguous()?;
        let words: Vec<u32> = draws.iter().flat_map(Draw::words).collect();
        let draws = Tensor::from_vec(words, rows * 4, logits.device())?;
        let out = Tensor::zeros(rows, DType::U32, logits.device())?;
        let stream = self.device.cuda_stream();
        let mut args = pointers(&[&out, &logits, &draws], &stream)?;
        args.push(Arg::I32(vocab as i32));
        let config = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (SAMPLE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments are the kernel's parameters in number, order and type: `out`
        // holds a u32 per row, `logits` is a contiguous f32 `[rows, vocab]`, `draws` four u32
        // words per row.
        unsafe { self.launch_named("sample_rows_f32", config, &args)? };
        out.to_vec1()
    }
}

/// The kernels' PTX for one head size and grouping, from NVRTC.
fn ptx(head_dim: usize, group: usize, warps: usize, arch: &'static str) -> Result<String> {
    let source =
        format!("#define DIM {head_dim}\n#define GROUP {group}\n#define WARPS {warps}\n{SOURCE}");
    let ptx = compile_ptx_with_opts(
        source,
        CompileOptions {
            arch: Some(arch),
            options: vec!["--std=c++17".into()],
            ..CompileOptions::default()
        },
    )
    .map_err(|e| candle_core::Error::Msg(format!("NVRTC: {e}")))?;
    Ok(ptx.to_src())
}

/// One kernel argument.
#[derive(Debug, Clone, Copy)]
enum Arg {
    U64(u64),
    I32(i32),
    F32(f32),
}

/// The device addresses of contiguous CUDA tensors, as kernel arguments.
fn pointers(tensors: &[&Tensor], stream: &cudarc::driver::CudaStream) -> Result<Vec<Arg>> {
    tensors
        .iter()
        .map(|t| pointer(t, stream).map(Arg::U64))
        .collect()
}

/// The device address of a contiguous CUDA tensor's first element.
fn pointer(t: &Tensor, stream: &cudarc::driver::CudaStream) -> Result<u64> {
    if !t.is_contiguous() {
        bail!("the CUDA kernels take contiguous tensors");
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        bail!("the CUDA kernels take tensors on a CUDA device");
    };
    let base = match &cuda.slice {
        CudaStorageSlice::BF16(s) => s.device_ptr(stream).0,
        CudaStorageSlice::F16(s) => s.device_ptr(stream).0,
        CudaStorageSlice::F32(s) => s.device_ptr(stream).0,
        CudaStorageSlice::U32(s) => s.device_ptr(stream).0,
        _ => bail!("the CUDA kernels take bf16, f16, f32 and u32 tensors"),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC needs no GPU: the kernels compile for the shapes the dummy models and common
    /// checkpoints have (head size, query heads per KV head), wherever libnvrtc can be opened
    /// (scripts/build-cuda's venv has one).
    #[test]
    fn the_kernels_compile_with_nvrtc_for_the_shapes_served() {
        // SAFETY: only tries to open the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("SKIPPED: libnvrtc cannot be opened here");
            return;
        }
        for (head_dim, group) in [(64, 3), (64, 4), (128, 1), (128, 4), (128, 8)] {
            for arch in ["sm_90", "sm_80"] {
                let warps = max_attention_warps(head_dim, group);
                let ptx = ptx(head_dim, group, warps, arch).expect("the kernels compile");
                for kernel in [
                    "rope_and_cache",
                    "paged_attention",
                    "paged_attention_merge",
                    "silu_and_mul",
                ] {
                    for suffix in ["bf16", "f16", "f32"] {
                        assert!(
                            ptx.contains(&format!("{kernel}_{suffix}")),
                            "{kernel}_{suffix}"
                        );
                    }
                }
                assert!(ptx.contains(".entry sample_rows_f32"));
            }
        }
    }

    #[test]
    fn attention_blocks_fit_their_partial_results_in_the_shared_memory_a_block_has() {
        // SmolLM2 (64 × 3), Llama 3.2 1B (64 × 4), 3.1 8B (128 × 4), 70B (128 × 8), and the
        // largest shape the kernels take (256 × 16).
        let warps: Vec<usize> = [(64, 3), (64, 4), (128, 4), (128, 8), (256, 16)]
            .iter()
            .map(|&(dim, group)| max_attention_warps(dim, group))
            .collect();
        assert_eq!(warps, [16, 16, 16, 8, 2]);
        // Within the 48 KiB a block may have without opting in, maxima and sums included.
        for &(dim, group) in &[(64, 3), (128, 8), (256, 16), (32, 1)] {
            let warps = max_attention_warps(dim, group);
            assert!(attention_shared_bytes(warps, group, dim) <= 48 * 1024);
        }
    }

    #[test]
    fn attention_splits_are_a_count_up_to_64() {
        assert_eq!(attention_splits(None).unwrap(), 1);
        assert_eq!(attention_splits(Some("8")).unwrap(), 8);
        for bad in ["0", "65", "many"] {
            let error = attention_splits(Some(bad)).unwrap_err().to_string();
            assert!(error.contains("PARALLAX_ATTENTION_SPLITS"), "{error}");
        }
    }

    #[test]
    fn a_fixed_warp_count_is_a_power_of_two_the_shape_allows() {
        assert_eq!(fixed_warps(None, 16).unwrap(), None);
        assert_eq!(fixed_warps(Some("4"), 16).unwrap(), Some(4));
        for bad in ["3", "32", "0", "four"] {
            let error = fixed_warps(Some(bad), 16).unwrap_err().to_string();
            assert!(error.contains("PARALLAX_ATTENTION_WARPS"), "{error}");
        }
    }
}
