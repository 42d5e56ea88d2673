//! CPU kernels of the forward pass: int8 block quantization, the int8 matrix product every linear
//! layer uses, RMSNorm, rotary embeddings, SiLU. Safe Rust written so that LLVM vectorises it
//! (the workspace builds for x86-64-v3); the hot loops are fixed-size so they unroll.
//!
//! Numerics do not depend on the batch: each output element is one row of weights dotted with
//! one row of activations in a fixed order, whatever else is in the batch. That is what makes
//! continuous batching give the same greedy tokens as running a request alone.

use half::f16;
use rayon::prelude::*;

/// Elements per quantization block.
pub const BLOCK: usize = 32;

/// A row-major matrix quantized to int8 in blocks of [`BLOCK`] along each row, one scale per
/// block (GGML's Q8_0). Activations also keep each block's scaled sum (GGML's Q8_1 `s`), which
/// the Q4_1 product needs. Scales are rounded to f16 as GGML stores them, so products equal
/// GGML's and candle's.
#[derive(Debug, Clone, Default)]
pub struct Q8Matrix {
    pub rows: usize,
    pub cols: usize,
    pub quants: Vec<i8>,
    pub scales: Vec<f32>,
    pub sums: Vec<f32>,
}

/// A row-major matrix in GGML's Q4_1: per block of 32, 4-bit values `q` (low nibbles hold
/// elements 0–15, high nibbles 16–31) with `x = d·q + m`.
#[derive(Debug, Clone, Default)]
pub struct Q41Matrix {
    pub rows: usize,
    pub cols: usize,
    pub nibbles: Vec<u8>,
    pub scales: Vec<f32>,
    pub mins: Vec<f32>,
}

impl Q41Matrix {
    /// From GGML Q4_1 blocks (20 bytes: f16 d, f16 m, 16 bytes of nibbles).
    pub fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let blocks = rows * cols / BLOCK;
        if !cols.is_multiple_of(BLOCK) || bytes.len() != blocks * 20 {
            return None;
        }
        let mut m = Self {
            rows,
            cols,
            nibbles: Vec::with_capacity(blocks * 16),
            scales: Vec::with_capacity(blocks),
            mins: Vec::with_capacity(blocks),
        };
        for b in bytes.chunks_exact(20) {
            m.scales.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            m.mins.push(f16::from_le_bytes([b[2], b[3]]).to_f32());
            m.nibbles.extend_from_slice(&b[4..]);
        }
        Some(m)
    }

    pub fn bytes(&self) -> usize {
        self.nibbles.len() + 8 * self.scales.len()
    }
}

/// A weight matrix in whichever int8 or int4 layout its file had (others become Q8_0).
#[derive(Debug, Clone)]
pub enum Linear {
    Q8(Q8Matrix),
    Q41(Q41Matrix),
}

impl Linear {
    pub fn rows(&self) -> usize {
        match self {
            Self::Q8(m) => m.rows,
            Self::Q41(m) => m.rows,
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Self::Q8(m) => m.bytes(),
            Self::Q41(m) => m.bytes(),
        }
    }
}

impl Q8Matrix {
    /// Quantizes `data` (`rows × cols`, row-major); `cols` must be a multiple of [`BLOCK`].
    pub fn quantize(data: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "matrix data does not match its shape"
        );
        assert_eq!(cols % BLOCK, 0, "columns must be a multiple of {BLOCK}");
        let mut m = Self {
            rows,
            cols,
            quants: vec![0; rows * cols],
            scales: vec![0.0; rows * cols / BLOCK],
            sums: vec![0.0; rows * cols / BLOCK],
        };
        m.quants
            .par_chunks_mut(cols)
            .zip(m.scales.par_chunks_mut(cols / BLOCK))
            .zip(m.sums.par_chunks_mut(cols / BLOCK))
            .zip(data.par_chunks(cols))
            .for_each(|(((q, s), sum), x)| quantize_row(x, q, s, sum));
        m
    }

    /// From GGML Q8_0 blocks (34 bytes: f16 d, 32 int8), exactly.
    pub fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let blocks = rows * cols / BLOCK;
        if !cols.is_multiple_of(BLOCK) || bytes.len() != blocks * 34 {
            return None;
        }
        let mut m = Self {
            rows,
            cols,
            quants: Vec::with_capacity(rows * cols),
            scales: Vec::with_capacity(blocks),
            sums: Vec::new(),
        };
        for b in bytes.chunks_exact(34) {
            m.scales.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            m.quants.extend(b[2..].iter().map(|v| *v as i8));
        }
        Some(m)
    }

    /// Quantizes into existing buffers (activations, every step).
    pub fn quantize_into(&mut self, data: &[f32], rows: usize, cols: usize) {
        debug_assert_eq!(cols % BLOCK, 0);
        self.rows = rows;
        self.cols = cols;
        self.quants.resize(rows * cols, 0);
        self.scales.resize(rows * cols / BLOCK, 0.0);
        self.sums.resize(rows * cols / BLOCK, 0.0);
        if rows * cols >= 1 << 16 {
            self.quants
                .par_chunks_mut(cols)
                .zip(self.scales.par_chunks_mut(cols / BLOCK))
                .zip(self.sums.par_chunks_mut(cols / BLOCK))
                .zip(data.par_chunks(cols))
                .for_each(|(((q, s), sum), x)| quantize_row(x, q, s, sum));
        } else {
            for (((q, s), sum), x) in self
                .quants
                .chunks_mut(cols)
                .zip(self.scales.chunks_mut(cols / BLOCK))
                .zip(self.sums.chunks_mut(cols / BLOCK))
                .zip(data.chunks(cols))
            {
                quantize_row(x, q, s, sum);
            }
        }
    }

    /// Row `r` back to f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let q = &self.quants[r * self.cols..(r + 1) * self.cols];
        let s = &self.scales[r * self.cols / BLOCK..(r + 1) * self.cols / BLOCK];
        for ((o, q), s) in out
            .chunks_exact_mut(BLOCK)
            .zip(q.chunks_exact(BLOCK))
            .zip(s)
        {
            for (o, q) in o.iter_mut().zip(q) {
                *o = f32::from(*q) * s;
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.quants.len() + self.scales.len() * 4
    }
}

