//! A request inside the engine: its tokens, cache, sampling state and output text, and what one
//! sampled token does to it (stop tokens, `max_tokens`, stop strings held back across token
//! boundaries).

use super::{Event, FinishReason, RunTime};
use crate::engine::backend::RowOutput;
use crate::engine::model::tokenizer::{IncrementalDecoder, TextCodec};
use crate::engine::sampling::{Draw, Rng, Sampled, SamplingParams};
use crate::engine::scheduling::admission::{Queued, Ticket};
use crate::engine::scheduling::blocks::{BlockHash, BlockTable};
use crate::engine::scheduling::scheduler::Schedulable;
use std::time::Instant;
use tokio::sync::mpsc;

pub(super) struct Sequence {
    pub ticket: Ticket,
    /// When the sequence first ran (its queue time ends there).
    pub started: Option<Instant>,
    pub run_time: RunTime,
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub computed: usize,
    pub table: BlockTable,
    /// The last prefix-cache look-up (tokens looked up, tokens found), until the engine counts
    /// it.
    pub lookup: Option<(usize, usize)>,
    /// Prompt tokens found in the prefix cache when it was first scheduled.
    pub cached_tokens: Option<usize>,
    pub params: SamplingParams,
    pub rng: Rng,
    pub decoder: IncrementalDecoder,
    /// Output text not yet sent (held back while it may begin a stop string).
    pub pending: String,
    pub events: mpsc::UnboundedSender<Event>,
    pub finished: bool,
}

impl Sequence {
    /// What the sequence needs back from a step that runs `tokens` of its tokens: nothing
    /// mid-prefill; its token alone when the device can pick it (greedy, or sampled with the
    /// next of the request's draws); else the logits (log-probabilities, logits processors).
    pub fn output(&mut self, tokens: usize) -> RowOutput {
        let params = &self.params;
        if self.computed + tokens < self.tokens.len() {
            RowOutput::None
        } else if params.logprobs > 0 || params.score || params.processes_logits() {
            RowOutput::Logits
        } else if params.temperature == 0.0 {
            RowOutput::Argmax
        } else {
            RowOutput::Sample(Draw::new(params, self.rng.next_f32()))
        }
    }

    /// Takes a sampled token: the events it gives (the token, and `Finished` when it ends the
    /// request by a stop token, `max_tokens`, the context or a stop string).
    pub fn accept(
        &mut self,
        sampled: Sampled,
        codec: &TextCodec,
        context: usize,
        began: Instant,
    ) -> Vec<Event> {
        self.tokens.push(sampled.token);
        let generated = self.tokens.len() - self.prompt_len;
        // Before `min_tokens` nothing ends the output but its length (the sampler held the
        // end tokens back).
        let may_stop = generated >= self.params.min_tokens;
        let stop_token = may_stop
            && (self.params.stop_token_ids.contains(&sampled.token)
                || (!self.params.ignore_eos && codec.eos.contains(&sampled.token)));
        let mut reason = if stop_token {
            Some(FinishReason::Stop)
        } else if generated >= self.params.max_tokens || self.tokens.len() >= context {
            Some(FinishReason::Length)
        } else {
            None
        };
        // Text: the stop token's own text is not part of the output.
        let new_text = if stop_token {
            String::new()
        } else {
            self.decoder
                .step(
                    codec,
                    &self.tokens[self.prompt_len..],
                    self.params.skip_special_tokens,
                )
                .unwrap_or_default()
        };
        self.pending.push_str(&new_text);
        if may_stop && let Some((at, len)) = find_stop(&self.pending, &self.params.stop) {
            let keep = if self.params.include_stop_str_in_output {
                at + len
            } else {
                at
            };
            self.pending.truncate(keep);
            reason = Some(FinishReason::Stop);
        }
        let text = match reason {
            Some(_) => String::new(),
            None => take_safe_prefix(&mut self.pending, &self.params.stop),
        };
        let mut events = vec![Event::Token {
            id: sampled.token,
            text,
            logprob: sampled.logprob,
            top_logprobs: sampled.top,
        }];
        if let Some(reason) = reason {
            events.push(Event::Finished {
                text: std::mem::take(&mut self.pending),
                reason,
                prompt_tokens: self.prompt_len,
                completion_tokens: generated,
                cached_tokens: self.cached_tokens.unwrap_or(0),
                queue_time: self.started.unwrap_or(began) - self.ticket.arrived,
                run_time: self.run_time,
            });
            self.finished = true;
        }
        events
    }
}

impl Schedulable for Sequence {
    fn total_tokens(&self) -> usize {
        self.tokens.len()
    }
    fn computed(&self) -> usize {
        self.computed
    }
    fn reset(&mut self) {
        self.computed = 0;
        self.lookup = None;
    }
    fn reuse_cached_prefix(&mut self) {
        if self.computed == 0 {
            self.computed = self.table.reuse_cached_prefix(&self.tokens);
            self.lookup = Some((self.tokens.len(), self.computed));
        }
    }
    fn frontier(&self) -> Option<BlockHash> {
        self.table.frontier(&self.tokens, self.computed)
    }
    fn table(&mut self) -> &mut BlockTable {
        &mut self.table
    }
    fn table_ref(&self) -> &BlockTable {
        &self.table
    }
}

impl Queued for Sequence {
    fn ticket(&self) -> Ticket {
        self.ticket
    }
}

/// Byte offset and length of the earliest stop string in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<(usize, usize)> {
    stops
        .iter()
        .filter_map(|s| Some((text.find(s.as_str())?, s.len())))
        .min()
}

/// Takes the part of `pending` that cannot be the beginning of a stop string.
fn take_safe_prefix(pending: &mut String, stops: &[String]) -> String {
    let mut keep_from = pending.len();
    for stop in stops {
        // The longest suffix of `pending` that is a proper prefix of `stop`.
        for (i, _) in pending.char_indices() {
            if stop.starts_with(&pending[i..]) {
                keep_from = keep_from.min(i);
                break;
            }
        }
    }
    let rest = pending.split_off(keep_from);
    std::mem::replace(pending, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_that_may_start_a_stop_string_is_held_back() {
        let stops = vec!["###".to_owned()];
        let mut pending = "hello #".to_owned();
        assert_eq!(take_safe_prefix(&mut pending, &stops), "hello ");
        assert_eq!(pending, "#");
        pending.push_str("# x");
        assert_eq!(take_safe_prefix(&mut pending, &stops), "## x");
        assert_eq!(find_stop("ab###c", &stops), Some((2, 3)));
        let mut none = "abc".to_owned();
        assert_eq!(take_safe_prefix(&mut none, &[]), "abc");
    }
}
