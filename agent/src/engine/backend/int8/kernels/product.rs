//! The int8 matrix products every linear layer uses: Q8_0 and Q4_1 weights against Q8
//! activations, with portable loops that define the arithmetic and AVX2 and AVX-512 VNNI
//! kernels (the latter chosen at run time when the CPU has it) that give the same bits.
//!
//! Both follow candle's portable vec_dot_q8_0_q8_0 and vec_dot_q4_1_q8_1: per block an exact
//! integer sum `Σq·qx`, then in f32 `acc += Σq·qx · d · dx` (Q8_0) or
//! `acc += Σq·qx · d · dx + m · s` (Q4_1), block after block. The weights are repacked in panels
//! of eight rows ([`super::quant::PANEL`]), so one int8 dot instruction advances the integer
//! sums of eight rows and the float steps run eight rows to a register.

use super::pool;
use super::quant::{BLOCK, Linear, PANEL, Q8Matrix, Q8Panels, Q41Matrix};

/// Panel `p` of Q8_0 weights · activation row `j` of `x`: the eight rows' products in candle's
/// order (`acc += Σq·qx · d · dx`, block after block). The vector kernels give the same bits;
/// builds without AVX2 use this.
#[cfg(any(
    test,
    not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))
))]
fn panel_dot_q8(w: &Q8Panels, p: usize, x: &Q8Matrix, j: usize) -> [f32; PANEL] {
    let (k, kb) = (w.cols, w.cols / BLOCK);
    let mut acc = [0f32; PANEL];
    for b in 0..kb {
        let chunks = &w.quants[(p * kb + b) * 256..(p * kb + b + 1) * 256];
        let xq = &x.quants[j * k + b * BLOCK..j * k + (b + 1) * BLOCK];
        let dx = x.scales[j * kb + b];
        for (r, acc) in acc.iter_mut().enumerate() {
            let sum: i32 = (0..BLOCK)
                .map(|e| i32::from(chunks[32 * (e / 4) + 4 * r + e % 4]) * i32::from(xq[e]))
                .sum();
            *acc += sum as f32 * w.scales[(p * kb + b) * PANEL + r] * dx;
        }
    }
    acc
}

/// Panel `p` of Q4_1 weights · activation row `j` of `x`: the eight rows' products in candle's
/// order (`acc += Σq·qx · d · dx + m · s`, block after block). The vector kernels give the same
/// bits; builds without AVX2 use this.
#[cfg(any(
    test,
    not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))
))]
fn panel_dot_q41(w: &Q41Matrix, p: usize, x: &Q8Matrix, j: usize) -> [f32; PANEL] {
    let (k, kb) = (w.cols, w.cols / BLOCK);
    let mut acc = [0f32; PANEL];
    for b in 0..kb {
        let nibbles = &w.nibbles[(p * kb + b) * 128..(p * kb + b + 1) * 128];
        let xq = &x.quants[j * k + b * BLOCK..j * k + (b + 1) * BLOCK];
        let (dx, s) = (x.scales[j * kb + b], x.sums[j * kb + b]);
        for (r, acc) in acc.iter_mut().enumerate() {
            let mut sum = 0i32;
            for c in 0..4 {
                for e in 0..4 {
                    let byte = nibbles[32 * c + 4 * r + e];
                    sum += i32::from(byte & 0x0f) * i32::from(xq[8 * c + e])
                        + i32::from(byte >> 4) * i32::from(xq[8 * c + 4 + e]);
                }
            }
            let at = (p * kb + b) * PANEL + r;
            *acc += sum as f32 * w.scales[at] * dx + w.mins[at] * s;
        }
    }
    acc
}

/// Where tiles write `out[m × stride]`: activation row `j`'s products with panel `u` are the
/// eight floats at `j·stride + u·PANEL`. Parallel tasks are given disjoint panels, so their
/// writes never meet; every write is checked against the bounds.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    rows: usize,
    stride: usize,
}

// SAFETY: tasks sharing an `Out` write disjoint panels of a buffer borrowed for the whole loop.
#[allow(unsafe_code)]
unsafe impl Send for Out {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for Out {}

impl Out {
    fn new(buf: &mut [f32], rows: usize, stride: usize) -> Self {
        assert!(buf.len() >= rows * stride && stride.is_multiple_of(PANEL));
        Self {
            ptr: buf.as_mut_ptr(),
            rows,
            stride,
        }
    }