/// GGML's quantize_row_q8_1: `q = round(x / d)` with `d = max|x| / 127`, `d` stored as f16, and
/// `s = f16(Σq) · d` in f16.
fn quantize_row(x: &[f32], q: &mut [i8], s: &mut [f32], sums: &mut [f32]) {
    for (((x, q), s), sum) in x
        .chunks_exact(BLOCK)
        .zip(q.chunks_exact_mut(BLOCK))
        .zip(s.iter_mut())
        .zip(sums.iter_mut())
    {
        let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max / 127.0;
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut total = 0i32;
        for (q, x) in q.iter_mut().zip(x) {
            *q = (x * inv).round() as i8;
            total += i32::from(*q);
        }
        let d = f16::from_f32(d);
        *s = d.to_f32();
        *sum = (f16::from_f32(total as f32) * d).to_f32();
    }
}

/// Q8_0 weights · Q8 activations, one row each, in the order of GGML's AVX2 vec_dot_q8_0_q8_0:
/// eight lanes each summing four products per block, scaled by `dw·dx` and fused-multiply-added
/// across blocks, then reduced pairwise. The AVX2 kernel gives the same bits; builds without
/// AVX2 use this.
#[cfg(any(
    test,
    not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))
))]
fn row_dot_q8(wq: &[i8], ws: &[f32], xq: &[i8], xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for ((wb, xb), (dw, dx)) in wq
        .chunks_exact(BLOCK)
        .zip(xq.chunks_exact(BLOCK))
        .zip(ws.iter().zip(xs))
    {
        let d = dw * dx;
        for (l, lane) in lanes.iter_mut().enumerate() {
            let sum: i32 = (4 * l..4 * l + 4)
                .map(|i| i32::from(wb[i]) * i32::from(xb[i]))
                .sum();
            *lane = d.mul_add(sum as f32, *lane);
        }
    }
    reduce_lanes(lanes)
}

/// Q4_1 weights · Q8_1 activations in the order of GGML's AVX2 vec_dot_q4_1_q8_1: per block,
/// eight lanes each summing four exact products, scaled by `d·dx` and fused-multiply-added
/// across blocks, reduced pairwise; plus `Σ m·s` ([`min_terms`]). The AVX2 and AVX-512 kernels
/// give the same bits; builds without AVX2 use this.
#[cfg(any(
    test,
    not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))
))]
fn row_dot_q41(nibbles: &[u8], d: &[f32], m: &[f32], xq: &[i8], xs: &[f32], xsum: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for ((nb, xb), (dw, dx)) in nibbles
        .chunks_exact(BLOCK / 2)
        .zip(xq.chunks_exact(BLOCK))
        .zip(d.iter().zip(xs))
    {
        let scale = dw * dx;
        // Element e of the block: low nibbles hold 0–15, high nibbles 16–31.
        let w = |e: usize| {
            i32::from(if e < 16 {
                nb[e] & 0x0f
            } else {
                nb[e - 16] >> 4
            })
        };
        for (l, lane) in lanes.iter_mut().enumerate() {
            let sum: i32 = (4 * l..4 * l + 4).map(|e| w(e) * i32::from(xb[e])).sum();
            *lane = scale.mul_add(sum as f32, *lane);
        }
    }
    reduce_lanes(lanes) + min_terms(m, xsum)
}

