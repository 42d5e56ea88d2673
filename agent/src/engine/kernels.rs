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
/// across blocks, then reduced pairwise. The AVX2 and portable versions give the same bits.
#[inline]
fn row_dot_q8(wq: &[i8], ws: &[f32], xq: &[i8], xs: &[f32]) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        simd::row_dot_q8(wq, ws, xq, xs)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        let mut lanes = [0f32; 8];
        for ((wb, xb), (dw, dx)) in wq
            .chunks_exact(BLOCK)
            .zip(xq.chunks_exact(BLOCK))
            .zip(ws.iter().zip(xs))
        {
            let d = dw * dx;
            for (l, lane) in lanes.iter_mut().enumerate() {
                let mut sum = 0i32;
                for i in 4 * l..4 * l + 4 {
                    sum += i32::from(wb[i]) * i32::from(xb[i]);
                }
                *lane = d.mul_add(sum as f32, *lane);
            }
        }
        let quad = [
            lanes[4] + lanes[0],
            lanes[5] + lanes[1],
            lanes[6] + lanes[2],
            lanes[7] + lanes[3],
        ];
        let pair = [quad[0] + quad[2], quad[1] + quad[3]];
        pair[0] + pair[1]
    }
}

/// Q4_1 weights · Q8_1 activations (GGML's vec_dot_q4_1_q8_1): `Σ d·dx·Σq·qx + m·s`, blocks
/// in order, the integer sums exact (with AVX2 where the build has it).
#[inline]
fn row_dot_q41(nibbles: &[u8], d: &[f32], m: &[f32], xq: &[i8], xs: &[f32], xsum: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (((nb, xb), (dw, mw)), (dx, sx)) in nibbles
        .chunks_exact(BLOCK / 2)
        .zip(xq.chunks_exact(BLOCK))
        .zip(d.iter().zip(m))
        .zip(xs.iter().zip(xsum))
    {
        let nb: &[u8; BLOCK / 2] = nb.try_into().expect("block");
        let xb: &[i8; BLOCK] = xb.try_into().expect("block");
        acc += q41_block_sum(nb, xb) as f32 * dw * dx + mw * sx;
    }
    acc
}

#[inline(always)]
fn q41_block_sum(nb: &[u8; BLOCK / 2], xb: &[i8; BLOCK]) -> i32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    {
        simd::q41_block_sum(nb, xb)
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    {
        let mut sum = 0i32;
        for j in 0..BLOCK / 2 {
            sum += i32::from(nb[j] & 0x0f) * i32::from(xb[j])
                + i32::from(nb[j] >> 4) * i32::from(xb[j + BLOCK / 2]);
        }
        sum
    }
}

/// AVX2 versions of the block products, used when the build targets AVX2 and FMA (the
/// workspace's x86-64-v3). They compute exactly what the portable loops compute.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[allow(unsafe_code)]
mod simd {
    use super::BLOCK;
    use std::arch::x86_64::*;

    /// Σ q·x of one Q4_1 block: nibbles widened to bytes, multiplied as unsigned × signed.
    #[inline(always)]
    pub fn q41_block_sum(nb: &[u8; BLOCK / 2], xb: &[i8; BLOCK]) -> i32 {
        // SAFETY: this module is compiled only when the target has AVX2, and every load reads
        // exactly the array it is given (16 and 32 bytes) with unaligned loads. Products are at
        // most 15 · 127 · 2 per 16-bit lane, so `maddubs` cannot saturate.
        unsafe {
            let bytes = _mm_loadu_si128(nb.as_ptr().cast());
            let mask = _mm_set1_epi8(0x0f);
            let low = _mm_and_si128(bytes, mask);
            let high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
            let w = _mm256_set_m128i(high, low);
            let x = _mm256_loadu_si256(xb.as_ptr().cast());
            let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
            let s = _mm_add_epi32(
                _mm256_castsi256_si128(sums),
                _mm256_extracti128_si256(sums, 1),
            );
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            _mm_cvtsi128_si32(s)
        }
    }

    /// Eight values from `values[at..at + count]`, zero-padded.
    #[inline(always)]
    unsafe fn load8(values: &[f32], at: usize, count: usize) -> __m256 {
        // SAFETY: a full load only when eight values exist at `at`; otherwise a padded copy.
        unsafe {
            if count == 8 {
                _mm256_loadu_ps(values.as_ptr().add(at))
            } else {
                let mut padded = [0f32; 8];
                padded[..count].copy_from_slice(&values[at..at + count]);
                _mm256_loadu_ps(padded.as_ptr())
            }
        }
    }

