//! Desired child objects of a pool: pure functions of the pool and its group layout.
//! Nothing here talks to the API server; `reconcile` applies what these return.

use crate::inventory::GPU_PRODUCT_LABEL;
use crate::tp::GroupLayout;
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, Lifecycle, LifecycleHandler,
    NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, Pod, PodAffinityTerm, PodAntiAffinity, PodSecurityContext,
    PodSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext,
    Service, ServicePort, ServiceSpec, SleepAction, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use parallax_crds::{
    AGENT_CONFIG_FILE, AGENT_GROUP_PORT, AGENT_HTTP_PORT, AgentConfig, InferencePool,
};
use std::collections::BTreeMap;

pub const POOL_LABEL: &str = "parallax.dev/pool";
pub const GROUP_LABEL: &str = "parallax.dev/group";
pub const RANK_LABEL: &str = "parallax.dev/rank";
/// Which incarnation of its group a pod belongs to (0 unless the group was recreated under new
/// names after a node was lost).
pub const INCARNATION_LABEL: &str = "parallax.dev/incarnation";
pub const TEMPLATE_HASH_ANNOTATION: &str = "parallax.dev/template-hash";
/// The serving-spec revision a pod runs (what the rollback judge compares).
pub const REVISION_ANNOTATION: &str = "parallax.dev/revision";
/// Pods in the group a pod was built for: an outdated group is judged by its own size.
pub const GROUP_SIZE_ANNOTATION: &str = "parallax.dev/group-size";
const CONFIG_DIR: &str = "/etc/parallax";
/// The agent's writable cache; hub downloads go to its `models/` folder.
const CACHE_DIR: &str = "/var/cache/parallax";
const MODEL_CACHE_DIR: &str = "/var/cache/parallax/models";
/// Where `model.volumeClaim` is mounted.
pub const MODELS_DIR: &str = "/models";

/// Names of a pool's children.
pub fn service_name(pool: &str) -> String {
    pool.to_owned()
}
pub fn headless_service_name(pool: &str) -> String {
    format!("{pool}-pods")
}
/// The agent configuration of one pod template: each revision keeps its own, so a pod that
/// restarts mid-rollout reads the configuration it was built with.
pub fn config_map_name(pool: &str, template_hash: &str) -> String {
    let revision = template_hash.get(..10).unwrap_or(template_hash);
    format!("{pool}-agent-{revision}")
}
pub fn pdb_name(pool: &str) -> String {
    pool.to_owned()
}
/// A pod's name: `POOL-GROUP-RANK`, and `-iN` for the group's N-th incarnation (a group
/// recreated under new names because pods of its last one are stuck on a lost node).
pub fn pod_name(pool: &str, group: u32, rank: u32, incarnation: u32) -> String {
    match incarnation {
        0 => format!("{pool}-{group}-{rank}"),
        n => format!("{pool}-{group}-{rank}-i{n}"),
    }
}

/// Labels every child carries.
pub fn pool_labels(pool: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "parallax-agent"),
        ("app.kubernetes.io/instance", pool),
        ("app.kubernetes.io/managed-by", "parallax-operator"),
        (POOL_LABEL, pool),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// Selector of every pod of a pool.
pub fn pool_selector(pool: &str) -> String {
    format!("{POOL_LABEL}={pool}")
}

/// Selector of the pool's group leaders: one pod per group, so HPA and KEDA count groups.
pub fn leader_selector(pool: &str) -> String {
    format!("{POOL_LABEL}={pool},{RANK_LABEL}=0")
}

/// Everything the pool owns except its pods.
#[derive(Debug, Clone)]
pub struct PoolChildren {
    pub config_map: ConfigMap,
    pub service: Service,
    pub headless_service: Service,
    pub pdb: PodDisruptionBudget,
}

/// Whether the pool controls the object `meta` describes (the pool's uid is its controller
/// owner): the operator adopts, changes and deletes nothing else, whatever its labels say.
pub fn owned_by(meta: &ObjectMeta, pool: &InferencePool) -> bool {
    let Some(uid) = pool.metadata.uid.as_deref() else {
        return false;
    };
    meta.owner_references
        .iter()
        .flatten()
        .any(|owner| owner.controller == Some(true) && owner.uid == uid)
}

/// The pool's agent ConfigMaps that no pod reads any more: neither the current revision's nor
/// one that a pod of the pool (however outdated) mounts.
pub fn unused_configs(
    config_maps: &[ConfigMap],
    pods: &[Pod],
    current: &str,
    pool: &InferencePool,
) -> Vec<String> {
    let mounted: Vec<&str> = pods
        .iter()
        .filter_map(|p| p.spec.as_ref()?.volumes.as_ref())
        .flatten()
        .filter_map(|v| Some(v.config_map.as_ref()?.name.as_str()))
        .collect();
    config_maps
        .iter()
        .filter(|c| owned_by(&c.metadata, pool))
        .map(ResourceExt::name_any)
        .filter(|name| name != current && !mounted.contains(&name.as_str()))
        .collect()
}

