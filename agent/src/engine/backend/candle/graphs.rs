//! How a decode step is laid out for a CUDA graph (`--cuda-graphs`), on the host and on any
//! device: a graph replays a step's kernel launches with the shapes and device addresses they were
//! captured with, so every step it serves runs over the same fixed input buffers at the same
//! sizes. A step of `n` single-token rows is padded to the captured batch size just above `n`
//! (vLLM's sizes: 1, 2, 4, then every 8 up to 256) and its block tables to a power-of-two width;
//! padding rows write no keys or values (their slot is [`PADDING_SLOT`]) and their logits are
//! never read. The CUDA side (`cuda::graphs`) captures and replays; this module only lays out.

use super::slot;
use crate::engine::backend::{RowOutput, SeqInput};

/// The largest decode step captured; larger ones run eagerly (their launches are a small share
/// of a step that reads the weights for so many rows).
pub const MAX_GRAPH_BATCH: usize = 256;
/// The narrowest block table a graph is captured with.
const MIN_TABLE_WIDTH: usize = 16;
/// The cache slot of a padding row: the KV write skips it (`PADDING_SLOT` in `kernels.cu`).
pub const PADDING_SLOT: u32 = u32::MAX;

/// The fixed input buffer's sections, in u32 words: every row's sequence index and logits row
/// (`0..MAX_GRAPH_BATCH`, written once), then what each step writes — token ids, positions,
/// slots — and the block tables, `batch × width` of them.
pub const TOKEN_SEQ: usize = 0;
pub const ROWS: usize = MAX_GRAPH_BATCH;
pub const IDS: usize = 2 * MAX_GRAPH_BATCH;
pub const POSITIONS: usize = 3 * MAX_GRAPH_BATCH;
pub const SLOTS: usize = 4 * MAX_GRAPH_BATCH;
pub const TABLES: usize = 5 * MAX_GRAPH_BATCH;

/// The batch size a graph of `rows` decode rows is captured for.
pub fn graph_batch(rows: usize) -> Option<usize> {
    match rows {
        0 => None,
        1 | 2 => Some(rows),
        3 | 4 => Some(4),
        n if n <= MAX_GRAPH_BATCH => Some(n.div_ceil(8) * 8),
        _ => None,
    }
}

/// The block-table width a graph is captured with for sequences of up to `longest` blocks, when
/// no sequence has more than `max_width` (the context length's).
pub fn table_width(longest: usize, max_width: usize) -> usize {
    longest
        .max(MIN_TABLE_WIDTH)
        .next_power_of_two()
        .min(max_width)
        .max(longest)
}

/// The most blocks a sequence of `context_length` positions takes: the widest table.
pub fn max_width(context_length: usize, block_size: usize) -> usize {
    context_length.div_ceil(block_size)
}

/// Words of the fixed input buffer for tables up to `max_width` wide.
pub fn input_words(max_width: usize) -> usize {
    TABLES + MAX_GRAPH_BATCH * max_width
}

/// Device memory decode graphs keep beside what eager steps use, for the KV cache's sizing: the
/// fixed input buffer, the fixed `[MAX_GRAPH_BATCH, vocab]` f32 logits, and the graphs' own pool
/// of activations — those of the largest decode step they run, `activations` (CUDA gives graphs
/// launched into one stream the same physical memory).
pub fn reserved_bytes(vocab: usize, max_width: usize, activations: usize) -> usize {
    (input_words(max_width) + MAX_GRAPH_BATCH * vocab) * size_of::<u32>() + activations
}

/// A decode step laid out for a graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodePlan {
    /// The step's own rows (the first `rows` of the batch).
    pub rows: usize,
    /// The captured batch size, padding included.
    pub batch: usize,
    /// The block tables' width.
    pub width: usize,
    /// What the step writes into the input buffer from [`IDS`] on: ids, positions and slots
    /// (`MAX_GRAPH_BATCH` words each, padding rows' after the step's), then `batch × width`
    /// block-table words.
    pub words: Vec<u32>,
}

impl DecodePlan {
    /// The graph this step replays: its batch size and table width.
    pub fn key(&self) -> (usize, usize) {
        (self.batch, self.width)
    }

