//! The `InferencePool` custom resource (`parallax.dev/v1alpha1`).
//!
//! Every default lives here, once, as a serde default: the generated CRD schema carries it so the
//! API server fills it in, and Rust code that deserializes a partial object gets the same value.

use k8s_openapi::api::core::v1::{EnvVar, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A pool of tensor-parallel model-server groups behind one OpenAI-compatible endpoint.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "parallax.dev",
    version = "v1alpha1",
    kind = "InferencePool",
    plural = "inferencepools",
    singular = "inferencepool",
    shortname = "ipool",
    category = "parallax",
    namespaced,
    status = "InferencePoolStatus",
    derive = "PartialEq",
    scale = r#"{"specReplicasPath":".spec.replicas","statusReplicasPath":".status.replicas","labelSelectorPath":".status.selector"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready Replicas","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"TP","type":"integer","jsonPath":".status.tensorParallelSize"}"#,
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.model.source"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas").field_path(".minReplicas"),
    validation = Rule::new("self.replicas >= self.minReplicas && self.replicas <= self.maxReplicas").message("replicas must lie between minReplicas and maxReplicas").field_path(".replicas"),
    validation = Rule::new("self.tensorParallelSize != 'auto' || has(self.model.shape)").message("tensorParallelSize auto needs model.shape (a preset or weightBytes, layers and hiddenSize) to size the group").field_path(".model"),
    validation = Rule::new("!has(self.autoscaling) || !has(self.autoscaling.scaleToZeroAfterSeconds) || (self.minReplicas == 0 && (!has(self.router) || self.router.enabled))").message("autoscaling.scaleToZeroAfterSeconds needs minReplicas 0 and the router (router.enabled), which holds requests while the pool wakes").field_path(".autoscaling.scaleToZeroAfterSeconds")
)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolSpec {
    /// The model every group serves.
    pub model: ModelSpec,

    /// What each pod asks of its node: the GPU resource, placement and host resources.
    #[serde(default)]
    pub resources: GpuResources,

    /// GPUs that shard one copy of the model: a power of two, or `auto` to pick the smallest one
    /// whose GPUs hold the weights and the KV cache.
    #[serde(default = "default_tensor_parallel_size")]
    #[schemars(schema_with = "tensor_parallel_size_schema")]
    pub tensor_parallel_size: IntOrString,

    /// How `auto` picks: `throughput` takes the fewest GPUs that fit (more groups per node),
    /// `latency` takes every GPU of a node.
    #[serde(default)]
    pub parallelism_preference: ParallelismPreference,

    /// Desired number of groups (model copies). The scale subresource writes this field.
    #[serde(default = "default_one")]
    #[schemars(range(min = 0))]
    pub replicas: i32,

    /// Lower bound on `replicas`.
    #[serde(default = "default_one")]
    #[schemars(range(min = 0))]
    pub min_replicas: i32,

    /// Upper bound on `replicas`.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 0))]
    pub max_replicas: i32,

    /// Seconds a rollout (groups being created or updated) may go without a group becoming
    /// ready or updated before `Progressing` turns False with `ProgressDeadlineExceeded`, as a
    /// Deployment's. Generous by default: a pod downloads and loads its model first.
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: i32,

    /// How groups are replaced when the pod template changes.
    #[serde(default)]
    pub rollout: RolloutStrategy,

    /// The built-in autoscaler: off unless enabled; it writes `replicas` within
    /// `minReplicas`/`maxReplicas` from the group leaders' metrics.
    #[serde(default)]
    pub autoscaling: AutoscalingSpec,

    /// Where groups run: on-demand nodes, or spot nodes for a share of them.
    #[serde(default)]
    pub placement: PlacementSpec,

    /// What the operator does about a pod whose agent reports an unhealthy GPU.
    #[serde(default)]
    pub gpu_health: GpuHealthSpec,

    /// Automatic rollback: after a change of what the groups serve, the new revision is
    /// compared with the last good one, and run no more if it serves worse.
    #[serde(default)]
    pub rollback: RollbackSpec,

    /// What runs the groups: `pods` (the operator creates, restarts and rolls each pod), or
    /// `leaderworkerset` (one LeaderWorkerSet, where its CRD is installed, for its gang
    /// scheduling and topology placement; Parallax still sizes the groups).
    #[serde(default)]
    pub group_workload: GroupWorkload,

    /// Continuous batching and the execution-time bins of the agent's scheduler.
    #[serde(default)]
    pub batching: BatchingSpec,

    /// The paged KV cache.
    #[serde(default)]
    pub kv_cache: KvCacheSpec,

    /// The agent container.
    #[serde(default)]
    pub agent: AgentSpec,

    /// The router in front of the groups: the pool's Service sends every request to it, and it
    /// picks a group by live load, prompt prefix and priority, retries one that refuses, and
    /// holds requests while no group is ready.
    #[serde(default)]
    pub router: RouterSpec,
}

