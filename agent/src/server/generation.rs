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
use tokio::sync::watch;

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

/// One request being answered.
struct Generation {
    state: Arc<AppState>,
    placement: Placing,
    class: RequestClass,
    max_tokens: usize,
    prompt_tokens: usize,
    slot: Option<QueueSlot>,
    api: Api,
    id: String,
    created: u64,
    model: String,
    codec: Arc<TextCodec>,
    want_logprobs: bool,
    include_usage: bool,
    stream: RequestStream,
    timer: RequestTimer,
    abort: watch::Receiver<bool>,
    /// Bytes of token text so far (the completions API's `text_offset`).
    offset: usize,
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

impl Generation {
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
        tokio::select! {
            event = self.stream.next() => match event {
                Some(Event::Started { queue_time, batch_size }) => {
                    self.started(queue_time, batch_size);
                    Ok(())
                }
                Some(Event::Failed { message }) => {
                    self.timer.failed();
                    Err(ApiError::StepFailed(message))
                }
                Some(_) => Err(ApiError::Internal("the engine answered before it started".into())),
                None => Err(ApiError::Engine(crate::engine::EngineError::Stopped)),
            },
            () = aborted(&mut self.abort) => Err(ApiError::ShuttingDown),
            () = timed_out => {
                self.state.metrics.record_rejection("queue_timeout");
                Err(ApiError::QueueTimeout { waited_ms: arrived.elapsed().as_millis() as u64 })
            }
        }
    }

    fn started(&mut self, queue_time: Duration, batch_size: usize) {
        let now = Instant::now();
        self.placement.started = Some(now);
        self.placement.queue_time = queue_time;
        self.placement.batch_size = batch_size;
        if let Some(slot) = self.slot.take() {
            slot.started(now);
        }
    }

    /// How the request was placed; with the processing time once it has `finished`.
    fn report(&self, finished: bool) -> Placement {
        let p = &self.placement;
        let millis = |d: Duration| d.as_secs_f64() * 1e3;
        Placement {
            bin: p.prediction.bin.as_str(),
            complexity: p.prediction.complexity,
            predicted_time_ms: millis(p.prediction.time),
            queue_time_ms: millis(p.queue_time),
            processing_time_ms: p.started.filter(|_| finished).map(|s| millis(s.elapsed())),
            batch_size: p.batch_size,
            gpu_utilization: match self.state.gpus() {
                Some(gpus) => gpus.utilization().map_or_else(
                    || "unavailable (not reported)".into(),
                    |u| format!("{u:.0}%"),
                ),
                None => "unavailable (no GPU watched)".into(),
            },
        }
    }

