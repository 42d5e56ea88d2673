//! The int8 matrix products every linear layer uses: Q8_0 and Q4_1 weights against Q8
//! activations. Portable loops define the arithmetic (GGML's AVX2 order: eight float lanes per
//! output, blocks in order); the AVX2 kernels and, where the CPU has it, the AVX-512 VNNI kernel
//! give the same bits, four activation rows per widened weight block.

use super::dot;
use super::quant::{BLOCK, Linear, Q8Matrix, Q41Matrix};
#[cfg(any(
    test,
    not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))
))]
use super::reduce_lanes;
use rayon::prelude::*;

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
/// across blocks, reduced pairwise; plus `Σ m·s` over the blocks ([`dot`]). The AVX2 and AVX-512 kernels
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
    reduce_lanes(lanes) + dot(m, xsum)
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

    /// Panics unless `out[..R]` and activation rows `j0..j0 + R` of `x` exist and the weight
    /// row's `nibbles`, `d` and `m` describe `x.cols` columns: what the Q4_1 tiles' pointer
    /// arithmetic relies on.
    #[inline(always)]
    pub fn check_q41_tile(
        nibbles: &[u8],
        d: &[f32],
        m: &[f32],
        x: &super::Q8Matrix,
        j0: usize,
        rows: usize,
        out: &[f32],
    ) {
        let kb = d.len();
        let k = kb * BLOCK;
        assert!(nibbles.len() == kb * 16 && m.len() == kb && x.cols == k && out.len() >= rows);
        assert!(
            j0 + rows <= x.rows
                && x.quants.len() >= x.rows * k
                && x.scales.len() >= x.rows * kb
                && x.sums.len() >= x.rows * kb
        );
    }

    /// A Q4_1 block's 16 bytes of nibbles widened to 32 bytes in element order (low nibbles are
    /// elements 0–15, high nibbles 16–31).
    ///
    /// # Safety
    /// `block` must point at 16 readable bytes.
    #[inline(always)]
    pub unsafe fn widen_q41(block: *const u8) -> __m256i {
        // SAFETY: the caller guarantees 16 bytes at `block`; the load is unaligned.
        unsafe {
            let mask = _mm_set1_epi8(0x0f);
            let bytes = _mm_loadu_si128(block.cast());
            _mm256_set_m128i(
                _mm_and_si128(_mm_srli_epi16(bytes, 4), mask),
                _mm_and_si128(bytes, mask),
            )
        }
    }

    /// Eight float lanes summed as GGML's hsum_float_8.
    #[inline(always)]
    pub unsafe fn reduce8(v: __m256) -> f32 {
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
        check_q41_tile(nibbles, d, m, x, j0, R, out);
        let kb = d.len();
        let k = kb * BLOCK;
        // SAFETY: AVX2 and FMA are enabled for this build. The check above bounds every
        // pointer: block b reads nibbles[16b..16b + 16] and, for row j in j0..j0 + R,
        // quants[j·k + 32b ..+32] and scales[j·kb + b]. Loads are unaligned. Products are at most
        // 15 · 127 · 2 per 16-bit lane, so `maddubs` cannot saturate.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..kb {
                let w = widen_q41(nibbles.as_ptr().add(b * 16));
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
                out[t] = reduce8(acc) + super::dot(m, &x.sums[j * kb..(j + 1) * kb]);
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
    use super::{BLOCK, simd};
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
        simd::check_q41_tile(nibbles, d, m, x, j0, R, out);
        let kb = d.len();
        let k = kb * BLOCK;
        // SAFETY: the caller guarantees the CPU features. The check above bounds every
        // pointer: block b reads nibbles[16b..16b + 16] and, for row j in j0..j0 + R,
        // quants[j·k + 32b ..+32]; scales are read eight at a time under a mask of the blocks
        // that exist. Loads are unaligned. `vpdpbusd` sums four products of at most 15 · 127
        // into each 32-bit lane, exactly.
        unsafe {
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
                    let w = simd::widen_q41(nibbles.as_ptr().add(b * 16));
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
                out[t] = simd::reduce8(acc) + super::dot(m, &x.sums[j * kb..(j + 1) * kb]);
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

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

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
}
