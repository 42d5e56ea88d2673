//! What GPUs the cluster offers a pool: Nodes filtered by the pool's placement, read as
//! (GPU count, memory per GPU). Pure functions over `Node` objects.

use k8s_openapi::api::core::v1::{Node, Taint, Toleration};
use parallax_crds::GpuResources;
use parallax_crds::quantity::parse_bytes_str;

/// GPU Feature Discovery label holding the memory of one GPU in MiB.
pub const GPU_MEMORY_LABEL: &str = "nvidia.com/gpu.memory";
/// GPU Feature Discovery label naming the GPU product.
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";

/// A node a pool's pods may land on, with its GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuNode {
    pub name: String,
    /// Allocatable GPUs.
    pub gpus: u32,
    /// Memory of one GPU in bytes.
    pub memory_per_gpu: u64,
    pub product: Option<String>,
}

/// The nodes that fit a pool, and the ones that nearly did (for messages).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuInventory {
    pub nodes: Vec<GpuNode>,
    /// Nodes that match placement and have GPUs but no known GPU memory.
    pub unknown_memory: Vec<String>,
}

impl GpuInventory {
    /// Reads every node that the pool's selector, tolerations and GPU resource admit.
    pub fn from_nodes<'a>(
        nodes: impl IntoIterator<Item = &'a Node>,
        resources: &GpuResources,
    ) -> Self {
        let mut inventory = Self::default();
        for node in nodes {
            let Some(name) = node.metadata.name.clone() else {
                continue;
            };
            if !admits(node, resources) {
                continue;
            }
            let gpus = allocatable_gpus(node, &resources.gpu_resource_name);
            if gpus == 0 {
                continue;
            }
            let labels = node.metadata.labels.as_ref();
            let product = labels.and_then(|l| l.get(GPU_PRODUCT_LABEL)).cloned();
            let memory = labels
                .and_then(|l| l.get(GPU_MEMORY_LABEL))
                .and_then(|mib| mib.parse::<u64>().ok())
                .map(|mib| mib << 20)
                .or_else(|| product.as_deref().and_then(memory_of_product));
            match memory {
                Some(memory_per_gpu) => inventory.nodes.push(GpuNode {
                    name,
                    gpus,
                    memory_per_gpu,
                    product,
                }),
                None => inventory.unknown_memory.push(name),
            }
        }
        inventory.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        inventory
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Most GPUs on one node.
    pub fn max_gpus_per_node(&self) -> u32 {
        self.nodes.iter().map(|n| n.gpus).max().unwrap_or(0)
    }
}

/// The nodes lost to their pods: not Ready for longer than a grace period. A node that is gone
/// altogether is not listed: Kubernetes' pod garbage collector deletes the pods bound to it, and
/// their groups are then topped up as usual (a node not yet seen is never taken for lost).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeHealth {
    lost: std::collections::BTreeSet<String>,
}

/// How long a node may be NotReady (or Unknown) before the groups on it are recreated elsewhere:
/// past the taint-based eviction default (300 s), so a kubelet restart or a short partition does
/// not move anything.
pub const NODE_LOST_SECONDS: i64 = 360;

impl NodeHealth {
    /// From the nodes at `now` (Unix seconds).
    pub fn from_nodes<'a>(nodes: impl IntoIterator<Item = &'a Node>, now: i64) -> Self {
        let lost = nodes
            .into_iter()
            .filter(|node| {
                let ready = node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
                ready.is_some_and(|c| {
                    c.status != "True"
                        && c.last_transition_time
                            .as_ref()
                            .is_some_and(|t| now - t.0.as_second() > NODE_LOST_SECONDS)
                })
            })
            .filter_map(|node| node.metadata.name.clone())
            .collect();
        Self { lost }
    }

    /// Whether a pod on `node` is lost with it.
    pub fn is_lost(&self, node: &str) -> bool {
        self.lost.contains(node)
    }
}

fn allocatable_gpus(node: &Node, resource: &str) -> u32 {
    node.status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get(resource))
        .and_then(|q| parse_bytes_str(&q.0).ok())
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

fn admits(node: &Node, resources: &GpuResources) -> bool {
    let spec = node.spec.as_ref();
    if spec.and_then(|s| s.unschedulable).unwrap_or(false) {
        return false;
    }
    let labels = node.metadata.labels.as_ref();
    let selected = resources
        .node_selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
    let taints = spec.and_then(|s| s.taints.as_deref()).unwrap_or_default();
    selected
        && taints
            .iter()
            .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
            .all(|t| resources.tolerations.iter().any(|tol| tolerates(tol, t)))
}

/// The scheduler's rule: empty key with `Exists` tolerates everything; otherwise keys match and
/// the value matches for `Equal` (the default operator); an empty effect matches every effect.
fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let exists = toleration.operator.as_deref() == Some("Exists");
    let key = toleration.key.as_deref().unwrap_or("");
    if key.is_empty() && !exists {
        return false;
    }
    let key_matches = key.is_empty() || key == taint.key;
    let value_matches =
        exists || toleration.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("");
    let effect_matches = toleration
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    key_matches && value_matches && effect_matches
}