    /// The placement as response headers.
    fn headers(&self, finished: bool) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in self.report(finished).headers() {
            if let Ok(value) = value.parse() {
                headers.insert(name, value);
            }
        }
        headers
    }

    async fn next(&mut self) -> Step {
        loop {
            let event = tokio::select! {
                event = self.stream.next() => event,
                () = aborted(&mut self.abort) => return Step::Failed(ApiError::ShuttingDown),
            };
            if let Some(Event::Started {
                queue_time,
                batch_size,
            }) = event
            {
                self.started(queue_time, batch_size);
                continue;
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

    /// Runs to the end and answers with one JSON body.
    async fn collect(mut self, state: &AppState) -> Response {
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
                    let headers = self.headers(true);
                    return (headers, self.body(text, all, reason, usage)).into_response();
                }
                Step::Failed(e) => return state.refuse(e),
            }
        }
    }

    fn body(
        self,
        text: String,
        logprobs: Option<Logprobs>,
        reason: &'static str,
        usage: Usage,
    ) -> Response {
        match self.api {
            Api::Completion => Json(CompletionResponse {
                id: self.id,
                object: "text_completion",
                created: self.created,
                model: self.model,
                choices: vec![CompletionChoice {
                    index: 0,
                    text,
                    logprobs: logprobs.and_then(Logprobs::completion),
                    finish_reason: Some(reason),
                }],
                usage: Some(usage),
            })
            .into_response(),
            Api::Chat => Json(ChatCompletionResponse {
                id: self.id,
                object: "chat.completion",
                created: self.created,
                model: self.model,
                choices: vec![ChatChoice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant",
                        content: text,
                    },
                    logprobs: logprobs.and_then(Logprobs::chat),
                    finish_reason: reason,
                }],
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

    /// One chunk of the stream.
    fn chunk(
        &self,
        role: bool,
        text: Option<String>,
        logprobs: Option<Logprobs>,
        finish_reason: Option<&'static str>,
    ) -> SseEvent {
        match self.api {
            Api::Completion => {
                let choice = CompletionChoice {
                    index: 0,
                    text: text.unwrap_or_default(),
                    logprobs: logprobs.and_then(Logprobs::completion),
                    finish_reason,
                };
                self.frame(vec![choice], Vec::new(), None)
            }
            Api::Chat => {
                let choice = ChatChunkChoice {
                    index: 0,
                    delta: Delta {
                        role: role.then_some("assistant"),
                        content: text,
                    },
                    logprobs: logprobs.and_then(Logprobs::chat),
                    finish_reason,
                };
                // With include_usage, every chunk but the last says `"usage": null`.
                self.frame(Vec::new(), vec![choice], self.include_usage.then_some(None))
            }
        }
    }

    /// The chunk that carries only the token counts, extended with the request's placement
    /// (`usage.parallax`: what the response headers could not know yet).
    fn usage_chunk(&self, mut usage: Usage) -> SseEvent {
        usage.parallax = Some(self.report(true));
        self.frame(Vec::new(), Vec::new(), Some(Some(usage)))
    }

    /// The events for the next engine event, and whether the stream is over.
    async fn next_events(&mut self, first: bool) -> (Vec<SseEvent>, bool) {
        let mut events = Vec::new();
        if first && self.api == Api::Chat {
            events.push(self.chunk(true, Some(String::new()), None, None));
        }
        match self.next().await {
            Step::Token { text, logprobs } => {
                // Nothing to say while text is held back (a possible stop string, a partial
                // character), unless log-probabilities were asked for.
                if !text.is_empty() || logprobs.is_some() {
                    events.push(self.chunk(false, Some(text), logprobs, None));
                }
                (events, false)
            }
            Step::Finished {
                text,
                reason,
                usage,
            } => {
                let text = match self.api {
                    Api::Chat if text.is_empty() => None,
                    _ => Some(text),
                };
                events.push(self.chunk(false, text, None, Some(reason)));
                if self.include_usage {
                    events.push(self.usage_chunk(usage));
                }
                events.push(SseEvent::default().data("[DONE]"));
                (events, true)
            }
            Step::Failed(e) => {
                let body = serde_json::to_string(&e.body()).unwrap_or_default();
                events.push(SseEvent::default().data(body));
                events.push(SseEvent::default().data("[DONE]"));
                (events, true)
            }
        }
    }

    fn into_sse(self) -> Response {
        use futures::StreamExt;
        let headers = self.headers(false);
        let events = futures::stream::unfold(Some((self, true)), |state| async move {
            let (mut generation, first) = state?;
            let (events, done) = generation.next_events(first).await;
            let next = (!done).then_some((generation, false));
            Some((
                futures::stream::iter(events.into_iter().map(Ok::<_, Infallible>)),
                next,
            ))
        })
        .flatten();
        (headers, Sse::new(events)).into_response()
    }
}

/// Predicts, admits (or refuses), submits and answers a valid request.
pub async fn respond(
    state: Arc<AppState>,
    engine: EngineHandle,
    request: ValidRequest,
    scheduling: Scheduling,
    arrived: Instant,
) -> Response {
    let max_tokens = request.params.max_tokens;
    let class = RequestClass::new(
        request.api == Api::Chat,
        max_tokens,
        scheduling.task_class.as_deref(),
    );
    let prompt_tokens = request.prompt.len();
    let (prediction, bounds) = {
        let mut predictor = state.predictor.lock().unwrap_or_else(|e| e.into_inner());
        let prediction = predictor.predict(&class, prompt_tokens, max_tokens);
        (prediction, predictor.bounds())
    };
    state.metrics.set_bin_bounds(bounds);
    let slot = match state.budget.reserve(prompt_tokens) {
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
    let stream = match engine.submit_with(request.prompt, request.params, options) {
        Ok(stream) => stream,
        Err(e) => return state.refuse(e.into()),
    };
    state
        .metrics
        .record_admission(prediction.bin, scheduling.priority);
    let mut generation = Generation {
        placement: Placing {
            prediction,
            started: None,
            queue_time: Duration::ZERO,
            batch_size: 0,
        },
        class,
        max_tokens,
        prompt_tokens,
        slot: Some(slot),
        api: request.api,
        id: response_id(request.api),
        created: unix_now(),
        model: state.served_name.clone(),
        codec: engine.codec.clone(),
        want_logprobs: request.logprobs.is_some(),
        include_usage: request.include_usage,
        stream,
        timer: state.metrics.timer(arrived),
        abort: state.abort_signal(),
        offset: 0,
        state: state.clone(),
    };
    // The headers go out once the request has started, so that they can say how it was placed.
    if let Err(e) = generation.wait_started(scheduling.timeout, arrived).await {
        return state.refuse(e);
    }
    if request.stream {
        generation.into_sse()
    } else {
        generation.collect(&state).await
    }
}