/// Builds the children of `pool` for `layout`. Every child is owned by the pool.
#[derive(Debug)]
pub struct ChildBuilder<'a> {
    pub(crate) pool: &'a InferencePool,
    pub(crate) layout: &'a GroupLayout,
    pub(crate) name: String,
    pub(crate) namespace: String,
    config: String,
    template_hash: String,
    /// The agent image the pods run.
    image: String,
    /// A router pod is ready: the pool's Service sends to the router, not the leaders.
    router_serving: bool,
}

/// The agent image of pools that pin none: the CUDA build of this operator's version.
pub fn default_agent_image() -> String {
    format!(
        "ghcr.io/parallax-dev/parallax-agent:{}-cuda",
        env!("CARGO_PKG_VERSION")
    )
}

impl<'a> ChildBuilder<'a> {
    pub fn new(pool: &'a InferencePool, layout: &'a GroupLayout) -> Self {
        Self::with_agent_image(pool, layout, &default_agent_image())
    }

    /// Children whose pods run `agent_image` unless the pool pins an image.
    pub fn with_agent_image(
        pool: &'a InferencePool,
        layout: &'a GroupLayout,
        agent_image: &str,
    ) -> Self {
        let config = AgentConfig::for_pool(&pool.spec, layout.tensor_parallel_size);
        let config = serde_json::to_string_pretty(&config).expect("agent config serializes");
        let image = pool
            .spec
            .agent
            .image
            .clone()
            .unwrap_or_else(|| agent_image.to_owned());
        let template_hash = template_hash(pool, layout, &config, &image);
        Self {
            pool,
            layout,
            image,
            name: pool.name_any(),
            namespace: pool.namespace().unwrap_or_default(),
            config,
            template_hash,
            router_serving: false,
        }
    }

    /// Children for when the router has a ready pod (`serving`) or has none: until one is
    /// ready the pool's Service keeps sending to the group leaders, so that a router being
    /// created, rolled or failing never leaves the endpoint with nothing behind it.
    pub fn with_router_serving(mut self, serving: bool) -> Self {
        self.router_serving = serving;
        self
    }

    /// The agent image the pods (and the router) run.
    pub fn image(&self) -> &str {
        &self.image
    }

    /// Changes whenever a pod built now would differ from one built before.
    pub fn template_hash(&self) -> &str {
        &self.template_hash
    }

    /// The ConfigMap this template's pods read their configuration from.
    pub fn config_map_name(&self) -> String {
        config_map_name(&self.name, &self.template_hash)
    }

