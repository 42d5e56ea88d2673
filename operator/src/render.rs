//! `parallax-operator render`: prints the children a pool would get, without a cluster — for
//! review, GitOps diffs and manifest validation. The same builders the reconcile uses.

use crate::children::ChildBuilder;
use crate::inventory::{GPU_MEMORY_LABEL, GpuInventory};
use crate::lws;
use crate::tp;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use parallax_crds::{GroupWorkload, InferencePool};
use serde::Serialize;
use serde_json::json;

/// Nodes to size `tensorParallelSize: auto` against: `count` identical GPU nodes.
#[derive(Debug, Clone, Copy)]
pub struct AssumedNodes {
    pub count: u32,
    pub gpus_per_node: u32,
    pub gpu_memory_mib: u64,
}

/// Renders every child of the pool in `pool_yaml` as a multi-document YAML stream.
pub fn render(pool_yaml: &str, nodes: AssumedNodes) -> Result<String, String> {
    let mut pool: InferencePool =
        serde_yaml::from_str(pool_yaml).map_err(|e| format!("not an InferencePool: {e}"))?;
    if pool.metadata.namespace.is_none() {
        pool.metadata.namespace = Some("default".into());
    }
    pool.metadata
        .uid
        .get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".into());
    // The assumed nodes match the pool's placement.
    let mut labels = pool.spec.resources.node_selector.clone();
    labels.insert(GPU_MEMORY_LABEL.into(), nodes.gpu_memory_mib.to_string());
    let nodes: Vec<Node> = (0..nodes.count)
        .map(|i| {
            serde_json::from_value(json!({
                "metadata": {"name": format!("gpu-{i}"), "labels": labels},
                "status": {"allocatable": {pool.spec.resources.gpu_resource_name.clone(): nodes.gpus_per_node.to_string()}}
            }))
            .expect("a node from literals")
        })
        .collect();
    let inventory = GpuInventory::from_nodes(&nodes, &pool.spec.resources);
    let layout =
        tp::resolve(&pool.spec, &inventory).map_err(|e| format!("{}: {e}", pool.name_any()))?;
    // As the pool runs once its router is ready (before that its Service selects the leaders).
    let builder = ChildBuilder::new(&pool, &layout).with_router_serving(true);
    let children = builder.children();
    let mut out = format!("# {}: {}\n", pool.name_any(), layout.reason);
    push(&mut out, &children.config_map, "v1", "ConfigMap")?;
    push(&mut out, &children.service, "v1", "Service")?;
    push(&mut out, &children.headless_service, "v1", "Service")?;
    push(&mut out, &children.pdb, "policy/v1", "PodDisruptionBudget")?;
    if let Some(router) = builder.router() {
        push(&mut out, &router.leaders, "v1", "Service")?;
        push(&mut out, &router.deployment, "apps/v1", "Deployment")?;
        push(&mut out, &router.pdb, "policy/v1", "PodDisruptionBudget")?;
    }
    let replicas = pool.spec.replicas.max(0) as u32;
    match pool.spec.group_workload {
        GroupWorkload::Pods => {
            for group in 0..replicas {
                for rank in 0..layout.pods_per_group {
                    push(&mut out, &builder.pod(group, rank), "v1", "Pod")?;
                }
            }
        }
        GroupWorkload::LeaderWorkerSet => {
            let resource = lws::resource();
            push(
                &mut out,
                &builder.leader_worker_set(replicas),
                &resource.api_version,
                &resource.kind,
            )?;
        }
    }
    Ok(out)
}

fn push(
    out: &mut String,
    object: &impl Serialize,
    api_version: &str,
    kind: &str,
) -> Result<(), String> {
    let mut value = serde_json::to_value(object).map_err(|e| e.to_string())?;
    value["apiVersion"] = api_version.into();
    value["kind"] = kind.into();
    out.push_str("---\n");
    out.push_str(&serde_yaml::to_string(&value).map_err(|e| e.to_string())?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_child_of_a_multi_node_pool() {
        let pool = "apiVersion: parallax.dev/v1alpha1\nkind: InferencePool\nmetadata: {name: big}\nspec:\n  model: {source: /m.gguf}\n  tensorParallelSize: 8\n  replicas: 2\n";
        let yaml = render(
            pool,
            AssumedNodes {
                count: 4,
                gpus_per_node: 4,
                gpu_memory_mib: 81559,
            },
        )
        .unwrap();
        assert_eq!(yaml.matches("kind: Pod\n").count(), 4, "2 groups × 2 pods");
        assert!(yaml.contains("name: big-1-1"));
        assert!(yaml.contains("kind: PodDisruptionBudget"));
    }

    #[test]
    fn a_pool_that_does_not_fit_is_an_error_naming_it() {
        let pool = "apiVersion: parallax.dev/v1alpha1\nkind: InferencePool\nmetadata: {name: huge}\nspec:\n  model: {source: /m.gguf}\n  tensorParallelSize: 16\n";
        let err = render(
            pool,
            AssumedNodes {
                count: 1,
                gpus_per_node: 8,
                gpu_memory_mib: 81559,
            },
        )
        .unwrap_err();
        assert!(
            err.starts_with("huge: tensorParallelSize 16 needs 2 nodes"),
            "{err}"
        );
    }
}
