//! Tensor parallelism: a model's layers split over ranks, Megatron-style. Q/K/V and gate/up are
//! split by output rows (each rank holds whole heads, KV heads too, and a slice of the FFN), the
//! output and down projections by input columns, so each rank's attention and MLP outputs are
//! partial sums, added up by one all-reduce each per layer ([`collective`]). The embedding and
//! the norms are replicated; only rank 0 computes logits. The KV cache is split by KV head; the
//! scheduler and the block tables stay on rank 0, which sends every step's plan to the others
//! ([`StepPlan`]) and samples from its own logits ([`group`]).

pub mod collective;
pub mod group;
pub mod link;
pub mod watchdog;

use super::backend::{RowOutput, SeqInput};
use super::error::{EngineError, Result};
use super::model::LlamaConfig;
use super::sampling::Draw;

/// Which part of the model a rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    /// The whole model (no tensor parallelism).
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };

    /// Checks that `world` ranks can split `config`: every rank needs whole attention heads, an
    /// equal slice of the FFN, and whole KV heads — its own share, or past the KV head count a
    /// copy of the one its query heads read (`world` a multiple of it, as vLLM replicates them).
    pub fn check(config: &LlamaConfig, world: usize) -> Result<()> {
        let kv_fits =
            config.kv_heads.is_multiple_of(world) || world.is_multiple_of(config.kv_heads);
        if world == 0
            || !config.heads.is_multiple_of(world)
            || !kv_fits
            || !config.intermediate_size.is_multiple_of(world)
        {
            return Err(EngineError::Unsupported(format!(
                "tensor parallel size {world} does not divide the model's {} attention heads and \
                 {} KV heads (nor is it a multiple of the KV heads), or its FFN of {}: every rank \
                 needs whole heads",
                config.heads, config.kv_heads, config.intermediate_size
            )));
        }
        Ok(())
    }

    /// The configuration of this rank's slice: its heads, KV heads (one, replicated, past the
    /// KV head count) and FFN width.
    pub fn config(&self, config: &LlamaConfig) -> LlamaConfig {
        LlamaConfig {
            heads: config.heads / self.world,
            kv_heads: (config.kv_heads / self.world).max(1),
            intermediate_size: config.intermediate_size / self.world,
            ..config.clone()
        }
    }

    /// The first of the whole model's KV heads this rank holds: its own share, or the one its
    /// query heads read where KV heads are replicated.
    pub fn first_kv_head(&self, config: &LlamaConfig) -> usize {
        if config.kv_heads >= self.world {
            self.rank * (config.kv_heads / self.world)
        } else {
            self.rank / (self.world / config.kv_heads)
        }
    }
}

/// One step's plan, owned, to send to the other ranks: each sequence's tokens, first position,
/// block table and what it wants back.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepPlan {
    pub seqs: Vec<PlannedSeq>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedSeq {
    pub tokens: Vec<u32>,
    pub start: usize,
    pub blocks: Vec<u32>,
    pub output: RowOutput,
}

impl StepPlan {
    pub fn from_inputs(batch: &[SeqInput<'_>]) -> Self {
        Self {
            seqs: batch
                .iter()
                .map(|s| PlannedSeq {
                    tokens: s.tokens.to_vec(),
                    start: s.start,
                    blocks: s.blocks.to_vec(),
                    output: s.output,
                })
                .collect(),
        }
    }

    pub fn inputs(&self) -> Vec<SeqInput<'_>> {
        self.seqs
            .iter()
            .map(|s| SeqInput {
                tokens: &s.tokens,
                start: s.start,
                blocks: &s.blocks,
                output: s.output,
            })
            .collect()
    }

