//! The pool's router: a Deployment of `parallax-agent route` (the agent's image, no GPU) that
//! finds the group leaders through a headless Service of their own and takes the pool's
//! Service in their place. Pure functions of the pool, as the rest of the children.

use crate::children::{
    ChildBuilder, POOL_LABEL, RANK_LABEL, flag, http_probe, pre_stop_pause, restricted_container,
    restricted_pod,
};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, PodSpec, PodTemplateSpec, ResourceRequirements, Service, ServiceSpec,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use parallax_crds::AGENT_HTTP_PORT;
use std::collections::BTreeMap;

/// Router pods carry this (with the pool's name), never the pool label: they are no group's.
pub const ROUTER_LABEL: &str = "parallax.dev/router";

pub fn deployment_name(pool: &str) -> String {
    format!("{pool}-router")
}

/// The group leaders' own headless Service: its name resolves to every leader's address.
pub fn leaders_service_name(pool: &str) -> String {
    format!("{pool}-leaders")
}

/// Labels of the router's pods, which the pool's Service selects.
pub fn router_labels(pool: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "parallax-router"),
        ("app.kubernetes.io/instance", pool),
        ("app.kubernetes.io/managed-by", "parallax-operator"),
        (ROUTER_LABEL, pool),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// How long the router of a pool that scales to zero holds a request while a group starts.
pub const WAKE_HOLD_SECONDS: u32 = 300;

/// How long a router pod may finish its streams after SIGTERM.
const ROUTER_GRACE_SECONDS: i64 = 60;

/// The router's children.
#[derive(Debug, Clone)]
pub struct RouterChildren {
    pub leaders: Service,
    pub deployment: Deployment,
    /// `<pool>-router`: a voluntary disruption (a node drain) takes one router pod at a time.
    pub pdb: PodDisruptionBudget,
}

