//! From an engine request stream to an OpenAI response: one JSON body, or server-sent events
//! (`data: {chunk}` … `data: [DONE]`). Dropping the response (the client went away) drops the
//! engine stream, which cancels the request. When the server's shutdown deadline passes, an
//! unfinished request ends with an explicit `server_shutting_down` error.

use super::AppState;
use super::error::ApiError;
use super::metrics::RequestTimer;
use super::overload::QueueSlot;
use super::prediction::{Observation, Prediction, RequestClass};
use super::protocol::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
    ChatLogprobs, CompletionChoice, CompletionLogprobs, CompletionResponse, Delta, Placement,
    TokenLogprob, TopLogprob, Usage,
};
use super::validation::{Api, BatchPreference, Scheduling, ValidRequest};
use crate::engine::runtime::{RequestOptions, RunTime};
use crate::engine::{EngineHandle, Event, RequestStream, TextCodec};
use axum::Json;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{oneshot, watch};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A response id unique within the process and unlikely to repeat across restarts.
fn response_id(api: Api) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = match api {
        Api::Completion => "cmpl",
        Api::Chat => "chatcmpl",
    };
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("{prefix}-{started:x}{n:06x}")
}

/// Resolves when the server's shutdown deadline has passed; never, if it cannot.
async fn aborted(abort: &mut watch::Receiver<bool>) {
    if abort.wait_for(|a| *a).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Log-probabilities of the tokens so far, in the API's shape.
#[derive(Debug, Clone, PartialEq)]
enum Logprobs {
    Completion(CompletionLogprobs),
    Chat(ChatLogprobs),
}

impl Logprobs {
    fn new(api: Api) -> Self {
        match api {
            Api::Completion => Self::Completion(CompletionLogprobs::default()),
            Api::Chat => Self::Chat(ChatLogprobs::default()),
        }
    }

    /// Adds one token; returns the length of its text (for the next `text_offset`).
    fn push(
        &mut self,
        codec: &TextCodec,
        id: u32,
        logprob: f32,
        top: &[(u32, f32)],
        offset: usize,
    ) -> usize {
        let token = codec.token_text(id);
        let len = token.len();
        match self {
            Self::Completion(l) => {
                l.top_logprobs.push(
                    top.iter()
                        .map(|&(t, lp)| (codec.token_text(t), lp))
                        .collect(),
                );
                l.tokens.push(token);
                l.token_logprobs.push(logprob);
                l.text_offset.push(offset);
            }
            Self::Chat(l) => l.content.push(TokenLogprob {
                bytes: token.as_bytes().to_vec(),
                token,
                logprob,
                top_logprobs: top
                    .iter()
                    .map(|&(t, lp)| {
                        let token = codec.token_text(t);
                        TopLogprob {
                            bytes: token.as_bytes().to_vec(),
                            token,
                            logprob: lp,
                        }
                    })
                    .collect(),
            }),
        }
        len
    }

    /// Appends the tokens of `later` (of the same API).
    fn append(&mut self, later: Self) {
        match (self, later) {
            (Self::Completion(a), Self::Completion(l)) => {
                a.tokens.extend(l.tokens);
                a.token_logprobs.extend(l.token_logprobs);
                a.top_logprobs.extend(l.top_logprobs);
                a.text_offset.extend(l.text_offset);
            }
            (Self::Chat(a), Self::Chat(l)) => a.content.extend(l.content),
            // One request has one API.
            _ => {}
        }
    }

    fn completion(self) -> Option<CompletionLogprobs> {
        match self {
            Self::Completion(l) => Some(l),
            Self::Chat(_) => None,
        }
    }

    fn chat(self) -> Option<ChatLogprobs> {
        match self {
            Self::Chat(l) => Some(l),
            Self::Completion(_) => None,
        }
    }
}

/// What is known of a request's scheduling.
#[derive(Debug, Clone, Copy)]
struct Placing {
    prediction: Prediction,
    /// Set when the first step ran.
    started: Option<Instant>,
    queue_time: Duration,
    batch_size: usize,
}

impl Placing {
    /// How the request was placed; with the processing time once it has `finished`.
    fn report(&self, state: &AppState, finished: bool) -> Placement {
        let millis = |d: Duration| d.as_secs_f64() * 1e3;
        Placement {
            bin: self.prediction.bin.as_str(),
            complexity: self.prediction.complexity,
            predicted_time_ms: millis(self.prediction.time),
            queue_time_ms: millis(self.queue_time),
            processing_time_ms: self
                .started
                .filter(|_| finished)
                .map(|s| millis(s.elapsed())),
            batch_size: self.batch_size,
            gpu_utilization: match state.gpus() {
                Some(gpus) => gpus.utilization().map_or_else(
                    || "unavailable (not reported)".into(),
                    |u| format!("{u:.0}%"),
                ),
                None => "unavailable (no GPU watched)".into(),
            },
        }
    }

    /// The placement as response headers.
    fn headers(&self, state: &AppState, finished: bool) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in self.report(state, finished).headers() {
            if let Ok(value) = value.parse() {
                headers.insert(name, value);
            }
        }
        headers
    }
}