    pub(crate) fn meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(pool_labels(&self.name)),
            owner_references: self.pool.controller_owner_ref(&()).map(|r| vec![r]),
            ..ObjectMeta::default()
        }
    }

    pub fn children(&self) -> PoolChildren {
        PoolChildren {
            config_map: self.config_map(),
            service: self.service(),
            headless_service: self.headless_service(),
            pdb: self.pdb(),
        }
    }

    fn config_map(&self) -> ConfigMap {
        ConfigMap {
            metadata: self.meta(self.config_map_name()),
            data: Some([(AGENT_CONFIG_FILE.to_owned(), self.config.clone())].into()),
            ..ConfigMap::default()
        }
    }

    /// The agent's HTTP port, by its container port's name.
    pub(crate) fn http_port() -> ServicePort {
        ServicePort {
            name: Some("http".into()),
            port: i32::from(AGENT_HTTP_PORT),
            target_port: Some(IntOrString::String("http".into())),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        }
    }

    /// Where a multi-pod group's leader accepts its workers.
    fn group_port() -> ServicePort {
        ServicePort {
            name: Some("group".into()),
            port: i32::from(AGENT_GROUP_PORT),
            target_port: Some(IntOrString::String("group".into())),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        }
    }

    /// The OpenAI endpoint: the router's pods once one is ready, else the group leaders (the
    /// pods that serve HTTP for their group).
    fn service(&self) -> Service {
        let selector = if self.pool.spec.router.enabled && self.router_serving {
            crate::router::router_labels(&self.name)
        } else {
            BTreeMap::from([
                (POOL_LABEL.to_owned(), self.name.clone()),
                (RANK_LABEL.to_owned(), "0".to_owned()),
            ])
        };
        Service {
            metadata: self.meta(service_name(&self.name)),
            spec: Some(ServiceSpec {
                selector: Some(selector),
                ports: Some(vec![Self::http_port()]),
                type_: Some("ClusterIP".into()),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    /// Stable DNS for every pod (`<pod>.<pool>-pods`), ready or not, so workers find their leader
    /// while the group starts.
    fn headless_service(&self) -> Service {
        Service {
            metadata: self.meta(headless_service_name(&self.name)),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                publish_not_ready_addresses: Some(true),
                selector: Some(BTreeMap::from([(POOL_LABEL.to_owned(), self.name.clone())])),
                ports: Some(vec![Self::http_port(), Self::group_port()]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    /// At most one group's worth of pods disrupted at a time.
    fn pdb(&self) -> PodDisruptionBudget {
        self.disruption_budget(
            pdb_name(&self.name),
            self.layout.pods_per_group as i32,
            POOL_LABEL,
        )
    }

    /// The budget `name`: at most `max_unavailable` of the pods whose `label` is the pool's name
    /// disrupted at a time.
    pub(crate) fn disruption_budget(
        &self,
        name: String,
        max_unavailable: i32,
        label: &str,
    ) -> PodDisruptionBudget {
        PodDisruptionBudget {
            metadata: self.meta(name),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(max_unavailable)),
                selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(label.to_owned(), self.name.clone())])),
                    ..LabelSelector::default()
                }),
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        }
    }

    /// The pod of `rank` in `group` (its first incarnation).
    pub fn pod(&self, group: u32, rank: u32) -> Pod {
        self.pod_in(group, rank, 0)
    }

    /// The pod of `rank` in `group`'s `incarnation`.
    pub fn pod_in(&self, group: u32, rank: u32, incarnation: u32) -> Pod {
        let spec = &self.pool.spec;
        let name = pod_name(&self.name, group, rank, incarnation);
        let mut meta = self.meta(name.clone());
        let labels = meta.labels.get_or_insert_with(BTreeMap::new);
        labels.insert(GROUP_LABEL.into(), group.to_string());
        labels.insert(RANK_LABEL.into(), rank.to_string());
        labels.insert(INCARNATION_LABEL.into(), incarnation.to_string());
        meta.annotations = Some(BTreeMap::from([
            (
                TEMPLATE_HASH_ANNOTATION.to_owned(),
                self.template_hash.clone(),
            ),
            (
                GROUP_SIZE_ANNOTATION.to_owned(),
                self.layout.pods_per_group.to_string(),
            ),
            (REVISION_ANNOTATION.to_owned(), spec.serving_revision()),
        ]));

        let leader = format!(
            "{}.{}.{}.svc",
            pod_name(&self.name, group, 0, incarnation),
            headless_service_name(&self.name),
            self.namespace
        );
        let env = [
            ("PARALLAX_POOL", self.name.clone()),
            ("PARALLAX_GROUP", group.to_string()),
            ("PARALLAX_RANK", rank.to_string()),
            (
                "PARALLAX_WORLD_SIZE",
                self.layout.pods_per_group.to_string(),
            ),
            (
                "PARALLAX_TENSOR_PARALLEL_SIZE",
                self.layout.tensor_parallel_size.to_string(),
            ),
            ("PARALLAX_LEADER_ADDRESS", leader),
            ("PARALLAX_MODEL_CACHE", MODEL_CACHE_DIR.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| EnvVar {
            name: k.into(),
            value: Some(v),
            ..EnvVar::default()
        })
        .chain(
            ["metadata.name", "metadata.namespace"]
                .into_iter()
                .map(|path| EnvVar {
                    name: if path == "metadata.name" {
                        "POD_NAME"
                    } else {
                        "POD_NAMESPACE"
                    }
                    .into(),
                    value_from: Some(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: path.into(),
                            ..ObjectFieldSelector::default()
                        }),
                        ..EnvVarSource::default()
                    }),
                    ..EnvVar::default()
                }),
        )
        .chain(spec.model.hub_token_secret.as_ref().map(|secret| EnvVar {
            name: "HF_TOKEN".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.name.clone(),
                    key: secret.key.clone(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }))
        // The pool's own, last: a value may refer to the operator's as $(NAME).
        .chain(spec.agent.env.iter().cloned())
        .collect();

        // The pod's address, not loopback: probes and the Services reach it from outside.
        let mut args = vec![
            "serve".to_owned(),
            "--config".to_owned(),
            format!("{CONFIG_DIR}/{AGENT_CONFIG_FILE}"),
            "--host".to_owned(),
            "0.0.0.0".to_owned(),
        ];
        // The pod's GPUs, unless the pool's arguments name a device themselves.
        let names_device = flag(&spec.agent.extra_args, "--device").is_some();
        if self.layout.gpus_per_pod > 0 && !names_device {
            args.extend(["--device".to_owned(), "cuda".to_owned()]);
        }
        args.extend(spec.agent.extra_args.iter().cloned());

        let gpus = Quantity(self.layout.gpus_per_pod.to_string());
        let mut limits = BTreeMap::from([(spec.resources.gpu_resource_name.clone(), gpus)]);
        let mut requests = BTreeMap::new();
        for (key, value) in [
            ("cpu", &spec.resources.cpu),
            ("memory", &spec.resources.memory),
        ] {
            if let Some(q) = value {
                requests.insert(key.to_owned(), q.clone());
            }
        }
        if let Some(memory) = &spec.resources.memory {
            limits.insert("memory".into(), memory.clone());
        }

        let (volumes, volume_mounts) = self.volumes();
        let container = Container {
            name: "agent".into(),
            image: Some(self.image.clone()),
            image_pull_policy: spec.agent.image_pull_policy.clone(),
            args: Some(args),
            env: Some(env),
            ports: Some(vec![
                ContainerPort {
                    name: Some("http".into()),
                    container_port: i32::from(AGENT_HTTP_PORT),
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                },
                ContainerPort {
                    name: Some("group".into()),
                    container_port: i32::from(AGENT_GROUP_PORT),
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                },
            ]),
            resources: Some(ResourceRequirements {
                limits: Some(limits),
                requests: (!requests.is_empty()).then_some(requests),
                ..ResourceRequirements::default()
            }),
            readiness_probe: Some(http_probe("/ready", 5, 3)),
            liveness_probe: Some(http_probe("/health", 10, 6)),
            // Started means the model is downloaded and loaded (an hour at most); liveness
            // waits until then. A restart keeps the pod's cache, so a download resumes.
            startup_probe: Some(http_probe("/ready", 10, 360)),
            // Endpoints drop the pod before the agent stops taking requests.
            lifecycle: Some(pre_stop_pause()),
            security_context: Some(restricted_container()),
            volume_mounts: Some(volume_mounts),
            ..Container::default()
        };

        // On the GPUs the size was chosen for; members of a multi-node group on different nodes.
        let node_affinity = (!self.layout.gpu_products.is_empty()).then(|| NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: GPU_PRODUCT_LABEL.into(),
                        operator: "In".into(),
                        values: Some(self.layout.gpu_products.clone()),
                    }]),
                    ..NodeSelectorTerm::default()
                }],
            }),
            ..NodeAffinity::default()
        });
        let anti_affinity = (self.layout.pods_per_group > 1).then(|| PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
                topology_key: "kubernetes.io/hostname".into(),
                label_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([
                        (POOL_LABEL.to_owned(), self.name.clone()),
                        (GROUP_LABEL.to_owned(), group.to_string()),
                    ])),
                    ..LabelSelector::default()
                }),
                ..PodAffinityTerm::default()
            }]),
            ..PodAntiAffinity::default()
        });
        let affinity = (node_affinity.is_some() || anti_affinity.is_some()).then(|| Affinity {
            node_affinity,
            pod_anti_affinity: anti_affinity,
            ..Affinity::default()
        });

        Pod {
            metadata: meta,
            spec: Some(PodSpec {
                containers: vec![container],
                hostname: Some(name),
                subdomain: Some(headless_service_name(&self.name)),
                restart_policy: Some("Always".into()),
                node_selector: (!spec.resources.node_selector.is_empty())
                    .then(|| spec.resources.node_selector.clone()),
                tolerations: (!spec.resources.tolerations.is_empty())
                    .then(|| spec.resources.tolerations.clone()),
                affinity,
                termination_grace_period_seconds: Some(termination_grace_seconds(
                    &spec.agent.extra_args,
                )),
                automount_service_account_token: Some(false),
                enable_service_links: Some(false),
                security_context: Some(restricted_pod()),
                volumes: Some(volumes),
                ..PodSpec::default()
            }),
            status: None,
        }
    }
}