    /// `batch`'s layout for a graph, or `None` when a graph cannot run it: a row with other than
    /// one token, or one that gives no output (mid-prefill), or more rows than any graph has.
    /// `max_width` is the most blocks a sequence can have (the context length's).
    pub fn of(batch: &[SeqInput<'_>], block_size: usize, max_width: usize) -> Option<Self> {
        let eligible = |s: &SeqInput<'_>| s.tokens.len() == 1 && s.output != RowOutput::None;
        if !batch.iter().all(eligible) {
            return None;
        }
        let rows = batch.len();
        let padded = graph_batch(rows)?;
        let longest = batch.iter().map(|s| s.blocks.len()).max()?;
        if longest > max_width {
            return None;
        }
        let width = table_width(longest, max_width);
        let mut words = vec![0; TABLES - IDS + padded * width];
        let (ids, rest) = words.split_at_mut(MAX_GRAPH_BATCH);
        let (positions, rest) = rest.split_at_mut(MAX_GRAPH_BATCH);
        let (slots, tables) = rest.split_at_mut(MAX_GRAPH_BATCH);
        slots[rows..padded].fill(PADDING_SLOT);
        for (r, seq) in batch.iter().enumerate() {
            ids[r] = seq.tokens[0];
            positions[r] = seq.start as u32;
            slots[r] = slot(seq.blocks, block_size, seq.start);
            tables[r * width..r * width + seq.blocks.len()].copy_from_slice(seq.blocks);
        }
        Some(Self {
            rows,
            batch: padded,
            width,
            words,
        })
    }
}

/// Every row's sequence index and logits row: `0..MAX_GRAPH_BATCH` twice, the buffer's fixed
/// head.
pub fn fixed_words() -> Vec<u32> {
    (0..2 * MAX_GRAPH_BATCH as u32)
        .map(|i| i % MAX_GRAPH_BATCH as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampling::Draw;

    fn decode<'a>(tokens: &'a [u32], start: usize, blocks: &'a [u32]) -> SeqInput<'a> {
        SeqInput {
            tokens,
            start,
            blocks,
            output: RowOutput::Argmax,
        }
    }

    #[test]
    fn batches_round_up_to_the_captured_sizes_and_stop_at_the_largest() {
        let sizes: Vec<Option<usize>> = [0, 1, 2, 3, 4, 5, 8, 9, 17, 256, 257]
            .into_iter()
            .map(graph_batch)
            .collect();
        assert_eq!(
            sizes,
            [
                None,
                Some(1),
                Some(2),
                Some(4),
                Some(4),
                Some(8),
                Some(8),
                Some(16),
                Some(24),
                Some(256),
                None
            ]
        );
        // Padding never exceeds 7 rows past 4.
        for rows in 5..=MAX_GRAPH_BATCH {
            let batch = graph_batch(rows).unwrap();
            assert!(batch >= rows && batch - rows < 8, "{rows} → {batch}");
        }
    }

    #[test]
    fn tables_widen_in_powers_of_two_up_to_the_context() {
        assert_eq!(table_width(1, 8192), 16);
        assert_eq!(table_width(16, 8192), 16);
        assert_eq!(table_width(17, 8192), 32);
        assert_eq!(table_width(600, 8192), 1024);
        // A short context caps the width, never below what the step needs.
        assert_eq!(table_width(5, 8), 8);
        assert_eq!(table_width(100, 128), 128);
        assert_eq!(table_width(3, 3), 3);
    }

    #[test]
    fn a_decode_step_is_laid_out_padded_with_rows_that_write_nothing() {
        let (a_blocks, b_blocks, c_blocks) = ([7, 2], [4], [9, 1, 3]);
        let batch = [
            decode(&[11], 20, &a_blocks),
            decode(&[12], 3, &b_blocks),
            SeqInput {
                output: RowOutput::Sample(Draw::greedy()),
                ..decode(&[13], 33, &c_blocks)
            },
        ];
        let plan = DecodePlan::of(&batch, 16, 8192).expect("a decode step");
        assert_eq!((plan.rows, plan.batch, plan.width), (3, 4, 16));
        assert_eq!(plan.key(), (4, 16));
        let section = |at: usize| &plan.words[at - IDS..at - IDS + plan.batch];
        assert_eq!(section(IDS), [11, 12, 13, 0]);
        assert_eq!(section(POSITIONS), [20, 3, 33, 0]);
        // Position 20 is in the sequence's second block (2) at offset 4; 33 in its third (3) at 1.
        assert_eq!(
            section(SLOTS),
            [2 * 16 + 4, 4 * 16 + 3, 3 * 16 + 1, PADDING_SLOT]
        );
        let tables = &plan.words[TABLES - IDS..];
        assert_eq!(tables.len(), 4 * 16);
        assert_eq!(&tables[..3], [7, 2, 0]);
        assert_eq!(&tables[16..18], [4, 0]);
        assert_eq!(&tables[32..35], [9, 1, 3]);
        assert!(tables[48..].iter().all(|&b| b == 0));
        assert_eq!(TABLES - IDS + 4 * 16, plan.words.len());
        assert!(plan.words.len() + IDS <= input_words(8192));
    }

    #[test]
    fn prefill_chunks_and_rows_without_output_run_eagerly() {
        let blocks = [1];
        let chunk = decode(&[1, 2], 0, &blocks);
        assert_eq!(DecodePlan::of(&[chunk], 16, 64), None);
        let mid_prefill = SeqInput {
            output: RowOutput::None,
            ..decode(&[1], 4, &blocks)
        };
        assert_eq!(DecodePlan::of(&[mid_prefill], 16, 64), None);
        assert_eq!(DecodePlan::of(&[], 16, 64), None);
        let ids = [5u32; MAX_GRAPH_BATCH + 1];
        let many: Vec<SeqInput<'_>> = ids.chunks(1).map(|t| decode(t, 0, &blocks)).collect();
        assert_eq!(DecodePlan::of(&many, 16, 64), None);
        assert!(DecodePlan::of(&many[..MAX_GRAPH_BATCH], 16, 64).is_some());
    }

    #[test]
    fn the_reserve_counts_both_fixed_buffers_and_the_graphs_activations() {
        // Llama 3's vocabulary, 8,192 blocks of context: 125.25 MiB of logits, 8 MiB of inputs.
        let bytes = reserved_bytes(128_256, 8192, 100 << 20);
        assert_eq!(bytes, (1280 + 256 * 8192 + 256 * 128_256) * 4 + (100 << 20));
        assert!(bytes > 233 << 20 && bytes < 234 << 20, "{bytes}");
    }

    #[test]
    fn the_fixed_head_numbers_every_row_for_both_sections() {
        let head = fixed_words();
        assert_eq!(head.len(), IDS);
        assert_eq!(&head[TOKEN_SEQ..TOKEN_SEQ + 3], [0, 1, 2]);
        assert_eq!(&head[ROWS..ROWS + 3], [0, 1, 2]);
        assert_eq!(head[ROWS - 1], MAX_GRAPH_BATCH as u32 - 1);
    }
}