/// `Σ m·s` over a row's blocks: eight lanes (block `b` in lane `b mod 8`), fused-multiply-added,
/// then reduced pairwise — one fixed order, in eight independent chains so it vectorises.
#[inline(always)]
fn min_terms(m: &[f32], xsum: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (m8, xs8) = (m.chunks_exact(8), xsum.chunks_exact(8));
    let (m_rest, xs_rest) = (m8.remainder(), xs8.remainder());
    for (m, s) in m8.zip(xs8) {
        for l in 0..8 {
            lanes[l] = m[l].mul_add(s[l], lanes[l]);
        }
    }
    for (l, (m, s)) in m_rest.iter().zip(xs_rest).enumerate() {
        lanes[l] = m.mul_add(*s, lanes[l]);
    }
    reduce_lanes(lanes)
}

/// Eight lanes summed as GGML's hsum_float_8 does: halves, then pairs, then the last two.
#[inline(always)]
fn reduce_lanes(lanes: [f32; 8]) -> f32 {
    let quad = [
        lanes[4] + lanes[0],
        lanes[5] + lanes[1],
        lanes[6] + lanes[2],
        lanes[7] + lanes[3],
    ];
    let pair = [quad[0] + quad[2], quad[1] + quad[3]];
    pair[0] + pair[1]
}

/// AVX2 versions of the block products, used when the build targets AVX2 and FMA (the
/// workspace's x86-64-v3). They compute exactly what the portable loops compute.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[allow(unsafe_code)]
mod simd {
    use super::BLOCK;
    use std::arch::x86_64::*;

    /// Eight float lanes summed as GGML's hsum_float_8.
    #[inline(always)]
    unsafe fn reduce8(v: __m256) -> f32 {
        // SAFETY: register-only AVX operations; the caller's build has AVX2.
        unsafe {
            let quad = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
            let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
            _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
        }
    }

    /// One Q4_1 weight row (`nibbles`, `d`, `m` for its blocks) against activation rows
    /// `j0..j0 + R` of `x`, into `out[..R]`: each weight block is widened once and used for all
    /// `R` rows, each row keeping its own eight float lanes (as [`super::row_dot_q41`]). A row's
    /// arithmetic is the same whatever `R` is, so it gives the same bits alone and in a batch.
    #[inline(always)]
    pub fn q41_tile<const R: usize>(
        nibbles: &[u8],
        d: &[f32],
        m: &[f32],
        x: &super::Q8Matrix,
        j0: usize,
        out: &mut [f32],
    ) {
        let kb = d.len();
        let k = kb * BLOCK;
        assert!(nibbles.len() == kb * 16 && m.len() == kb && x.cols == k && out.len() >= R);
        assert!(
            j0 + R <= x.rows
                && x.quants.len() >= x.rows * k
                && x.scales.len() >= x.rows * kb
                && x.sums.len() >= x.rows * kb
        );
        // SAFETY: AVX2 and FMA are enabled for this build. The assertions above bound every
        // pointer: block b reads nibbles[16b..16b + 16] and, for row j in j0..j0 + R,
        // quants[j·k + 32b ..+32] and scales[j·kb + b]. Loads are unaligned. Products are at most
        // 15 · 127 · 2 per 16-bit lane, so `maddubs` cannot saturate.
        unsafe {
            let mask = _mm_set1_epi8(0x0f);
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..kb {
                let bytes = _mm_loadu_si128(nibbles.as_ptr().add(b * 16).cast());
                let w = _mm256_set_m128i(
                    _mm_and_si128(_mm_srli_epi16(bytes, 4), mask),
                    _mm_and_si128(bytes, mask),
                );
                let dw = *d.get_unchecked(b);
                for (t, acc) in acc.iter_mut().enumerate() {
                    let j = j0 + t;
                    let xv = _mm256_loadu_si256(x.quants.as_ptr().add(j * k + b * BLOCK).cast());
                    let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), ones);
                    let scale = _mm256_set1_ps(dw * *x.scales.get_unchecked(j * kb + b));
                    *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), *acc);
                }
            }
            for (t, acc) in acc.into_iter().enumerate() {
                let j = j0 + t;
                out[t] = reduce8(acc) + super::min_terms(m, &x.sums[j * kb..(j + 1) * kb]);
            }
        }
    }

    /// One Q8_0 weight row (`wq`, `ws`) against activation rows `j0..j0 + R` of `x`, into
    /// `out[..R]`, each row in its own eight float lanes as [`super::row_dot_q8`] adds them.
    #[inline(always)]
    pub fn q8_tile<const R: usize>(
        wq: &[i8],
        ws: &[f32],
        x: &super::Q8Matrix,
        j0: usize,
        out: &mut [f32],
    ) {
        let kb = ws.len();
        let k = kb * BLOCK;
        assert!(wq.len() == k && x.cols == k && out.len() >= R);
        assert!(j0 + R <= x.rows && x.quants.len() >= x.rows * k && x.scales.len() >= x.rows * kb);
        // SAFETY: AVX2 and FMA are enabled for this build. The assertions above bound every
        // pointer: block b reads wq[32b..32b + 32] and, for row j in j0..j0 + R,
        // quants[j·k + 32b ..+32] and scales[j·kb + b]. Loads are unaligned. Weights and
        // activations are quantized to [-127, 127], so `sign` gives exact magnitudes and
        // `maddubs` cannot saturate (127 · 127 · 2 < 32768).
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..kb {
                let w = _mm256_loadu_si256(wq.as_ptr().add(b * BLOCK).cast());
                let magnitude = _mm256_sign_epi8(w, w);
                let dw = *ws.get_unchecked(b);
                for (t, acc) in acc.iter_mut().enumerate() {
                    let j = j0 + t;
                    let xv = _mm256_loadu_si256(x.quants.as_ptr().add(j * k + b * BLOCK).cast());
                    let products = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xv, w));
                    let lanes = _mm256_cvtepi32_ps(_mm256_madd_epi16(products, ones));
                    let scale = _mm256_set1_ps(dw * *x.scales.get_unchecked(j * kb + b));
                    *acc = _mm256_fmadd_ps(scale, lanes, *acc);
                }
            }
            for (o, acc) in out.iter_mut().zip(acc) {
                *o = reduce8(acc);
            }
        }
    }
}

