//! The OpenAI wire types the server reads and writes. Requests take every field the OpenAI API
//! defines for these endpoints and vLLM's sampling extensions, so that an option this server
//! cannot honour is refused by name rather than silently dropped. Fields nobody defines are
//! kept in `extra`: accepted with a warning, as vLLM does, or refused under
//! `--strict-request-fields`. The same types describe the API in `/openapi.json`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A prompt: text, or token ids; or a list of either, answered with a choice per prompt.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Prompt {
    Text(#[schemars(length(min = 1))] String),
    Texts(#[schemars(length(min = 1))] Vec<String>),
    Tokens(#[schemars(length(min = 1))] Vec<TokenId>),
    TokenLists(#[schemars(length(min = 1))] Vec<Vec<TokenId>>),
}

/// A token id of the model's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct TokenId(#[schemars(range(min = 0))] pub i64);

/// One or more stop strings (at most 4, none empty).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Stop {
    One(#[schemars(length(min = 1))] String),
    Many(#[schemars(length(max = 4))] Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with the request's token counts.
    #[serde(default)]
    pub include_usage: bool,
    /// Put the token counts so far in every chunk too (needs `include_usage`).
    #[serde(default)]
    pub continuous_usage_stats: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct CompletionRequest {
    /// The served model (the default).
    pub model: Option<String>,
    pub prompt: Prompt,
    /// Tokens to generate (default 16).
    #[schemars(range(min = 1))]
    pub max_tokens: Option<i64>,
    /// The newer name of `max_tokens`, as vLLM takes it here too.
    #[schemars(range(min = 1))]
    pub max_completion_tokens: Option<i64>,
    /// 0 (greedy) to 2; default 1.
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    /// In (0, 1]; default 1.
    #[schemars(range(max = 1.0), extend("exclusiveMinimum" = 0))]
    pub top_p: Option<f64>,
    /// Completions per prompt (1 to 128).
    #[schemars(range(min = 1, max = 128))]
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Log-probabilities of the sampled token and this many alternatives (0–20).
    #[schemars(range(min = 0, max = 20))]
    pub logprobs: Option<i64>,
    /// Not supported: must be false.
    pub echo: Option<bool>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    /// Subtracted from the logit of every token already in the output (-2 to 2).
    #[schemars(range(min = -2.0, max = 2.0))]
    pub presence_penalty: Option<f64>,
    /// Subtracted, times its count, from the logit of every token in the output (-2 to 2).
    #[schemars(range(min = -2.0, max = 2.0))]
    pub frequency_penalty: Option<f64>,
    /// Candidates per prompt, of which the `n` most likely are returned (at least `n`, at most
    /// 128; not with `stream`).
    #[schemars(range(min = 1, max = 128))]
    pub best_of: Option<i64>,
    /// Added to the logits of these token ids (-100 to 100).
    #[schemars(extend("additionalProperties" = {"type": "number", "minimum": -100, "maximum": 100}))]
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// Not supported.
    pub suffix: Option<String>,
    /// Recorded in nothing; accepted for compatibility.
    pub user: Option<String>,
    // vLLM's sampling extensions. Written out in each request type rather than flattened from
    // one struct: a flattened field's type error would lose its name in the 400's `param`.
    /// vLLM extension: keep the k most likely tokens (0 or -1: all).
    #[schemars(range(min = -1))]
    pub top_k: Option<i64>,
    /// vLLM extension: tokens to generate before an end token or a stop string may end the
    /// output (0 to `max_tokens`).
    #[schemars(range(min = 0))]
    pub min_tokens: Option<i64>,
    /// vLLM extension: a token already in the prompt or the output has a positive logit
    /// divided by this, a negative one multiplied; 1 is off.
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub repetition_penalty: Option<f64>,
    /// vLLM extension: token ids that end the output besides the model's end-of-sequence.
    pub stop_token_ids: Option<Vec<TokenId>>,
    /// vLLM extension: keep the stop string that ended the output in its text.
    pub include_stop_str_in_output: Option<bool>,
    /// vLLM extension: leave special tokens out of the text (default true).
    pub skip_special_tokens: Option<bool>,
    /// vLLM extension: add the model's special tokens (its BOS) to the prompt. Default true
    /// for completions, false for chat (the chat template writes them).
    pub add_special_tokens: Option<bool>,
    /// vLLM extension: keep generating past the end-of-sequence token.
    pub ignore_eos: Option<bool>,
    /// Fields no API defines: ignored with a warning (refused with `--strict-request-fields`).
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// A chat message's content: text, or a list of text parts.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct ContentPart {
    /// Only `text` is supported.
    #[serde(rename = "type")]
    #[schemars(extend("enum" = ["text"]))]
    pub kind: String,
    #[schemars(required)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct ChatMessage {
    /// system, developer, user or assistant.
    pub role: String,
    pub content: Option<Content>,
    pub name: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct ChatCompletionRequest {
    /// The served model (the default).
    pub model: Option<String>,
    #[schemars(length(min = 1))]
    pub messages: Vec<ChatMessage>,
    /// Tokens to generate (default: as many as the context and KV cache allow).
    #[schemars(range(min = 1))]
    pub max_tokens: Option<i64>,
    /// The newer name of `max_tokens`.
    #[schemars(range(min = 1))]
    pub max_completion_tokens: Option<i64>,
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    #[schemars(range(max = 1.0), extend("exclusiveMinimum" = 0))]
    pub top_p: Option<f64>,
    /// Choices (1 to 128).
    #[schemars(range(min = 1, max = 128))]
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Return the sampled tokens' log-probabilities.
    pub logprobs: Option<bool>,
    /// Alternatives per token (0–20); needs `logprobs`.
    #[schemars(range(min = 0, max = 20))]
    pub top_logprobs: Option<i64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    #[schemars(range(min = -2.0, max = 2.0))]
    pub presence_penalty: Option<f64>,
    #[schemars(range(min = -2.0, max = 2.0))]
    pub frequency_penalty: Option<f64>,
    /// Added to the logits of these token ids (-100 to 100).
    #[schemars(extend("additionalProperties" = {"type": "number", "minimum": -100, "maximum": 100}))]
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// Not supported.
    pub tools: Option<serde_json::Value>,
    /// Not supported.
    pub tool_choice: Option<serde_json::Value>,
    /// Not supported.
    pub parallel_tool_calls: Option<bool>,
    /// Only `{"type": "text"}` is supported.
    pub response_format: Option<serde_json::Value>,
    pub user: Option<String>,
    /// vLLM extension: keep the k most likely tokens (0 or -1: all).
    #[schemars(range(min = -1))]
    pub top_k: Option<i64>,
    /// vLLM extension: tokens to generate before an end token or a stop string may end the
    /// output (0 to `max_tokens`).
    #[schemars(range(min = 0))]
    pub min_tokens: Option<i64>,
    /// vLLM extension: a token already in the prompt or the output has a positive logit
    /// divided by this, a negative one multiplied; 1 is off.
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub repetition_penalty: Option<f64>,
    /// vLLM extension: token ids that end the output besides the model's end-of-sequence.
    pub stop_token_ids: Option<Vec<TokenId>>,
    /// vLLM extension: keep the stop string that ended the output in its text.
    pub include_stop_str_in_output: Option<bool>,
    /// vLLM extension: leave special tokens out of the text (default true).
    pub skip_special_tokens: Option<bool>,
    /// vLLM extension: add the model's special tokens (its BOS) to the prompt. Default true
    /// for completions, false for chat (the chat template writes them).
    pub add_special_tokens: Option<bool>,
    /// vLLM extension: keep generating past the end-of-sequence token.
    pub ignore_eos: Option<bool>,
    /// Fields no API defines: ignored with a warning (refused with `--strict-request-fields`).
    #[serde(flatten)]
    #[schemars(skip)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Token counts of a request.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
    /// Parallax's extension, in a stream's usage chunk: how the request was placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallax: Option<Placement>,
}

/// What the prompt's tokens cost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, JsonSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens found in the prefix cache: their keys and values were not computed again.
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
            parallax: None,
        }
    }
}

/// How a request was placed: the `X-Bin`, `X-Complexity`, … response headers, and the usage
/// extension of a stream.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Placement {
    /// fast, medium or slow.
    pub bin: &'static str,
    /// 1 to 10.
    pub complexity: u8,
    pub predicted_time_ms: f64,
    pub queue_time_ms: f64,
    /// From the first step until now (known once the request has finished).
    pub processing_time_ms: Option<f64>,
    /// Sequences in the request's first step.
    pub batch_size: usize,
    /// The device's utilization, or why there is none.
    pub gpu_utilization: String,
}

impl Placement {
    /// As response headers.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            ("x-bin", self.bin.to_owned()),
            ("x-complexity", self.complexity.to_string()),
            (
                "x-predicted-time",
                format!("{:.1}ms", self.predicted_time_ms),
            ),
            ("x-queue-time", format!("{:.1}ms", self.queue_time_ms)),
            ("x-batch-size", self.batch_size.to_string()),
            ("x-gpu-utilization", self.gpu_utilization.clone()),
        ];
        if let Some(ms) = self.processing_time_ms {
            headers.push(("x-processing-time", format!("{ms:.1}ms")));
        }
        headers
    }
}

/// Log-probabilities in the completions API's shape.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`; null until the last chunk of a stream.
    pub finish_reason: Option<&'static str>,
}

/// A completion, or one chunk of a streamed one (`object` says which).
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct CompletionResponse {
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One alternative token.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One sampled token's log-probability in the chat API's shape.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct AssistantMessage {
    /// `assistant`.
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
}

/// `chat.completion`.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// What a chunk adds to the message.
#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// `chat.completion.chunk`: one server-sent event of a streamed chat completion.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// With `stream_options.include_usage`: null in every chunk but the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ModelCard {
    pub id: String,
    /// `model`.
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// Longest prompt plus completion, in tokens.
    pub max_model_len: usize,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// OpenAI's error body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    pub code: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}