    /// The terms `sum·d·dx + m·s` of the `count` blocks from 8g of activation row `j` (lane b =
    /// block; lanes from `count` on are zero), the weight blocks widened in `w`.
    #[inline(always)]
    unsafe fn block_terms(
        w: &[__m256i; 8],
        dw: __m256,
        mw: __m256,
        x: &super::Q8Matrix,
        j: usize,
        g: usize,
        count: usize,
    ) -> __m256 {
        let kb = x.cols / BLOCK;
        // SAFETY: the caller (q41_row) checked that row j and blocks 8g..8g+count lie inside `x`;
        // no block at or past `count` is read.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let xq = x.quants.as_ptr().add(j * x.cols + 8 * g * BLOCK);
            // Block b's eight partial sums (zero past `count`), reduced pairwise as they come
            // so few registers are live.
            let block = |b: usize| {
                if b < count {
                    let xv = _mm256_loadu_si256(xq.add(b * BLOCK).cast());
                    _mm256_madd_epi16(_mm256_maddubs_epi16(w[b], xv), ones)
                } else {
                    _mm256_setzero_si256()
                }
            };
            let h01 = _mm256_hadd_epi32(block(0), block(1));
            let h23 = _mm256_hadd_epi32(block(2), block(3));
            let low = _mm256_hadd_epi32(h01, h23);
            let h45 = _mm256_hadd_epi32(block(4), block(5));
            let h67 = _mm256_hadd_epi32(block(6), block(7));
            let high = _mm256_hadd_epi32(h45, h67);
            let sums = _mm256_add_epi32(
                _mm256_permute2x128_si256(low, high, 0x20),
                _mm256_permute2x128_si256(low, high, 0x31),
            );
            let dx = load8(&x.scales, j * kb + 8 * g, count);
            let sx = load8(&x.sums, j * kb + 8 * g, count);
            _mm256_add_ps(
                _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sums), dw), dx),
                _mm256_mul_ps(mw, sx),
            )
        }
    }

    /// Transposes an 8×8 matrix of floats held as eight rows.
    #[inline(always)]
    unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // SAFETY: register-only AVX operations; the caller's build has AVX2.
        unsafe {
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps(t0, t2, 0x44);
            let u1 = _mm256_shuffle_ps(t0, t2, 0xee);
            let u2 = _mm256_shuffle_ps(t1, t3, 0x44);
            let u3 = _mm256_shuffle_ps(t1, t3, 0xee);
            let u4 = _mm256_shuffle_ps(t4, t6, 0x44);
            let u5 = _mm256_shuffle_ps(t4, t6, 0xee);
            let u6 = _mm256_shuffle_ps(t5, t7, 0x44);
            let u7 = _mm256_shuffle_ps(t5, t7, 0xee);
            [
                _mm256_permute2f128_ps(u0, u4, 0x20),
                _mm256_permute2f128_ps(u1, u5, 0x20),
                _mm256_permute2f128_ps(u2, u6, 0x20),
                _mm256_permute2f128_ps(u3, u7, 0x20),
                _mm256_permute2f128_ps(u0, u4, 0x31),
                _mm256_permute2f128_ps(u1, u5, 0x31),
                _mm256_permute2f128_ps(u2, u6, 0x31),
                _mm256_permute2f128_ps(u3, u7, 0x31),
            ]
        }
    }

    /// One Q4_1 weight row (`nibbles`, `d`, `m` for its blocks) against every activation row of
    /// `x`, into `out[j]`. Eight blocks at a time: the weight blocks are widened once, the eight
    /// exact block sums of each activation row are reduced together, and each block's
    /// `sum·d·dx + m·s` is added to the row's total in block order.
    pub fn q41_row(nibbles: &[u8], d: &[f32], m: &[f32], x: &super::Q8Matrix, out: &mut [f32]) {
        let kb = d.len();
        let k = kb * BLOCK;
        let groups = kb.div_ceil(8);
        out.fill(0.0);
        assert!(nibbles.len() == kb * 16 && m.len() == kb && x.cols == k && out.len() == x.rows);
        assert!(
            x.quants.len() >= x.rows * k
                && x.scales.len() >= x.rows * kb
                && x.sums.len() >= x.rows * kb
        );
        // SAFETY: AVX2 is enabled for this build. The assertions above bound every pointer:
        // group `g` covers blocks 8g..8g+count (count = 8, or what is left in the last group)
        // and reads nibbles[(8g..8g+count)·16], d/m[8g..8g+count], and for row j quants
        // [j·k + 256g ..+32·count] and scales/sums [j·kb + 8g ..+count], all inside the slices
        // for j < rows. Loads are unaligned.
        unsafe {
            let mask = _mm_set1_epi8(0x0f);
            for g in 0..groups {
                let count = (kb - 8 * g).min(8);
                let mut w = [_mm256_setzero_si256(); 8];
                for (b, wb) in w.iter_mut().enumerate().take(count) {
                    let bytes = _mm_loadu_si128(nibbles.as_ptr().add((8 * g + b) * 16).cast());
                    *wb = _mm256_set_m128i(
                        _mm_and_si128(_mm_srli_epi16(bytes, 4), mask),
                        _mm_and_si128(bytes, mask),
                    );
                }
                let dw = load8(d, 8 * g, count);
                let mw = load8(m, 8 * g, count);
                // Eight rows at a time: transpose so lane = row, then add block by block — each
                // row's total still takes its terms in block order.
                let mut j = 0;
                while j + 8 <= out.len() {
                    let mut t = [_mm256_setzero_ps(); 8];
                    for (r, tr) in t.iter_mut().enumerate() {
                        *tr = block_terms(&w, dw, mw, x, j + r, g, count);
                    }
                    let mut total = _mm256_loadu_ps(out.as_ptr().add(j));
                    for column in transpose8(t).into_iter().take(count) {
                        total = _mm256_add_ps(total, column);
                    }
                    _mm256_storeu_ps(out.as_mut_ptr().add(j), total);
                    j += 8;
                }
                for (j, total) in out.iter_mut().enumerate().skip(j) {
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), block_terms(&w, dw, mw, x, j, g, count));
                    for term in lanes.into_iter().take(count) {
                        *total += term;
                    }
                }
            }
        }
    }

    /// Q8_0 · Q8 row product with eight float lanes, as the portable version lays them out.
    #[cfg(target_feature = "fma")]
    #[inline]
    pub fn row_dot_q8(wq: &[i8], ws: &[f32], xq: &[i8], xs: &[f32]) -> f32 {
        // SAFETY: AVX2 and FMA are enabled for this build; each load reads one 32-byte block
        // taken from a `chunks_exact(32)` slice. Weights and activations are quantized to
        // [-127, 127], so `sign` gives exact magnitudes and `maddubs` cannot saturate
        // (127 · 127 · 2 < 32768).
        unsafe {
            let mut acc = _mm256_setzero_ps();
            let ones = _mm256_set1_epi16(1);
            for ((wb, xb), (dw, dx)) in wq
                .chunks_exact(BLOCK)
                .zip(xq.chunks_exact(BLOCK))
                .zip(ws.iter().zip(xs))
            {
                let w = _mm256_loadu_si256(wb.as_ptr().cast());
                let x = _mm256_loadu_si256(xb.as_ptr().cast());
                let products = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
                let lanes = _mm256_cvtepi32_ps(_mm256_madd_epi16(products, ones));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), lanes, acc);
            }
            let quad = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
            let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
            _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
        }
    }
}

