//! From a request body to a [`ValidRequest`]: parsed, checked rule by rule, the prompt tokenized
//! and the context checked. Everything past this module can trust its input.

use super::error::ApiError;
use super::protocol::{
    ChatCompletionRequest, CompletionRequest, Content, Prompt, Stop, StreamOptions, TokenId,
};
use crate::engine::scheduling::admission::Priority;
use crate::engine::{Message, SamplingParams, TextCodec};
use axum::http::HeaderMap;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::time::Duration;

/// Which API a request came through; it decides the response's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Completion,
    Chat,
}

/// What the loaded model allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelLimits {
    pub context_length: usize,
    pub vocab_size: usize,
    /// Tokens the whole KV cache holds: no request can be longer.
    pub kv_tokens: usize,
}

/// A request that passed every rule.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub api: Api,
    /// The prompts (one, or a completions prompt list), each with its `max_tokens`: each is
    /// answered with `n` choices, in order.
    pub prompts: Vec<(Vec<u32>, usize)>,
    /// Shared by every choice (`max_tokens` aside, which is each prompt's).
    pub params: SamplingParams,
    /// Choices returned per prompt.
    pub n: usize,
    /// Candidates generated per prompt, of which the `n` most likely are returned.
    pub best_of: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Usage in every chunk of a stream, not only the last.
    pub continuous_usage: bool,
    /// Return log-probabilities, with this many alternatives per token.
    pub logprobs: Option<usize>,
    /// Fields no API defines, which were ignored.
    pub ignored: Vec<String>,
}

/// How a request asks to be scheduled (`X-Batch-Preference`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchPreference {
    /// May wait up to its max wait to join a fuller batch.
    Enable,
    /// Runs in steps of its own.
    Disable,
    /// Joins the next step.
    #[default]
    Auto,
}

impl BatchPreference {
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "enable" => Some(Self::Enable),
            "disable" => Some(Self::Disable),
            "auto" => Some(Self::Auto),
            _ => None,
        }
    }
}

/// The scheduling headers, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduling {
    pub priority: Priority,
    pub preference: BatchPreference,
    /// `X-Max-Wait-Time`: the longest the request may be held to form a fuller batch.
    pub max_wait: Duration,
    /// `X-Task-Class`: a caller's name for the kind of work, used by the predictor.
    pub task_class: Option<String>,
    /// `X-Request-Timeout`: how long the request may wait to start.
    pub timeout: Option<Duration>,
}

/// `50ms`, `1.5s`, `2m`, `250us`, or a bare number of milliseconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let seconds = match unit.trim() {
        "" | "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "s" => value,
        "m" => value * 60.0,
        _ => return None,
    };
    (seconds.is_finite() && seconds <= 86_400.0).then(|| Duration::from_secs_f64(seconds))
}

/// A header's value, if present; names match in any case.
fn header_text<'h>(
    headers: &'h HeaderMap,
    name: &'static str,
) -> Result<Option<&'h str>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str().map_err(|_| ApiError::BadHeader {
                header: name,
                message: "is not text".into(),
            })
        })
        .transpose()
}

/// A header's value parsed by `parse`, or an error naming the header and what it may be.
fn header_value<T>(
    headers: &HeaderMap,
    name: &'static str,
    expected: &str,
    parse: fn(&str) -> Option<T>,
) -> Result<Option<T>, ApiError> {
    header_text(headers, name)?
        .map(|v| {
            parse(v).ok_or_else(|| ApiError::BadHeader {
                header: name,
                message: format!("{v:?} is not {expected}"),
            })
        })
        .transpose()
}

/// Reads the scheduling headers, refusing a bad value by the header's name.
pub fn scheduling(headers: &HeaderMap, default_max_wait: Duration) -> Result<Scheduling, ApiError> {
    let duration = "a duration such as 50ms, 2s or 1m";
    Ok(Scheduling {
        priority: header_value(
            headers,
            "X-Request-Priority",
            "one of high, medium, low",
            Priority::parse,
        )?
        .unwrap_or_default(),
        preference: header_value(
            headers,
            "X-Batch-Preference",
            "one of enable, disable, auto",
            BatchPreference::parse,
        )?
        .unwrap_or_default(),
        max_wait: header_value(headers, "X-Max-Wait-Time", duration, parse_duration)?
            .unwrap_or(default_max_wait),
        task_class: header_text(headers, "X-Task-Class")?
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty()),
        timeout: header_value(headers, "X-Request-Timeout", duration, parse_duration)?,
    })
}