/// What every choice of a response shares.
#[derive(Debug, Clone)]
struct Shape {
    api: Api,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    /// Usage in every chunk.
    continuous_usage: bool,
}

/// A choice's engine stream: submitted, or to be submitted once the first choice of its
/// prompt has computed the prompt (so that its KV blocks are in the prefix cache to share).
enum ChoiceStream {
    Ready(RequestStream),
    Waiting(oneshot::Receiver<Result<RequestStream, ApiError>>),
}

/// One choice being generated: one engine sequence.
struct Generation {
    state: Arc<AppState>,
    /// The choice's index in the response (prompt by prompt, `n` each).
    index: usize,
    placement: Placing,
    class: RequestClass,
    max_tokens: usize,
    prompt_tokens: usize,
    slot: Option<QueueSlot>,
    api: Api,
    codec: Arc<TextCodec>,
    want_logprobs: bool,
    stream: ChoiceStream,
    /// Told when this choice's prompt is computed: its siblings may start.
    prefilled: Option<oneshot::Sender<()>>,
    timer: RequestTimer,
    abort: watch::Receiver<bool>,
    /// Bytes of token text so far (the completions API's `text_offset`).
    offset: usize,
    /// Tokens so far, and the sum of their log-probabilities (to rank `best_of` candidates).
    completion_tokens: usize,
    cumulative_logprob: f64,
}

/// What the next engine event amounts to.
enum Step {
    Token {
        text: String,
        logprobs: Option<Logprobs>,
    },
    Finished {
        text: String,
        reason: &'static str,
        usage: Usage,
    },
    Failed(ApiError),
}

/// A choice, generated to its end.
struct Choice {
    index: usize,
    text: String,
    logprobs: Option<Logprobs>,
    reason: &'static str,
    usage: Usage,
    cumulative_logprob: f64,
}

impl Generation {
    /// The engine stream, once submitted.
    async fn engine_stream(&mut self) -> Result<&mut RequestStream, ApiError> {
        if let ChoiceStream::Waiting(submitted) = &mut self.stream {
            let stream = tokio::select! {
                submitted = submitted => submitted.unwrap_or(Err(ApiError::Engine(
                    crate::engine::EngineError::Stopped,
                )))?,
                () = aborted(&mut self.abort) => return Err(ApiError::ShuttingDown),
            };
            self.stream = ChoiceStream::Ready(stream);
        }
        match &mut self.stream {
            ChoiceStream::Ready(stream) => Ok(stream),
            ChoiceStream::Waiting(_) => {
                Err(ApiError::Internal("a choice was never submitted".into()))
            }
        }
    }

    /// Waits for the request's first step: its queue time and batch are then known. Ends it
    /// with an error if it waits past `timeout`.
    async fn wait_started(
        &mut self,
        timeout: Option<Duration>,
        arrived: Instant,
    ) -> Result<(), ApiError> {
        let deadline = timeout.map(|t| tokio::time::Instant::from_std(arrived + t));
        let timed_out = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let mut abort = self.abort.clone();
        let stream = self.engine_stream().await?;
        let event = tokio::select! {
            event = stream.next() => event,
            () = aborted(&mut abort) => return Err(ApiError::ShuttingDown),
            () = timed_out => {
                self.state.metrics.record_rejection("queue_timeout");
                return Err(ApiError::QueueTimeout { waited_ms: arrived.elapsed().as_millis() as u64 });
            }
        };
        match event {
            Some(Event::Started {
                queue_time,
                batch_size,
            }) => {
                self.started(queue_time, batch_size);
                Ok(())
            }
            Some(Event::Failed { message }) => {
                self.timer.failed();
                Err(ApiError::StepFailed(message))
            }
            Some(_) => Err(ApiError::Internal(
                "the engine answered before it started".into(),
            )),
            None => Err(ApiError::Engine(crate::engine::EngineError::Stopped)),
        }
    }