    /// Panics unless panels `u0..u0 + units` of rows `j0..j0 + rows` are inside the buffer.
    #[inline(always)]
    fn check(&self, u0: usize, units: usize, j0: usize, rows: usize) {
        assert!(j0 + rows <= self.rows && (u0 + units) * PANEL <= self.stride);
    }

    /// The eight floats of row `j` and panel `u`, which [`Out::check`] has covered.
    ///
    /// # Safety
    /// `(j, u)` must be inside the checked bounds and belong to the calling task's panels.
    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn at(&self, j: usize, u: usize) -> *mut f32 {
        // SAFETY: inside the buffer, as the caller guarantees.
        unsafe { self.ptr.add(j * self.stride + u * PANEL) }
    }
}

/// A product kernel over one tile: weight panels `u0..u0 + W` against activation rows
/// `j0..j0 + R`, into `out`. Every element is one weight row dotted with one activation row in
/// the fixed order of the portable loops, so the tile shape changes speed, never bits.
trait Tile: Sync {
    /// Activation rows.
    fn rows(&self) -> usize;
    fn tile<const W: usize, const R: usize>(&self, u0: usize, j0: usize, out: Out);
}

/// Panels `u0..u0 + count` against every activation row. One activation row (a lone decode)
/// takes four panels at a time and two or three take two, so that at least four independent
/// accumulators hide the instructions' latency; more rows take one panel against four
/// activation rows.
fn run_tiles<K: Tile>(k: &K, u0: usize, count: usize, out: Out) {
    match k.rows() {
        1 => by_units::<K, 4>(k, u0, count, out),
        2 | 3 => by_units::<K, 2>(k, u0, count, out),
        _ => by_units::<K, 1>(k, u0, count, out),
    }
}

fn by_units<K: Tile, const W: usize>(k: &K, u0: usize, count: usize, out: Out) {
    let mut i = 0;
    while i + W <= count {
        by_activation_rows::<K, W>(k, u0 + i, out);
        i += W;
    }
    for i in i..count {
        by_activation_rows::<K, 1>(k, u0 + i, out);
    }
}

fn by_activation_rows<K: Tile, const W: usize>(k: &K, u: usize, out: Out) {
    let m = k.rows();
    let mut j = 0;
    while j + 4 <= m {
        k.tile::<W, 4>(u, j, out);
        j += 4;
    }
    match m - j {
        3 => k.tile::<W, 3>(u, j, out),
        2 => k.tile::<W, 2>(u, j, out),
        1 => k.tile::<W, 1>(u, j, out),
        _ => {}
    }
}

/// The portable loops as [`Tile`]s, for builds without AVX2.
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
mod portable {
    use super::{Out, PANEL, Q8Matrix, Q8Panels, Q41Matrix, Tile, panel_dot_q8, panel_dot_q41};

    pub struct Q8<'a>(pub &'a Q8Panels, pub &'a Q8Matrix);
    pub struct Q41<'a>(pub &'a Q41Matrix, pub &'a Q8Matrix);

    impl Tile for Q8<'_> {
        fn rows(&self) -> usize {
            self.1.rows
        }
        fn tile<const W: usize, const R: usize>(&self, p0: usize, j0: usize, out: Out) {
            out.check(p0, W, j0, R);
            for u in p0..p0 + W {
                for j in j0..j0 + R {
                    let sums = panel_dot_q8(self.0, u, self.1, j);
                    // SAFETY: checked above; the panels are this task's.
                    #[allow(unsafe_code)]
                    unsafe {
                        out.at(j, u).copy_from_nonoverlapping(sums.as_ptr(), PANEL)
                    };
                }
            }
        }
    }

    impl Tile for Q41<'_> {
        fn rows(&self) -> usize {
            self.1.rows
        }
        fn tile<const W: usize, const R: usize>(&self, p0: usize, j0: usize, out: Out) {
            out.check(p0, W, j0, R);
            for u in p0..p0 + W {
                for j in j0..j0 + R {
                    let sums = panel_dot_q41(self.0, u, self.1, j);
                    // SAFETY: checked above; the panels are this task's.
                    #[allow(unsafe_code)]
                    unsafe {
                        out.at(j, u).copy_from_nonoverlapping(sums.as_ptr(), PANEL)
                    };
                }
            }
        }
    }
}