/// Memory per GPU for products whose name says it (`NVIDIA-H100-80GB-HBM3` → 80 GB) or that
/// come in one size; decimal gigabytes, which errs on the small side.
fn memory_of_product(product: &str) -> Option<u64> {
    let gigabytes = product
        .split(['-', '_', ' '])
        .find_map(|part| part.strip_suffix("GB")?.parse::<u64>().ok())
        .or_else(|| {
            let p = product.to_ascii_uppercase();
            [
                ("H200", 141),
                ("H100", 80),
                ("L40S", 48),
                ("L40", 48),
                ("RTX-4090", 24),
                ("L4", 24),
            ]
            .iter()
            .find(|(name, _)| p.contains(name))
            .map(|&(_, gb)| gb)
        })?;
    Some(gigabytes * 1_000_000_000)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::ObjectMeta;

    /// A node with `gpus` GPUs of `memory_mib` each (label omitted when `None`).
    pub(crate) fn gpu_node(name: &str, gpus: u32, memory_mib: Option<u64>) -> Node {
        let mut labels = std::collections::BTreeMap::new();
        if let Some(mib) = memory_mib {
            labels.insert(GPU_MEMORY_LABEL.to_owned(), mib.to_string());
        }
        Node {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec::default()),
            status: Some(NodeStatus {
                allocatable: Some(
                    [("nvidia.com/gpu".to_owned(), Quantity(gpus.to_string()))].into(),
                ),
                ..NodeStatus::default()
            }),
        }
    }

    #[test]
    fn a_node_down_past_the_grace_period_is_lost() {
        let with_ready = |name: &str, status: &str, since: i64| {
            let mut node = gpu_node(name, 8, Some(81559));
            node.status.as_mut().unwrap().conditions = Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: status.into(),
                last_transition_time: Some(Time(jiff::Timestamp::from_second(since).unwrap())),
                ..NodeCondition::default()
            }]);
            node
        };
        let nodes = [
            with_ready("up", "True", 0),
            with_ready("down-long", "False", 0),
            with_ready("unknown-long", "Unknown", 0),
            with_ready("down-briefly", "False", 1000 - NODE_LOST_SECONDS + 10),
        ];
        let health = NodeHealth::from_nodes(&nodes, 1000);
        let lost: Vec<&str> = ["up", "down-long", "unknown-long", "down-briefly", "gone"]
            .into_iter()
            .filter(|n| health.is_lost(n))
            .collect();
        assert_eq!(lost, ["down-long", "unknown-long"]);
    }

    #[test]
    fn reads_gpus_and_memory_from_labels_or_product() {
        let mut h100 = gpu_node("a", 8, None);
        h100.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(GPU_PRODUCT_LABEL.into(), "NVIDIA-H100-80GB-HBM3".into());
        let nodes = [
            gpu_node("b", 4, Some(81559)),
            h100,
            gpu_node("c", 2, None),
            gpu_node("cpu", 0, Some(1)),
        ];
        let inv = GpuInventory::from_nodes(&nodes, &GpuResources::default());
        assert_eq!(inv.nodes.len(), 2);
        assert_eq!(inv.nodes[0].memory_per_gpu, 80_000_000_000);
        assert_eq!(inv.nodes[1].memory_per_gpu, 81559 << 20);
        assert_eq!(inv.unknown_memory, vec!["c".to_owned()]);
        assert_eq!(inv.max_gpus_per_node(), 8);
    }

    #[test]
    fn placement_filters_by_selector_taints_and_cordon() {
        let mut tainted = gpu_node("tainted", 8, Some(81559));
        tainted.spec.as_mut().unwrap().taints = Some(vec![Taint {
            key: "nvidia.com/gpu".into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        }]);
        let mut cordoned = gpu_node("cordoned", 8, Some(81559));
        cordoned.spec.as_mut().unwrap().unschedulable = Some(true);
        let mut pool_node = gpu_node("pool", 8, Some(81559));
        pool_node
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("pool".into(), "llm".into());
        let nodes = [tainted, cordoned, pool_node];

        let default = GpuInventory::from_nodes(&nodes, &GpuResources::default());
        assert_eq!(
            default
                .nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>(),
            ["pool"]
        );

        let tolerant = GpuResources {
            tolerations: vec![Toleration {
                key: Some("nvidia.com/gpu".into()),
                operator: Some("Exists".into()),
                ..Toleration::default()
            }],
            ..GpuResources::default()
        };
        let inv = GpuInventory::from_nodes(&nodes, &tolerant);
        assert_eq!(
            inv.nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>(),
            ["pool", "tainted"]
        );

        let selective = GpuResources {
            node_selector: [("pool".to_owned(), "llm".to_owned())].into(),
            ..tolerant
        };
        let inv = GpuInventory::from_nodes(&nodes, &selective);
        assert_eq!(
            inv.nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>(),
            ["pool"]
        );
    }
}