/// The Q4_1 product with AVX-512 VNNI (`vpdpbusd` on 256-bit registers), for CPUs that have it
/// (checked at run time). Same arithmetic, same bits as [`simd::q41_tile`].
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[allow(unsafe_code)]
mod vnni {
    use super::BLOCK;
    use std::arch::x86_64::*;

    /// Whether this CPU has the instructions [`q41_tile`] uses.
    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }

    /// [`super::simd::q41_tile`] with `vpdpbusd` giving a block's eight four-product sums in
    /// one instruction, and the blocks' scales `d·dx` computed eight at a time and spread over a
    /// block's lanes with one permutation. Same lanes, same order, same bits.
    ///
    /// # Safety
    /// The CPU must have what [`available`] checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    pub unsafe fn q41_tile<const R: usize>(
        nibbles: &[u8],
        d: &[f32],
        m: &[f32],
        x: &super::Q8Matrix,
        j0: usize,
        out: &mut [f32],
    ) {
        let kb = d.len();
        let k = kb * BLOCK;
        assert!(nibbles.len() == kb * 16 && m.len() == kb && x.cols == k && out.len() >= R);
        assert!(
            j0 + R <= x.rows
                && x.quants.len() >= x.rows * k
                && x.scales.len() >= x.rows * kb
                && x.sums.len() >= x.rows * kb
        );
        // SAFETY: the caller guarantees the CPU features. The assertions above bound every
        // pointer: block b reads nibbles[16b..16b + 16] and, for row j in j0..j0 + R,
        // quants[j·k + 32b ..+32]; scales are read eight at a time under a mask of the blocks
        // that exist. Loads are unaligned. `vpdpbusd` sums four products of at most 15 · 127
        // into each 32-bit lane, exactly.
        unsafe {
            let mask = _mm_set1_epi8(0x0f);
            let mut acc = [_mm256_setzero_ps(); R];
            for group in (0..kb).step_by(8) {
                let count = (kb - group).min(8);
                let present = ((1u32 << count) - 1) as __mmask8;
                let dw = _mm256_maskz_loadu_ps(present, d.as_ptr().add(group));
                let mut scales = [_mm256_setzero_ps(); R];
                for (t, scales) in scales.iter_mut().enumerate() {
                    let at = (j0 + t) * kb + group;
                    *scales = _mm256_mul_ps(
                        dw,
                        _mm256_maskz_loadu_ps(present, x.scales.as_ptr().add(at)),
                    );
                }
                for i in 0..count {
                    let b = group + i;
                    let bytes = _mm_loadu_si128(nibbles.as_ptr().add(b * 16).cast());
                    let w = _mm256_set_m128i(
                        _mm_and_si128(_mm_srli_epi16(bytes, 4), mask),
                        _mm_and_si128(bytes, mask),
                    );
                    let lane = _mm256_set1_epi32(i as i32);
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let at = (j0 + t) * k + b * BLOCK;
                        let xv = _mm256_loadu_si256(x.quants.as_ptr().add(at).cast());
                        let sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, xv);
                        let scale = _mm256_permutevar8x32_ps(scales[t], lane);
                        *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), *acc);
                    }
                }
            }
            for (t, acc) in acc.into_iter().enumerate() {
                let j = j0 + t;
                let quad = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
                let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
                let total = _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
                out[t] = total + super::min_terms(m, &x.sums[j * kb..(j + 1) * kb]);
            }
        }
    }
}