/// Parses a JSON body, naming the field at fault.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        // serde_json appends the position; the field is the useful part.
        let message = message
            .rfind(" at line ")
            .map_or(message.as_str(), |at| &message[..at])
            .to_owned();
        if !inner.is_data() {
            return ApiError::MalformedJson(message);
        }
        let quoted = || message.split('`').nth(1).unwrap_or_default().to_owned();
        let under = |field: String| {
            if path == "." || path.is_empty() {
                field
            } else {
                format!("{path}.{field}")
            }
        };
        if message.starts_with("unknown field") {
            // The path already ends at the unknown field.
            let field = quoted();
            ApiError::UnknownField(if path.ends_with(&field) {
                path
            } else {
                under(field)
            })
        } else if message.starts_with("missing field") {
            ApiError::WrongType {
                param: under(quoted()),
                message: "is required".into(),
            }
        } else {
            ApiError::WrongType {
                param: path,
                message,
            }
        }
    })?;
    // Trailing characters after the value are malformed JSON too.
    deserializer
        .end()
        .map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    Ok(value)
}

/// The options both APIs share, checked.
struct Common<'a> {
    model: Option<&'a str>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    n: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<&'a StreamOptions>,
    stop: Option<&'a Stop>,
    seed: Option<i64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<&'a BTreeMap<String, f64>>,
    top_k: Option<i64>,
    min_tokens: Option<i64>,
    repetition_penalty: Option<f64>,
    stop_token_ids: Option<&'a [TokenId]>,
    include_stop_str_in_output: Option<bool>,
    skip_special_tokens: Option<bool>,
    ignore_eos: Option<bool>,
    extra: &'a BTreeMap<String, serde_json::Value>,
}

/// The shared options of either request type (their fields have the same names).
macro_rules! common {
    ($request:expr) => {
        Common {
            model: $request.model.as_deref(),
            temperature: $request.temperature,
            top_p: $request.top_p,
            n: $request.n,
            stream: $request.stream,
            stream_options: $request.stream_options.as_ref(),
            stop: $request.stop.as_ref(),
            seed: $request.seed,
            presence_penalty: $request.presence_penalty,
            frequency_penalty: $request.frequency_penalty,
            logit_bias: $request.logit_bias.as_ref(),
            top_k: $request.top_k,
            min_tokens: $request.min_tokens,
            repetition_penalty: $request.repetition_penalty,
            stop_token_ids: $request.stop_token_ids.as_deref(),
            include_stop_str_in_output: $request.include_stop_str_in_output,
            skip_special_tokens: $request.skip_special_tokens,
            ignore_eos: $request.ignore_eos,
            extra: &$request.extra,
        }
    };
}

fn out_of_range(param: &'static str, message: String) -> ApiError {
    ApiError::OutOfRange { param, message }
}

fn unsupported(param: &str, message: &str) -> ApiError {
    ApiError::Unsupported {
        param: param.to_owned(),
        message: message.to_owned(),
    }
}

/// Most choices a request may ask for (`n`, `best_of`, over every prompt of a list).
pub const MAX_CHOICES: i64 = 128;

/// What the shared options come to.
struct Checked {
    params: SamplingParams,
    n: usize,
    stream: bool,
    include_usage: bool,
    continuous_usage: bool,
    ignored: Vec<String>,
}