impl ChildBuilder<'_> {
    /// The pod's volumes and the agent's mounts: its configuration, the download cache (a
    /// claim, or an emptyDir sized from the model's shape), the model claim, shared memory.
    fn volumes(&self) -> (Vec<Volume>, Vec<VolumeMount>) {
        let model = &self.pool.spec.model;
        let claim = |name: &str, read_only: bool| PersistentVolumeClaimVolumeSource {
            claim_name: name.to_owned(),
            read_only: Some(read_only),
        };
        let empty_dir = |medium: Option<&str>, size_limit: Option<Quantity>| EmptyDirVolumeSource {
            medium: medium.map(Into::into),
            size_limit,
        };
        let mut volumes = vec![
            Volume {
                name: "config".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: self.config_map_name(),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
            match &model.cache_volume_claim {
                Some(name) => Volume {
                    name: "cache".into(),
                    persistent_volume_claim: Some(claim(name, false)),
                    ..Volume::default()
                },
                None => Volume {
                    name: "cache".into(),
                    empty_dir: Some(empty_dir(None, cache_size_limit(&self.pool.spec))),
                    ..Volume::default()
                },
            },
            Volume {
                name: "dshm".into(),
                empty_dir: Some(empty_dir(Some("Memory"), None)),
                ..Volume::default()
            },
        ];
        let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
            name: name.into(),
            mount_path: path.into(),
            read_only: read_only.then_some(true),
            ..VolumeMount::default()
        };
        let mut mounts = vec![
            mount("config", CONFIG_DIR, true),
            mount("cache", CACHE_DIR, false),
            mount("dshm", "/dev/shm", false),
        ];
        if let Some(name) = &model.volume_claim {
            volumes.push(Volume {
                name: "models".into(),
                persistent_volume_claim: Some(claim(name, true)),
                ..Volume::default()
            });
            mounts.push(mount("models", MODELS_DIR, true));
        }
        (volumes, mounts)
    }
}

/// The preStop pause, in seconds: long enough for Services to stop sending to a pod.
const PRE_STOP_SECONDS: i64 = 5;

/// A GET of `path` on the container's `http` port.
pub(crate) fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// The preStop pause: endpoints drop the pod before it stops taking requests.
pub(crate) fn pre_stop_pause() -> Lifecycle {
    Lifecycle {
        pre_stop: Some(LifecycleHandler {
            sleep: Some(SleepAction {
                seconds: PRE_STOP_SECONDS,
            }),
            ..LifecycleHandler::default()
        }),
        ..Lifecycle::default()
    }
}