/// The fields of the spec that say what the groups serve: a change of any is a new revision,
/// and a rollback puts all of them back. Replicas, rollout, autoscaling, placement and the
/// rest say how many groups run and where; they are never rolled back.
const SERVING_FIELDS: [&str; 7] = [
    "model",
    "resources",
    "tensorParallelSize",
    "parallelismPreference",
    "batching",
    "kvCache",
    "agent",
];

impl InferencePoolSpec {
    /// What the groups serve, as the JSON object of [`SERVING_FIELDS`].
    pub fn serving(&self) -> serde_json::Value {
        let spec = serde_json::to_value(self).unwrap_or_default();
        SERVING_FIELDS
            .iter()
            .filter_map(|field| Some((field.to_string(), spec.get(*field)?.clone())))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// The serving spec's revision: a digest of [`Self::serving`], stable across operator
    /// versions (FNV-1a over its JSON).
    pub fn serving_revision(&self) -> String {
        let digest = fnv1a(&self.serving().to_string());
        format!("{:010x}", digest >> 24)
    }

    /// This spec with the serving fields of `serving` (as [`Self::serving`] gave them).
    pub fn with_serving(&self, serving: &serde_json::Value) -> Result<Self, serde_json::Error> {
        let mut spec = serde_json::to_value(self)?;
        for field in SERVING_FIELDS {
            if let (Some(value), Some(spec)) = (serving.get(field), spec.as_object_mut()) {
                spec.insert(field.to_owned(), value.clone());
            }
        }
        serde_json::from_value(spec)
    }
}

/// FNV-1a, 64 bits: a digest that stays the same across Rust and operator versions.
pub fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A rolling update's bounds, in groups, as a Deployment's (a count or a percentage of
/// `replicas`; surge rounds up, unavailable rounds down, and both at zero means one unavailable).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("!(string(self.maxSurge) in ['0', '0%'] && string(self.maxUnavailable) in ['0', '0%'])").message("maxSurge and maxUnavailable cannot both be 0: the update could never start").field_path(".maxUnavailable")
)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStrategy {
    /// Groups created beyond `replicas` on the new template before old ones go. Set it to 1 to
    /// update a one-group pool without an outage, when the cluster has a group's GPUs to spare.
    #[serde(default = "default_max_surge")]
    #[schemars(schema_with = "groups_or_percent_schema")]
    pub max_surge: IntOrString,

    /// Groups that may be unready while the update runs (counted against `replicas`).
    #[serde(default = "default_max_unavailable")]
    #[schemars(schema_with = "groups_or_percent_schema")]
    pub max_unavailable: IntOrString,
}

impl Default for RolloutStrategy {
    fn default() -> Self {
        Self {
            max_surge: default_max_surge(),
            max_unavailable: default_max_unavailable(),
        }
    }
}

impl RolloutStrategy {
    /// (surge, unavailable) in groups for `replicas` groups.
    pub fn resolve(&self, replicas: u32) -> (u32, u32) {
        let groups = |value: &IntOrString, round_up: bool| match value {
            IntOrString::Int(n) => (*n).max(0) as u32,
            IntOrString::String(s) if !s.ends_with('%') => s.parse().unwrap_or(0),
            IntOrString::String(s) => {
                let percent: u64 = s.trim_end_matches('%').parse().unwrap_or(0);
                let scaled = percent * u64::from(replicas);
                let groups = if round_up {
                    scaled.div_ceil(100)
                } else {
                    scaled / 100
                };
                groups.min(u64::from(u32::MAX)) as u32
            }
        };
        let surge = groups(&self.max_surge, true);
        let unavailable = groups(&self.max_unavailable, false);
        if surge == 0 && unavailable == 0 {
            (0, 1)
        } else {
            (surge, unavailable)
        }
    }
}

fn groups_or_percent_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true,
        "nullable": false,
        "description": "A number of groups, or a percentage of replicas such as `25%`.",
        "x-kubernetes-validations": [{
            "rule": "string(self).matches('^[0-9]+%?$')",
            "message": "must be a non-negative number of groups or a percentage such as 25%"
        }]
    })
}