impl Common<'_> {
    fn check(&self, served_name: &str, vocab: usize, strict: bool) -> Result<Checked, ApiError> {
        if let Some(model) = self.model
            && model != served_name
        {
            return Err(ApiError::UnknownModel(model.to_owned()));
        }
        if strict && let Some(field) = self.extra.keys().next() {
            return Err(ApiError::UnknownField(field.clone()));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(out_of_range(
                "temperature",
                format!("must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(out_of_range(
                "top_p",
                format!("must be in (0, 1], got {top_p}"),
            ));
        }
        let top_k = self.top_k.unwrap_or(0);
        if top_k < -1 {
            return Err(out_of_range(
                "top_k",
                format!("must be -1, 0 (all tokens) or positive, got {top_k}"),
            ));
        }
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_CHOICES).contains(&n) {
            return Err(out_of_range(
                "n",
                format!("must be between 1 and {MAX_CHOICES}, got {n}"),
            ));
        }
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 {
            return Err(out_of_range(
                "stop",
                format!("at most 4 stop sequences, got {}", stop.len()),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(out_of_range(
                "stop",
                "stop sequences must not be empty".into(),
            ));
        }
        let mut penalties = [0.0f32; 2];
        for (slot, (param, value)) in penalties.iter_mut().zip([
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ]) {
            let value = value.unwrap_or(0.0);
            if !(-2.0..=2.0).contains(&value) {
                return Err(out_of_range(
                    param,
                    format!("must be between -2 and 2, got {value}"),
                ));
            }
            *slot = value as f32;
        }
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
            return Err(out_of_range(
                "repetition_penalty",
                format!("must be greater than 0, got {repetition_penalty}"),
            ));
        }
        let mut logit_bias = Vec::new();
        for (key, bias) in self.logit_bias.into_iter().flatten() {
            let token = key
                .parse::<u32>()
                .ok()
                .filter(|t| (*t as usize) < vocab)
                .ok_or_else(|| {
                    out_of_range(
                        "logit_bias",
                        format!("{key:?} is not a token id of the vocabulary of {vocab}"),
                    )
                })?;
            if !(-100.0..=100.0).contains(bias) {
                return Err(out_of_range(
                    "logit_bias",
                    format!("the bias of token {key} must be between -100 and 100, got {bias}"),
                ));
            }
            logit_bias.push((token, *bias as f32));
        }
        let stop_token_ids = self
            .stop_token_ids
            .map(|ids| token_ids("stop_token_ids", ids, vocab))
            .transpose()?
            .unwrap_or_default();
        let min_tokens = self.min_tokens.unwrap_or(0);
        if min_tokens < 0 {
            return Err(out_of_range(
                "min_tokens",
                format!("must be at least 0, got {min_tokens}"),
            ));
        }
        let stream = self.stream.unwrap_or(false);
        let options = self.stream_options;
        if options.is_some() && !stream {
            return Err(out_of_range(
                "stream_options",
                "stream_options is only allowed when stream is true".into(),
            ));
        }
        let include_usage = options.is_some_and(|o| o.include_usage);
        let continuous_usage = options.is_some_and(|o| o.continuous_usage_stats);
        if continuous_usage && !include_usage {
            return Err(out_of_range(
                "stream_options",
                "continuous_usage_stats needs include_usage: true".into(),
            ));
        }
        let params = SamplingParams {
            temperature: temperature as f32,
            top_k: top_k.max(0) as usize,
            top_p: top_p as f32,
            // A negative seed is as good a seed as any: keep its bits.
            seed: self.seed.map(|s| s as u64),
            stop,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            min_tokens: min_tokens as usize,
            stop_token_ids,
            include_stop_str_in_output: self.include_stop_str_in_output.unwrap_or(false),
            skip_special_tokens: self.skip_special_tokens.unwrap_or(true),
            repetition_penalty: repetition_penalty as f32,
            presence_penalty: penalties[0],
            frequency_penalty: penalties[1],
            logit_bias,
            ..SamplingParams::default()
        };
        Ok(Checked {
            params,
            n: n as usize,
            stream,
            include_usage,
            continuous_usage,
            ignored: self.extra.keys().cloned().collect(),
        })
    }
}

/// `min_tokens` is checked once `max_tokens` is known.
fn min_tokens_fit(params: &SamplingParams, max_tokens: usize) -> Result<(), ApiError> {
    if params.min_tokens > max_tokens {
        return Err(out_of_range(
            "min_tokens",
            format!(
                "must not exceed max_tokens ({max_tokens}), got {}",
                params.min_tokens
            ),
        ));
    }
    Ok(())
}

fn logprobs_count(param: &'static str, n: i64) -> Result<usize, ApiError> {
    if (0..=20).contains(&n) {
        Ok(n as usize)
    } else {
        Err(out_of_range(
            param,
            format!("must be between 0 and 20, got {n}"),
        ))
    }
}

