//! Model sizes for `tensorParallelSize: auto`: presets, explicit overrides and the memory formula.

use crate::inference_pool::{ModelShape, ShapePreset};
use crate::quantity::{QuantityError, parse_bytes};

/// Context length assumed when neither the shape nor its preset names one.
pub const DEFAULT_CONTEXT_LENGTH: u64 = 8192;

/// A model's size in the numbers the memory formula needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedShape {
    pub weight_bytes: u64,
    pub layers: u64,
    pub hidden_size: u64,
    pub kv_hidden_size: u64,
    pub context_length: u64,
    /// Attention and KV heads, where known: a tensor-parallel size must divide both.
    pub heads: Option<(u64, u64)>,
}

/// Why a shape cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShapeError {
    /// Neither a preset nor this field was given.
    Missing(&'static str),
    /// `weightBytes` is not a byte quantity.
    WeightBytes(QuantityError),
    /// A count that must be positive is not.
    NotPositive(&'static str),
}

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing(field) => write!(f, "model.shape.{field} is required without a preset"),
            Self::WeightBytes(e) => write!(f, "model.shape.weightBytes: {e}"),
            Self::NotPositive(field) => write!(f, "model.shape.{field} must be positive"),
        }
    }
}

impl std::error::Error for ShapeError {}

impl ShapePreset {
    /// The preset's size with 16-bit weights.
    pub fn shape(self) -> ResolvedShape {
        let (params, layers, hidden_size, heads, kv_heads, head_dim): (
            u64,
            u64,
            u64,
            u64,
            u64,
            u64,
        ) = match self {
            Self::Smollm2_135m => (134_515_008, 30, 576, 9, 3, 64),
            Self::Llama3_2_1b => (1_235_814_400, 16, 2048, 32, 8, 64),
            Self::Llama3_1_8b => (8_030_261_248, 32, 4096, 32, 8, 128),
            Self::Llama3_1_70b => (70_553_706_496, 80, 8192, 64, 8, 128),
            Self::Llama3_1_405b => (405_853_388_800, 126, 16384, 128, 8, 128),
        };
        ResolvedShape {
            weight_bytes: params * 2,
            layers,
            hidden_size,
            kv_hidden_size: kv_heads * head_dim,
            context_length: DEFAULT_CONTEXT_LENGTH,
            heads: Some((heads, kv_heads)),
        }
    }
}

impl ModelShape {
    /// The preset's numbers with every explicit field laid over them.
    pub fn resolve(&self) -> Result<ResolvedShape, ShapeError> {
        let base = self.preset.map(ShapePreset::shape);
        let count = |value: Option<i64>, preset: Option<u64>, field| match (value, preset) {
            (Some(v), _) if v > 0 => Ok(v as u64),
            (Some(_), _) => Err(ShapeError::NotPositive(field)),
            (None, Some(p)) => Ok(p),
            (None, None) => Err(ShapeError::Missing(field)),
        };
        let weight_bytes = match (&self.weight_bytes, base) {
            (Some(q), _) => parse_bytes(q).map_err(ShapeError::WeightBytes)?,
            (None, Some(b)) => b.weight_bytes,
            (None, None) => return Err(ShapeError::Missing("weightBytes")),
        };
        let layers = count(self.layers, base.map(|b| b.layers), "layers")?;
        let hidden_size = count(self.hidden_size, base.map(|b| b.hidden_size), "hiddenSize")?;
        let kv_hidden_size = count(
            self.kv_hidden_size,
            Some(base.map_or(hidden_size, |b| b.kv_hidden_size)),
            "kvHiddenSize",
        )?;
        let context_length = count(
            self.context_length,
            Some(base.map_or(DEFAULT_CONTEXT_LENGTH, |b| b.context_length)),
            "contextLength",
        )?;
        let positive = |value: Option<i64>, field| match value {
            Some(v) if v > 0 => Ok(Some(v as u64)),
            Some(_) => Err(ShapeError::NotPositive(field)),
            None => Ok(None),
        };
        let heads = positive(self.attention_heads, "attentionHeads")?;
        let kv_heads = positive(self.kv_heads, "kvHeads")?;
        let preset_heads = base.and_then(|b| b.heads);
        let heads = match (heads, kv_heads, preset_heads) {
            (Some(h), Some(k), _) => Some((h, k)),
            (Some(h), None, _) => Some((h, h)),
            (None, Some(k), Some((h, _))) => Some((h, k)),
            (None, None, preset) => preset,
            (None, Some(_), None) => return Err(ShapeError::Missing("attentionHeads")),
        };
        Ok(ResolvedShape {
            weight_bytes,
            layers,
            hidden_size,
            kv_hidden_size,
            context_length,
            heads,
        })
    }
}

impl ResolvedShape {
    /// Whether `size` GPUs can split the model: each needs whole attention heads, and whole KV
    /// heads — its own, or, past the KV head count, a copy of one (`size` a multiple of it, as
    /// vLLM replicates them). True where the heads are not known.
    pub fn splits_into(&self, size: u64) -> bool {
        self.heads.is_none_or(|(h, k)| {
            size > 0 && h.is_multiple_of(size) && (k.is_multiple_of(size) || size.is_multiple_of(k))
        })
    }

    /// KV cache bytes for `batch` sequences of the full context: batch × context × 2 (K and V) ×
    /// layers × KV width × bytes per element.
    pub fn kv_cache_bytes(&self, batch: u64, bytes_per_element: u64) -> u64 {
        batch
            .saturating_mul(self.context_length)
            .saturating_mul(2)
            .saturating_mul(self.layers)
            .saturating_mul(self.kv_hidden_size)
            .saturating_mul(bytes_per_element)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    #[test]
    fn explicit_fields_override_the_preset() {
        let shape = ModelShape {
            preset: Some(ShapePreset::Llama3_1_8b),
            weight_bytes: Some(Quantity("8Gi".into())),
            context_length: Some(4096),
            ..ModelShape::default()
        };
        let resolved = shape.resolve().unwrap();
        assert_eq!(resolved.weight_bytes, 8 << 30);
        assert_eq!(resolved.context_length, 4096);
        assert_eq!(resolved.layers, 32);
        assert_eq!(resolved.kv_hidden_size, 1024);
    }

    #[test]
    fn without_a_preset_kv_width_defaults_to_hidden_size() {
        let shape = ModelShape {
            weight_bytes: Some(Quantity("1G".into())),
            layers: Some(2),
            hidden_size: Some(64),
            ..ModelShape::default()
        };
        let resolved = shape.resolve().unwrap();
        assert_eq!(resolved.kv_hidden_size, 64);
        assert_eq!(resolved.context_length, DEFAULT_CONTEXT_LENGTH);
        // 2 sequences × 8192 tokens × K and V × 2 layers × 64 wide × 2 bytes
        assert_eq!(resolved.kv_cache_bytes(2, 2), 2 * 8192 * 2 * 2 * 64 * 2);
    }

    #[test]
    fn missing_and_invalid_fields_are_named() {
        let shape = ModelShape {
            layers: Some(2),
            hidden_size: Some(64),
            ..ModelShape::default()
        };
        assert_eq!(shape.resolve(), Err(ShapeError::Missing("weightBytes")));
        let shape = ModelShape {
            weight_bytes: Some(Quantity("1G".into())),
            layers: Some(0),
            hidden_size: Some(64),
            ..ModelShape::default()
        };
        assert_eq!(shape.resolve(), Err(ShapeError::NotPositive("layers")));
    }
}