    fn started(&mut self, queue_time: Duration, batch_size: usize) {
        let now = Instant::now();
        if self.placement.started.is_none() {
            self.placement.started = Some(now);
            self.placement.queue_time = queue_time;
            self.placement.batch_size = batch_size;
        }
        if let Some(slot) = self.slot.take() {
            slot.started(now);
        }
    }

    /// How the request was placed; with the processing time once it has `finished`.
    fn report(&self, finished: bool) -> Placement {
        self.placement.report(&self.state, finished)
    }

    async fn next(&mut self) -> Step {
        loop {
            let mut abort = self.abort.clone();
            let event = match self.engine_stream().await {
                Ok(stream) => tokio::select! {
                    event = stream.next() => event,
                    () = aborted(&mut abort) => return Step::Failed(ApiError::ShuttingDown),
                },
                Err(e) => return Step::Failed(e),
            };
            if let Some(Event::Started {
                queue_time,
                batch_size,
            }) = event
            {
                self.started(queue_time, batch_size);
                continue;
            }
            // The prompt is computed once the first token comes: the siblings may start.
            if let Some(prefilled) = self.prefilled.take() {
                let _ = prefilled.send(());
            }
            return self.step(event);
        }
    }

    fn step(&mut self, event: Option<Event>) -> Step {
        match event {
            // `next` takes the start; nothing to say if it came here.
            Some(Event::Started { .. }) => Step::Token {
                text: String::new(),
                logprobs: None,
            },
            Some(Event::Token {
                id,
                text,
                logprob,
                top_logprobs,
            }) => {
                self.timer.token();
                self.completion_tokens += 1;
                self.cumulative_logprob += f64::from(logprob);
                let logprobs = self.want_logprobs.then(|| {
                    let mut l = Logprobs::new(self.api);
                    self.offset += l.push(&self.codec, id, logprob, &top_logprobs, self.offset);
                    l
                });
                Step::Token { text, logprobs }
            }
            Some(Event::Finished {
                text,
                reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                queue_time,
                run_time,
            }) => {
                self.timer.finish(reason, queue_time, completion_tokens);
                self.learn(completion_tokens, cached_tokens, run_time);
                Step::Finished {
                    text,
                    reason: reason.as_str(),
                    usage: Usage::new(prompt_tokens, completion_tokens, cached_tokens),
                }
            }
            Some(Event::Failed { message }) => {
                self.timer.failed();
                Step::Failed(ApiError::StepFailed(message))
            }
            None => Step::Failed(ApiError::Engine(crate::engine::EngineError::Stopped)),
        }
    }

    /// Teaches the predictor what this request took: its prefill time was spent on the prompt
    /// tokens not found in the prefix cache.
    fn learn(&self, output_tokens: usize, cached_tokens: usize, run_time: RunTime) {
        let p = &self.placement;
        if run_time.total.is_zero() {
            return;
        }
        let seen = Observation {
            prompt_tokens: self.prompt_tokens.saturating_sub(cached_tokens),
            output_tokens,
            prefill: run_time.prefill,
            processing: run_time.total,
        };
        let error = self
            .state
            .predictor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(&self.class, self.max_tokens, &p.prediction, &seen);
        self.state.metrics.record_prediction_error(error);
    }

    /// Runs the choice to its end.
    async fn run_to_end(mut self) -> Result<Choice, ApiError> {
        let mut text = String::new();
        let mut all = self.want_logprobs.then(|| Logprobs::new(self.api));
        loop {
            match self.next().await {
                Step::Token {
                    text: piece,
                    logprobs,
                } => {
                    text.push_str(&piece);
                    if let (Some(all), Some(l)) = (&mut all, logprobs) {
                        all.append(l);
                    }
                }
                Step::Finished {
                    text: rest,
                    reason,
                    usage,
                } => {
                    text.push_str(&rest);
                    return Ok(Choice {
                        index: self.index,
                        text,
                        logprobs: all,
                        reason,
                        usage,
                        cumulative_logprob: self.cumulative_logprob,
                    });
                }
                Step::Failed(e) => return Err(e),
            }
        }
    }
}