/// The restricted Pod Security Standard, container side.
pub(crate) fn restricted_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// The restricted Pod Security Standard, pod side.
pub(crate) fn restricted_pod() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// Longer than the preStop pause and the agent's drain (`--shutdown-timeout`, 30 s unless the
/// pool's arguments say), with ten seconds to exit.
fn termination_grace_seconds(extra_args: &[String]) -> i64 {
    let drain = flag(extra_args, "--shutdown-timeout")
        .flatten()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
        .unwrap_or(30.0);
    PRE_STOP_SECONDS + drain.ceil() as i64 + 10
}

/// The last `name` among the agent's arguments and its value (`--name VALUE` or `--name=VALUE`;
/// `Some(None)` when it ends the list).
pub(crate) fn flag<'a>(args: &'a [String], name: &str) -> Option<Option<&'a str>> {
    let mut found = None;
    for (i, arg) in args.iter().enumerate() {
        match arg.strip_prefix(name) {
            Some("") => found = Some(args.get(i + 1).map(String::as_str)),
            Some(rest) if rest.starts_with('=') => found = Some(Some(&rest[1..])),
            _ => {}
        }
    }
    found
}

/// Room for a download of the model: its weights and a quarter more (tokenizer, partial files),
/// in whole GiB. None when the pool gives no shape.
fn cache_size_limit(spec: &parallax_crds::InferencePoolSpec) -> Option<Quantity> {
    let weights = spec.model.shape.as_ref()?.resolve().ok()?.weight_bytes;
    let gib = (weights + weights / 4).div_ceil(1 << 30).max(1);
    Some(Quantity(format!("{gib}Gi")))
}