/// Where the weights come from and what the model is called on the API.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// A model on a Hugging Face hub, `hf://ORG/NAME[@REVISION]` (a GGUF repository's file as
    /// `hf://ORG/NAME[@REVISION]/FILE.gguf`), downloaded into the pod's cache before the agent
    /// loads it; a path on `volumeClaim` (mounted at `/models`): a `.gguf` file or a Hugging
    /// Face folder; or `dummy:SHAPE` for random weights.
    #[x_kube(validation = Rule::new("self.size() > 0").message("model.source must name a hub model (hf://ORG/NAME), a path under /models or dummy:SHAPE"))]
    pub source: String,

    /// Weight format; `auto` infers it from the source.
    #[serde(default)]
    pub format: ModelFormat,

    /// Name clients pass as `model`; defaults to the last path segment of `source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_name: Option<String>,

    /// Size of the model, used to choose `tensorParallelSize: auto` (and to size the download
    /// cache).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<ModelShape>,

    /// A Secret key holding a Hugging Face token, for private and gated `hf://` models (given to
    /// the agent as `HF_TOKEN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_token_secret: Option<SecretKey>,

    /// A PersistentVolumeClaim holding model files, mounted read-only at `/models` in every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_claim: Option<String>,

    /// A PersistentVolumeClaim for downloads, kept across pod restarts (ReadWriteMany when a
    /// pool has several pods). Without one, each pod downloads into an emptyDir sized from
    /// `shape`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_volume_claim: Option<String>,
}

/// A key of a Secret in the pool's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKey {
    /// The Secret's name.
    pub name: String,
    /// The key within it.
    #[serde(default = "default_token_key")]
    pub key: String,
}

fn default_token_key() -> String {
    "token".to_owned()
}

/// Weight format of a model source.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// Inferred from the source: `.gguf` files are GGUF, anything else safetensors.
    #[default]
    Auto,
    /// A single GGUF file.
    Gguf,
    /// A Hugging Face layout: config.json, safetensors and tokenizer files.
    Safetensors,
}

/// The numbers that size a model's memory: either a known preset or explicit values.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("has(self.preset) || (has(self.weightBytes) && has(self.layers) && has(self.hiddenSize))").message("model.shape needs a preset, or weightBytes, layers and hiddenSize"))]
#[serde(rename_all = "camelCase")]
pub struct ModelShape {
    /// A known architecture; explicit fields below override its values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<ShapePreset>,

    /// Bytes of weights in the format served (e.g. `16Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_bytes: Option<Quantity>,

    /// Transformer layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub layers: Option<i64>,

    /// Hidden size (model dimension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub hidden_size: Option<i64>,

    /// Width of the keys (and of the values) one layer caches per token: KV heads × head
    /// dimension. Defaults to `hiddenSize`, which overestimates grouped-query-attention models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub kv_hidden_size: Option<i64>,

    /// Longest sequence (prompt plus output) the KV cache is sized for (presets: 8192).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub context_length: Option<i64>,

    /// Attention (query) heads. With `kvHeads`, a tensor-parallel size must divide both: every
    /// GPU of a group holds whole heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub attention_heads: Option<i64>,

    /// Key-value heads (grouped-query attention; equal to `attentionHeads` without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub kv_heads: Option<i64>,
}

/// Architectures whose sizes Parallax knows.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShapePreset {
    #[serde(rename = "smollm2-135m")]
    Smollm2_135m,
    #[serde(rename = "llama-3.2-1b")]
    Llama3_2_1b,
    #[serde(rename = "llama-3.1-8b")]
    Llama3_1_8b,
    #[serde(rename = "llama-3.1-70b")]
    Llama3_1_70b,
    #[serde(rename = "llama-3.1-405b")]
    Llama3_1_405b,
}

/// How `tensorParallelSize: auto` trades GPUs per group against groups per node.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ParallelismPreference {
    /// The fewest GPUs that hold the model: more copies, more aggregate throughput.
    #[default]
    Throughput,
    /// Every GPU of a node: more memory bandwidth per token.
    Latency,
}

