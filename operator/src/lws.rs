//! The LeaderWorkerSet a pool with `groupWorkload: leaderworkerset` runs its groups as: one
//! leader pod and `pods_per_group - 1` workers per group, gang-scheduled, recreated as a group,
//! rolled by LWS within the pool's `rollout`. Parallax still sizes the groups; the pods are
//! those `ChildBuilder` makes, turned into templates that learn their group, rank and leader
//! from the labels and variables LWS gives each pod. Pure, like `children`.

use crate::children::{ChildBuilder, GROUP_LABEL, INCARNATION_LABEL, POOL_LABEL, RANK_LABEL};
use k8s_openapi::api::core::v1::{
    EnvVar, EnvVarSource, ObjectFieldSelector, PodAffinityTerm, PodTemplateSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;
use std::collections::BTreeMap;

/// LWS's labels on the pods it makes.
pub const LWS_NAME_LABEL: &str = "leaderworkerset.sigs.k8s.io/name";
pub const LWS_GROUP_INDEX_LABEL: &str = "leaderworkerset.sigs.k8s.io/group-index";
pub const LWS_WORKER_INDEX_LABEL: &str = "leaderworkerset.sigs.k8s.io/worker-index";
/// Unique per group: what keeps a group's members apart.
pub const LWS_GROUP_KEY_LABEL: &str = "leaderworkerset.sigs.k8s.io/group-key";

/// `leaderworkerset.x-k8s.io/v1` `LeaderWorkerSet`.
pub fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("leaderworkerset.x-k8s.io", "v1", "LeaderWorkerSet"),
        "leaderworkersets",
    )
}

/// The pool's LeaderWorkerSet. Not the pool's own name: LWS makes a headless Service of its
/// name, and the pool's client Service has that one. Its pods are `NAME-G` (leaders) and
/// `NAME-G-R` (workers).
pub fn name(pool: &str) -> String {
    format!("{pool}-groups")
}