impl Shape {
    /// The whole answer, choices in index order.
    fn body(&self, choices: Vec<Choice>, usage: Usage) -> Response {
        match self.api {
            Api::Completion => Json(CompletionResponse {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: choices
                    .into_iter()
                    .map(|c| CompletionChoice {
                        index: c.index,
                        text: c.text,
                        logprobs: c.logprobs.and_then(Logprobs::completion),
                        finish_reason: Some(c.reason),
                    })
                    .collect(),
                usage: Some(usage),
            })
            .into_response(),
            Api::Chat => Json(ChatCompletionResponse {
                id: self.id.clone(),
                object: "chat.completion",
                created: self.created,
                model: self.model.clone(),
                choices: choices
                    .into_iter()
                    .map(|c| ChatChoice {
                        index: c.index,
                        message: AssistantMessage {
                            role: "assistant",
                            content: c.text,
                        },
                        logprobs: c.logprobs.and_then(Logprobs::chat),
                        finish_reason: c.reason,
                    })
                    .collect(),
                usage,
            })
            .into_response(),
        }
    }

    /// One server-sent event of the stream: `choices` and `usage` in the API's chunk shape.
    fn frame(
        &self,
        completion: Vec<CompletionChoice>,
        chat: Vec<ChatChunkChoice>,
        usage: Option<Option<Usage>>,
    ) -> SseEvent {
        let json = match self.api {
            Api::Completion => serde_json::to_string(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: completion,
                usage: usage.flatten(),
            }),
            Api::Chat => serde_json::to_string(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices: chat,
                usage,
            }),
        };
        SseEvent::default().data(json.unwrap_or_default())
    }

    /// One chunk of choice `index`; `usage` is its counts so far with continuous usage.
    fn chunk(
        &self,
        index: usize,
        role: bool,
        text: Option<String>,
        logprobs: Option<Logprobs>,
        finish_reason: Option<&'static str>,
        usage: Option<Usage>,
    ) -> SseEvent {
        // With include_usage, every chunk but the last says `"usage": null`, unless usage is
        // continuous.
        let usage = self
            .include_usage
            .then_some(usage.filter(|_| self.continuous_usage));
        match self.api {
            Api::Completion => {
                let choice = CompletionChoice {
                    index,
                    text: text.unwrap_or_default(),
                    logprobs: logprobs.and_then(Logprobs::completion),
                    finish_reason,
                };
                self.frame(vec![choice], Vec::new(), usage)
            }
            Api::Chat => {
                let choice = ChatChunkChoice {
                    index,
                    delta: Delta {
                        role: role.then_some("assistant"),
                        content: text,
                    },
                    logprobs: logprobs.and_then(Logprobs::chat),
                    finish_reason,
                };
                self.frame(Vec::new(), vec![choice], usage)
            }
        }
    }
}

/// The usage of a response: each prompt's tokens once, every returned choice's completion.
fn total_usage(prompt_tokens: usize, cached_tokens: usize, choices: &[Choice]) -> Usage {
    let completion = choices.iter().map(|c| c.usage.completion_tokens).sum();
    Usage::new(prompt_tokens, completion, cached_tokens)
}

/// Answers with one JSON body once every choice has ended; of `best_of` candidates per prompt,
/// the `n` most likely (by the sum of their tokens' log-probabilities) are returned.
async fn collect(
    state: &AppState,
    shape: Shape,
    first: Generation,
    others: Vec<Generation>,
    n: usize,
    best_of: usize,
    prompt_tokens: usize,
) -> Response {
    let first_started = first.placement;
    let results = futures::future::join_all(
        std::iter::once(first)
            .chain(others)
            .map(Generation::run_to_end),
    )
    .await;
    let mut candidates = Vec::with_capacity(results.len());
    for result in results {
        match result {
            Ok(choice) => candidates.push(choice),
            Err(e) => return state.refuse(e),
        }
    }
    candidates.sort_by_key(|c| c.index);
    let cached: usize = candidates
        .iter()
        .filter(|c| c.index % best_of == 0)
        .map(|c| c.usage.prompt_tokens_details.cached_tokens)
        .sum();
    let mut choices = Vec::with_capacity(candidates.len() / best_of * n);
    let mut rest = candidates.into_iter().peekable();
    let mut prompt = 0;
    while rest.peek().is_some() {
        let mut group: Vec<Choice> = rest.by_ref().take(best_of).collect();
        if best_of > n {
            group.sort_by(|a, b| b.cumulative_logprob.total_cmp(&a.cumulative_logprob));
        }
        for (k, mut choice) in group.into_iter().take(n).enumerate() {
            choice.index = prompt * n + k;
            choices.push(choice);
        }
        prompt += 1;
    }
    let usage = total_usage(prompt_tokens, cached, &choices);
    let headers = first_started.headers(state, true);
    (headers, shape.body(choices, usage)).into_response()
}