/// The built-in autoscaler's rules (the product's defaults). It reads the group leaders'
/// `/metrics` every few seconds and writes `replicas` through the scale subresource.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Scale this pool by itself (an HPA or KEDA object that targets the pool wins).
    #[serde(default)]
    pub enabled: bool,
    /// Utilization a pool is sized for when it scales to a known load.
    #[serde(default = "default_target_utilization")]
    #[schemars(range(min = 0.05, max = 1.0))]
    pub target_utilization: f64,
    /// Scale up when more requests than this wait, summed over the groups…
    #[serde(default = "default_scale_up_queue")]
    #[schemars(range(min = 0))]
    pub scale_up_queue: i32,
    /// …or p95 end-to-end latency is above this many milliseconds.
    #[serde(default = "default_scale_up_p95")]
    #[schemars(range(min = 1))]
    pub scale_up_p95_milliseconds: i32,
    /// Scale down when utilization stays below this…
    #[serde(default = "default_target_utilization")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub scale_down_utilization: f64,
    /// …for this many seconds.
    #[serde(default = "default_scale_down_window")]
    #[schemars(range(min = 0))]
    pub scale_down_window_seconds: i32,
    /// An emergency step (at least two groups, at once) when more than this wait…
    #[serde(default = "default_emergency_queue")]
    #[schemars(range(min = 0))]
    pub emergency_queue: i32,
    /// …or more than this share of requests fail.
    #[serde(default = "default_emergency_errors")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub emergency_error_rate: f64,
    /// Least seconds between two scale-ups.
    #[serde(default = "default_scale_up_cooldown")]
    #[schemars(range(min = 0))]
    pub scale_up_cooldown_seconds: i32,
    /// Least seconds from any change to a scale-down.
    #[serde(default = "default_scale_down_window")]
    #[schemars(range(min = 0))]
    pub scale_down_cooldown_seconds: i32,
    /// Scale to zero: with `minReplicas: 0`, after this many seconds in which no request
    /// arrived, waited or ran, the pool goes to zero groups (low utilization alone never takes
    /// it below one). The router holds the next request and the autoscaler wakes the pool for it
    /// (to one group, or `minReplicas`). Unset: never to zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub scale_to_zero_after_seconds: Option<i32>,
    /// Where the leaders' metrics are read, for the autoscaler and the rollback judge: from
    /// each leader's `/metrics` at its pod IP (absent), or from a Prometheus that already
    /// scrapes the agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_source: Option<MetricsSource>,
}

/// A source of the agents' metrics other than the agents themselves.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSource {
    pub prometheus: PrometheusSource,
}

/// A Prometheus (or anything that answers its HTTP query API) that scrapes the agents, with the
/// labels its scrape configuration gives each series.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.url.startsWith('http://')").message("metricsSource.prometheus.url must be an http:// URL (an in-cluster Prometheus; https is not supported)").field_path(".url"))]
pub struct PrometheusSource {
    /// Base URL of the query API, e.g. `http://prometheus-operated.monitoring:9090`.
    pub url: String,
    /// The label that names a series' pod.
    #[serde(default = "default_pod_label")]
    pub pod_label: String,
    /// The label that names a series' namespace.
    #[serde(default = "default_namespace_label")]
    pub namespace_label: String,
}

fn default_pod_label() -> String {
    "pod".to_owned()
}
fn default_namespace_label() -> String {
    "namespace".to_owned()
}

impl Default for AutoscalingSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            target_utilization: default_target_utilization(),
            scale_up_queue: default_scale_up_queue(),
            scale_up_p95_milliseconds: default_scale_up_p95(),
            scale_down_utilization: default_target_utilization(),
            scale_down_window_seconds: default_scale_down_window(),
            emergency_queue: default_emergency_queue(),
            emergency_error_rate: default_emergency_errors(),
            scale_up_cooldown_seconds: default_scale_up_cooldown(),
            scale_down_cooldown_seconds: default_scale_down_window(),
            scale_to_zero_after_seconds: None,
            metrics_source: None,
        }
    }
}

fn default_target_utilization() -> f64 {
    0.6
}
fn default_scale_up_queue() -> i32 {
    20
}
fn default_scale_up_p95() -> i32 {
    300
}
fn default_scale_down_window() -> i32 {
    300
}
fn default_emergency_queue() -> i32 {
    100
}
fn default_emergency_errors() -> f64 {
    0.05
}
fn default_scale_up_cooldown() -> i32 {
    60
}

/// Spot placement: a share of the groups on spot (reclaimable, cheaper) nodes, the rest and an
/// on-demand floor on on-demand nodes. Nodes are told apart by the labels (and spot nodes'
/// taints) the user names, as Karpenter, GKE and EKS label them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// Share of the groups that may run on spot nodes (0: none).
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub spot_share: f64,
    /// Groups that always run on on-demand nodes, whatever the share.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub on_demand_floor: i32,
    /// Labels of spot nodes (e.g. `karpenter.sh/capacity-type: spot`); spot groups' pods select them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub spot_node_selector: BTreeMap<String, String>,
    /// Taints of spot nodes that spot groups' pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spot_tolerations: Vec<Toleration>,
    /// Labels of on-demand nodes (e.g. `karpenter.sh/capacity-type: on-demand`); on-demand groups'
    /// pods select them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub on_demand_node_selector: BTreeMap<String, String>,
}