/// `out[m × n] = x[m × k] · wᵀ` with `w` of shape `n × k`. Rows of `w` are the outer loop so each
/// weight row is read from memory once per call however many activation rows there are; the
/// output rows are split between the worker threads.
pub fn matmul(x: &Q8Matrix, w: &Linear, out: &mut Vec<f32>, scratch: &mut Vec<f32>) {
    match w {
        Linear::Q8(w) => matmul_q8(x, w, out, scratch),
        Linear::Q41(w) => matmul_q41(x, w, out, scratch),
    }
}

/// [`matmul`] for Q8_0 weights: each weight row against four activation rows at a time.
pub fn matmul_q8(x: &Q8Matrix, w: &Q8Matrix, out: &mut Vec<f32>, scratch: &mut Vec<f32>) {
    let k = w.cols;
    assert_eq!(x.cols, k, "inner dimensions differ");
    let kb = k / BLOCK;
    let m = x.rows;
    for_weight_rows(m, w.rows, out, scratch, |r, out_row| {
        let (wq, ws) = (
            &w.quants[r * k..(r + 1) * k],
            &w.scales[r * kb..(r + 1) * kb],
        );
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        {
            let mut j = 0;
            while j + 4 <= m {
                simd::q8_tile::<4>(wq, ws, x, j, &mut out_row[j..]);
                j += 4;
            }
            match m - j {
                3 => simd::q8_tile::<3>(wq, ws, x, j, &mut out_row[j..]),
                2 => simd::q8_tile::<2>(wq, ws, x, j, &mut out_row[j..]),
                1 => simd::q8_tile::<1>(wq, ws, x, j, &mut out_row[j..]),
                _ => {}
            }
        }
        #[cfg(not(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        )))]
        for (j, o) in out_row.iter_mut().enumerate() {
            *o = row_dot_q8(
                wq,
                ws,
                &x.quants[j * k..(j + 1) * k],
                &x.scales[j * kb..(j + 1) * kb],
            );
        }
    });
}

/// [`matmul`] for Q4_1 weights: each weight row against four activation rows at a time.
fn matmul_q41(x: &Q8Matrix, w: &Q41Matrix, out: &mut Vec<f32>, scratch: &mut Vec<f32>) {
    assert_eq!(x.cols, w.cols, "inner dimensions differ");
    let kb = w.cols / BLOCK;
    let m = x.rows;
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    // A single row (decode alone) measured as fast or faster on the AVX2 kernel.
    let vnni = m >= 2 && vnni::available();
    for_weight_rows(m, w.rows, out, scratch, |r, out_row| {
        let (nibbles, d, mins) = (
            &w.nibbles[r * kb * 16..(r + 1) * kb * 16],
            &w.scales[r * kb..(r + 1) * kb],
            &w.mins[r * kb..(r + 1) * kb],
        );
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        {
            let mut j = 0;
            while j < m {
                let rows = (m - j).min(4);
                let out = &mut out_row[j..];
                if vnni {
                    // SAFETY: `vnni::available()` said this CPU has the features it needs.
                    #[allow(unsafe_code)]
                    unsafe {
                        match rows {
                            4 => vnni::q41_tile::<4>(nibbles, d, mins, x, j, out),
                            3 => vnni::q41_tile::<3>(nibbles, d, mins, x, j, out),
                            2 => vnni::q41_tile::<2>(nibbles, d, mins, x, j, out),
                            _ => vnni::q41_tile::<1>(nibbles, d, mins, x, j, out),
                        }
                    }
                } else {
                    match rows {
                        4 => simd::q41_tile::<4>(nibbles, d, mins, x, j, out),
                        3 => simd::q41_tile::<3>(nibbles, d, mins, x, j, out),
                        2 => simd::q41_tile::<2>(nibbles, d, mins, x, j, out),
                        _ => simd::q41_tile::<1>(nibbles, d, mins, x, j, out),
                    }
                }
                j += rows;
            }
        }
        #[cfg(not(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        )))]
        for (j, o) in out_row.iter_mut().enumerate() {
            *o = row_dot_q41(
                nibbles,
                d,
                mins,
                &x.quants[j * w.cols..(j + 1) * w.cols],
                &x.scales[j * kb..(j + 1) * kb],
                &x.sums[j * kb..(j + 1) * kb],
            );
        }
    });
}