impl ChildBuilder<'_> {
    /// The router's children, when the pool has one.
    pub fn router(&self) -> Option<RouterChildren> {
        self.pool.spec.router.enabled.then(|| RouterChildren {
            leaders: self.leaders_service(),
            deployment: self.router_deployment(),
            pdb: self.router_pdb(),
        })
    }

    /// At most one router pod disrupted at a time: with two or more the pool keeps a router
    /// through a drain; with one it changes nothing (its Service falls back to the leaders
    /// while no router pod is ready).
    fn router_pdb(&self) -> PodDisruptionBudget {
        self.disruption_budget(deployment_name(&self.name), 1, ROUTER_LABEL)
    }

    /// Every group leader, ready or not: the router reads each one's `/ready` itself, so it
    /// knows a waking group before kube-proxy would.
    fn leaders_service(&self) -> Service {
        Service {
            metadata: self.meta(leaders_service_name(&self.name)),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                publish_not_ready_addresses: Some(true),
                selector: Some(BTreeMap::from([
                    (POOL_LABEL.to_owned(), self.name.clone()),
                    (RANK_LABEL.to_owned(), "0".to_owned()),
                ])),
                ports: Some(vec![Self::http_port()]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn router_deployment(&self) -> Deployment {
        let spec = &self.pool.spec;
        let labels = router_labels(&self.name);
        let mut args = vec![
            "route".to_owned(),
            "--discover".to_owned(),
            format!("{}:{AGENT_HTTP_PORT}", leaders_service_name(&self.name)),
            "--host".to_owned(),
            "0.0.0.0".to_owned(),
            "--port".to_owned(),
            AGENT_HTTP_PORT.to_string(),
        ];
        // A pool that scales to zero wakes for the requests its router holds: they wait for a
        // group to start (the model loaded), not the minute a running pool's would.
        if spec.autoscaling.scale_to_zero_after_seconds.is_some()
            && flag(&spec.router.extra_args, "--hold-timeout").is_none()
        {
            args.extend(["--hold-timeout".to_owned(), WAKE_HOLD_SECONDS.to_string()]);
        }
        args.extend(spec.router.extra_args.iter().cloned());
        let container = Container {
            name: "router".into(),
            image: Some(self.image().to_owned()),
            image_pull_policy: spec.agent.image_pull_policy.clone(),
            args: Some(args),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: i32::from(AGENT_HTTP_PORT),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            }]),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_owned(), Quantity("100m".into())),
                    ("memory".to_owned(), Quantity("64Mi".into())),
                ])),
                limits: Some(BTreeMap::from([(
                    "memory".to_owned(),
                    Quantity("512Mi".into()),
                )])),
                ..ResourceRequirements::default()
            }),
            readiness_probe: Some(http_probe("/ready", 5, 3)),
            liveness_probe: Some(http_probe("/health", 10, 3)),
            lifecycle: Some(pre_stop_pause()),
            security_context: Some(restricted_container()),
            ..Container::default()
        };
        Deployment {
            metadata: self.meta(deployment_name(&self.name)),
            spec: Some(DeploymentSpec {
                replicas: Some(spec.router.replicas.max(1)),
                selector: LabelSelector {
                    match_labels: Some(labels.clone()),
                    ..LabelSelector::default()
                },
                // A new router is ready before an old one stops: the endpoint never goes dark.
                strategy: Some(DeploymentStrategy {
                    type_: Some("RollingUpdate".into()),
                    rolling_update: Some(RollingUpdateDeployment {
                        max_surge: Some(IntOrString::Int(1)),
                        max_unavailable: Some(IntOrString::Int(0)),
                    }),
                }),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![container],
                        termination_grace_period_seconds: Some(ROUTER_GRACE_SECONDS),
                        automount_service_account_token: Some(false),
                        enable_service_links: Some(false),
                        node_selector: (!spec.resources.node_selector.is_empty())
                            .then(|| spec.resources.node_selector.clone()),
                        tolerations: (!spec.resources.tolerations.is_empty())
                            .then(|| spec.resources.tolerations.clone()),
                        security_context: Some(restricted_pod()),
                        ..PodSpec::default()
                    }),
                },
                ..DeploymentSpec::default()
            }),
            status: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::children::tests::{layout, pool};
    use crate::children::{ChildBuilder, POOL_LABEL, pool_selector};
    use serde_json::json;

    #[test]
    fn the_router_finds_the_leaders_and_takes_the_pools_service() {
        let pool = pool(json!({
            "model": {"source": "hf://org/model"},
            "router": {"replicas": 2, "extraArgs": ["--queue-limit", "8"]},
        }));
        let layout = layout(1, 1);
        let builder = ChildBuilder::new(&pool, &layout).with_router_serving(true);
        let children = builder.children();
        let router = builder.router().expect("a router by default");

        let leaders = serde_json::to_value(&router.leaders).unwrap();
        assert_eq!(leaders["metadata"]["name"], "llama-leaders");
        assert_eq!(leaders["spec"]["clusterIP"], "None");
        assert_eq!(
            leaders["spec"]["selector"],
            json!({"parallax.dev/pool": "llama", "parallax.dev/rank": "0"})
        );

        let deployment = serde_json::to_value(&router.deployment).unwrap();
        assert_eq!(deployment["metadata"]["name"], "llama-router");
        assert_eq!(deployment["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        assert_eq!(deployment["spec"]["replicas"], 2);
        let pod = &deployment["spec"]["template"];
        let container = &pod["spec"]["containers"][0];
        assert_eq!(
            container["args"],
            json!([
                "route",
                "--discover",
                "llama-leaders:8000",
                "--host",
                "0.0.0.0",
                "--port",
                "8000",
                "--queue-limit",
                "8"
            ])
        );
        assert!(
            container["resources"]["limits"]
                .get("nvidia.com/gpu")
                .is_none()
        );
        assert_eq!(
            container["image"],
            serde_json::to_value(builder.image()).unwrap()
        );
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        // Router pods are no group's: nothing that selects the pool's pods selects them.
        let labels = pod["metadata"]["labels"].as_object().unwrap();
        assert!(!labels.contains_key(POOL_LABEL), "{labels:?}");
        assert_eq!(pool_selector("llama"), "parallax.dev/pool=llama");
        assert_eq!(
            deployment["spec"]["selector"]["matchLabels"],
            pod["metadata"]["labels"]
        );

        // One router pod at a time may be drained; the groups' budget does not count them.
        let pdb = serde_json::to_value(&router.pdb).unwrap();
        assert_eq!(pdb["metadata"]["name"], "llama-router");
        assert_eq!(pdb["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);
        let selected = pdb["spec"]["selector"]["matchLabels"].as_object().unwrap();
        assert!(selected.iter().all(|(k, v)| labels.get(k) == Some(v)));
        let groups = serde_json::to_value(&children.pdb).unwrap();
        let group_selector = groups["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap();
        assert!(!group_selector.iter().all(|(k, v)| labels.get(k) == Some(v)));

        // The pool's Service selects the router's pods once one is ready, the leaders before.
        let service = serde_json::to_value(&children.service).unwrap();
        assert_eq!(service["spec"]["selector"], pod["metadata"]["labels"]);
        let starting = ChildBuilder::new(&pool, &layout).children().service;
        assert_eq!(
            serde_json::to_value(starting).unwrap()["spec"]["selector"],
            json!({"parallax.dev/pool": "llama", "parallax.dev/rank": "0"})
        );
    }

    #[test]
    fn without_a_router_the_service_selects_the_leaders() {
        let pool = pool(json!({
            "model": {"source": "hf://org/model"},
            "router": {"enabled": false},
        }));
        let layout = layout(1, 1);
        let builder = ChildBuilder::new(&pool, &layout).with_router_serving(true);
        assert!(builder.router().is_none());
        let service = serde_json::to_value(builder.children().service).unwrap();
        assert_eq!(
            service["spec"]["selector"],
            json!({"parallax.dev/pool": "llama", "parallax.dev/rank": "0"})
        );
    }

    #[test]
    fn a_router_that_wakes_its_pool_holds_requests_while_a_group_starts() {
        let args = |spec: serde_json::Value| {
            let pool = pool(spec);
            let layout = layout(1, 1);
            let router = ChildBuilder::new(&pool, &layout).router().unwrap();
            serde_json::to_value(&router.deployment).unwrap()["spec"]["template"]["spec"]
                ["containers"][0]["args"]
                .clone()
        };
        let zero = json!({"model": {"source": "hf://org/model"}, "minReplicas": 0,
            "autoscaling": {"enabled": true, "scaleToZeroAfterSeconds": 600}});
        let held = args(zero.clone());
        let held = held.as_array().unwrap();
        assert_eq!(
            held[held.len() - 2..],
            [json!("--hold-timeout"), json!("300")]
        );
        // The pool's own value wins.
        let mut own = zero;
        own["router"] = json!({"extraArgs": ["--hold-timeout", "900"]});
        let own = args(own);
        assert_eq!(
            own.as_array()
                .unwrap()
                .iter()
                .filter(|a| *a == "--hold-timeout")
                .count(),
            1
        );
        assert!(own.as_array().unwrap().contains(&json!("900")));
        // A pool that never scales to zero keeps the router's default.
        let plain = args(json!({"model": {"source": "hf://org/model"}}));
        assert!(!plain.as_array().unwrap().contains(&json!("--hold-timeout")));
    }
}