/// GPU-hours the pool's pods have run, by capacity type, since the operator started counting.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuHours {
    #[serde(default)]
    pub on_demand: f64,
    #[serde(default)]
    pub spot: f64,
}

/// How long a GPU may stay unhealthy before its group moves, and how long its node is avoided.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuHealthSpec {
    /// Seconds a pod's GPU may report unhealthy (its agent unready, waiting for probation)
    /// before the operator recreates the pod's group away from its node.
    #[serde(default = "default_unhealthy_grace")]
    #[schemars(range(min = 0))]
    pub unhealthy_grace_seconds: i32,

    /// Seconds new pods of the pool keep off a node whose GPU made a group move.
    #[serde(default = "default_avoid_node")]
    #[schemars(range(min = 0))]
    pub avoid_node_seconds: i32,
}

impl Default for GpuHealthSpec {
    fn default() -> Self {
        Self {
            unhealthy_grace_seconds: default_unhealthy_grace(),
            avoid_node_seconds: default_avoid_node(),
        }
    }
}

/// When a new revision of the pool counts as a regression. After the groups' serving spec
/// changes (model, resources, tensor parallelism, batching, KV cache, agent), the operator reads
/// the new revision's leaders for `windowSeconds` of traffic and compares them with the last good
/// revision's last window: p95 end-to-end latency up by more than `latencyIncrease`, throughput
/// (output tokens per second at full batch) down by more than `throughputDecrease`, more than
/// `errorRate` of requests failing, or agents reporting `parallax_degraded` for most of the
/// window. A regression puts the last good revision's serving spec back on the groups (the
/// pool's spec is left as written) until the spec changes again.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RollbackSpec {
    /// Judge new revisions and roll back the ones that regress. Turn it off for a change that
    /// is meant to serve slower (a larger model, say).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Seconds of the new revision's traffic a verdict reads, and of the last good one's it is
    /// compared with.
    #[serde(default = "default_rollback_window")]
    #[schemars(range(min = 1))]
    pub window_seconds: i32,
    /// Requests a window must hold before latency and throughput are compared.
    #[serde(default = "default_rollback_requests")]
    #[schemars(range(min = 1))]
    pub min_requests: i32,
    /// A rise of p95 latency beyond this share of the baseline's is a regression.
    #[serde(default = "default_latency_increase")]
    #[schemars(range(min = 0.0))]
    pub latency_increase: f64,
    /// A fall of throughput beyond this share of the baseline's is a regression.
    #[serde(default = "default_throughput_decrease")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub throughput_decrease: f64,
    /// A share of failed requests above this is a regression.
    #[serde(default = "default_rollback_errors")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub error_rate: f64,
}

impl Default for RollbackSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            window_seconds: default_rollback_window(),
            min_requests: default_rollback_requests(),
            latency_increase: default_latency_increase(),
            throughput_decrease: default_throughput_decrease(),
            error_rate: default_rollback_errors(),
        }
    }
}

/// What the rollback judge knows of the pool's revisions.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RollbackStatus {
    /// The serving-spec revision the groups run now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<String>,
    /// The last revision judged good (or the first one seen): what a regression rolls back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<String>,
    /// A revision that regressed: while the spec still asks for it, the groups run
    /// `stableRevision` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_revision: Option<String>,
    /// What the last verdict found, or what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What the autoscaler saw and forecast at its last look.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// Requests per second over the last interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    /// Requests waiting, summed over the leaders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95_milliseconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization: Option<f64>,
    /// Requests per second one group serves at full utilization, as learned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_per_group: Option<f64>,
    /// The rate to provision for, one lead ahead (forecast with its margin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast_requests_per_second: Option<f64>,
    /// The forecast's mean absolute percentage error at the lead over the last day, and a
    /// naive last-value forecast's; the forecast is used only while it is the better.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast_mape: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub naive_mape: Option<f64>,
    /// Whether the forecast took part in the last decision.
    #[serde(default)]
    pub predictive: bool,
}

