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
    ChatLogprobs, CompletionChoice, CompletionLogprobs, CompletionResponse, Delta, TokenLogprob,
    TopLogprob, Usage,
};
use super::validation::{Api, BatchPreference, Scheduling, ValidRequest};
use crate::engine::runtime::RequestOptions;
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

    fn push(
        &mut self,
        codec: &TextCodec,
        id: u32,
        logprob: f32,
        top: &[(u32, f32)],
        offset: usize,
    ) {
        let token = codec.token_text(id);
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
    }
}

/// What is known of a request's scheduling, for its response headers.
#[derive(Debug, Clone, Copy)]
struct Placement {
    prediction: Prediction,
    /// Set when the first step ran.
    started: Option<Instant>,
    queue_time: Duration,
    batch_size: usize,
    first_token: Option<Instant>,
}

/// One request being answered.
struct Generation {
    state: Arc<AppState>,
    placement: Placement,
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

    /// The scheduling headers known now.
    fn headers(&self, finished: bool) -> HeaderMap {
        let p = &self.placement;
        let mut headers = HeaderMap::new();
        let mut put = |name: &'static str, value: String| {
            if let Ok(value) = value.parse() {
                headers.insert(name, value);
            }
        };
        put("x-bin", p.prediction.bin.as_str().to_owned());
        put("x-complexity", p.prediction.complexity.to_string());
        put(
            "x-predicted-time",
            format!("{:.1}ms", p.prediction.time.as_secs_f64() * 1e3),
        );
        put(
            "x-queue-time",
            format!("{:.1}ms", p.queue_time.as_secs_f64() * 1e3),
        );
        put("x-batch-size", p.batch_size.to_string());
        // This engine runs on CPU: there is no device utilization to report.
        put("x-gpu-utilization", "unavailable (cpu)".to_owned());
        if finished && let Some(started) = p.started {
            put(
                "x-processing-time",
                format!("{:.1}ms", started.elapsed().as_secs_f64() * 1e3),
            );
        }
        headers
    }

    /// The same, for the extension of a stream's usage chunk.
    fn placement_json(&self) -> serde_json::Value {
        let p = &self.placement;
        serde_json::json!({
            "bin": p.prediction.bin.as_str(),
            "complexity": p.prediction.complexity,
            "predicted_time_ms": p.prediction.time.as_secs_f64() * 1e3,
            "queue_time_ms": p.queue_time.as_secs_f64() * 1e3,
            "processing_time_ms": p.started.map_or(0.0, |s| s.elapsed().as_secs_f64() * 1e3),
            "batch_size": p.batch_size,
            "gpu_utilization": "unavailable (cpu)",
        })
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
                self.placement.first_token.get_or_insert_with(Instant::now);
                let logprobs = self.want_logprobs.then(|| {
                    let mut l = Logprobs::new(self.api);
                    l.push(&self.codec, id, logprob, &top_logprobs, self.offset);
                    l
                });
                self.offset += self.codec.token_text(id).len();
                Step::Token { text, logprobs }
            }
            Some(Event::Finished {
                text,
                reason,
                prompt_tokens,
                completion_tokens,
                queue_time,
            }) => {
                self.timer.finish(reason, queue_time, completion_tokens);
                self.learn(completion_tokens);
                Step::Finished {
                    text,
                    reason: reason.as_str(),
                    usage: Usage::new(prompt_tokens, completion_tokens),
                }
            }
            Some(Event::Failed { message }) => {
                self.timer.failed();
                Step::Failed(ApiError::StepFailed(message))
            }
            None => Step::Failed(ApiError::Engine(crate::engine::EngineError::Stopped)),
        }
    }

    /// Teaches the predictor what this request took.
    fn learn(&self, output_tokens: usize) {
        let p = &self.placement;
        let Some(started) = p.started else { return };
        let now = Instant::now();
        let seen = Observation {
            prompt_tokens: self.prompt_tokens,
            output_tokens,
            prefill: p.first_token.unwrap_or(now) - started,
            processing: now - started,
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
                    match (&mut all, logprobs) {
                        (Some(Logprobs::Completion(a)), Some(Logprobs::Completion(l))) => {
                            a.tokens.extend(l.tokens);
                            a.token_logprobs.extend(l.token_logprobs);
                            a.top_logprobs.extend(l.top_logprobs);
                            a.text_offset.extend(l.text_offset);
                        }
                        (Some(Logprobs::Chat(a)), Some(Logprobs::Chat(l))) => {
                            a.content.extend(l.content);
                        }
                        _ => {}
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
                    logprobs: match logprobs {
                        Some(Logprobs::Completion(l)) => Some(l),
                        _ => None,
                    },
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
                    logprobs: match logprobs {
                        Some(Logprobs::Chat(l)) => Some(l),
                        _ => None,
                    },
                    finish_reason: reason,
                }],
                usage,
            })
            .into_response(),
        }
    }

    /// One chunk of the stream.
    fn chunk(
        &self,
        role: bool,
        text: Option<String>,
        logprobs: Option<Logprobs>,
        finish_reason: Option<&'static str>,
    ) -> SseEvent {
        let usage = self.include_usage.then_some(None);
        let json = match self.api {
            Api::Completion => serde_json::to_string(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChoice {
                    index: 0,
                    text: text.unwrap_or_default(),
                    logprobs: match logprobs {
                        Some(Logprobs::Completion(l)) => Some(l),
                        _ => None,
                    },
                    finish_reason,
                }],
                usage: None,
            }),
            Api::Chat => serde_json::to_string(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices: vec![ChatChunkChoice {
                    index: 0,
                    delta: Delta {
                        role: role.then_some("assistant"),
                        content: text,
                    },
                    logprobs: match logprobs {
                        Some(Logprobs::Chat(l)) => Some(l),
                        _ => None,
                    },
                    finish_reason,
                }],
                usage,
            }),
        };
        SseEvent::default().data(json.unwrap_or_default())
    }

    /// The chunk that carries only the token counts, extended with the request's placement
    /// (`usage.parallax`: what the response headers could not know yet).
    fn usage_chunk(&self, usage: Usage) -> SseEvent {
        let json = match self.api {
            Api::Completion => serde_json::to_string(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(usage),
            }),
            Api::Chat => serde_json::to_string(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
        };
        let mut value: serde_json::Value = json
            .ok()
            .and_then(|j| serde_json::from_str(&j).ok())
            .unwrap_or_default();
        value["usage"]["parallax"] = self.placement_json();
        SseEvent::default().data(value.to_string())
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
    let prediction = state
        .predictor
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .predict(&class, prompt_tokens, max_tokens);
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
        placement: Placement {
            prediction,
            started: None,
            queue_time: Duration::ZERO,
            batch_size: 0,
            first_token: None,
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
