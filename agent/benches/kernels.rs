//! The int8 products at the shapes of SmolLM2-135M's largest layer (gate/up: 3072 × 576), for one
//! activation row (decode), a few, and 32 (a batch of decodes); the Q8_0 output head for one
//! row; and the Q4_1 product over 40 matrices in turn, so that weights come from memory.

use criterion::{Criterion, criterion_group, criterion_main};
use half::f16;
use parallax_agent::engine::backend::int8::kernels::{
    Linear, Q8Matrix, Q8Panels, Q41Matrix, matmul,
};
use std::hint::black_box;

fn values(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

/// `n × k` Q4_1 weights from GGML blocks with varied scales and mins.
fn q4_1(n: usize, k: usize, seed: u32) -> Linear {
    let mut bytes = Vec::with_capacity(n * k / 32 * 20);
    for (i, v) in values(n * k / 32, seed).iter().enumerate() {
        bytes.extend_from_slice(&f16::from_f32(v.abs() / 8.0 + 0.01).to_le_bytes());
        bytes.extend_from_slice(&f16::from_f32(-v.abs() / 16.0).to_le_bytes());
        bytes.extend((0..16).map(|j| ((i * 31 + j * 17) % 256) as u8));
    }
    Linear::Q41(Q41Matrix::from_ggml(&bytes, n, k).expect("valid blocks"))
}

fn products(c: &mut Criterion) {
    let (n, k) = (3072, 576);
    let q41 = q4_1(n, k, 1);
    let q8 = Linear::Q8(Q8Panels::from_matrix(&Q8Matrix::quantize(
        &values(n * k, 2),
        n,
        k,
    )));
    for m in [1, 2, 4, 32] {
        let x = Q8Matrix::quantize(&values(m * k, 3), m, k);
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        c.bench_function(&format!("q4_1 {n}x{k}, {m} rows"), |b| {
            b.iter(|| matmul(black_box(&x), &q41, &mut out, &mut scratch))
        });
        c.bench_function(&format!("q8_0 {n}x{k}, {m} rows"), |b| {
            b.iter(|| matmul(black_box(&x), &q8, &mut out, &mut scratch))
        });
    }
}

/// The output head (SmolLM2's tied embedding, Q8_0) for one sequence sampling.
fn head(c: &mut Criterion) {
    let (n, k) = (49152, 576);
    let q8 = Linear::Q8(Q8Panels::from_matrix(&Q8Matrix::quantize(
        &values(n * k, 4),
        n,
        k,
    )));
    let x = Q8Matrix::quantize(&values(k, 5), 1, k);
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    c.bench_function(&format!("q8_0 {n}x{k}, 1 row"), |b| {
        b.iter(|| matmul(black_box(&x), &q8, &mut out, &mut scratch))
    });
}

/// The gate/up product over 40 different matrices in turn (70 MB, as a whole model's layers),
/// so that the weights come from memory rather than cache.
fn streamed(c: &mut Criterion) {
    let (n, k) = (3072, 576);
    let mats: Vec<Linear> = (0..40).map(|s| q4_1(n, k, s)).collect();
    for m in [1, 32] {
        let x = Q8Matrix::quantize(&values(m * k, 3), m, k);
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        c.bench_function(&format!("q4_1 40 x {n}x{k}, {m} rows"), |b| {
            b.iter(|| {
                for w in &mats {
                    matmul(black_box(&x), w, &mut out, &mut scratch)
                }
            })
        });
    }
}

criterion_group!(benches, products, head, streamed);
criterion_main!(benches);