/// A pod whose agent reports an unhealthy GPU.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuFault {
    pub pod: String,
    /// The pod's node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The GPU's index in the pod.
    pub gpu: i32,
    pub uuid: String,
    /// What the agent says happened (`XID 79: GPU has fallen off the bus`).
    pub reason: String,
    /// When the operator first saw it.
    pub since: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
}

/// A node new pods keep off, after a GPU of it made a group move.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AvoidedNode {
    pub node: String,
    pub until: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
}

/// What runs a pool's groups.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GroupWorkload {
    /// Pods the operator manages itself.
    #[default]
    Pods,
    /// A LeaderWorkerSet (`leaderworkerset.x-k8s.io/v1`): one leader and its workers per group.
    #[serde(rename = "leaderworkerset")]
    LeaderWorkerSet,
}

/// What each pod of a group asks of its node.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuResources {
    /// Extended resource that counts GPUs on a node.
    #[serde(default = "default_gpu_resource")]
    pub gpu_resource_name: String,

    /// Nodes a group may run on (all must match).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations for tainted GPU nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// CPU requested by each pod (e.g. `4`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,

    /// Memory requested by each pod (e.g. `32Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

impl Default for GpuResources {
    fn default() -> Self {
        Self {
            gpu_resource_name: default_gpu_resource(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            cpu: None,
            memory: None,
        }
    }
}

/// Continuous batching limits and the scheduler's execution-time bins.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.bins.fast.maxExecutionTimeMs) == has(self.bins.medium.maxExecutionTimeMs)").message("bins: set both fast.maxExecutionTimeMs and medium.maxExecutionTimeMs (fixed bounds) or neither (bounds that adapt to the traffic)").field_path(".bins"))]
#[x_kube(validation = Rule::new("!has(self.bins.fast.maxExecutionTimeMs) || !has(self.bins.medium.maxExecutionTimeMs) || self.bins.fast.maxExecutionTimeMs < self.bins.medium.maxExecutionTimeMs").message("bins must be ordered: fast.maxExecutionTimeMs must be below medium.maxExecutionTimeMs").field_path(".bins"))]
#[serde(rename_all = "camelCase")]
pub struct BatchingSpec {
    /// Most sequences in one forward step.
    #[serde(default = "default_max_batch_size")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_batch_size: i32,

    /// Longest a request is held to form a fuller batch, in milliseconds.
    #[serde(default = "default_batch_timeout_ms")]
    #[schemars(range(min = 0, max = 60000))]
    pub batch_timeout_ms: i32,

    /// Execution-time bins: fast, medium and slow.
    #[serde(default)]
    pub bins: Bins,
}

impl Default for BatchingSpec {
    fn default() -> Self {
        Self {
            max_batch_size: default_max_batch_size(),
            batch_timeout_ms: default_batch_timeout_ms(),
            bins: Bins::default(),
        }
    }
}

/// The three bins. A request whose predicted execution time is below `fast.maxExecutionTimeMs`
/// is fast, below `medium.maxExecutionTimeMs` medium, otherwise slow. Without those two bounds
/// the agent places them at the natural breaks of recent predicted times, so the bins split the
/// traffic on any hardware. A bin's batch sizes are a guarantee and a weight, not a ceiling:
/// places no other bin waits for are lent beyond `maxBatchSize`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Bins {
    #[serde(default = "Bin::default_fast")]
    pub fast: Bin,
    #[serde(default = "Bin::default_medium")]
    pub medium: Bin,
    #[serde(default = "Bin::default_slow")]
    pub slow: SlowBin,
}

impl Default for Bins {
    fn default() -> Self {
        Self {
            fast: Bin::default_fast(),
            medium: Bin::default_medium(),
            slow: Bin::default_slow(),
        }
    }
}

/// A bounded bin: its upper execution-time bound, its share of the running batch and its weight.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.minBatchSize <= self.maxBatchSize").message("a bin's minBatchSize must not exceed its maxBatchSize"))]
#[serde(rename_all = "camelCase")]
pub struct Bin {
    /// Upper bound of predicted execution time, in milliseconds; unset (the default), the
    /// agent derives it from the traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_execution_time_ms: Option<i32>,
    /// Sequences of this bin the scheduler keeps running when it has them, taking places back
    /// from bins that borrowed beyond their maximum.
    #[schemars(range(min = 0))]
    pub min_batch_size: i32,
    /// Sequences of this bin in the running batch while other bins wait; beyond it, only places
    /// no other bin waits for.
    #[schemars(range(min = 1))]
    pub max_batch_size: i32,
    /// Relative weight in the admission order.
    #[schemars(range(min = 1, max = 100))]
    pub weight: i32,
}

