//! Block quantization: activations to int8 per 32 values (GGML's Q8_0 and Q8_1, f16-rounded
//! scales) and the weight layouts the products read (Q8_0, Q4_1).

use super::pool;
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

/// Weight rows per Q4_1 panel: one 32-bit lane of a 256-bit register each.
pub const PANEL: usize = 8;

/// A matrix in GGML's Q4_1 (per block of 32 columns, 4-bit values `q` with `x = d·q + m`),
/// repacked in panels of [`PANEL`] rows so that one int8 dot instruction works on all eight
/// rows of a panel at once. For panel `p` and block `b`, `nibbles` holds 128 bytes: four chunks
/// of 32, where byte `4·r + j` of chunk `c` holds element `8c + j` of the panel's row `r` in its
/// low nibble and element `8c + 4 + j` in its high nibble; `scales` and `mins` hold the eight
/// rows' `d` and `m` for the block. Rows past `rows`, up to a whole panel, are zero.
#[derive(Debug, Clone, Default)]
pub struct Q41Matrix {
    pub rows: usize,
    pub cols: usize,
    pub nibbles: Vec<u8>,
    pub scales: Vec<f32>,
    pub mins: Vec<f32>,
}

impl Q41Matrix {
    /// From GGML Q4_1 blocks (20 bytes: f16 d, f16 m, 16 bytes of nibbles: low nibbles hold
    /// elements 0–15, high nibbles 16–31), row after row.
    pub fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let kb = cols / BLOCK;
        if !cols.is_multiple_of(BLOCK) || bytes.len() != rows * kb * 20 {
            return None;
        }
        let panels = rows.div_ceil(PANEL);
        let mut m = Self {
            rows,
            cols,
            nibbles: vec![0; panels * kb * PANEL * BLOCK / 2],
            scales: vec![0.0; panels * kb * PANEL],
            mins: vec![0.0; panels * kb * PANEL],
        };
        for (r, row) in bytes.chunks_exact(kb * 20).enumerate() {
            let (p, lane) = (r / PANEL, r % PANEL);
            for (b, block) in row.chunks_exact(20).enumerate() {
                let at = (p * kb + b) * PANEL + lane;
                m.scales[at] = f16::from_le_bytes([block[0], block[1]]).to_f32();
                m.mins[at] = f16::from_le_bytes([block[2], block[3]]).to_f32();
                let q = |e: usize| {
                    let byte = block[4 + e % 16];
                    if e < 16 { byte & 0x0f } else { byte >> 4 }
                };
                let panel = &mut m.nibbles[(p * kb + b) * 128..(p * kb + b + 1) * 128];
                for c in 0..4 {
                    for j in 0..4 {
                        panel[32 * c + 4 * lane + j] = q(8 * c + j) | (q(8 * c + 4 + j) << 4);
                    }
                }
            }
        }
        Some(m)
    }

    /// Panels of [`PANEL`] rows, the last one padded.
    pub fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }

    pub fn bytes(&self) -> usize {
        self.nibbles.len() + 4 * (self.scales.len() + self.mins.len())
    }
}

/// A Q8_0 weight matrix repacked in panels of [`PANEL`] rows, as [`Q41Matrix`]: for panel `p`
/// and block `b`, `quants` holds 256 bytes, eight chunks of 32 where byte `4·r + j` of chunk `c`
/// is element `4c + j` of the panel's row `r`; `scales` holds the eight rows' `d` and `offsets`
/// their `128 · Σq` (what the int8 dot instruction's unsigned operand adds when the activations
/// are offset by 128). Rows past `rows`, up to a whole panel, are zero.
#[derive(Debug, Clone, Default)]
pub struct Q8Panels {
    pub rows: usize,
    pub cols: usize,
    pub quants: Vec<i8>,
    pub scales: Vec<f32>,
    pub offsets: Vec<i32>,
}

impl Q8Panels {
    pub fn from_matrix(m: &Q8Matrix) -> Self {
        let (rows, cols, kb) = (m.rows, m.cols, m.cols / BLOCK);
        let panels = rows.div_ceil(PANEL);
        let mut p = Self {
            rows,
            cols,
            quants: vec![0; panels * kb * PANEL * BLOCK],
            scales: vec![0.0; panels * kb * PANEL],
            offsets: vec![0; panels * kb * PANEL],
        };
        for r in 0..rows {
            let (panel, lane) = (r / PANEL, r % PANEL);
            for b in 0..kb {
                let block = &m.quants[r * cols + b * BLOCK..r * cols + (b + 1) * BLOCK];
                let at = (panel * kb + b) * PANEL + lane;
                p.scales[at] = m.scales[r * kb + b];
                p.offsets[at] = 128 * block.iter().map(|q| i32::from(*q)).sum::<i32>();
                let chunks = &mut p.quants[(panel * kb + b) * 256..(panel * kb + b + 1) * 256];
                for (e, q) in block.iter().enumerate() {
                    chunks[32 * (e / 4) + 4 * lane + e % 4] = *q;
                }
            }
        }
        p
    }