/// Panics unless panels `u0..u0 + w_units` of a weight matrix with `units` panels and `kb`
/// blocks a row, activation rows `j0..j0 + x_rows` of `x` and their places in `out` exist: what
/// the vector tiles' pointer arithmetic relies on. `parts` are the weight arrays with their
/// elements per panel and block.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn check_tile(
    units: usize,
    kb: usize,
    parts: &[(usize, usize)],
    u0: usize,
    w_units: usize,
    x: &Q8Matrix,
    j0: usize,
    x_rows: usize,
    out: Out,
) {
    assert!(u0 + w_units <= units && parts.iter().all(|&(len, per)| len == units * kb * per));
    assert!(
        x.cols == kb * BLOCK
            && j0 + x_rows <= x.rows
            && x.quants.len() >= x.rows * x.cols
            && x.scales.len() >= x.rows * kb
            && x.sums.len() >= x.rows * kb
    );
    out.check(u0, w_units, j0, x_rows);
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
    use super::{BLOCK, Out, PANEL, Q8Matrix, Q8Panels, Q41Matrix, Tile, check_tile};
    use std::arch::x86_64::*;

    /// `acc + Σ a·b` over each 32-bit lane's four bytes, `a` unsigned and `b` signed, exactly:
    /// `vpdpbusd` when `VNNI` (the caller must then be compiled with AVX-512 VNNI and VL), else
    /// two AVX2 steps. Without `VNNI`, each pair of products must stay within an i16 (callers
    /// here stay within 128 · 127 · 2), so that `maddubs` cannot saturate.
    #[inline(always)]
    unsafe fn dot4<const VNNI: bool>(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: register-only operations; with `VNNI` the caller guarantees the features.
        unsafe {
            if VNNI {
                _mm256_dpbusd_epi32(acc, a, b)
            } else {
                let pairs = _mm256_maddubs_epi16(a, b);
                _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
            }
        }
    }

    /// Writes panel `p0 + i`'s sums for activation row `j0 + t` from `acc[i][t]`.
    ///
    /// # Safety
    /// The tile `p0..p0 + P` × `j0..j0 + R` must be inside `out` (checked) and the caller's.
    #[inline(always)]
    unsafe fn store<const P: usize, const R: usize>(
        acc: [[__m256; R]; P],
        out: Out,
        p0: usize,
        j0: usize,
    ) {
        for (i, acc) in acc.into_iter().enumerate() {
            for (t, acc) in acc.into_iter().enumerate() {
                // SAFETY: inside the tile, as the caller guarantees; the store is unaligned.
                unsafe { _mm256_storeu_ps(out.at(j0 + t, p0 + i), acc) };
            }
        }
    }

    /// Q4_1 panels `p0..p0 + P` against activation rows `j0..j0 + R` of `x`, in candle's order
    /// (as [`super::panel_dot_q41`]): per block, the integer sums of the panel's eight rows in
    /// the lanes of two registers (low and high nibbles), then `acc += Σ · d · dx + m · s` eight
    /// rows at a time.
    ///
    /// # Safety
    /// With `VNNI`, the CPU must have AVX-512 VNNI and VL and the caller be compiled with them.
    #[inline(always)]
    pub unsafe fn q41_panels<const VNNI: bool, const P: usize, const R: usize>(
        w: &Q41Matrix,
        p0: usize,
        x: &Q8Matrix,
        j0: usize,
        out: Out,
    ) {
        let (k, kb) = (w.cols, w.cols / BLOCK);
        let parts = [
            (w.nibbles.len(), 128),
            (w.scales.len(), 8),
            (w.mins.len(), 8),
        ];
        check_tile(w.panels(), kb, &parts, p0, P, x, j0, R, out);
        // SAFETY: AVX2 (and with `VNNI` the caller's features) are enabled. The check bounds
        // every pointer: block b reads, for panel p in p0..p0 + P, nibbles[(p·kb + b)·128 ..+128]
        // and scales, mins[(p·kb + b)·8 ..+8]; for activation row j in j0..j0 + R,
        // quants[j·k + 32b ..+32], scales[j·kb + b] and sums[j·kb + b]; it writes
        // panel p0 + i of row j of `out`, which the check covers. Loads and stores are unaligned.
        unsafe {
            let low = _mm256_set1_epi8(0x0f);
            let mut acc = [[_mm256_setzero_ps(); R]; P];
            for b in 0..kb {
                // Per activation row and panel, the low and high nibbles' integer sums.
                let mut sums = [[[_mm256_setzero_si256(); 2]; P]; R];
                for c in 0..4 {
                    let mut halves = [[_mm256_setzero_si256(); 2]; P];
                    for (i, halves) in halves.iter_mut().enumerate() {
                        let at = ((p0 + i) * kb + b) * 128 + 32 * c;
                        let v = _mm256_loadu_si256(w.nibbles.as_ptr().add(at).cast());
                        halves[0] = _mm256_and_si256(v, low);
                        halves[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    }
                    for (t, sums) in sums.iter_mut().enumerate() {
                        let xb = x.quants.as_ptr().add((j0 + t) * k + b * BLOCK + 8 * c);
                        let xv = [
                            _mm256_set1_epi32(xb.cast::<i32>().read_unaligned()),
                            _mm256_set1_epi32(xb.add(4).cast::<i32>().read_unaligned()),
                        ];
                        for (sums, halves) in sums.iter_mut().zip(&halves) {
                            for h in 0..2 {
                                sums[h] = dot4::<VNNI>(sums[h], halves[h], xv[h]);
                            }
                        }
                    }
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let at = ((p0 + i) * kb + b) * PANEL;
                    let d = _mm256_loadu_ps(w.scales.as_ptr().add(at));
                    let mins = _mm256_loadu_ps(w.mins.as_ptr().add(at));
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let xa = (j0 + t) * kb + b;
                        let dx = _mm256_set1_ps(*x.scales.get_unchecked(xa));
                        let s = _mm256_set1_ps(*x.sums.get_unchecked(xa));
                        let sum = _mm256_add_epi32(sums[t][i][0], sums[t][i][1]);
                        let scaled = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sum), d), dx);
                        let term = _mm256_add_ps(scaled, _mm256_mul_ps(mins, s));
                        *acc = _mm256_add_ps(*acc, term);
                    }
                }
            }
            store(acc, out, p0, j0);
        }
    }

    /// The Q4_1 product with AVX2.
    pub struct Q41<'a>(pub &'a Q41Matrix, pub &'a Q8Matrix);

    impl Tile for Q41<'_> {
        fn rows(&self) -> usize {
            self.1.rows
        }

        #[inline(always)]
        fn tile<const W: usize, const R: usize>(&self, p0: usize, j0: usize, out: Out) {
            // SAFETY: without VNNI, AVX2 is all it needs, and this build has it.
            unsafe { q41_panels::<false, W, R>(self.0, p0, self.1, j0, out) }
        }
    }

    /// Q8_0 panels `p0..p0 + P` against activation rows `j0..j0 + R` of `x`, in candle's order
    /// (as [`super::panel_dot_q8`]): per block, the eight rows' integer sums in the lanes of a
    /// register, then `acc += Σ · d · dx` eight rows at a time. With `VNNI`, `vpdpbusd` takes
    /// the activations offset by 128 (`offset`, as unsigned bytes) against the signed weights,
    /// and the weights' `128 · Σq` is taken off again; without, the weights' magnitudes meet the
    /// activations carrying the weights' signs, which `maddubs` sums without saturating (Q8
    /// activations are within ±127, so each pair is at most 128 · 127 · 2).
    ///
    /// # Safety
    /// With `VNNI`, the CPU must have AVX-512 VNNI and VL and the caller be compiled with them.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn q8_panels<const VNNI: bool, const P: usize, const R: usize>(
        w: &Q8Panels,
        p0: usize,
        x: &Q8Matrix,
        offset: &[u8],
        j0: usize,
        out: Out,
    ) {
        let (k, kb) = (w.cols, w.cols / BLOCK);
        let parts = [
            (w.quants.len(), 256),
            (w.scales.len(), 8),
            (w.offsets.len(), 8),
        ];
        check_tile(w.panels(), kb, &parts, p0, P, x, j0, R, out);
        assert!(!VNNI || offset.len() == x.quants.len());
        // SAFETY: AVX2 (and with `VNNI` the caller's features) are enabled. The check bounds
        // every pointer: block b reads, for panel p in p0..p0 + P, quants[(p·kb + b)·256 ..+256]
        // and scales, offsets[(p·kb + b)·8 ..+8]; for activation row j in j0..j0 + R,
        // quants (or offset) [j·k + 32b ..+32] and scales[j·kb + b]; it writes
        // panel p0 + i of row j of `out`, which the check covers. Loads and stores are unaligned.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); R]; P];
            for b in 0..kb {
                let mut sums = [[_mm256_setzero_si256(); P]; R];
                for c in 0..8 {
                    let mut wv = [_mm256_setzero_si256(); P];
                    for (i, wv) in wv.iter_mut().enumerate() {
                        let at = ((p0 + i) * kb + b) * 256 + 32 * c;
                        *wv = _mm256_loadu_si256(w.quants.as_ptr().add(at).cast());
                    }
                    for (t, sums) in sums.iter_mut().enumerate() {
                        let at = (j0 + t) * k + b * BLOCK + 4 * c;
                        let activations = if VNNI {
                            offset.as_ptr()
                        } else {
                            x.quants.as_ptr().cast()
                        };
                        let xv =
                            _mm256_set1_epi32(activations.add(at).cast::<i32>().read_unaligned());
                        for (sum, wv) in sums.iter_mut().zip(&wv) {
                            *sum = if VNNI {
                                dot4::<true>(*sum, xv, *wv)
                            } else {
                                dot4::<false>(*sum, _mm256_abs_epi8(*wv), _mm256_sign_epi8(xv, *wv))
                            };
                        }
                    }
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let at = ((p0 + i) * kb + b) * PANEL;
                    let d = _mm256_loadu_ps(w.scales.as_ptr().add(at));
                    let taken = _mm256_loadu_si256(w.offsets.as_ptr().add(at).cast());
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let dx = _mm256_set1_ps(*x.scales.get_unchecked((j0 + t) * kb + b));
                        let sum = if VNNI {
                            _mm256_sub_epi32(sums[t][i], taken)
                        } else {
                            sums[t][i]
                        };
                        let scaled = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sum), d), dx);
                        *acc = _mm256_add_ps(*acc, scaled);
                    }
                }
            }
            store(acc, out, p0, j0);
        }
    }

    /// The Q8_0 product with AVX2.
    pub struct Q8<'a>(pub &'a Q8Panels, pub &'a Q8Matrix);

    impl Tile for Q8<'_> {
        fn rows(&self) -> usize {
            self.1.rows
        }

        #[inline(always)]
        fn tile<const W: usize, const R: usize>(&self, p0: usize, j0: usize, out: Out) {
            // SAFETY: without VNNI, AVX2 is all it needs, and this build has it.
            unsafe { q8_panels::<false, W, R>(self.0, p0, self.1, &[], j0, out) }
        }
    }
}

