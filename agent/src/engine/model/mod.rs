//! What a model is, apart from any device: its shape and constants ([`LlamaConfig`]), the files it
//! comes from ([`loader`]) and its tokenizer and chat template ([`tokenizer`]). Backends turn a
//! [`loader::ModelFiles`] into weights of their own.

pub mod loader;
pub mod tokenizer;

/// How a model pairs the dimensions a rotary embedding rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// (0, 1), (2, 3), …: GGUF Llama files (llama.cpp permutes Q and K at conversion).
    Interleaved,
    /// (i, i + d/2): Hugging Face Llama checkpoints.
    HalfSplit,
}

/// Rotary frequency scaling (Llama 3.1 and 3.2 need it).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `rope_scaling` of type `llama3` in config.json: low frequencies are divided by `factor`,
    /// high ones kept, the band between blended smoothly (as transformers computes it).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// GGUF's `rope_freqs.weight`: each frequency divided by its own factor (llama.cpp writes the
    /// `llama3` scaling so).
    Factors(Vec<f32>),
}

/// Shape and constants of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rope_scaling: Option<RopeScaling>,
    pub context_length: usize,
}

impl LlamaConfig {
    /// Values one token caches per layer for keys (and again for values).
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The rotary embedding's inverse frequencies, `head_dim / 2` of them: `θ^(-2i/d)` (in f32,
    /// as llama.cpp and candle compute them), scaled as `rope_scaling` says (as transformers does
    /// for `llama3`).
    pub fn inverse_frequencies(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f32 / d as f32))
            .collect();
        match self.rope_scaling {
            None => base,
            Some(RopeScaling::Factors(ref factors)) => {
                base.iter().zip(factors).map(|(f, by)| f / by).collect()
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let original = original_max_position_embeddings as f32;
                let low_wavelen = original / low_freq_factor;
                let high_wavelen = original / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rope_scaling: Option<RopeScaling>) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 8,
            hidden_size: 128,
            intermediate_size: 256,
            layers: 1,
            heads: 1,
            kv_heads: 1,
            head_dim: 128,
            rms_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_style: RopeStyle::HalfSplit,
            rope_scaling,
            context_length: 131_072,
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_divides_low_ones_and_blends_between() {
        let plain = config(None).inverse_frequencies();
        let scaled = config(Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }))
        .inverse_frequencies();
        assert_eq!(plain.len(), 64);
        // Wavelength under 8192 / 4 = 2048 positions: unchanged.
        assert_eq!(scaled[0], plain[0]);
        // Over 8192: divided by 8.
        assert_eq!(scaled[63], plain[63] / 8.0);
        // Between: strictly between the two.
        let mid = (0..64)
            .find(|&i| {
                let w = 2.0 * std::f32::consts::PI / plain[i];
                (2048.0..8192.0).contains(&w)
            })
            .unwrap();
        assert!(scaled[mid] < plain[mid] && scaled[mid] > plain[mid] / 8.0);
        // GGUF's per-frequency factors divide.
        let factors = config(Some(RopeScaling::Factors(vec![2.0; 64]))).inverse_frequencies();
        assert_eq!(factors[5], plain[5] / 2.0);
    }
}