/// Streams every choice's chunks as they come, each with its index; then the usage chunk (with
/// `include_usage`, extended with the first choice's placement) and `[DONE]`. A failed choice
/// ends the stream with its error.
fn stream(
    shape: Shape,
    first: Generation,
    others: Vec<Generation>,
    prompt_tokens: usize,
) -> Response {
    use futures::StreamExt;
    let headers = first.placement.headers(&first.state, false);
    let count = 1 + others.len();
    // Each choice: (index, step) until its end; the first also reports its placement at the end.
    let choices = std::iter::once(first).chain(others).map(|g| {
        futures::stream::unfold(Some(g), |g| async move {
            let mut g = g?;
            let step = g.next().await;
            let done = !matches!(step, Step::Token { .. });
            let report = done.then(|| g.report(true));
            let item = (
                g.index,
                (g.prompt_tokens, g.completion_tokens),
                step,
                report,
            );
            Some((item, (!done).then_some(g)))
        })
        .boxed()
    });
    let merged = futures::stream::select_all(choices);
    let opening: Vec<SseEvent> = if shape.api == Api::Chat {
        (0..count)
            .map(|i| shape.chunk(i, true, Some(String::new()), None, None, None))
            .collect()
    } else {
        Vec::new()
    };
    struct Totals {
        finished: usize,
        completion: usize,
        cached: usize,
        placement: Option<Placement>,
        over: bool,
    }
    let totals = Totals {
        finished: 0,
        completion: 0,
        cached: 0,
        placement: None,
        over: false,
    };
    let body = futures::stream::unfold(
        (merged, totals, shape),
        move |(mut merged, mut totals, shape)| async move {
            if totals.over {
                return None;
            }
            let (index, so_far, step, report) = merged.next().await?;
            let mut events = Vec::new();
            match step {
                Step::Token { text, logprobs } => {
                    // Nothing to say while text is held back (a possible stop string, a
                    // partial character), unless log-probabilities were asked for.
                    if !text.is_empty() || logprobs.is_some() {
                        let usage = Some(Usage::new(so_far.0, so_far.1, 0));
                        events.push(shape.chunk(index, false, Some(text), logprobs, None, usage));
                    }
                }
                Step::Finished {
                    text,
                    reason,
                    usage,
                } => {
                    let text = match shape.api {
                        Api::Chat if text.is_empty() => None,
                        _ => Some(text),
                    };
                    let own = Usage::new(usage.prompt_tokens, usage.completion_tokens, 0);
                    events.push(shape.chunk(index, false, text, None, Some(reason), Some(own)));
                    totals.finished += 1;
                    totals.completion += usage.completion_tokens;
                    if index == 0 {
                        totals.cached = usage.prompt_tokens_details.cached_tokens;
                        totals.placement = report;
                    }
                    if totals.finished == count {
                        if shape.include_usage {
                            let mut usage =
                                Usage::new(prompt_tokens, totals.completion, totals.cached);
                            usage.parallax = totals.placement.take();
                            events.push(shape.frame(Vec::new(), Vec::new(), Some(Some(usage))));
                        }
                        events.push(SseEvent::default().data("[DONE]"));
                        totals.over = true;
                    }
                }
                Step::Failed(e) => {
                    let body = serde_json::to_string(&e.body()).unwrap_or_default();
                    events.push(SseEvent::default().data(body));
                    events.push(SseEvent::default().data("[DONE]"));
                    totals.over = true;
                }
            }
            Some((
                futures::stream::iter(events.into_iter().map(Ok::<_, Infallible>)),
                (merged, totals, shape),
            ))
        },
    )
    .flatten();
    let all = futures::stream::iter(opening.into_iter().map(Ok::<_, Infallible>)).chain(body);
    (headers, Sse::new(all)).into_response()
}