    /// Little-endian u32 words: the sequence count, then per sequence its token count, block
    /// count, start, output, a sampled row's draw (four words), tokens and blocks.
    pub fn encode(&self) -> Vec<u8> {
        let mut words = vec![self.seqs.len() as u32];
        for s in &self.seqs {
            words.extend([
                s.tokens.len() as u32,
                s.blocks.len() as u32,
                s.start as u32,
                match s.output {
                    RowOutput::None => 0,
                    RowOutput::Logits => 1,
                    RowOutput::Argmax => 2,
                    RowOutput::Sample(_) => 3,
                },
            ]);
            if let RowOutput::Sample(draw) = s.output {
                words.extend(draw.words());
            }
            words.extend(&s.tokens);
            words.extend(&s.blocks);
        }
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = || EngineError::Backend {
            backend: "tensor parallel",
            reason: "a step plan that does not parse".into(),
        };
        if !bytes.len().is_multiple_of(4) {
            return Err(bad());
        }
        let words: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        let mut at = 0;
        let mut next = |n: usize| {
            let part = words.get(at..at + n).ok_or_else(bad)?;
            at += n;
            Ok::<_, EngineError>(part)
        };
        let count = next(1)?[0] as usize;
        let mut seqs = Vec::with_capacity(count.min(4096));
        for _ in 0..count {
            let head = next(4)?;
            let (tokens, blocks, start, output) = (head[0], head[1], head[2], head[3]);
            let output = match output {
                0 => RowOutput::None,
                1 => RowOutput::Logits,
                2 => RowOutput::Argmax,
                3 => {
                    let w = next(4)?;
                    RowOutput::Sample(Draw::from_words([w[0], w[1], w[2], w[3]]))
                }
                _ => return Err(bad()),
            };
            seqs.push(PlannedSeq {
                tokens: next(tokens as usize)?.to_vec(),
                blocks: next(blocks as usize)?.to_vec(),
                start: start as usize,
                output,
            });
        }
        Ok(Self { seqs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_survives_encoding_and_garbage_is_refused() {
        let plan = StepPlan {
            seqs: vec![
                PlannedSeq {
                    tokens: vec![1, 2, 3],
                    start: 0,
                    blocks: vec![7],
                    output: RowOutput::None,
                },
                PlannedSeq {
                    tokens: vec![9],
                    start: 40,
                    blocks: vec![3, 1, 4],
                    output: RowOutput::Argmax,
                },
                PlannedSeq {
                    tokens: vec![5],
                    start: 12,
                    blocks: vec![2],
                    output: RowOutput::Sample(Draw {
                        temperature: 0.7,
                        top_k: 40,
                        top_p: 0.9,
                        uniform: 0.123,
                    }),
                },
            ],
        };
        assert_eq!(StepPlan::decode(&plan.encode()).unwrap(), plan);
        assert!(StepPlan::decode(&[1, 2, 3]).is_err());
        assert!(StepPlan::decode(&plan.encode()[..20]).is_err());
    }

    #[test]
    fn a_size_that_does_not_divide_the_heads_is_refused_by_its_numbers() {
        let config = LlamaConfig {
            vocab_size: 10,
            hidden_size: 576,
            intermediate_size: 1152,
            layers: 1,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            rms_eps: 1e-5,
            rope_theta: 1e4,
            rope_style: crate::engine::model::RopeStyle::HalfSplit,
            rope_scaling: None,
            context_length: 64,
        };
        assert!(Shard::check(&config, 3).is_ok());
        // Nine heads split nine ways: each rank reads a copy of one of the three KV heads.
        assert!(Shard::check(&config, 9).is_ok());
        let ninth = |rank| Shard { rank, world: 9 };
        assert_eq!(ninth(4).config(&config).kv_heads, 1);
        assert_eq!(
            (0..9)
                .map(|r| ninth(r).first_kv_head(&config))
                .collect::<Vec<_>>(),
            [0, 0, 0, 1, 1, 1, 2, 2, 2]
        );
        let error = Shard::check(&config, 2).unwrap_err().to_string();
        assert!(
            error.contains("tensor parallel size 2")
                && error.contains("9 attention heads")
                && error.contains("3 KV heads"),
            "{error}"
        );
        let third = Shard { rank: 1, world: 3 }.config(&config);
        assert_eq!(
            (third.heads, third.kv_heads, third.intermediate_size),
            (3, 1, 384)
        );
    }
}
