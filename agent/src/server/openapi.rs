//! `/openapi.json`: the API as OpenAPI 3.1. The routes come from [`ROUTES`], the table the router is
//! built from, and the schemas from the very types the handlers read and write, so the document
//! cannot drift from the handlers.

use super::protocol::{
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
    CompletionResponse, ErrorResponse, ModelList,
};
use schemars::generate::{SchemaGenerator, SchemaSettings};
use serde_json::{Value, json};

pub const COMPLETIONS: &str = "/v1/completions";
pub const CHAT_COMPLETIONS: &str = "/v1/chat/completions";
pub const MODELS: &str = "/v1/models";
pub const HEALTH: &str = "/health";
pub const READY: &str = "/ready";
pub const METRICS: &str = "/metrics";
pub const OPENAPI: &str = "/openapi.json";

/// One documented route.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    body: Option<fn(&mut SchemaGenerator) -> Value>,
    answer: Answer,
    /// The answer can also be a stream of server-sent events of this schema.
    events: Option<fn(&mut SchemaGenerator) -> Value>,
}

/// What a route answers with.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// JSON of this schema.
    Json(fn(&mut SchemaGenerator) -> Value),
    /// Text of this media type.
    Text(&'static str),
}

fn schema<T: schemars::JsonSchema>(generator: &mut SchemaGenerator) -> Value {
    generator.subschema_for::<T>().to_value()
}

fn empty(_: &mut SchemaGenerator) -> Value {
    json!({"type": "object"})
}

/// Every route the server answers.
pub const ROUTES: &[Route] = &[
    Route {
        method: "post",
        path: COMPLETIONS,
        summary: "Complete a prompt (OpenAI completions); SSE when stream is true",
        body: Some(schema::<CompletionRequest>),
        answer: Answer::Json(schema::<CompletionResponse>),
        events: Some(schema::<CompletionResponse>),
    },
    Route {
        method: "post",
        path: CHAT_COMPLETIONS,
        summary: "Answer a conversation (OpenAI chat completions); SSE when stream is true",
        body: Some(schema::<ChatCompletionRequest>),
        answer: Answer::Json(schema::<ChatCompletionResponse>),
        events: Some(schema::<ChatCompletionChunk>),
    },
    Route {
        method: "get",
        path: MODELS,
        summary: "The served model",
        body: None,
        answer: Answer::Json(schema::<ModelList>),
        events: None,
    },
    Route {
        method: "get",
        path: HEALTH,
        summary: "Liveness: 200 while the process and its engine run",
        body: None,
        answer: Answer::Json(empty),
        events: None,
    },
    Route {
        method: "get",
        path: READY,
        summary: "Readiness: 200 once the model is loaded, 503 while loading or shutting down",
        body: None,
        answer: Answer::Json(empty),
        events: None,
    },
    Route {
        method: "get",
        path: METRICS,
        summary: "Prometheus metrics with vLLM's names: OpenMetrics when asked for, else text 0.0.4",
        body: None,
        answer: Answer::Text("text/plain"),
        events: None,
    },
    Route {
        method: "get",
        path: OPENAPI,
        summary: "This document",
        body: None,
        answer: Answer::Json(empty),
        events: None,
    },
];

/// The OpenAPI 3 document.
pub fn document() -> Value {
    // OpenAPI 3.1 takes JSON Schema 2020-12 as it is; only the definitions move.
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    settings.meta_schema = None;
    let mut generator = settings.into_generator();
    let error = schema::<ErrorResponse>(&mut generator);
    let mut paths = serde_json::Map::new();
    for route in ROUTES {
        let mut ok = serde_json::Map::new();
        match route.answer {
            Answer::Json(answer) => ok.insert(
                "application/json".into(),
                json!({"schema": answer(&mut generator)}),
            ),
            Answer::Text(media) => ok.insert(media.into(), json!({"schema": {"type": "string"}})),
        };
        if let Some(events) = route.events {
            ok.insert(
                "text/event-stream".into(),
                json!({
                    "schema": {"type": "string"},
                    "x-event-schema": events(&mut generator),
                }),
            );
        }
        let mut operation = json!({
            "summary": route.summary,
            "responses": {"200": {"description": "OK", "content": ok}},
        });
        if let Some(body) = route.body {
            operation["requestBody"] = json!({
                "required": true,
                "content": {"application/json": {"schema": body(&mut generator)}},
            });
            let responses = &mut operation["responses"];
            for (status, what) in [
                (
                    "400",
                    "Invalid request: malformed JSON or a bad parameter, named in `param`",
                ),
                ("404", "Unknown model"),
                ("413", "Body too large"),
                ("503", "Loading or shutting down"),
            ] {
                responses[status] = json!({
                    "description": what,
                    "content": {"application/json": {"schema": error.clone()}},
                });
            }
        }
        paths
            .entry(route.path)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .map(|p| p.insert(route.method.into(), operation));
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Parallax agent",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "OpenAI-compatible inference API, health and metrics of one Parallax agent.",
        },
        "paths": paths,
        "components": {"schemas": generator.take_definitions(true)},
    })
}