impl ChildBuilder<'_> {
    /// The LeaderWorkerSet for `replicas` groups.
    pub fn leader_worker_set(&self, replicas: u32) -> DynamicObject {
        let pool = self.pool;
        let size = self.layout.pods_per_group;
        let mut template = json!({
            "size": size,
            // A member that restarts cannot rejoin its group's collective alone.
            "restartPolicy": "RecreateGroupOnPodRestart",
            "workerTemplate": self.lws_template(size.min(2) - 1),
        });
        if size > 1 {
            template["leaderTemplate"] = json!(self.lws_template(0));
        }
        let mut object = DynamicObject::new(&name(&self.name), &resource())
            .within(&self.namespace)
            .data(json!({"spec": {
                "replicas": replicas,
                // A leader is ready only once its workers joined: they must not wait for it.
                "startupPolicy": "LeaderCreated",
                "rolloutStrategy": {
                    "type": "RollingUpdate",
                    "rollingUpdateConfiguration": {
                        "maxSurge": pool.spec.rollout.max_surge,
                        "maxUnavailable": pool.spec.rollout.max_unavailable,
                    },
                },
                "leaderWorkerTemplate": template,
            }}));
        object.metadata = self.meta(name(&self.name));
        object
    }

    /// The pod template of a group's leader (`rank` 0) or its workers (any other `rank`).
    fn lws_template(&self, rank: u32) -> PodTemplateSpec {
        let pod = self.pod_in(0, rank, 0);
        let mut labels = pod.metadata.labels.unwrap_or_default();
        labels.remove(GROUP_LABEL);
        labels.remove(INCARNATION_LABEL);
        if rank != 0 {
            // Workers have many ranks; only leaders carry rank 0, which Services select.
            labels.remove(RANK_LABEL);
        }
        let mut spec = pod.spec.unwrap_or_default();
        // LWS names pods and gives them a subdomain of its own Service.
        spec.hostname = None;
        spec.subdomain = None;
        let from_label = |key: &str| EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: format!("metadata.labels['{key}']"),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        };
        for container in &mut spec.containers {
            for env in container.env.iter_mut().flatten() {
                match env.name.as_str() {
                    "PARALLAX_GROUP" => {
                        *env = EnvVar {
                            name: env.name.clone(),
                            value_from: Some(from_label(LWS_GROUP_INDEX_LABEL)),
                            ..EnvVar::default()
                        };
                    }
                    "PARALLAX_RANK" => {
                        *env = EnvVar {
                            name: env.name.clone(),
                            value_from: Some(from_label(LWS_WORKER_INDEX_LABEL)),
                            ..EnvVar::default()
                        };
                    }
                    // LWS puts its variables first, so this one expands.
                    "PARALLAX_LEADER_ADDRESS" => {
                        env.value = Some("$(LWS_LEADER_ADDRESS)".into());
                    }
                    _ => {}
                }
            }
        }
        // Members of one group on different nodes: the group is told apart by LWS's key.
        if let Some(anti) = spec
            .affinity
            .as_mut()
            .and_then(|a| a.pod_anti_affinity.as_mut())
        {
            anti.required_during_scheduling_ignored_during_execution =
                Some(vec![PodAffinityTerm {
                    topology_key: "kubernetes.io/hostname".into(),
                    label_selector: Some(LabelSelector {
                        match_labels: Some(BTreeMap::from([(
                            POOL_LABEL.to_owned(),
                            self.name.clone(),
                        )])),
                        ..LabelSelector::default()
                    }),
                    match_label_keys: Some(vec![LWS_GROUP_KEY_LABEL.to_owned()]),
                    ..PodAffinityTerm::default()
                }]);
        }
        PodTemplateSpec {
            metadata: Some(kube::api::ObjectMeta {
                labels: Some(labels),
                annotations: pod.metadata.annotations,
                ..kube::api::ObjectMeta::default()
            }),
            spec: Some(spec),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::tests::{layout, pool};
    use serde_json::Value;

    /// `NAME`'s value or `fieldRef` path in a template's agent container.
    fn env<'a>(template: &'a Value, name: &str) -> &'a Value {
        let env = template["spec"]["containers"][0]["env"].as_array().unwrap();
        let var = env.iter().find(|e| e["name"] == name).unwrap();
        if var["value"].is_null() {
            &var["valueFrom"]["fieldRef"]["fieldPath"]
        } else {
            &var["value"]
        }
    }

    #[test]
    fn a_multi_pod_group_is_a_leader_and_workers_that_learn_their_place_from_lws() {
        let pool = pool(
            serde_json::json!({"model": {"source": "/m.gguf"}, "tensorParallelSize": 8,
            "replicas": 3, "rollout": {"maxSurge": 1, "maxUnavailable": 0}}),
        );
        let layout = layout(8, 2);
        let builder = ChildBuilder::new(&pool, &layout);
        let object = builder.leader_worker_set(3);
        assert_eq!(object.metadata.name.as_deref(), Some("llama-groups"));
        assert_eq!(
            object.metadata.owner_references.as_ref().unwrap()[0].kind,
            "InferencePool"
        );
        let spec = &object.data["spec"];
        assert_eq!(spec["replicas"], 3);
        assert_eq!(spec["startupPolicy"], "LeaderCreated");
        assert_eq!(
            spec["rolloutStrategy"]["rollingUpdateConfiguration"],
            serde_json::json!({"maxSurge": 1, "maxUnavailable": 0})
        );
        let group = &spec["leaderWorkerTemplate"];
        assert_eq!(group["size"], 2);
        assert_eq!(group["restartPolicy"], "RecreateGroupOnPodRestart");
        let (leader, worker) = (&group["leaderTemplate"], &group["workerTemplate"]);
        // Only leaders carry rank 0: the pool's Service selects them.
        assert_eq!(leader["metadata"]["labels"][RANK_LABEL], "0");
        assert!(worker["metadata"]["labels"].get(RANK_LABEL).is_none());
        for template in [leader, worker] {
            let labels = &template["metadata"]["labels"];
            assert_eq!(labels[POOL_LABEL], "llama");
            assert!(labels.get(GROUP_LABEL).is_none());
            assert!(template["spec"].get("hostname").is_none());
            assert!(template["spec"].get("subdomain").is_none());
            assert_eq!(
                template["metadata"]["annotations"]["parallax.dev/template-hash"],
                builder.template_hash()
            );
            assert_eq!(
                env(template, "PARALLAX_RANK"),
                "metadata.labels['leaderworkerset.sigs.k8s.io/worker-index']"
            );
            assert_eq!(
                env(template, "PARALLAX_GROUP"),
                "metadata.labels['leaderworkerset.sigs.k8s.io/group-index']"
            );
            assert_eq!(env(template, "PARALLAX_WORLD_SIZE"), "2");
            assert_eq!(
                env(template, "PARALLAX_LEADER_ADDRESS"),
                "$(LWS_LEADER_ADDRESS)"
            );
            let apart = &template["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                [0];
            assert_eq!(apart["matchLabelKeys"][0], LWS_GROUP_KEY_LABEL);
            assert_eq!(apart["topologyKey"], "kubernetes.io/hostname");
        }
    }

    #[test]
    fn a_one_pod_group_is_a_leader_alone() {
        let pool =
            pool(serde_json::json!({"model": {"source": "/m.gguf"}, "tensorParallelSize": 2}));
        let layout = layout(2, 1);
        let object = ChildBuilder::new(&pool, &layout).leader_worker_set(1);
        let group = &object.data["spec"]["leaderWorkerTemplate"];
        assert_eq!(group["size"], 1);
        assert!(group.get("leaderTemplate").is_none());
        assert_eq!(
            group["workerTemplate"]["metadata"]["labels"][RANK_LABEL],
            "0"
        );
        assert!(group["workerTemplate"]["spec"].get("affinity").is_none());
    }
}