/// Predicts, admits (or refuses), submits and answers a valid request: one engine sequence per
/// choice (`best_of` per prompt). A prompt's first choice is submitted at once; its siblings
/// when it has computed the prompt, so that they start on its cached KV blocks.
pub async fn respond(
    state: Arc<AppState>,
    engine: EngineHandle,
    request: ValidRequest,
    scheduling: Scheduling,
    arrived: Instant,
) -> Response {
    let (first_prompt, max_tokens) = (&request.prompts[0].0, request.prompts[0].1);
    let class = RequestClass::new(
        request.api == Api::Chat,
        max_tokens,
        scheduling.task_class.as_deref(),
    );
    let all_prompt_tokens: usize = request.prompts.iter().map(|(p, _)| p.len()).sum();
    let (prediction, bounds) = {
        let mut predictor = state.predictor.lock().unwrap_or_else(|e| e.into_inner());
        let prediction = predictor.predict(&class, first_prompt.len(), max_tokens);
        (prediction, predictor.bounds())
    };
    state.metrics.set_bin_bounds(bounds);
    let slot = match state.budget.reserve(all_prompt_tokens) {
        Ok(slot) => slot,
        Err(refusal) => {
            state.metrics.record_rejection(refusal.reason);
            return state.refuse(ApiError::Overloaded {
                reason: refusal.reason,
                retry_after: refusal.retry_after,
            });
        }
    };
    let options = RequestOptions {
        priority: scheduling.priority,
        bin: prediction.bin,
        exclusive: scheduling.preference == BatchPreference::Disable,
        max_wait: (scheduling.preference == BatchPreference::Enable).then_some(scheduling.max_wait),
    };
    let shape = Shape {
        api: request.api,
        id: response_id(request.api),
        created: unix_now(),
        model: state.served_name.clone(),
        include_usage: request.include_usage,
        continuous_usage: request.continuous_usage,
    };
    let placing = Placing {
        prediction,
        started: None,
        queue_time: Duration::ZERO,
        batch_size: 0,
    };
    let mut slot = Some(slot);
    let mut generations = Vec::with_capacity(request.prompts.len() * request.best_of);
    for (p, (prompt, max_tokens)) in request.prompts.iter().enumerate() {
        // Candidate `k` of a prompt samples with seed + k: distinct, and reproducible.
        let params_of = |k: usize| {
            let mut params = request.params.clone();
            params.max_tokens = *max_tokens;
            params.seed = params.seed.map(|s| s.wrapping_add(k as u64));
            params
        };
        let (prefilled, siblings_may_start) = oneshot::channel();
        let mut senders = Vec::new();
        for k in 0..request.best_of {
            let stream = if k == 0 {
                match engine.submit_with(prompt.clone(), params_of(0), options) {
                    Ok(stream) => ChoiceStream::Ready(stream),
                    Err(e) => return state.refuse(e.into()),
                }
            } else {
                let (tx, rx) = oneshot::channel();
                senders.push((tx, params_of(k)));
                ChoiceStream::Waiting(rx)
            };
            generations.push(Generation {
                index: p * request.best_of + k,
                placement: placing,
                class: class.clone(),
                max_tokens: *max_tokens,
                prompt_tokens: prompt.len(),
                slot: slot.take(),
                api: request.api,
                codec: engine.codec.clone(),
                want_logprobs: request.logprobs.is_some(),
                stream,
                prefilled: None,
                timer: state
                    .metrics
                    .timer(arrived, prediction.bin, scheduling.priority),
                abort: state.abort_signal(),
                offset: 0,
                completion_tokens: 0,
                cumulative_logprob: 0.0,
                state: state.clone(),
            });
        }
        if senders.is_empty() {
            continue;
        }
        let first = generations.len() - request.best_of;
        generations[first].prefilled = Some(prefilled);
        let (engine, prompt) = (engine.clone(), prompt.clone());
        tokio::spawn(async move {
            // Whatever became of the first choice (a token, its end, a failure, the client
            // gone), the siblings are submitted or told why not.
            let _ = siblings_may_start.await;
            // A choice whose response is gone (the client left, the request failed) is not
            // submitted.
            for (tx, params) in senders.into_iter().filter(|(tx, _)| !tx.is_closed()) {
                let _ = tx.send(
                    engine
                        .submit_with(prompt.clone(), params, options)
                        .map_err(ApiError::from),
                );
            }
        });
    }
    state
        .metrics
        .record_admission(prediction.bin, scheduling.priority);
    let mut generations = generations.into_iter();
    let Some(mut first) = generations.next() else {
        return state.refuse(ApiError::Internal("a request without a prompt".into()));
    };
    // The headers go out once the request has started, so that they can say how it was placed.
    if let Err(e) = first.wait_started(scheduling.timeout, arrived).await {
        return state.refuse(e);
    }
    let others: Vec<Generation> = generations.collect();
    if request.stream {
        stream(shape, first, others, all_prompt_tokens)
    } else {
        collect(
            &state,
            shape,
            first,
            others,
            request.n,
            request.best_of,
            all_prompt_tokens,
        )
        .await
    }
}