/// Checks `max_tokens` (or picks the default) against the context and the KV cache.
fn max_tokens(
    requested: Option<i64>,
    default: Option<usize>,
    prompt: usize,
    limits: ModelLimits,
) -> Result<usize, ApiError> {
    let context = limits.context_length;
    match requested {
        Some(n) if n < 1 => Err(out_of_range(
            "max_tokens",
            format!("must be at least 1, got {n}"),
        )),
        Some(n) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if prompt.saturating_add(n) > context {
                return Err(ApiError::ContextExceeded {
                    prompt,
                    max_tokens: n,
                    context,
                });
            }
            Ok(n)
        }
        None => {
            if prompt >= context {
                return Err(ApiError::ContextExceeded {
                    prompt,
                    max_tokens: 1,
                    context,
                });
            }
            let room = context.min(limits.kv_tokens).saturating_sub(prompt).max(1);
            Ok(default.map_or(room, |d| d.min(context - prompt)))
        }
    }
}

/// `POST /v1/completions`.
pub fn completion(
    request: &CompletionRequest,
    served_name: &str,
    codec: &TextCodec,
    limits: ModelLimits,
    strict: bool,
) -> Result<ValidRequest, ApiError> {
    let Checked {
        mut params,
        n,
        stream,
        include_usage,
        continuous_usage,
        ignored,
    } = common!(request).check(served_name, limits.vocab_size, strict)?;
    if request.echo == Some(true) {
        return Err(unsupported("echo", "echo is not supported"));
    }
    if request.suffix.is_some() {
        return Err(unsupported("suffix", "suffix is not supported"));
    }
    let best_of = request.best_of.unwrap_or(n as i64);
    if best_of < n as i64 || best_of > MAX_CHOICES {
        return Err(out_of_range(
            "best_of",
            format!("must be at least n ({n}) and at most {MAX_CHOICES}, got {best_of}"),
        ));
    }
    let best_of = best_of as usize;
    if best_of > n && stream {
        return Err(unsupported(
            "best_of",
            "best_of above n cannot be streamed: the best choices are known only at the end",
        ));
    }
    let logprobs = request
        .logprobs
        .map(|n| logprobs_count("logprobs", n))
        .transpose()?;
    let add_special = request.add_special_tokens.unwrap_or(true);
    let prompts: Vec<Vec<u32>> = match &request.prompt {
        Prompt::Text(text) => vec![encode(codec, text, add_special)?],
        Prompt::Texts(texts) => texts
            .iter()
            .map(|t| encode(codec, t, add_special))
            .collect::<Result<_, _>>()?,
        Prompt::Tokens(ids) => vec![token_ids("prompt", ids, limits.vocab_size)?],
        Prompt::TokenLists(lists) => lists
            .iter()
            .map(|ids| token_ids("prompt", ids, limits.vocab_size))
            .collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() {
        return Err(out_of_range("prompt", "the prompt list is empty".into()));
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        let which = if prompts.len() == 1 {
            "the prompt is empty".to_owned()
        } else {
            format!("prompt {i} of the list is empty")
        };
        return Err(out_of_range("prompt", which));
    }
    if (prompts.len() * best_of) as i64 > MAX_CHOICES {
        return Err(out_of_range(
            "prompt",
            format!(
                "{} prompts times {best_of} choices each is more than the {MAX_CHOICES} a request may ask for",
                prompts.len()
            ),
        ));
    }
    let requested = request.max_completion_tokens.or(request.max_tokens);
    let prompts = prompts
        .into_iter()
        .map(|p| {
            let max = max_tokens(requested, Some(16), p.len(), limits)?;
            min_tokens_fit(&params, max)?;
            Ok((p, max))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    params.max_tokens = prompts[0].1;
    params.logprobs = logprobs.unwrap_or(0);
    // The sampled token's log-probability is wanted with `logprobs` (even 0 alternatives) and
    // to rank `best_of` candidates.
    params.score = best_of > n || logprobs.is_some();
    Ok(ValidRequest {
        api: Api::Completion,
        prompts,
        params,
        n,
        best_of,
        stream,
        include_usage,
        continuous_usage,
        logprobs,
        ignored,
    })
}

/// `POST /v1/chat/completions`.
pub fn chat(
    request: &ChatCompletionRequest,
    served_name: &str,
    codec: &TextCodec,
    limits: ModelLimits,
    strict: bool,
) -> Result<ValidRequest, ApiError> {
    let Checked {
        mut params,
        n,
        stream,
        include_usage,
        continuous_usage,
        ignored,
    } = common!(request).check(served_name, limits.vocab_size, strict)?;
    if request
        .tools
        .as_ref()
        .is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(unsupported("tools", "tool calling is not supported"));
    }
    if request
        .tool_choice
        .as_ref()
        .is_some_and(|c| !c.is_null() && c != "none")
    {
        return Err(unsupported("tool_choice", "tool calling is not supported"));
    }
    if let Some(format) = &request.response_format
        && format["type"] != "text"
    {
        return Err(unsupported(
            "response_format",
            "only {\"type\": \"text\"} is supported",
        ));
    }
    let top = request
        .top_logprobs
        .map(|n| logprobs_count("top_logprobs", n))
        .transpose()?;
    let logprobs = match (request.logprobs.unwrap_or(false), top) {
        (true, top) => Some(top.unwrap_or(0)),
        (false, None | Some(0)) => None,
        (false, Some(_)) => {
            return Err(out_of_range(
                "top_logprobs",
                "top_logprobs needs logprobs: true".into(),
            ));
        }
    };
    if request.messages.is_empty() {
        return Err(out_of_range(
            "messages",
            "at least one message is needed".into(),
        ));
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for (i, m) in request.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "user" | "assistant" => m.role.clone(),
            // OpenAI's newer name for system instructions; models' templates know `system`.
            "developer" => "system".to_owned(),
            "tool" | "function" => {
                return Err(unsupported(
                    &format!("messages[{i}].role"),
                    "tool messages are not supported",
                ));
            }
            other => {
                return Err(ApiError::WrongType {
                    param: format!("messages[{i}].role"),
                    message: format!(
                        "unknown role {other:?} (system, developer, user or assistant)"
                    ),
                });
            }
        };
        let content = match &m.content {
            Some(Content::Text(text)) => text.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => text.push_str(t),
                        ("text", None) => {
                            return Err(ApiError::WrongType {
                                param: format!("messages[{i}].content[{j}].text"),
                                message: "is required".into(),
                            });
                        }
                        (other, _) => {
                            return Err(unsupported(
                                &format!("messages[{i}].content[{j}].type"),
                                &format!("only text parts are supported, not {other:?}"),
                            ));
                        }
                    }
                }
                text
            }
            None => {
                return Err(ApiError::WrongType {
                    param: format!("messages[{i}].content"),
                    message: "is required".into(),
                });
            }
        };
        messages.push(Message { role, content });
    }
    let text = codec
        .chat_prompt(&messages)
        .map_err(|e| ApiError::WrongType {
            param: "messages".into(),
            message: e.to_string(),
        })?;
    // The chat template writes the special tokens it wants: none are added unless asked.
    let prompt = encode(codec, &text, request.add_special_tokens.unwrap_or(false))?;
    let requested = request.max_completion_tokens.or(request.max_tokens);
    params.max_tokens = max_tokens(requested, None, prompt.len(), limits)?;
    min_tokens_fit(&params, params.max_tokens)?;
    params.logprobs = logprobs.unwrap_or(0);
    params.score = logprobs.is_some();
    Ok(ValidRequest {
        api: Api::Chat,
        prompts: vec![(prompt, params.max_tokens)],
        params,
        n,
        best_of: n,
        stream,
        include_usage,
        continuous_usage,
        logprobs,
        ignored,
    })
}

