//! The agent's configuration file, written by the operator into a ConfigMap and read by
//! `parallax-agent serve --config`. Derived from the pool spec by [`AgentConfig::for_pool`].

use crate::inference_pool::{BatchingSpec, InferencePoolSpec, KvCacheSpec, ModelFormat};
use serde::{Deserialize, Serialize};

/// Port the agent serves the OpenAI-compatible API, health and metrics on.
pub const AGENT_HTTP_PORT: u16 = 8000;

/// Port a multi-pod group's leader accepts its worker pods on (`serve --group-port`): commands
/// go out, and the all-reduce sums of every layer come in and go back.
pub const AGENT_GROUP_PORT: u16 = 8001;

/// File name of the configuration inside the ConfigMap and the mounted folder.
pub const AGENT_CONFIG_FILE: &str = "agent.json";

/// Everything an agent needs beyond its rank, which comes from the environment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    pub model: AgentModel,
    pub tensor_parallel_size: u32,
    pub port: u16,
    pub batching: BatchingSpec,
    pub kv_cache: KvCacheSpec,
}

/// The model as the agent loads and names it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentModel {
    pub source: String,
    pub format: ModelFormat,
    pub served_name: String,
}

impl AgentConfig {
    /// The configuration of every agent of a pool whose groups are `tensor_parallel_size` wide.
    pub fn for_pool(spec: &InferencePoolSpec, tensor_parallel_size: u32) -> Self {
        Self {
            model: AgentModel {
                source: spec.model.source.clone(),
                format: spec.model.format,
                served_name: spec.model.served_name(),
            },
            tensor_parallel_size,
            port: AGENT_HTTP_PORT,
            batching: spec.batching.clone(),
            kv_cache: spec.kv_cache.clone(),
        }
    }
}

impl crate::inference_pool::ModelSpec {
    /// `servedName`, or the name [`served_name_of`] the source.
    pub fn served_name(&self) -> String {
        match &self.served_name {
            Some(name) => name.clone(),
            None => served_name_of(&self.source),
        }
    }
}

/// The name a model source is served under by default: the last path segment without a `.gguf`
/// extension, a hub repository's name without its `@revision`.
pub fn served_name_of(source: &str) -> String {
    let last = source
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(source);
    let last = last.strip_suffix(".gguf").unwrap_or(last);
    match last.split_once('@') {
        Some((name, _revision)) if source.starts_with("hf://") => name.to_owned(),
        _ => last.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference_pool::ModelSpec;

    fn model(source: &str) -> ModelSpec {
        ModelSpec {
            source: source.to_owned(),
            format: ModelFormat::Auto,
            served_name: None,
            shape: None,
            hub_token_secret: None,
            volume_claim: None,
            cache_volume_claim: None,
        }
    }

    #[test]
    fn served_name_defaults_to_the_last_segment() {
        assert_eq!(
            model("hf://meta-llama/Llama-3.1-8B").served_name(),
            "Llama-3.1-8B"
        );
        assert_eq!(model("/models/smollm2.gguf").served_name(), "smollm2");
        assert_eq!(model("/models/llama/").served_name(), "llama");
        assert_eq!(
            model("hf://org/Llama-3.2-1B@v2").served_name(),
            "Llama-3.2-1B"
        );
        assert_eq!(
            model("hf://org/repo@v2/small-Q4_K_M.gguf").served_name(),
            "small-Q4_K_M"
        );
        let mut named = model("/models/x.gguf");
        named.served_name = Some("chat".into());
        assert_eq!(named.served_name(), "chat");
    }

    #[test]
    fn round_trips_through_json_and_rejects_unknown_fields() {
        let spec: InferencePoolSpec =
            serde_json::from_value(serde_json::json!({"model": {"source": "/m/a.gguf"}})).unwrap();
        let config = AgentConfig::for_pool(&spec, 2);
        let text = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<AgentConfig>(&text).unwrap(), config);
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        value["bogus"] = 1.into();
        let err = serde_json::from_value::<AgentConfig>(value).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}

/// How far an agent's model download has come: in its `/ready` as `download` (the operator reads
/// it into the pool's status), and in its log.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DownloadProgress {
    pub model: String,
    pub files_done: u64,
    pub files: u64,
    pub bytes_done: u64,
    pub bytes: u64,
}

impl DownloadProgress {
    /// `2 of 7 files, 1.50 of 3.00 GiB (50%)`.
    pub fn amounts(&self) -> String {
        let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
        let percent = if self.bytes == 0 {
            100.0
        } else {
            self.bytes_done as f64 * 100.0 / self.bytes as f64
        };
        format!(
            "{} of {} files, {:.2} of {:.2} GiB ({percent:.0}%)",
            self.files_done,
            self.files,
            gib(self.bytes_done),
            gib(self.bytes)
        )
    }
}

impl std::fmt::Display for DownloadProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "downloading {}: {}", self.model, self.amounts())
    }
}