/// The open-ended slow bin: everything above the medium bound.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.minBatchSize <= self.maxBatchSize").message("a bin's minBatchSize must not exceed its maxBatchSize"))]
#[serde(rename_all = "camelCase")]
pub struct SlowBin {
    #[schemars(range(min = 0))]
    pub min_batch_size: i32,
    #[schemars(range(min = 1))]
    pub max_batch_size: i32,
    #[schemars(range(min = 1, max = 100))]
    pub weight: i32,
}

impl Bin {
    fn default_fast() -> Self {
        Self {
            max_execution_time_ms: None,
            min_batch_size: 32,
            max_batch_size: 64,
            weight: 3,
        }
    }
    fn default_medium() -> Self {
        Self {
            max_execution_time_ms: None,
            min_batch_size: 16,
            max_batch_size: 32,
            weight: 2,
        }
    }
    fn default_slow() -> SlowBin {
        SlowBin {
            min_batch_size: 4,
            max_batch_size: 16,
            weight: 1,
        }
    }
}

/// The paged KV cache.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KvCacheSpec {
    /// Fraction of each GPU's memory the agent may use for weights, activations and KV cache.
    #[serde(default = "default_memory_fraction")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("kvCache.gpuMemoryFraction must be in (0, 1]"))]
    pub gpu_memory_fraction: f64,

    /// Tokens per KV block.
    #[serde(default = "default_block_size")]
    #[x_kube(validation = Rule::new("self in [8, 16, 32, 64, 128]").message("kvCache.blockSize must be one of 8, 16, 32, 64, 128"))]
    pub block_size: i32,

    /// Share KV blocks between requests with a common prompt prefix.
    #[serde(default = "default_true")]
    pub prefix_caching: bool,

    /// Element type of cached keys and values.
    #[serde(default)]
    pub dtype: KvCacheDtype,
}

impl Default for KvCacheSpec {
    fn default() -> Self {
        Self {
            gpu_memory_fraction: default_memory_fraction(),
            block_size: default_block_size(),
            prefix_caching: true,
            dtype: KvCacheDtype::default(),
        }
    }
}

/// Element type of the KV cache. The agent keeps it in the engine's activation type (`--dtype`,
/// bf16 on GPUs by default): naming another is refused at start.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    /// The model's activation type (16-bit on GPUs).
    #[default]
    Auto,
    F16,
    Bf16,
}

impl KvCacheDtype {
    /// Bytes one cached element takes on a GPU, as the agent stores it.
    pub fn bytes_per_element(self) -> u64 {
        match self {
            Self::Auto | Self::F16 | Self::Bf16 => 2,
        }
    }
}

/// The agent container of every pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// Container image of `parallax-agent`. Unset, the operator's own (its `agentImage`, which
    /// follows the operator's version), so that upgrading the operator moves the pool to the
    /// matching agent; set, the pool keeps this image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Image pull policy (`Always`, `IfNotPresent`, `Never`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,

    /// Extra command-line arguments appended to `parallax-agent serve`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,

    /// Environment variables of the agent container, after the operator's own: NCCL's
    /// (`NCCL_SOCKET_IFNAME`, `NCCL_IB_HCA`, `NCCL_DEBUG`), a proxy for hub downloads
    /// (`HTTPS_PROXY`), `RUST_LOG`. The names the operator sets are refused: `PARALLAX_*` (the
    /// agent's flags go in `extraArgs`), `POD_NAME`, `POD_NAMESPACE` and `HF_TOKEN` (from
    /// `model.hubTokenSecret`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.all(e, !e.name.startsWith('PARALLAX_') && !(e.name in ['POD_NAME', 'POD_NAMESPACE', 'HF_TOKEN']))").message("agent.env must not set PARALLAX_* (the agent's flags go in agent.extraArgs), POD_NAME, POD_NAMESPACE or HF_TOKEN (model.hubTokenSecret): the operator sets them"))]
    pub env: Vec<EnvVar>,
}

/// The pool's router Deployment (`parallax-agent route`, from the agent's image).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    /// Off, the pool's Service sends requests straight to the group leaders (round robin by
    /// kube-proxy, no retries, nothing held while the pool has no ready group).
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Router pods. Each polls every group: a few are plenty.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = 16))]
    pub replicas: i32,

    /// Extra command-line arguments appended to `parallax-agent route` (`--queue-limit`,
    /// `--affinity-slack`, `--hold-timeout`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
}

impl Default for RouterSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            replicas: 1,
            extra_args: Vec::new(),
        }
    }
}