/// `out[m × n] = x[m × k] · wᵀ` with `w` of shape `n × k`. Rows of `w` are the outer loop so each
/// weight row is read from memory once per call however many activation rows there are; the
/// output rows are split between the worker threads.
pub fn matmul(x: &Q8Matrix, w: &Linear, out: &mut Vec<f32>, scratch: &mut Vec<f32>) {
    match w {
        Linear::Q8(w) => matmul_q8(x, w, out, scratch),
        // Eight activation rows or more amortise widening the weights eight blocks at a time;
        // fewer go block by block. Both give the same bits.
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
        Linear::Q41(w) if x.rows >= 8 => {
            assert_eq!(x.cols, w.cols, "inner dimensions differ");
            matmul_q41_avx2(x, w, out, scratch);
        }
        Linear::Q41(w) => {
            let kb = w.cols / BLOCK;
            assert_eq!(x.cols, w.cols, "inner dimensions differ");
            matmul_rows(x, w.rows, out, scratch, |r, j| {
                row_dot_q41(
                    &w.nibbles[r * kb * 16..(r + 1) * kb * 16],
                    &w.scales[r * kb..(r + 1) * kb],
                    &w.mins[r * kb..(r + 1) * kb],
                    &x.quants[j * w.cols..(j + 1) * w.cols],
                    &x.scales[j * kb..(j + 1) * kb],
                    &x.sums[j * kb..(j + 1) * kb],
                )
            });
        }
    }
}

/// [`matmul`] for Q8_0 weights.
pub fn matmul_q8(x: &Q8Matrix, w: &Q8Matrix, out: &mut Vec<f32>, scratch: &mut Vec<f32>) {
    let k = w.cols;
    assert_eq!(x.cols, k, "inner dimensions differ");
    let kb = k / BLOCK;
    matmul_rows(x, w.rows, out, scratch, |r, j| {
        row_dot_q8(
            &w.quants[r * k..(r + 1) * k],
            &w.scales[r * kb..(r + 1) * kb],
            &x.quants[j * k..(j + 1) * k],
            &x.scales[j * kb..(j + 1) * kb],
        )
    });
}