/// The products with AVX-512 VNNI (`vpdpbusd` on 256-bit registers), for CPUs that have it
/// (checked at run time): the AVX2 kernels' arithmetic with one instruction for each four
/// products of eight rows. Same bits.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[allow(unsafe_code)]
mod vnni {
    use super::{Out, Q8Matrix, Q8Panels, Q41Matrix, Tile, simd};

    /// Whether this CPU has the instructions the kernels here use.
    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }

    /// [`simd::q41_panels`] with `vpdpbusd`. Made only by [`Q41::new`], which checks the CPU.
    pub struct Q41<'a>(&'a Q41Matrix, &'a Q8Matrix);

    impl<'a> Q41<'a> {
        pub fn new(w: &'a Q41Matrix, x: &'a Q8Matrix) -> Option<Self> {
            available().then_some(Self(w, x))
        }
    }

    impl Tile for Q41<'_> {
        fn rows(&self) -> usize {
            self.1.rows
        }

        #[inline(always)]
        fn tile<const W: usize, const R: usize>(&self, p0: usize, j0: usize, out: Out) {
            // SAFETY: `Q41::new` checked that the CPU has the features.
            unsafe { q41_tile::<W, R>(self.0, p0, self.1, j0, out) }
        }
    }

    /// # Safety
    /// The CPU must have what [`available`] checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn q41_tile<const W: usize, const R: usize>(
        w: &Q41Matrix,
        p0: usize,
        x: &Q8Matrix,
        j0: usize,
        out: Out,
    ) {
        // SAFETY: this function is compiled with the features `VNNI` needs and the caller
        // guarantees the CPU has them.
        unsafe { simd::q41_panels::<true, W, R>(w, p0, x, j0, out) }
    }

    /// [`simd::q8_panels`] with `vpdpbusd`. Made only by [`Q8::new`], which checks the CPU and
    /// offsets the activations by 128.
    pub struct Q8<'a> {
        w: &'a Q8Panels,
        x: &'a Q8Matrix,
        offset: Vec<u8>,
    }

    impl<'a> Q8<'a> {
        pub fn new(w: &'a Q8Panels, x: &'a Q8Matrix) -> Option<Self> {
            available().then(|| Self {
                w,
                x,
                offset: x.quants.iter().map(|q| (*q as u8) ^ 0x80).collect(),
            })
        }
    }

    impl Tile for Q8<'_> {
        fn rows(&self) -> usize {
            self.x.rows
        }

        #[inline(always)]
        fn tile<const W: usize, const R: usize>(&self, p0: usize, j0: usize, out: Out) {
            // SAFETY: `Q8::new` checked that the CPU has the features.
            unsafe { q8_tile::<W, R>(self.w, p0, self.x, &self.offset, j0, out) }
        }
    }

    /// # Safety
    /// The CPU must have what [`available`] checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn q8_tile<const W: usize, const R: usize>(
        w: &Q8Panels,
        p0: usize,
        x: &Q8Matrix,
        offset: &[u8],
        j0: usize,
        out: Out,
    ) {
        // SAFETY: this function is compiled with the features `VNNI` needs and the caller
        // guarantees the CPU has them.
        unsafe { simd::q8_panels::<true, W, R>(w, p0, x, offset, j0, out) }
    }
}