fn encode(codec: &TextCodec, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
    codec
        .encode_with(text, add_special_tokens)
        .map_err(|e| ApiError::WrongType {
            param: "prompt".into(),
            message: e.to_string(),
        })
}

fn token_ids(param: &'static str, ids: &[TokenId], vocab: usize) -> Result<Vec<u32>, ApiError> {
    ids.iter()
        .map(|&TokenId(id)| {
            u32::try_from(id)
                .ok()
                .filter(|&id| (id as usize) < vocab)
                .ok_or_else(|| {
                    out_of_range(
                        param,
                        format!("token id {id} is outside the vocabulary of {vocab}"),
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::protocol::CompletionRequest;

    fn param_of(body: &str) -> Option<String> {
        parse::<CompletionRequest>(body.as_bytes())
            .err()
            .and_then(|e| e.param())
    }

    #[test]
    fn parse_errors_name_the_field() {
        // Fields no API defines are kept aside, to be ignored (or refused when strict).
        let extra = parse::<CompletionRequest>(br#"{"prompt":"x","bogus":1,"also":{}}"#).unwrap();
        assert_eq!(extra.extra.keys().collect::<Vec<_>>(), ["also", "bogus"]);
        assert_eq!(extra.model, None, "model may be left out");
        assert_eq!(param_of(r#"{"model":"m"}"#).as_deref(), Some("prompt"));
        assert_eq!(
            param_of(r#"{"prompt":"x","min_tokens":"few"}"#).as_deref(),
            Some("min_tokens")
        );
        assert_eq!(
            param_of(r#"{"model":"m","prompt":"x","max_tokens":"many"}"#).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            param_of(r#"{"model":"m","prompt":"x","stream_options":{"x":1}}"#).as_deref(),
            Some("stream_options.x")
        );
        let malformed = parse::<CompletionRequest>(b"{\"model\":").unwrap_err();
        assert!(
            matches!(malformed, ApiError::MalformedJson(_)),
            "{malformed:?}"
        );
        let trailing = parse::<CompletionRequest>(br#"{"model":"m","prompt":"x"} x"#).unwrap_err();
        assert!(
            matches!(trailing, ApiError::MalformedJson(_)),
            "{trailing:?}"
        );
    }

    #[test]
    fn max_tokens_is_checked_against_the_context_and_defaults_to_what_fits() {
        let limits = ModelLimits {
            context_length: 100,
            vocab_size: 10,
            kv_tokens: 64,
        };
        assert_eq!(max_tokens(Some(10), None, 20, limits).unwrap(), 10);
        assert!(matches!(
            max_tokens(Some(90), None, 20, limits),
            Err(ApiError::ContextExceeded {
                prompt: 20,
                max_tokens: 90,
                context: 100
            })
        ));
        assert!(matches!(
            max_tokens(Some(0), None, 20, limits),
            Err(ApiError::OutOfRange { .. })
        ));
        // Chat's default fills what the KV cache can hold; completions' is 16.
        assert_eq!(max_tokens(None, None, 20, limits).unwrap(), 44);
        assert_eq!(max_tokens(None, Some(16), 20, limits).unwrap(), 16);
        assert_eq!(max_tokens(None, Some(16), 95, limits).unwrap(), 5);
    }

    #[test]
    fn scheduling_headers_are_read_and_bad_ones_named() {
        let mut headers = HeaderMap::new();
        let default = Duration::from_millis(50);
        let plain = scheduling(&headers, default).unwrap();
        assert_eq!(
            (
                plain.priority,
                plain.preference,
                plain.max_wait,
                plain.timeout
            ),
            (Priority::Medium, BatchPreference::Auto, default, None)
        );
        headers.insert("x-request-priority", "HIGH".parse().unwrap());
        headers.insert("x-batch-preference", "enable".parse().unwrap());
        headers.insert("x-max-wait-time", "20ms".parse().unwrap());
        headers.insert("x-request-timeout", "2s".parse().unwrap());
        headers.insert("x-task-class", "summary".parse().unwrap());
        let s = scheduling(&headers, default).unwrap();
        assert_eq!(s.priority, Priority::High);
        assert_eq!(s.preference, BatchPreference::Enable);
        assert_eq!(s.max_wait, Duration::from_millis(20));
        assert_eq!(s.timeout, Some(Duration::from_secs(2)));
        assert_eq!(s.task_class.as_deref(), Some("summary"));
        for (header, value) in [
            ("x-request-priority", "urgent"),
            ("x-batch-preference", "sometimes"),
            ("x-max-wait-time", "soon"),
            ("x-request-timeout", "5 parsecs"),
        ] {
            let mut bad = headers.clone();
            bad.insert(header, value.parse().unwrap());
            let error = scheduling(&bad, default).unwrap_err();
            assert_eq!(
                error.param().map(|p| p.to_ascii_lowercase()).as_deref(),
                Some(header)
            );
        }
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("-1s"), None);
    }

    #[test]
    fn token_prompts_must_be_in_the_vocabulary() {
        assert_eq!(
            token_ids("prompt", &[TokenId(1), TokenId(2)], 10).unwrap(),
            vec![1, 2]
        );
        assert!(token_ids("prompt", &[TokenId(10)], 10).is_err());
        assert!(token_ids("stop_token_ids", &[TokenId(-1)], 10).is_err());
    }
}