/// FNV-1a over everything a pod is built from: stable across operator restarts and versions.
fn template_hash(pool: &InferencePool, layout: &GroupLayout, config: &str, image: &str) -> String {
    let inputs = serde_json::json!({
        "image": image,
        "agent": pool.spec.agent,
        "model": pool.spec.model,
        "resources": pool.spec.resources,
        "layout": [layout.tensor_parallel_size, layout.pods_per_group, layout.gpus_per_pod],
        "products": layout.gpu_products,
        "config": config,
    });
    format!("{:016x}", parallax_crds::fnv1a(&inputs.to_string()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn pool(spec: serde_json::Value) -> InferencePool {
        let mut pool = InferencePool::new("llama", serde_json::from_value(spec).unwrap());
        pool.metadata.namespace = Some("ml".into());
        pool.metadata.uid = Some("uid-1".into());
        pool
    }

    pub(crate) fn layout(size: u32, pods: u32) -> GroupLayout {
        GroupLayout {
            tensor_parallel_size: size,
            pods_per_group: pods,
            gpus_per_pod: size / pods,
            reason: String::new(),
            gpu_products: Vec::new(),
            provisional: false,
        }
    }

    #[test]
    fn children_are_owned_labelled_and_named() {
        let pool = pool(json!({"model": {"source": "/m/llama.gguf"}, "tensorParallelSize": 2}));
        let layout = layout(2, 1);
        let children = ChildBuilder::new(&pool, &layout).children();
        let owner = &children.service.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("InferencePool", "llama", Some(true))
        );
        assert_eq!(children.service.metadata.name.as_deref(), Some("llama"));
        assert_eq!(
            children.headless_service.metadata.name.as_deref(),
            Some("llama-pods")
        );
        let headless = children.headless_service.spec.unwrap();
        assert_eq!(headless.cluster_ip.as_deref(), Some("None"));
        // The endpoint is the leaders until a router pod is ready (crate::router's tests).
        let selector = children.service.spec.unwrap().selector.unwrap();
        assert_eq!(selector.get(RANK_LABEL).map(String::as_str), Some("0"));
        assert_eq!(
            children.pdb.spec.unwrap().max_unavailable,
            Some(IntOrString::Int(1))
        );
    }

    #[test]
    fn config_map_carries_the_agent_config_derived_from_the_spec() {
        let pool = pool(
            json!({"model": {"source": "/m/llama.gguf"}, "tensorParallelSize": 4,
            "batching": {"maxBatchSize": 32}, "kvCache": {"blockSize": 32}}),
        );
        let layout = layout(4, 1);
        let cm = ChildBuilder::new(&pool, &layout).children().config_map;
        let text = &cm.data.unwrap()[AGENT_CONFIG_FILE];
        let config: AgentConfig = serde_json::from_str(text).unwrap();
        assert_eq!(config.tensor_parallel_size, 4);
        assert_eq!(config.batching.max_batch_size, 32);
        assert_eq!(config.kv_cache.block_size, 32);
        assert_eq!(config.model.served_name, "llama");
    }

    #[test]
    fn single_node_pod_requests_all_group_gpus_and_is_locked_down() {
        let pool = pool(
            json!({"model": {"source": "/m.gguf"}, "tensorParallelSize": 4,
            "resources": {"cpu": "8", "memory": "64Gi", "nodeSelector": {"pool": "llm"}}}),
        );
        let layout = layout(4, 1);
        let pod = ChildBuilder::new(&pool, &layout).pod(0, 0);
        assert_eq!(pod.metadata.name.as_deref(), Some("llama-0-0"));
        let spec = pod.spec.unwrap();
        assert!(spec.affinity.is_none());
        assert_eq!(spec.node_selector.unwrap()["pool"], "llm");
        let c = &spec.containers[0];
        let resources = c.resources.as_ref().unwrap();
        assert_eq!(
            resources.limits.as_ref().unwrap()["nvidia.com/gpu"],
            Quantity("4".into())
        );
        assert_eq!(
            resources.requests.as_ref().unwrap()["cpu"],
            Quantity("8".into())
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(
            (
                sc.read_only_root_filesystem,
                sc.run_as_non_root,
                sc.allow_privilege_escalation
            ),
            (Some(true), Some(true), Some(false))
        );
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_owned()][..])
        );
    }

    #[test]
    fn the_pools_environment_follows_the_operators() {
        let spec = json!({"model": {"source": "hf://a/b"}, "tensorParallelSize": 2,
            "agent": {"env": [{"name": "NCCL_SOCKET_IFNAME", "value": "eth0"},
                              {"name": "TRACE_RANK", "value": "$(PARALLAX_RANK)"}]}});
        let pod = ChildBuilder::new(&pool(spec), &layout(2, 1)).pod(0, 1);
        let env = pod.spec.unwrap().containers[0].env.clone().unwrap();
        let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
        // Last, so that $(PARALLAX_RANK) expands: Kubernetes expands only earlier variables.
        assert_eq!(
            names[names.len() - 2..],
            ["NCCL_SOCKET_IFNAME", "TRACE_RANK"]
        );
        let rank = names.iter().position(|n| *n == "PARALLAX_RANK").unwrap();
        assert!(rank < names.len() - 2, "{names:?}");
        assert_eq!(
            env.last().unwrap().value.as_deref(),
            Some("$(PARALLAX_RANK)")
        );
    }

    #[test]
    fn pods_run_on_their_gpus_and_get_the_models_token_claims_and_cache() {
        let env = |pod: &Pod| {
            pod.spec.as_ref().unwrap().containers[0]
                .env
                .clone()
                .unwrap()
        };
        let args = |pod: &Pod| {
            pod.spec.as_ref().unwrap().containers[0]
                .args
                .clone()
                .unwrap()
        };
        let volume = |pod: &Pod, name: &str| {
            pod.spec
                .as_ref()
                .unwrap()
                .volumes
                .as_ref()
                .unwrap()
                .iter()
                .find(|v| v.name == name)
                .cloned()
        };
        // A hub model sized by a preset: an emptyDir for it, the GPUs as the device.
        let hub = pool(
            json!({"model": {"source": "hf://meta-llama/Llama-3.1-8B-Instruct",
            "shape": {"preset": "llama-3.1-8b"},
            "hubTokenSecret": {"name": "hf"}}, "tensorParallelSize": 1}),
        );
        let pod = ChildBuilder::new(&hub, &layout(1, 1)).pod(0, 0);
        assert!(
            args(&pod).windows(2).any(|w| w == ["--device", "cuda"]),
            "{:?}",
            args(&pod)
        );
        let token = env(&pod)
            .into_iter()
            .find(|e| e.name == "HF_TOKEN")
            .unwrap();
        let secret = token.value_from.unwrap().secret_key_ref.unwrap();
        assert_eq!((secret.name.as_str(), secret.key.as_str()), ("hf", "token"));
        let cache = env(&pod)
            .into_iter()
            .find(|e| e.name == "PARALLAX_MODEL_CACHE")
            .unwrap();
        assert_eq!(cache.value.as_deref(), Some(MODEL_CACHE_DIR));
        let size = volume(&pod, "cache")
            .unwrap()
            .empty_dir
            .unwrap()
            .size_limit
            .unwrap();
        assert_eq!(
            size,
            Quantity("19Gi".into()),
            "8B weights at 16 bits and a quarter more"
        );
        assert!(volume(&pod, "models").is_none());

        // Weights on a claim, downloads kept on another, a device of the pool's own.
        let claimed = pool(
            json!({"model": {"source": "/models/llama/", "volumeClaim": "weights",
            "cacheVolumeClaim": "hub-cache"}, "tensorParallelSize": 2,
            "agent": {"extraArgs": ["--device=cuda:1"]}}),
        );
        let pod = ChildBuilder::new(&claimed, &layout(2, 1)).pod(0, 0);
        assert!(!args(&pod).contains(&"cuda".to_owned()), "{:?}", args(&pod));
        let models = volume(&pod, "models")
            .unwrap()
            .persistent_volume_claim
            .unwrap();
        assert_eq!(
            (models.claim_name.as_str(), models.read_only),
            ("weights", Some(true))
        );
        let cache = volume(&pod, "cache")
            .unwrap()
            .persistent_volume_claim
            .unwrap();
        assert_eq!(
            (cache.claim_name.as_str(), cache.read_only),
            ("hub-cache", Some(false))
        );
        let mounts = pod.spec.as_ref().unwrap().containers[0]
            .volume_mounts
            .clone()
            .unwrap();
        let models = mounts.iter().find(|m| m.name == "models").unwrap();
        assert_eq!(
            (models.mount_path.as_str(), models.read_only),
            (MODELS_DIR, Some(true))
        );
        assert!(env(&pod).iter().all(|e| e.name != "HF_TOKEN"));
        // Without a shape the emptyDir has no limit.
        let shapeless = pool(json!({"model": {"source": "hf://a/b"}, "tensorParallelSize": 1}));
        let pod = ChildBuilder::new(&shapeless, &layout(1, 1)).pod(0, 0);
        assert_eq!(
            volume(&pod, "cache").unwrap().empty_dir.unwrap().size_limit,
            None
        );
    }

    #[test]
    fn each_revision_has_its_configuration_until_no_pod_reads_it() {
        let old_pool = pool(json!({"model": {"source": "/m.gguf"}, "tensorParallelSize": 1}));
        let mut new_pool = old_pool.clone();
        new_pool.spec.batching.max_batch_size = 8;
        let l = layout(1, 1);
        let (old, new) = (
            ChildBuilder::new(&old_pool, &l),
            ChildBuilder::new(&new_pool, &l),
        );
        assert_ne!(old.config_map_name(), new.config_map_name());
        let config_volume = |pod: &Pod| {
            pod.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0]
                .config_map
                .as_ref()
                .unwrap()
                .name
                .clone()
        };
        let old_pod = old.pod(0, 0);
        assert_eq!(config_volume(&old_pod), old.config_map_name());
        assert_eq!(
            old.children().config_map.metadata.name,
            Some(old.config_map_name())
        );
        let maps = [old.children().config_map, new.children().config_map];
        let current = new.config_map_name();
        // An old pod still reads the old revision's; once it is gone, the old one goes.
        assert!(unused_configs(&maps, &[old_pod], &current, &new_pool).is_empty());
        assert_eq!(
            unused_configs(&maps, &[new.pod(0, 0)], &current, &new_pool),
            [old.config_map_name()]
        );
        // Somebody else's ConfigMap is never the pool's to remove.
        let mut foreign = maps[0].clone();
        foreign.metadata.owner_references = None;
        assert!(unused_configs(&[foreign], &[], &current, &new_pool).is_empty());
    }

    #[test]
    fn a_later_incarnation_of_a_group_has_names_of_its_own_and_its_own_leader() {
        assert_eq!(pod_name("llama", 3, 1, 0), "llama-3-1");
        assert_eq!(pod_name("llama", 3, 1, 2), "llama-3-1-i2");
        let pool = pool(json!({"model": {"source": "/m.gguf"}, "tensorParallelSize": 8}));
        let worker = ChildBuilder::new(&pool, &layout(8, 2)).pod_in(3, 1, 2);
        assert_eq!(worker.metadata.name.as_deref(), Some("llama-3-1-i2"));
        assert_eq!(
            worker.metadata.labels.as_ref().unwrap()[INCARNATION_LABEL],
            "2"
        );
        let spec = worker.spec.unwrap();
        assert_eq!(spec.hostname.as_deref(), Some("llama-3-1-i2"));
        let leader = spec.containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "PARALLAX_LEADER_ADDRESS")
            .and_then(|e| e.value.clone());
        assert_eq!(leader.as_deref(), Some("llama-3-0-i2.llama-pods.ml.svc"));
    }

    #[test]
    fn only_what_the_pool_controls_is_its_own() {
        let pool = pool(json!({"model": {"source": "/m.gguf"}, "tensorParallelSize": 1}));
        let pod = ChildBuilder::new(&pool, &layout(1, 1)).pod(0, 0);
        assert!(owned_by(&pod.metadata, &pool));
        let mut other = pool.clone();
        other.metadata.uid = Some("uid-2".into());
        assert!(
            !owned_by(&pod.metadata, &other),
            "a pool of the same name, recreated"
        );
        let mut labelled_only = pod.metadata.clone();
        labelled_only.owner_references = None;
        assert!(!owned_by(&labelled_only, &pool));
        let mut not_controller = pod.metadata.clone();
        not_controller.owner_references.as_mut().unwrap()[0].controller = Some(false);
        assert!(!owned_by(&not_controller, &pool));
    }

    #[test]
    fn pods_land_on_the_gpu_products_their_size_was_chosen_for() {
        let pool = pool(json!({"model": {"source": "/m.gguf"}, "tensorParallelSize": 8}));
        let mut sized = layout(8, 2);
        sized.gpu_products = vec!["NVIDIA-H100-80GB-HBM3".into(), "NVIDIA-H200".into()];
        let affinity = |layout: &GroupLayout| {
            ChildBuilder::new(&pool, layout)
                .pod(0, 1)
                .spec
                .unwrap()
                .affinity
        };
        let both = affinity(&sized).unwrap();
        let term = &both
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms[0];
        let requirement = &term.match_expressions.as_ref().unwrap()[0];
        assert_eq!(
            (requirement.key.as_str(), requirement.operator.as_str()),
            (GPU_PRODUCT_LABEL, "In")
        );
        assert_eq!(requirement.values.as_deref(), Some(&sized.gpu_products[..]));
        assert!(
            both.pod_anti_affinity.is_some(),
            "a two-pod group still spreads"
        );
        let hash =
            |layout: &GroupLayout| ChildBuilder::new(&pool, layout).template_hash().to_owned();
        assert_ne!(
            hash(&sized),
            hash(&layout(8, 2)),
            "the products shape the pods"
        );
        assert!(
            affinity(&layout(8, 1)).is_none(),
            "one pod, any product: no affinity"
        );
    }

    #[test]
    fn pods_start_when_the_model_serves_and_stop_after_draining() {
        let drained = |args: serde_json::Value| {
            let pool = pool(
                json!({"model": {"source": "/m.gguf"}, "tensorParallelSize": 1,
                "agent": {"extraArgs": args}}),
            );
            let pod = ChildBuilder::new(&pool, &layout(1, 1)).pod(0, 0);
            let spec = pod.spec.unwrap();
            let container = &spec.containers[0];
            let startup = container.startup_probe.as_ref().unwrap();
            let path = startup.http_get.as_ref().unwrap().path.clone();
            assert_eq!(path.as_deref(), Some("/ready"), "started means serving");
            let pre_stop = container
                .lifecycle
                .as_ref()
                .unwrap()
                .pre_stop
                .as_ref()
                .unwrap();
            assert_eq!(pre_stop.sleep.as_ref().unwrap().seconds, PRE_STOP_SECONDS);
            spec.termination_grace_period_seconds.unwrap()
        };
        assert_eq!(drained(json!([])), 45, "5 s preStop + 30 s drain + 10 s");
        assert_eq!(drained(json!(["--shutdown-timeout", "120"])), 135);
        assert_eq!(drained(json!(["--shutdown-timeout=0.5"])), 16);
    }

    #[test]
    fn multi_node_group_members_know_their_rank_and_leader() {
        let pool = pool(json!({"model": {"source": "/m.gguf"}, "tensorParallelSize": 8}));
        let layout = layout(8, 2);
        let builder = ChildBuilder::new(&pool, &layout);
        let worker = builder.pod(3, 1);
        let spec = worker.spec.unwrap();
        let env: BTreeMap<_, _> = spec.containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|e| Some((e.name.as_str(), e.value.clone()?)))
            .collect();
        assert_eq!(env["PARALLAX_RANK"], "1");
        assert_eq!(env["PARALLAX_WORLD_SIZE"], "2");
        // The agent listens on the pod's address so that probes and Services reach it, and
        // runs on the pod's GPUs.
        assert_eq!(
            spec.containers[0].args.as_deref().unwrap(),
            [
                "serve",
                "--config",
                "/etc/parallax/agent.json",
                "--host",
                "0.0.0.0",
                "--device",
                "cuda"
            ]
        );
        assert_eq!(env["PARALLAX_TENSOR_PARALLEL_SIZE"], "8");
        // Workers reach their leader on the group port.
        let group_port = spec.containers[0]
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .find(|p| p.name.as_deref() == Some("group"))
            .expect("a group port");
        assert_eq!(group_port.container_port, i32::from(AGENT_GROUP_PORT));
        assert_eq!(
            env["PARALLAX_LEADER_ADDRESS"],
            "llama-3-0.llama-pods.ml.svc"
        );
        assert_eq!(
            spec.containers[0]
                .resources
                .as_ref()
                .unwrap()
                .limits
                .as_ref()
                .unwrap()["nvidia.com/gpu"],
            Quantity("4".into())
        );
        assert!(spec.affinity.unwrap().pod_anti_affinity.is_some());
        assert_eq!(spec.subdomain.as_deref(), Some("llama-pods"));
        assert_eq!(worker.metadata.labels.unwrap()[GROUP_LABEL], "3");
    }

    #[test]
    fn template_hash_follows_what_pods_are_built_from() {
        let a = pool(json!({"model": {"source": "/m.gguf"}, "tensorParallelSize": 1}));
        let mut b = a.clone();
        b.spec.replicas = 5;
        let l = layout(1, 1);
        let hash = |p: &InferencePool| ChildBuilder::new(p, &l).template_hash().to_owned();
        assert_eq!(hash(&a), hash(&b), "replicas do not change pods");
        b.spec.batching.max_batch_size = 8;
        assert_ne!(hash(&a), hash(&b), "the agent config does");
        let mut c = a.clone();
        c.spec.agent.image = Some("other:1".into());
        assert_ne!(hash(&a), hash(&c), "the image does");
        // An operator upgrade moves pools that pin no image to its own agent image.
        let upgraded = |p: &InferencePool| {
            let builder = ChildBuilder::with_agent_image(p, &l, "registry.example/agent:9-cuda");
            let image = builder.pod(0, 0).spec.unwrap().containers[0].image.clone();
            (builder.template_hash().to_owned(), image.unwrap())
        };
        assert_ne!(upgraded(&a).0, hash(&a));
        assert_eq!(upgraded(&a).1, "registry.example/agent:9-cuda");
        assert_eq!(
            (upgraded(&c).0, upgraded(&c).1),
            (hash(&c), "other:1".to_owned())
        );
        assert_eq!(
            ChildBuilder::new(&a, &l).pod(0, 0).spec.unwrap().containers[0].image,
            Some(format!(
                "ghcr.io/parallax-dev/parallax-agent:{}-cuda",
                env!("CARGO_PKG_VERSION")
            ))
        );
    }
}