/// Runs `row(r, out_row)` for every weight row `r` — filling `out_row[j]` with its product with
/// activation row `j` — weight rows split between threads, and writes `out[m × n]`.
fn for_weight_rows(
    m: usize,
    n: usize,
    out: &mut Vec<f32>,
    scratch: &mut Vec<f32>,
    row: impl Fn(usize, &mut [f32]) + Sync,
) {
    scratch.resize(n * m, 0.0);
    // Enough rows per task to amortise scheduling, few enough to balance two or more threads.
    let rows_per_task = (n / (rayon::current_num_threads() * 8)).max(16);
    scratch
        .par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (i, out_row) in chunk.chunks_exact_mut(m).enumerate() {
                row(task * rows_per_task + i, out_row);
            }
        });
    // Transpose, writing each output row in order.
    out.resize(m * n, 0.0);
    let scratch = &scratch[..];
    let transpose = |(j, row): (usize, &mut [f32])| {
        for (r, o) in row.iter_mut().enumerate() {
            *o = scratch[r * m + j];
        }
    };
    if m * n >= 1 << 16 {
        out.par_chunks_exact_mut(n).enumerate().for_each(transpose);
    } else {
        out.chunks_exact_mut(n).enumerate().for_each(transpose);
    }
}

/// RMSNorm of each row of `x` (`rows × weight.len()`) into `out`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut Vec<f32>) {
    let h = weight.len();
    out.resize(x.len(), 0.0);
    for (o, x) in out.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / h as f32 + eps).sqrt();
        for ((o, x), w) in o.iter_mut().zip(x).zip(weight) {
            *o = x / rms * w;
        }
    }
}

/// How a model pairs the dimensions a rotary embedding rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// (0, 1), (2, 3), …: GGUF Llama files (llama.cpp permutes Q and K at conversion).
    Interleaved,
    /// (i, i + d/2): Hugging Face Llama checkpoints.
    HalfSplit,
}

/// Precomputed cos and sin for every position and frequency.
#[derive(Debug, Clone)]
pub struct Rope {
    pub style: RopeStyle,
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(style: RopeStyle, head_dim: usize, max_positions: usize, theta: f32) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for i in 0..half {
                let freq = 1.0 / theta.powf((2 * i) as f32 / head_dim as f32);
                let angle = p as f32 * freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            style,
            half,
            cos,
            sin,
        }
    }

    pub fn max_positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotates every head of one token's vector (`heads × head_dim`) to `position`.
    pub fn apply(&self, x: &mut [f32], position: usize) {
        let half = self.half;
        let cos = &self.cos[position * half..(position + 1) * half];
        let sin = &self.sin[position * half..(position + 1) * half];
        for head in x.chunks_exact_mut(2 * half) {
            match self.style {
                RopeStyle::Interleaved => {
                    for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                        let (a, b) = (pair[0], pair[1]);
                        pair[0] = a * cos[i] - b * sin[i];
                        pair[1] = a * sin[i] + b * cos[i];
                    }
                }
                RopeStyle::HalfSplit => {
                    let (lo, hi) = head.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (lo[i], hi[i]);
                        lo[i] = a * cos[i] - b * sin[i];
                        hi[i] = a * sin[i] + b * cos[i];
                    }
                }
            }
        }
    }
}

/// `Σ a·b` in eight lanes (element `i` in lane `i mod 8`), fused-multiply-added, reduced
/// pairwise: one fixed order that vectorises (attention scores).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_rest, b_rest) = (a8.remainder(), b8.remainder());
    for (a, b) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] = a[l].mul_add(b[l], lanes[l]);
        }
    }
    for (l, (a, b)) in a_rest.iter().zip(b_rest).enumerate() {
        lanes[l] = a.mul_add(*b, lanes[l]);
    }
    reduce_lanes(lanes)
}