/// A group's recreations after failures.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupRestart {
    /// The group's index.
    pub group: i32,
    /// Recreations in a row.
    pub count: i32,
    /// When the last one was.
    pub last: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
}

/// Downloads of the model under way in the pool's pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelDownload {
    /// Pods downloading.
    pub pods: i32,
    /// Bytes they have, together.
    pub bytes_done: i64,
    /// Bytes they fetch, together.
    pub bytes: i64,
}

/// What the operator observed and decided, written only by the operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolStatus {
    /// `Ready`, `Progressing` and `Degraded`, following Kubernetes API conventions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Groups that exist (any template).
    #[serde(default)]
    pub replicas: i32,

    /// Groups whose every pod is ready.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Groups running the current template.
    #[serde(default)]
    pub updated_replicas: i32,

    /// Resolved GPUs per group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor_parallel_size: Option<i32>,

    /// Pods per group (1 unless a group spans nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods_per_group: Option<i32>,

    /// Why this tensor-parallel size was chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor_parallel_reason: Option<String>,

    /// GPUs each pod of a group requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus_per_pod: Option<i32>,

    /// GPU products the size was chosen for; pods have a node affinity to them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_products: Vec<String>,

    /// When a group last became ready or updated, or the spec last changed: what
    /// `progressDeadlineSeconds` counts from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,

    /// Groups recreated after a member failed, lately: how many times in a row and when last.
    /// A group that fails again waits 10 s after its first recreation, doubling to 10 minutes;
    /// one ready 10 minutes after its last recreation is forgotten.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["group"]))]
    pub group_restarts: Vec<GroupRestart>,

    /// Pods downloading the model now, as their agents report it, and how far they have come
    /// together. Absent when no pod downloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_download: Option<ModelDownload>,

    /// The built-in autoscaler's last look, when it is enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,

    /// Revisions of the serving spec and the rollback judge's last verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackStatus>,

    /// GPU-hours by capacity type (counted by the operator every 15 s from running pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_hours: Option<GpuHours>,

    /// Since when spot capacity has been found wanting (a spot group's pod unschedulable for
    /// five minutes): new groups go on-demand for 30 minutes after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot_unavailable_since: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,

    /// Pods whose agents report an unhealthy GPU, and since when.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_faults: Vec<GpuFault>,

    /// Nodes new pods keep off for now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub avoided_nodes: Vec<AvoidedNode>,

    /// The spec generation the layout above was resolved for. The layout is kept until the spec
    /// changes: a cordon, a lost node or a kubelet restart does not resize or move groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout_generation: Option<i64>,

    /// Label selector of the pool's pods, for the scale subresource (HPA, KEDA, `kubectl scale`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// In-cluster URL of the OpenAI-compatible endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

fn tensor_parallel_size_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true,
        // Not nullable: a null is pruned and defaulted to auto, never stored (kube marks
        // int-or-string fields with a default nullable unless told).
        "nullable": false,
        "default": "auto",
        "description": "GPUs that shard one copy of the model: a power of two, or `auto`.",
        "x-kubernetes-validations": [{
            "rule": "self == 'auto' || self in [1, 2, 4, 8, 16, 32, 64]",
            "message": "tensorParallelSize must be auto or a power of two from 1 to 64"
        }]
    })
}

fn default_tensor_parallel_size() -> IntOrString {
    IntOrString::String("auto".to_owned())
}
fn default_one() -> i32 {
    1
}
fn default_unhealthy_grace() -> i32 {
    300
}
fn default_avoid_node() -> i32 {
    3600
}
fn default_max_surge() -> IntOrString {
    IntOrString::Int(0)
}
fn default_max_unavailable() -> IntOrString {
    IntOrString::Int(1)
}
fn default_max_replicas() -> i32 {
    10
}
fn default_progress_deadline() -> i32 {
    1800
}
fn default_gpu_resource() -> String {
    "nvidia.com/gpu".to_owned()
}
fn default_max_batch_size() -> i32 {
    64
}
fn default_batch_timeout_ms() -> i32 {
    50
}
fn default_memory_fraction() -> f64 {
    0.9
}
fn default_block_size() -> i32 {
    16
}
fn default_rollback_window() -> i32 {
    300
}
fn default_rollback_requests() -> i32 {
    50
}
fn default_latency_increase() -> f64 {
    0.2
}
fn default_throughput_decrease() -> f64 {
    0.15
}
fn default_rollback_errors() -> f64 {
    0.01
}
fn default_true() -> bool {
    true
}