/// Q4_1 product with each weight row unpacked once per eight blocks and reused for every
/// activation row; same arithmetic, same order, same bits as [`row_dot_q41`].
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
fn matmul_q41_avx2(x: &Q8Matrix, w: &Q41Matrix, out: &mut Vec<f32>, scratch: &mut Vec<f32>) {
    let (m, n) = (x.rows, w.rows);
    let kb = w.cols / BLOCK;
    scratch.resize(n * m, 0.0);
    let rows_per_task = (n / (rayon::current_num_threads() * 8)).max(16);
    scratch
        .par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (i, out_row) in chunk.chunks_exact_mut(m).enumerate() {
                let r = task * rows_per_task + i;
                simd::q41_row(
                    &w.nibbles[r * kb * 16..(r + 1) * kb * 16],
                    &w.scales[r * kb..(r + 1) * kb],
                    &w.mins[r * kb..(r + 1) * kb],
                    x,
                    out_row,
                );
            }
        });
    out.resize(m * n, 0.0);
    for (r, col) in scratch.chunks_exact(m).enumerate() {
        for (j, v) in col.iter().enumerate() {
            out[j * n + r] = *v;
        }
    }
}

/// Runs `dot(weight row, activation row)` for every pair, weight rows outermost and split
/// between threads, and writes `out[m × n]`.
fn matmul_rows(
    x: &Q8Matrix,
    n: usize,
    out: &mut Vec<f32>,
    scratch: &mut Vec<f32>,
    dot: impl Fn(usize, usize) -> f32 + Sync,
) {
    let m = x.rows;
    scratch.resize(n * m, 0.0);
    // Enough rows per task to amortise scheduling, few enough to balance two or more threads.
    let rows_per_task = (n / (rayon::current_num_threads() * 8)).max(16);
    scratch
        .par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            let first = task * rows_per_task;
            for (i, out_row) in chunk.chunks_exact_mut(m).enumerate() {
                for (j, o) in out_row.iter_mut().enumerate() {
                    *o = dot(first + i, j);
                }
            }
        });
    out.resize(m * n, 0.0);
    for (r, col) in scratch.chunks_exact(m).enumerate() {
        for (j, v) in col.iter().enumerate() {
            out[j * n + r] = *v;
        }
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
        let x = Q8Matrix::quantize(&pseudo_random(4 * 96, 8), 4, 96);
        let w = Q8Matrix::quantize(&pseudo_random(96, 9), 1, 96);
        let fast = row_dot_q8(&w.quants, &w.scales, &x.quants[..96], &x.scales[..3]);
        let mut lanes = [0f32; 8];
        for b in 0..3 {
            let d = w.scales[b] * x.scales[b];
            for (l, lane) in lanes.iter_mut().enumerate() {
                let sum: i32 = (4 * l..4 * l + 4)
                    .map(|i| i32::from(w.quants[32 * b + i]) * i32::from(x.quants[32 * b + i]))
                    .sum();
                *lane = d.mul_add(sum as f32, *lane);
            }
        }
        let quad = [
            lanes[4] + lanes[0],
            lanes[5] + lanes[1],
            lanes[6] + lanes[2],
            lanes[7] + lanes[3],
        ];
        assert_eq!(
            fast.to_bits(),
            ((quad[0] + quad[2]) + (quad[1] + quad[3])).to_bits()
        );

        let nibbles: Vec<u8> = (0..16).map(|i| (i * 37 + 11) as u8).collect();
        let xb: [i8; 32] = std::array::from_fn(|i| (i as i8 - 16) * 7);
        let expected: i32 = (0..16)
            .map(|j| {
                i32::from(nibbles[j] & 15) * i32::from(xb[j])
                    + i32::from(nibbles[j] >> 4) * i32::from(xb[j + 16])
            })
            .sum();
        assert_eq!(
            q41_block_sum(nibbles.as_slice().try_into().unwrap(), &xb),
            expected
        );

        // A whole Q4_1 product (19 blocks a row: two groups of eight and a tail) against the
        // block-by-block dot product, bit for bit.
        let (m, n, k) = (11, 5, 19 * BLOCK);
        let raw: Vec<u8> = (0..n * k / BLOCK * 20)
            .map(|i| (i * 7919 % 251) as u8)
            .collect();
        let mut bytes = raw.clone();
        for block in bytes.chunks_exact_mut(20) {
            block[..2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
            block[2..4].copy_from_slice(&f16::from_f32(-0.05).to_le_bytes());
        }
        let w = Q41Matrix::from_ggml(&bytes, n, k).unwrap();
        let x = Q8Matrix::quantize(&pseudo_random(m * k, 10), m, k);
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        matmul(&x, &Linear::Q41(w.clone()), &mut out, &mut scratch);
        let kb = k / BLOCK;
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
                    "row {r}, activation {j}"
                );
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
