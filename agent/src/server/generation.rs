//! From an engine request stream to an OpenAI response: one JSON body, or server-sent events
//! (`data: {chunk}` … `data: [DONE]`). Dropping the response (the client went away) drops the
//! engine stream, which cancels the request. When the server's shutdown deadline passes, an
//! unfinished request ends with an explicit `server_shutting_down` error.

use super::AppState;
use super::error::ApiError;
use super::metrics::RequestTimer;
use super::protocol::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
    ChatLogprobs, CompletionChoice, CompletionLogprobs, CompletionResponse, Delta, TokenLogprob,
    TopLogprob, Usage,
};
use super::validation::{Api, ValidRequest};
use crate::engine::{EngineHandle, Event, RequestStream, TextCodec};
use axum::Json;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
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

/// One request being answered.
struct Generation {
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
    async fn next(&mut self) -> Step {
        let event = tokio::select! {
            event = self.stream.next() => event,
            () = aborted(&mut self.abort) => return Step::Failed(ApiError::ShuttingDown),
        };
        match event {
            Some(Event::Token {
                id,
                text,
                logprob,
                top_logprobs,
            }) => {
                self.timer.token();
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
                self.timer.finish(reason, queue_time);
                Step::Finished {
                    text,
                    reason: reason.as_str(),
                    usage: Usage::new(prompt_tokens, completion_tokens),
                }
            }
            None => Step::Failed(ApiError::Engine(crate::engine::EngineError::Stopped)),
        }
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
                    return self.body(text, all, reason, usage);
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

    /// The chunk that carries only the token counts.
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
        SseEvent::default().data(json.unwrap_or_default())
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
        Sse::new(events).into_response()
    }
}

/// Submits a valid request and answers it.
pub async fn respond(
    state: Arc<AppState>,
    engine: EngineHandle,
    request: ValidRequest,
    arrived: Instant,
) -> Response {
    let stream = match engine.submit(request.prompt, request.params) {
        Ok(stream) => stream,
        Err(e) => return state.refuse(e.into()),
    };
    let generation = Generation {
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
    };
    if request.stream {
        generation.into_sse()
    } else {
        generation.collect(&state).await
    }
}