/// `gate_up` holds rows of `[gate | up]` (each `ffn` wide); writes `silu(gate) * up` rows.
pub fn silu_mul(gate_up: &[f32], ffn: usize, out: &mut Vec<f32>) {
    out.resize(gate_up.len() / 2, 0.0);
    for (o, row) in out.chunks_exact_mut(ffn).zip(gate_up.chunks_exact(2 * ffn)) {
        let (gate, up) = row.split_at(ffn);
        for ((o, g), u) in o.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
            }
        }
        out
    }

    fn pseudo_random(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn int8_matmul_is_close_to_f32() {
        let (m, n, k) = (5, 70, 96);
        let x = pseudo_random(m * k, 1);
        let w = pseudo_random(n * k, 2);
        let (qx, qw) = (Q8Matrix::quantize(&x, m, k), Q8Matrix::quantize(&w, n, k));
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        matmul_q8(&qx, &qw, &mut out, &mut scratch);
        let exact = reference(&x, &w, m, n, k);
        for (a, b) in out.iter().zip(&exact) {
            assert!((a - b).abs() < 0.03, "{a} vs {b}");
        }
    }

    #[test]
    fn q4_1_weights_multiply_like_their_dequantized_values() {
        let (m, n, k) = (3, 8, 64);
        // Random blocks: d, m as f16, 16 bytes of nibbles.
        let mut bytes = Vec::new();
        let raw = pseudo_random(n * k / BLOCK * 18, 5);
        for block in raw.chunks_exact(18) {
            bytes.extend_from_slice(&f16::from_f32(block[0].abs() / 8.0 + 0.01).to_le_bytes());
            bytes.extend_from_slice(&f16::from_f32(block[1] / 4.0).to_le_bytes());
            bytes.extend(block[2..].iter().map(|v| ((v + 0.5) * 255.0) as u8));
        }
        let w = Q41Matrix::from_ggml(&bytes, n, k).unwrap();
        let mut dense = vec![0.0; n * k];
        for (b, out) in dense.chunks_exact_mut(BLOCK).enumerate() {
            for j in 0..BLOCK / 2 {
                let byte = w.nibbles[b * 16 + j];
                out[j] = w.scales[b] * f32::from(byte & 0x0f) + w.mins[b];
                out[j + 16] = w.scales[b] * f32::from(byte >> 4) + w.mins[b];
            }
        }
        let x = pseudo_random(m * k, 6);
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        matmul(
            &Q8Matrix::quantize(&x, m, k),
            &Linear::Q41(w),
            &mut out,
            &mut scratch,
        );
        for (a, b) in out.iter().zip(&reference(&x, &dense, m, n, k)) {
            assert!((a - b).abs() < 0.05 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_a_batch() {
        let (n, k) = (40, 64);
        let w = Q8Matrix::quantize(&pseudo_random(n * k, 3), n, k);
        let rows = pseudo_random(7 * k, 4);
        let (mut batch, mut alone, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
        matmul_q8(
            &Q8Matrix::quantize(&rows, 7, k),
            &w,
            &mut batch,
            &mut scratch,
        );
        matmul_q8(
            &Q8Matrix::quantize(&rows[3 * k..4 * k], 1, k),
            &w,
            &mut alone,
            &mut scratch,
        );
        assert_eq!(&batch[3 * n..4 * n], &alone[..]);
    }

    #[test]
    fn the_vector_kernels_give_the_portable_bits() {
        // Whole Q8_0 products (19 blocks a row) for every tiling of the activation rows against
        // the portable dot product, bit for bit.
        let k = 19 * BLOCK;
        let all = pseudo_random(11 * k, 8);
        let w = Q8Matrix::quantize(&pseudo_random(5 * k, 9), 5, k);
        let kb = k / BLOCK;
        for m in [1, 2, 3, 4, 5, 11] {
            let x = Q8Matrix::quantize(&all[..m * k], m, k);
            let (mut out, mut scratch) = (Vec::new(), Vec::new());
            matmul_q8(&x, &w, &mut out, &mut scratch);
            for r in 0..5 {
                for j in 0..m {
                    let expected = row_dot_q8(
                        &w.quants[r * k..(r + 1) * k],
                        &w.scales[r * kb..(r + 1) * kb],
                        &x.quants[j * k..(j + 1) * k],
                        &x.scales[j * kb..(j + 1) * kb],
                    );
                    assert_eq!(out[j * 5 + r].to_bits(), expected.to_bits(), "{m} rows");
                }
            }
        }

        // Whole Q4_1 products (19 blocks a row) for every tiling of the activation rows against
        // the portable dot product, bit for bit: a row gives the same bits alone and in a batch.
        let (n, k) = (5, 19 * BLOCK);
        let mut bytes: Vec<u8> = (0..n * k / BLOCK * 20)
            .map(|i| (i * 7919 % 251) as u8)
            .collect();
        for block in bytes.chunks_exact_mut(20) {
            block[..2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
            block[2..4].copy_from_slice(&f16::from_f32(-0.05).to_le_bytes());
        }
        let w = Q41Matrix::from_ggml(&bytes, n, k).unwrap();
        let all = pseudo_random(11 * k, 10);
        let kb = k / BLOCK;
        for m in [1, 2, 3, 4, 5, 11] {
            let x = Q8Matrix::quantize(&all[..m * k], m, k);
            let (mut out, mut scratch) = (Vec::new(), Vec::new());
            matmul(&x, &Linear::Q41(w.clone()), &mut out, &mut scratch);
            for r in 0..n {
                for j in 0..m {
                    let expected = row_dot_q41(
                        &w.nibbles[r * kb * 16..(r + 1) * kb * 16],
                        &w.scales[r * kb..(r + 1) * kb],
                        &w.mins[r * kb..(r + 1) * kb],
                        &x.quants[j * k..(j + 1) * k],
                        &x.scales[j * kb..(j + 1) * kb],
                        &x.sums[j * kb..(j + 1) * kb],
                    );
                    assert_eq!(
                        out[j * n + r].to_bits(),
                        expected.to_bits(),
                        "{m} rows: weight row {r}, activation {j}"
                    );
                }
            }
        }
    }

    /// Both vector Q4_1 kernels, whichever `matmul` picks on this CPU, at every tile size and
    /// offset, against the portable dot product (19 blocks: two groups of eight and an odd tail).
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    #[test]
    #[allow(unsafe_code)]
    fn the_avx2_and_avx512_q4_1_kernels_give_the_portable_bits() {
        let (n, k) = (3, 19 * BLOCK);
        let kb = k / BLOCK;
        let bytes: Vec<u8> = (0..n * kb * 20).map(|i| (i * 7919 % 251) as u8).collect();
        let mut bytes = bytes;
        for (i, block) in bytes.chunks_exact_mut(20).enumerate() {
            block[..2].copy_from_slice(&f16::from_f32(0.01 + i as f32 * 1e-4).to_le_bytes());
            block[2..4].copy_from_slice(&f16::from_f32(-0.05).to_le_bytes());
        }
        let w = Q41Matrix::from_ggml(&bytes, n, k).unwrap();
        let x = Q8Matrix::quantize(&pseudo_random(4 * k, 12), 4, k);
        let vnni = vnni::available();
        if !vnni {
            eprintln!("this CPU has no AVX-512 VNNI: only the AVX2 kernel is checked");
        }
        for r in 0..n {
            let (nibbles, d, mins) = (
                &w.nibbles[r * kb * 16..(r + 1) * kb * 16],
                &w.scales[r * kb..(r + 1) * kb],
                &w.mins[r * kb..(r + 1) * kb],
            );
            let expected: Vec<u32> = (0..4)
                .map(|j| {
                    row_dot_q41(
                        nibbles,
                        d,
                        mins,
                        &x.quants[j * k..(j + 1) * k],
                        &x.scales[j * kb..(j + 1) * kb],
                        &x.sums[j * kb..(j + 1) * kb],
                    )
                    .to_bits()
                })
                .collect();
            let bits = |out: &[f32]| out.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let mut out = [0f32; 4];
            simd::q41_tile::<4>(nibbles, d, mins, &x, 0, &mut out);
            assert_eq!(bits(&out), expected, "AVX2, four rows");
            simd::q41_tile::<3>(nibbles, d, mins, &x, 1, &mut out);
            assert_eq!(bits(&out[..3]), expected[1..], "AVX2, three rows");
            simd::q41_tile::<1>(nibbles, d, mins, &x, 2, &mut out);
            assert_eq!(bits(&out[..1]), expected[2..3], "AVX2, one row");
            if vnni {
                // SAFETY: the CPU has the features (checked above).
                unsafe {
                    vnni::q41_tile::<4>(nibbles, d, mins, &x, 0, &mut out);
                    assert_eq!(bits(&out), expected, "AVX-512, four rows");
                    vnni::q41_tile::<2>(nibbles, d, mins, &x, 2, &mut out);
                    assert_eq!(bits(&out[..2]), expected[2..], "AVX-512, two rows");
                    vnni::q41_tile::<1>(nibbles, d, mins, &x, 1, &mut out);
                    assert_eq!(bits(&out[..1]), expected[1..2], "AVX-512, one row");
                }
            }
        }
    }

    #[test]
    fn rope_styles_rotate_the_pairs_they_name() {
        let rope = Rope::new(RopeStyle::Interleaved, 4, 8, 10_000.0);
        let mut x = vec![1.0, 0.0, 1.0, 0.0];
        rope.apply(&mut x, 0);
        assert_eq!(x, vec![1.0, 0.0, 1.0, 0.0], "position 0 is the identity");
        rope.apply(&mut x, 1);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
        let split = Rope::new(RopeStyle::HalfSplit, 4, 8, 10_000.0);
        let mut y = vec![1.0, 1.0, 0.0, 0.0];
        split.apply(&mut y, 1);
        assert!((y[0] - 1f32.cos()).abs() < 1e-6 && (y[2] - 1f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn rms_norm_scales_rows_to_unit_rms() {
        let mut out = Vec::new();
        rms_norm(&[3.0, 4.0, 0.0, 0.0], &[1.0, 1.0], 1e-6, &mut out);
        let rms = (12.5f32 + 1e-6).sqrt();
        assert_eq!(out[..2], [3.0 / rms, 4.0 / rms]);
        assert_eq!(out[2..], [0.0, 0.0]);
    }
}