/// `out[m × n] = x[m × k] · wᵀ` with `w` of shape `n × k`. Rows of `w` are the outer loop so each
/// weight row is read from memory once per call however many activation rows there are; the
/// weight rows are split between the worker threads.
pub fn matmul(x: &Q8Matrix, w: &Linear, out: &mut Vec<f32>, scratch: &mut Vec<f32>) {
    match w {
        Linear::Q8(w) => matmul_q8(x, w, out, scratch),
        Linear::Q41(w) => matmul_q41(x, w, out, scratch),
    }
}

/// [`matmul`] for Q8_0 weights.
pub fn matmul_q8(x: &Q8Matrix, w: &Q8Panels, out: &mut Vec<f32>, scratch: &mut Vec<f32>) {
    assert_eq!(x.cols, w.cols, "inner dimensions differ");
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    match vnni::Q8::new(w, x) {
        Some(k) => for_units(&k, w.panels(), w.rows, out, scratch),
        None => for_units(&simd::Q8(w, x), w.panels(), w.rows, out, scratch),
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    for_units(&portable::Q8(w, x), w.panels(), w.rows, out, scratch);
}

/// [`matmul`] for Q4_1 weights.
fn matmul_q41(x: &Q8Matrix, w: &Q41Matrix, out: &mut Vec<f32>, scratch: &mut Vec<f32>) {
    assert_eq!(x.cols, w.cols, "inner dimensions differ");
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    match vnni::Q41::new(w, x) {
        Some(k) => for_units(&k, w.panels(), w.rows, out, scratch),
        None => for_units(&simd::Q41(w, x), w.panels(), w.rows, out, scratch),
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    for_units(&portable::Q41(w, x), w.panels(), w.rows, out, scratch);
}

/// Runs kernel `k` over all `units` weight panels, split between threads, and writes
/// `out[m × n]`: the first `n` of the panels' rows (a padded panel's extra rows are dropped).
fn for_units<K: Tile>(k: &K, units: usize, n: usize, out: &mut Vec<f32>, scratch: &mut Vec<f32>) {
    let m = k.rows();
    out.resize(m * n, 0.0);
    if m == 0 {
        return;
    }
    // Whole panels go straight into `out`; otherwise into a wider buffer, then trimmed.
    let stride = units * PANEL;
    let buf = if stride == n {
        &mut out[..]
    } else {
        scratch.resize(m * stride, 0.0);
        &mut scratch[..]
    };
    let target = Out::new(buf, m, stride);
    // Enough panels per task to amortise claiming it, few enough to balance the threads.
    let per_task = (units / (pool::threads() * 8)).max(2);
    pool::for_each(units.div_ceil(per_task), |task| {
        let u0 = task * per_task;
        run_tiles(k, u0, per_task.min(units - u0), target);
    });
    if stride != n {
        for (o, s) in out.chunks_exact_mut(n).zip(scratch.chunks_exact(stride)) {
            o.copy_from_slice(&s[..n]);
        }
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

    /// GGML Q4_1 blocks for `n × k` weights from deterministic bytes, with varied scales.
    fn q4_1_bytes(n: usize, k: usize, seed: u32) -> Vec<u8> {
        let raw = pseudo_random(n * k / BLOCK * 20, seed);
        let mut bytes = Vec::new();
        for block in raw.chunks_exact(20) {
            bytes.extend_from_slice(&f16::from_f32(block[0].abs() / 8.0 + 0.01).to_le_bytes());
            bytes.extend_from_slice(&f16::from_f32(block[1] / 4.0).to_le_bytes());
            bytes.extend(block[4..].iter().map(|v| ((v + 0.5) * 255.0) as u8));
        }
        bytes
    }

    /// The values GGML Q4_1 blocks stand for (`d·q + m`), straight from the file's bytes.
    fn q4_1_values(bytes: &[u8]) -> Vec<f32> {
        let mut dense = Vec::new();
        for block in bytes.chunks_exact(20) {
            let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
            let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
            let q = |e: usize| {
                f32::from(if e < 16 {
                    block[4 + e] & 0x0f
                } else {
                    block[e - 12] >> 4
                })
            };
            dense.extend((0..BLOCK).map(|e| d * q(e) + m));
        }
        dense
    }

    #[test]
    fn int8_matmul_is_close_to_f32() {
        let (m, n, k) = (5, 70, 96);
        let x = pseudo_random(m * k, 1);
        let w = pseudo_random(n * k, 2);
        let (qx, qw) = (
            Q8Matrix::quantize(&x, m, k),
            Q8Panels::from_matrix(&Q8Matrix::quantize(&w, n, k)),
        );
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        matmul_q8(&qx, &qw, &mut out, &mut scratch);
        let exact = reference(&x, &w, m, n, k);
        for (a, b) in out.iter().zip(&exact) {
            assert!((a - b).abs() < 0.03, "{a} vs {b}");
        }
    }

    #[test]
    fn q4_1_weights_multiply_like_their_dequantized_values() {
        // 13 rows: a whole panel and a padded one.
        let (m, n, k) = (3, 13, 64);
        let bytes = q4_1_bytes(n, k, 5);
        let w = Q41Matrix::from_ggml(&bytes, n, k).unwrap();
        let x = pseudo_random(m * k, 6);
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        matmul(
            &Q8Matrix::quantize(&x, m, k),
            &Linear::Q41(w),
            &mut out,
            &mut scratch,
        );
        assert_eq!(out.len(), m * n);
        for (a, b) in out
            .iter()
            .zip(&reference(&x, &q4_1_values(&bytes), m, n, k))
        {
            assert!((a - b).abs() < 0.05 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    /// candle's own Q4_1 product (its quantized matmul, which quantizes the activations to Q8_1
    /// as we do): the same bits, for a lone row and for a batch.
    #[test]
    fn q4_1_products_equal_candles_bit_for_bit() {
        use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
        use candle_core::{Device, Module, Tensor};
        // candle wants an even number of blocks.
        let (n, k) = (24, 18 * BLOCK);
        let weights = Tensor::from_vec(pseudo_random(n * k, 21), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&weights, GgmlDType::Q4_1).unwrap();
        let w = Q41Matrix::from_ggml(&q.data().unwrap(), n, k).unwrap();
        let candle = QMatMul::from_qtensor(q).unwrap();
        for m in [1, 5] {
            let x = pseudo_random(m * k, 22 + m as u32);
            let expected = candle
                .forward(&Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let (mut out, mut scratch) = (Vec::new(), Vec::new());
            matmul(
                &Q8Matrix::quantize(&x, m, k),
                &Linear::Q41(w.clone()),
                &mut out,
                &mut scratch,
            );
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&expected), "{m} rows");
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_a_batch() {
        let (n, k) = (40, 64);
        let rows = pseudo_random(7 * k, 4);
        let (batch_x, alone_x) = (
            Q8Matrix::quantize(&rows, 7, k),
            Q8Matrix::quantize(&rows[3 * k..4 * k], 1, k),
        );
        let weights = [
            Linear::Q8(Q8Panels::from_matrix(&Q8Matrix::quantize(
                &pseudo_random(n * k, 3),
                n,
                k,
            ))),
            Linear::Q41(Q41Matrix::from_ggml(&q4_1_bytes(n, k, 7), n, k).unwrap()),
        ];
        for w in &weights {
            let (mut batch, mut alone, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
            matmul(&batch_x, w, &mut batch, &mut scratch);
            matmul(&alone_x, w, &mut alone, &mut scratch);
            assert_eq!(&batch[3 * n..4 * n], &alone[..]);
        }
    }

    #[test]
    fn whole_products_give_the_portable_bits() {
        // 19 blocks a row (an odd count) and 21 weight rows (a padded Q4_1 panel), for every
        // tiling of the activation rows.
        let (n, k) = (21, 19 * BLOCK);
        let all = pseudo_random(11 * k, 8);
        let q8 = Q8Panels::from_matrix(&Q8Matrix::quantize(&pseudo_random(n * k, 9), n, k));
        let q41 = Q41Matrix::from_ggml(&q4_1_bytes(n, k, 10), n, k).unwrap();
        for m in [1, 2, 3, 4, 5, 11] {
            let x = Q8Matrix::quantize(&all[..m * k], m, k);
            let (mut out, mut scratch) = (Vec::new(), Vec::new());
            matmul_q8(&x, &q8, &mut out, &mut scratch);
            for r in 0..n {
                for j in 0..m {
                    let expected = panel_dot_q8(&q8, r / PANEL, &x, j)[r % PANEL];
                    assert_eq!(
                        out[j * n + r].to_bits(),
                        expected.to_bits(),
                        "Q8_0, {m} rows"
                    );
                }
            }
            matmul(&x, &Linear::Q41(q41.clone()), &mut out, &mut scratch);
            for r in 0..n {
                for j in 0..m {
                    let expected = panel_dot_q41(&q41, r / PANEL, &x, j)[r % PANEL];
                    assert_eq!(
                        out[j * n + r].to_bits(),
                        expected.to_bits(),
                        "Q4_1, {m} rows"
                    );
                }
            }
        }
    }

    /// Every tile shape of one kernel — 1, 2 or 4 panels against 1 to 4 activation rows, at
    /// each offset — against `expected(weight row, activation row)`, bit for bit, writing
    /// nothing outside the tile.
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    fn assert_tiles_match<K: Tile>(
        k: &K,
        units: usize,
        expected: impl Fn(usize, usize) -> f32,
        name: &str,
    ) {
        type Shape<K> = fn(&K, usize, usize, Out);
        fn shape<K: Tile, const W: usize, const R: usize>(k: &K, u0: usize, j0: usize, out: Out) {
            k.tile::<W, R>(u0, j0, out)
        }
        let shapes: [(usize, usize, Shape<K>); 12] = [
            (1, 1, shape::<K, 1, 1>),
            (1, 2, shape::<K, 1, 2>),
            (1, 3, shape::<K, 1, 3>),
            (1, 4, shape::<K, 1, 4>),
            (2, 1, shape::<K, 2, 1>),
            (2, 2, shape::<K, 2, 2>),
            (2, 3, shape::<K, 2, 3>),
            (2, 4, shape::<K, 2, 4>),
            (4, 1, shape::<K, 4, 1>),
            (4, 2, shape::<K, 4, 2>),
            (4, 3, shape::<K, 4, 3>),
            (4, 4, shape::<K, 4, 4>),
        ];
        let (m, stride) = (k.rows(), units * PANEL);
        for (w, r, run) in shapes {
            for u0 in 0..=units - w {
                for j0 in 0..=m - r {
                    let mut out = vec![f32::NAN; m * stride];
                    run(k, u0, j0, Out::new(&mut out, m, stride));
                    for j in 0..m {
                        for c in 0..stride {
                            let inside = (j0..j0 + r).contains(&j)
                                && (u0 * PANEL..(u0 + w) * PANEL).contains(&c);
                            let got = out[j * stride + c];
                            if inside {
                                assert_eq!(
                                    got.to_bits(),
                                    expected(c, j).to_bits(),
                                    "{name}: {w}×{r} tile at ({u0}, {j0}), weight row {c}, \
                                     activation {j}"
                                );
                            } else {
                                assert!(got.is_nan(), "{name}: {w}×{r} tile wrote outside");
                            }
                        }
                    }
                }
            }
        }
    }

    /// The AVX2 kernels and, when this CPU has it, the AVX-512 VNNI ones, at every tile shape and
    /// offset, against the portable dot products (19 blocks a row: an odd count).
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    #[test]
    fn the_vector_tiles_give_the_portable_bits() {
        let (n, m, k) = (5 * PANEL, 5, 19 * BLOCK);
        let x = Q8Matrix::quantize(&pseudo_random(m * k, 12), m, k);
        let q41 = Q41Matrix::from_ggml(&q4_1_bytes(n, k, 11), n, k).unwrap();
        let q41_expected = |r: usize, j: usize| panel_dot_q41(&q41, r / PANEL, &x, j)[r % PANEL];
        let q8 = Q8Panels::from_matrix(&Q8Matrix::quantize(&pseudo_random(n * k, 13), n, k));
        let q8_expected = |r: usize, j: usize| panel_dot_q8(&q8, r / PANEL, &x, j)[r % PANEL];

        assert_tiles_match(&simd::Q41(&q41, &x), 5, q41_expected, "AVX2 Q4_1");
        assert_tiles_match(&simd::Q8(&q8, &x), 5, q8_expected, "AVX2 Q8_0");
        match (vnni::Q41::new(&q41, &x), vnni::Q8::new(&q8, &x)) {
            (Some(k41), Some(k8)) => {
                assert_tiles_match(&k41, 5, q41_expected, "AVX-512 Q4_1");
                assert_tiles_match(&k8, 5, q8_expected, "AVX-512 Q8_0");
            }
            _ => eprintln!("this CPU has no AVX-512 VNNI: only the AVX2 kernels are checked"),
        }
    }
}