    /// Panels of [`PANEL`] rows, the last one padded.
    pub fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }

    /// Row `r` back to f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (panel, lane, kb) = (r / PANEL, r % PANEL, self.cols / BLOCK);
        for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
            let chunks = &self.quants[(panel * kb + b) * 256..(panel * kb + b + 1) * 256];
            let d = self.scales[(panel * kb + b) * PANEL + lane];
            for (e, o) in out.iter_mut().enumerate() {
                *o = f32::from(chunks[32 * (e / 4) + 4 * lane + e % 4]) * d;
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.quants.len() + 4 * (self.scales.len() + self.offsets.len())
    }
}

/// A weight matrix in whichever int8 or int4 layout its file had (others become Q8_0).
#[derive(Debug, Clone)]
pub enum Linear {
    Q8(Q8Panels),
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
        if rows > 1 {
            // A few rows per task: every step quantizes the activations four times a layer.
            let per_task = rows.div_ceil(pool::threads() * 4);
            let kb = cols / BLOCK;
            pool::for_each_chunk3(
                (&mut self.quants, &mut self.scales, &mut self.sums),
                (per_task * cols, per_task * kb, per_task * kb),
                |task, q, s, sums| {
                    let x = &data[task * per_task * cols..];
                    for (((q, s), sums), x) in q
                        .chunks_mut(cols)
                        .zip(s.chunks_mut(kb))
                        .zip(sums.chunks_mut(kb))
                        .zip(x.chunks(cols))
                    {
                        quantize_row(x, q, s, sums);
                    }
                },
            );
        } else {
            quantize_row(data, &mut self.quants, &mut self.scales, &mut self.sums);
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
/// `s = f16(Σq) · d` in f16. Written on whole blocks so that it vectorises.
fn quantize_row(x: &[f32], q: &mut [i8], s: &mut [f32], sums: &mut [f32]) {
    for (((x, q), s), sum) in x
        .chunks_exact(BLOCK)
        .zip(q.chunks_exact_mut(BLOCK))
        .zip(s.iter_mut())
        .zip(sums.iter_mut())
    {
        // The maximum in eight lanes: `max` is exact, so the order does not matter.
        let mut lanes = [0f32; 8];
        for chunk in x.chunks_exact(8) {
            for (lane, v) in lanes.iter_mut().zip(chunk) {
                *lane = lane.max(v.abs());
            }
        }
        let max = lanes.iter().fold(0f32, |m, v| m.max(*v));
        let d = max / 127.0;
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut total = 0i32;
        for (q, x) in q.iter_mut().zip(x) {
            let v = round_half_away(x * inv);
            *q = v as i32 as i8;
            total += v as i32;
        }
        let d = f16::from_f32(d);
        *s = d.to_f32();
        *sum = (f16::from_f32(total as f32) * d).to_f32();
    }
}

/// `v.round()` (halves away from zero, as C's `roundf`) in steps that vectorise: the fraction
/// `v - trunc(v)` is exact, and so is adding one to a value below 2²⁴.
#[inline(always)]
fn round_half_away(v: f32) -> f32 {
    let t = v.trunc();
    let step = if (v - t).abs() >= 0.5 { 1f32 } else { 0.0 }.copysign(v);
    t + step
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_keep_every_row() {
        let (rows, cols) = (11, 64);
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let m = Q8Matrix::quantize(&data, rows, cols);
        let p = Q8Panels::from_matrix(&m);
        let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
        for r in 0..rows {
            m.dequantize_row(r, &mut a);
            p.dequantize_row(r, &mut b);
            assert_eq!(a, b, "row {r}");
        }
        assert_eq!(p.panels(), 2);
    }

    #[test]
    fn rounding_matches_the_standard_library() {
        let mut v = -130.0f32;
        while v < 130.0 {
            for x in [v, v + 0.5, -(v + 0.5), v.next_up(), (v + 0.5).next_down()] {
                assert_eq!(round_half_away(x).to_bits(), x.round().to_bits(), "{x}");
            }
            v += 0.25;
        }
        for x in [
            0.49999997f32,
            -0.49999997,
            0.5,
            -0.5,
            1.5,
            -2.5,
            0.0,
            -0.0,
            1e-30,
        ] {
            assert_eq!(round_half_away(x), x.round(), "{x}");
        }
    }
}
