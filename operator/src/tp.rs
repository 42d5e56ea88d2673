//! Tensor-parallel size: how many GPUs shard one copy of the model, and how a group of that size
//! is laid over nodes. A pure function of the pool spec and the GPU inventory.

use crate::inventory::GpuInventory;
use crate::status::Reason;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use parallax_crds::shape::ShapeError;
use parallax_crds::{InferencePool, InferencePoolSpec, ParallelismPreference};
use std::fmt;

/// The resolved layout of every group of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLayout {
    /// GPUs per group.
    pub tensor_parallel_size: u32,
    /// Pods per group: 1 when one node holds the group, else one pod per node.
    pub pods_per_group: u32,
    /// GPUs each pod requests.
    pub gpus_per_pod: u32,
    /// Why, in a sentence for status and events.
    pub reason: String,
    /// GPU products (`nvidia.com/gpu.product`) whose memory the size was chosen for; pods land
    /// only on nodes of these. Empty: any (an explicit size, or nodes that do not say).
    pub gpu_products: Vec<String>,
    /// Resolved before any GPU node was seen: not pinned, resolved again next time.
    pub provisional: bool,
}

/// The layout status pinned for the pool's current spec, if any: a cordon, a node gone or a
/// kubelet restart does not move a pool's groups; only a spec change resolves it again.
pub fn pinned(pool: &InferencePool) -> Option<GroupLayout> {
    let status = pool.status.as_ref()?;
    if status.layout_generation.is_none() || status.layout_generation != pool.metadata.generation {
        return None;
    }
    let positive = |n: Option<i32>| n.and_then(|n| u32::try_from(n).ok()).filter(|n| *n > 0);
    Some(GroupLayout {
        tensor_parallel_size: positive(status.tensor_parallel_size)?,
        pods_per_group: positive(status.pods_per_group)?,
        gpus_per_pod: positive(status.gpus_per_pod)?,
        reason: status.tensor_parallel_reason.clone().unwrap_or_default(),
        gpu_products: status.gpu_products.clone(),
        provisional: false,
    })
}

/// Why no layout could be chosen. Each variant is a `Ready=False` reason.
#[derive(Debug, Clone, PartialEq)]
pub enum LayoutError {
    /// No node admits the pool (selector, taints, GPU resource, known memory).
    NoGpuNodes {
        resource: String,
        unknown_memory: Vec<String>,
    },
    /// `model.shape` cannot be read.
    InvalidShape(ShapeError),
    /// Even the largest possible group cannot hold the model.
    InsufficientGpuMemory {
        need: u64,
        weights: u64,
        kv: u64,
        largest_group: u64,
        largest_gpus: u32,
    },
    /// An explicit size spans more nodes than the cluster has.
    NotEnoughNodes {
        size: u32,
        gpus_per_node: u32,
        needed: u32,
        found: u32,
    },
    /// `tensorParallelSize` is neither `auto` nor a positive power of two.
    InvalidSize(String),
    /// A tensor-parallel size that does not divide the model's attention and KV heads.
    IndivisibleHeads {
        size: u32,
        heads: u64,
        kv_heads: u64,
    },
}

impl LayoutError {
    /// The condition reason (CamelCase, stable).
    pub fn reason(&self) -> Reason {
        match self {
            Self::NoGpuNodes { .. } => Reason::NoGpuNodes,
            Self::InvalidShape(_) | Self::InvalidSize(_) | Self::IndivisibleHeads { .. } => {
                Reason::InvalidSpec
            }
            Self::InsufficientGpuMemory { .. } => Reason::InsufficientGpuMemory,
            Self::NotEnoughNodes { .. } => Reason::NotEnoughNodes,
        }
    }
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoGpuNodes {
                resource,
                unknown_memory,
            } => {
                write!(
                    f,
                    "no schedulable Node matching the pool's nodeSelector and tolerations has allocatable {resource}"
                )?;
                if !unknown_memory.is_empty() {
                    write!(
                        f,
                        " with a known GPU memory (label nvidia.com/gpu.memory missing on {})",
                        unknown_memory.join(", ")
                    )?;
                }
                Ok(())
            }
            Self::InvalidShape(e) => write!(f, "{e}"),
            Self::InvalidSize(s) => write!(
                f,
                "tensorParallelSize {s:?} is neither auto nor a power of two"
            ),
            Self::IndivisibleHeads {
                size,
                heads,
                kv_heads,
            } => write!(
                f,
                "tensorParallelSize {size} does not divide the model's {heads} attention heads and {kv_heads} KV heads (nor is it a multiple of the KV heads): every GPU of a group needs whole heads"
            ),
            Self::InsufficientGpuMemory {
                need,
                weights,
                kv,
                largest_group,
                largest_gpus,
            } => write!(
                f,
                "the model needs {} (weights {} + KV cache {}) but the largest group the cluster offers, {largest_gpus} GPUs, holds {} at the configured memory fraction",
                gib(*need),
                gib(*weights),
                gib(*kv),
                gib(*largest_group)
            ),
            Self::NotEnoughNodes {
                size,
                gpus_per_node,
                needed,
                found,
            } => write!(
                f,
                "tensorParallelSize {size} needs {needed} nodes with {gpus_per_node} free GPUs each; {found} found"
            ),
        }
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Largest power of two not above `n` (0 for 0).
fn floor_pow2(n: u32) -> u32 {
    if n == 0 {
        0
    } else {
        1 << (31 - n.leading_zeros())
    }
}

/// A way to lay out a group: `pods` pods of `gpus_per_pod` GPUs on nodes whose GPUs have
/// `memory` bytes.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    size: u32,
    pods: u32,
    gpus_per_pod: u32,
    memory: u64,
}

/// Chooses the group layout for `spec` on `inventory`.
pub fn resolve(
    spec: &InferencePoolSpec,
    inventory: &GpuInventory,
) -> Result<GroupLayout, LayoutError> {
    let size = match &spec.tensor_parallel_size {
        IntOrString::Int(n) if *n > 0 && (*n as u32).is_power_of_two() => *n as u32,
        IntOrString::String(s) if s == "auto" => return auto(spec, inventory),
        IntOrString::String(s) => match s.parse::<u32>() {
            Ok(n) if n.is_power_of_two() => n,
            _ => return Err(LayoutError::InvalidSize(s.clone())),
        },
        IntOrString::Int(n) => return Err(LayoutError::InvalidSize(n.to_string())),
    };
    // Where the shape says how many heads the model has, the size must divide them.
    if let Some(shape) = &spec.model.shape {
        let shape = shape.resolve().map_err(LayoutError::InvalidShape)?;
        if let Some((heads, kv_heads)) = shape.heads
            && !shape.splits_into(u64::from(size))
        {
            return Err(LayoutError::IndivisibleHeads {
                size,
                heads,
                kv_heads,
            });
        }
    }
    explicit(size, inventory)
}

fn explicit(size: u32, inventory: &GpuInventory) -> Result<GroupLayout, LayoutError> {
    let per_node = floor_pow2(inventory.max_gpus_per_node());
    if inventory.is_empty() || size <= per_node {
        let reason = if inventory.is_empty() {
            format!(
                "tensorParallelSize {size} from the spec; no GPU node seen yet, so one pod requests all {size} GPUs"
            )
        } else {
            format!("tensorParallelSize {size} from the spec fits one node")
        };
        return Ok(GroupLayout {
            tensor_parallel_size: size,
            pods_per_group: 1,
            gpus_per_pod: size,
            reason,
            gpu_products: Vec::new(),
            provisional: inventory.is_empty(),
        });
    }
    let needed = size / per_node;
    let found = inventory
        .nodes
        .iter()
        .filter(|n| n.gpus >= per_node)
        .count() as u32;
    if found < needed {
        return Err(LayoutError::NotEnoughNodes {
            size,
            gpus_per_node: per_node,
            needed,
            found,
        });
    }
    Ok(GroupLayout {
        tensor_parallel_size: size,
        pods_per_group: needed,
        gpus_per_pod: per_node,
        reason: format!(
            "tensorParallelSize {size} from the spec spans {needed} nodes of {per_node} GPUs"
        ),
        gpu_products: Vec::new(),
        provisional: false,
    })
}

fn auto(spec: &InferencePoolSpec, inventory: &GpuInventory) -> Result<GroupLayout, LayoutError> {
    let shape = spec
        .model
        .shape
        .as_ref()
        .ok_or(LayoutError::InvalidShape(ShapeError::Missing("preset")))?
        .resolve()
        .map_err(LayoutError::InvalidShape)?;
    if inventory.is_empty() {
        return Err(LayoutError::NoGpuNodes {
            resource: spec.resources.gpu_resource_name.clone(),
            unknown_memory: inventory.unknown_memory.clone(),
        });
    }
    let batch = spec.batching.max_batch_size.max(1) as u64;
    let kv = shape.kv_cache_bytes(batch, spec.kv_cache.dtype.bytes_per_element());
    let need = shape.weight_bytes.saturating_add(kv);
    let fraction = spec
        .kv_cache
        .gpu_memory_fraction
        .clamp(f64::MIN_POSITIVE, 1.0);
    let usable = |c: &Candidate| (c.size as f64 * c.memory as f64 * fraction) as u64;

    // Every layout the cluster offers: a power of two of one node's GPUs, or whole nodes of the
    // same GPUs side by side (a power of two of them).
    let mut candidates = Vec::new();
    for node in &inventory.nodes {
        let per_node = floor_pow2(node.gpus);
        let mut size = 1;
        while size <= per_node {
            candidates.push(Candidate {
                size,
                pods: 1,
                gpus_per_pod: size,
                memory: node.memory_per_gpu,
            });
            size *= 2;
        }
        let peers = inventory
            .nodes
            .iter()
            .filter(|n| n.gpus >= per_node && n.memory_per_gpu >= node.memory_per_gpu)
            .count() as u32;
        let mut pods = 2;
        while pods <= peers {
            candidates.push(Candidate {
                size: pods * per_node,
                pods,
                gpus_per_pod: per_node,
                memory: node.memory_per_gpu,
            });
            pods *= 2;
        }
    }
    let latency = spec.parallelism_preference == ParallelismPreference::Latency;
    let fitting: Vec<&Candidate> = candidates.iter().filter(|c| usable(c) >= need).collect();
    // Every GPU of a group holds whole attention and KV heads.
    let splitting: Vec<&Candidate> = fitting
        .iter()
        .copied()
        .filter(|c| shape.splits_into(u64::from(c.size)))
        .collect();
    let order = |c: &&Candidate| (c.size, c.pods, std::cmp::Reverse(c.memory));
    let chosen = splitting
        .iter()
        .copied()
        // Latency wants a whole node at least: drop single-node layouts smaller than the node.
        .filter(|c| {
            !latency
                || c.pods > 1
                || inventory
                    .nodes
                    .iter()
                    .any(|n| floor_pow2(n.gpus) == c.size && n.memory_per_gpu == c.memory)
        })
        .min_by_key(order)
        // A whole node that would split heads: the largest group that does not.
        .or_else(|| {
            latency
                .then(|| splitting.iter().copied().max_by_key(order))
                .flatten()
        });
    if let (None, Some(smallest), Some((heads, kv_heads))) = (
        chosen,
        fitting.iter().copied().min_by_key(order),
        shape.heads,
    ) && splitting.is_empty()
    {
        return Err(LayoutError::IndivisibleHeads {
            size: smallest.size,
            heads,
            kv_heads,
        });
    }
    let Some(c) = chosen.copied() else {
        let largest = candidates
            .iter()
            .max_by_key(|c| usable(c))
            .copied()
            .unwrap_or(Candidate {
                size: 0,
                pods: 0,
                gpus_per_pod: 0,
                memory: 0,
            });
        return Err(LayoutError::InsufficientGpuMemory {
            need,
            weights: shape.weight_bytes,
            kv,
            largest_group: usable(&largest),
            largest_gpus: largest.size,
        });
    };
    let placement = if c.pods == 1 {
        "on one node".to_owned()
    } else {
        format!("across {} nodes of {} GPUs", c.pods, c.gpus_per_pod)
    };
    Ok(GroupLayout {
        tensor_parallel_size: c.size,
        pods_per_group: c.pods,
        gpus_per_pod: c.gpus_per_pod,
        gpu_products: products_for(inventory, &c, |c| usable(c) >= need),
        provisional: false,
        reason: format!(
            "auto ({}): {} GPU(s) of {} {placement} give {} at memory fraction {fraction} for the {} needed (weights {} + KV cache {} for {batch} sequences × {} tokens)",
            if latency { "latency" } else { "throughput" },
            c.size,
            gib(c.memory),
            gib(usable(&c)),
            gib(need),
            gib(shape.weight_bytes),
            gib(kv),
            shape.context_length,
        ),
    })
}

/// The products of every node that can hold a pod of `c` (GPUs enough, whose memory holds the
/// model at `c`'s size: `usable`); none when such a node does not name its product (an affinity
/// would shut it out).
fn products_for(
    inventory: &GpuInventory,
    c: &Candidate,
    holds: impl Fn(&Candidate) -> bool,
) -> Vec<String> {
    let hosts = inventory.nodes.iter().filter(|n| {
        n.gpus >= c.gpus_per_pod
            && holds(&Candidate {
                memory: n.memory_per_gpu,
                ..*c
            })
    });
    let products: Option<Vec<String>> = hosts.map(|n| n.product.clone()).collect();
    let mut products = products.unwrap_or_default();
    products.sort();
    products.dedup();
    products
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::tests::gpu_node;
    use k8s_openapi::api::core::v1::Node;
    use serde_json::json;

    const H100_MIB: u64 = 81559;

    fn spec(value: serde_json::Value) -> InferencePoolSpec {
        serde_json::from_value(value).unwrap()
    }

    fn inventory(nodes: &[(&str, u32, u64)]) -> GpuInventory {
        let nodes: Vec<_> = nodes
            .iter()
            .map(|(n, g, m)| gpu_node(n, *g, Some(*m)))
            .collect();
        GpuInventory::from_nodes(&nodes, &Default::default())
    }

    fn preset(name: &str) -> serde_json::Value {
        json!({"model": {"source": "hf://x/y", "shape": {"preset": name}}})
    }

    #[test]
    fn auto_names_the_products_whose_memory_it_counted_on() {
        let labelled = |name: &str, gpus: u32, mib: u64, product: Option<&str>| {
            let mut node = gpu_node(name, gpus, Some(mib));
            if let Some(product) = product {
                node.metadata
                    .labels
                    .as_mut()
                    .unwrap()
                    .insert(crate::inventory::GPU_PRODUCT_LABEL.into(), product.into());
            }
            node
        };
        let nodes = [
            labelled("a", 8, H100_MIB, Some("NVIDIA-H100-80GB-HBM3")),
            labelled("b", 8, 143_771, Some("NVIDIA-H200")),
            labelled("c", 8, 24_576, Some("NVIDIA-L4")),
        ];
        let on = |nodes: &[Node]| {
            resolve(
                &spec(preset("llama-3.1-70b")),
                &GpuInventory::from_nodes(nodes, &Default::default()),
            )
            .unwrap()
        };
        // Four GPUs of 141 GB hold 70B and its cache (291 GiB); four of 80 GB do not: the H200
        // alone.
        let layout = on(&nodes);
        assert_eq!(layout.tensor_parallel_size, 4, "{}", layout.reason);
        assert_eq!(layout.gpu_products, ["NVIDIA-H200"]);
        // 8B for 8 sequences on one GPU (25 GB): the H100 and the H200 hold it, the L4 does not.
        let mut eight = preset("llama-3.1-8b");
        eight["batching"] = json!({"maxBatchSize": 8});
        let small = resolve(
            &spec(eight),
            &GpuInventory::from_nodes(&nodes, &Default::default()),
        )
        .unwrap();
        assert_eq!(small.tensor_parallel_size, 1, "{}", small.reason);
        assert_eq!(small.gpu_products, ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H200"]);
        assert!(!layout.provisional);
        // A node that fits but does not say what it is: no affinity that would shut it out.
        let unnamed = [nodes[1].clone(), labelled("d", 8, 143_771, None)];
        assert!(on(&unnamed).gpu_products.is_empty());
        // An explicit size before any node is seen is provisional.
        let explicit = resolve(
            &spec(json!({"model": {"source": "/m"}, "tensorParallelSize": 4})),
            &GpuInventory::default(),
        )
        .unwrap();
        assert!(explicit.provisional && explicit.gpu_products.is_empty());
    }

    #[test]
    fn a_layout_is_pinned_to_the_spec_generation_it_was_resolved_for() {
        let mut pool = InferencePool::new("p", spec(preset("llama-3.1-8b")));
        pool.metadata.generation = Some(4);
        assert_eq!(pinned(&pool), None, "nothing resolved yet");
        pool.status = Some(parallax_crds::InferencePoolStatus {
            tensor_parallel_size: Some(2),
            pods_per_group: Some(1),
            gpus_per_pod: Some(2),
            tensor_parallel_reason: Some("auto".into()),
            gpu_products: vec!["NVIDIA-H100-80GB-HBM3".into()],
            layout_generation: Some(4),
            ..Default::default()
        });
        let layout = pinned(&pool).unwrap();
        assert_eq!(
            (
                layout.tensor_parallel_size,
                layout.pods_per_group,
                layout.gpus_per_pod
            ),
            (2, 1, 2)
        );
        assert_eq!(layout.gpu_products, ["NVIDIA-H100-80GB-HBM3"]);
        pool.metadata.generation = Some(5);
        assert_eq!(pinned(&pool), None, "a spec change resolves again");
    }

    #[test]
    fn a_small_model_takes_one_gpu() {
        let layout = resolve(
            &spec(preset("llama-3.2-1b")),
            &inventory(&[("a", 8, H100_MIB)]),
        )
        .unwrap();
        assert_eq!(
            (
                layout.tensor_parallel_size,
                layout.pods_per_group,
                layout.gpus_per_pod
            ),
            (1, 1, 1)
        );
        assert!(
            layout.reason.contains("auto (throughput)"),
            "{}",
            layout.reason
        );
    }

    #[test]
    fn an_8b_model_with_a_full_kv_cache_takes_two_h100s() {
        // 16.1 GB weights + 64 × 8192 × 2 × 32 × 1024 × 2 B = 68.7 GB KV > 0.9 × 85.5 GB.
        let layout = resolve(
            &spec(preset("llama-3.1-8b")),
            &inventory(&[("a", 8, H100_MIB)]),
        )
        .unwrap();
        assert_eq!((layout.tensor_parallel_size, layout.pods_per_group), (2, 1));
    }

    #[test]
    fn latency_preference_takes_the_whole_node() {
        let mut s = spec(preset("llama-3.2-1b"));
        s.parallelism_preference = ParallelismPreference::Latency;
        let layout = resolve(&s, &inventory(&[("a", 8, H100_MIB)])).unwrap();
        assert_eq!(
            (
                layout.tensor_parallel_size,
                layout.pods_per_group,
                layout.gpus_per_pod
            ),
            (8, 1, 8)
        );
    }

    #[test]
    fn a_405b_model_spans_two_eight_gpu_nodes() {
        let inv = inventory(&[("a", 8, H100_MIB), ("b", 8, H100_MIB), ("c", 8, H100_MIB)]);
        let layout = resolve(&spec(preset("llama-3.1-405b")), &inv).unwrap();
        assert_eq!(
            (
                layout.tensor_parallel_size,
                layout.pods_per_group,
                layout.gpus_per_pod
            ),
            (16, 2, 8)
        );
        assert!(
            layout.reason.contains("across 2 nodes of 8 GPUs"),
            "{}",
            layout.reason
        );
    }

    #[test]
    fn prefers_the_node_whose_gpus_need_fewer_of_them() {
        // 70B needs ≈ 313 GB: 4 × 141 GB H200s beat 8 × 80 GB H100s.
        let inv = inventory(&[("h100", 8, H100_MIB), ("h200", 8, 143_771)]);
        let layout = resolve(&spec(preset("llama-3.1-70b")), &inv).unwrap();
        assert_eq!(layout.tensor_parallel_size, 4);
    }

    #[test]
    fn nothing_fits_says_how_much_is_missing() {
        let inv = inventory(&[("a", 2, 24_576)]);
        let err = resolve(&spec(preset("llama-3.1-70b")), &inv).unwrap_err();
        assert_eq!(err.reason(), Reason::InsufficientGpuMemory);
        let message = err.to_string();
        assert!(
            message.contains("largest group the cluster offers, 2 GPUs"),
            "{message}"
        );
        assert!(message.contains("weights 131.4 GiB"), "{message}");
    }

    #[test]
    fn no_gpu_nodes_is_reported_not_guessed() {
        let err = resolve(&spec(preset("llama-3.2-1b")), &GpuInventory::default()).unwrap_err();
        assert_eq!(err.reason(), Reason::NoGpuNodes);
        assert!(err.to_string().contains("allocatable nvidia.com/gpu"));
    }

    #[test]
    fn explicit_size_beyond_a_node_spans_nodes_or_says_what_is_missing() {
        let s = spec(json!({"model": {"source": "/m.gguf"}, "tensorParallelSize": 8}));
        let two = inventory(&[("a", 4, H100_MIB), ("b", 4, H100_MIB)]);
        let layout = resolve(&s, &two).unwrap();
        assert_eq!((layout.pods_per_group, layout.gpus_per_pod), (2, 4));
        let one = inventory(&[("a", 4, H100_MIB)]);
        let err = resolve(&s, &one).unwrap_err();
        assert_eq!(
            err,
            LayoutError::NotEnoughNodes {
                size: 8,
                gpus_per_node: 4,
                needed: 2,
                found: 1
            }
        );
        // Without inventory an explicit size is taken at its word.
        let layout = resolve(&s, &GpuInventory::default()).unwrap();
        assert_eq!((layout.pods_per_group, layout.gpus_per_pod), (1, 8));
    }

    #[test]
    fn a_size_that_does_not_divide_the_heads_is_refused_and_auto_avoids_it() {
        // SmolLM2 has 9 attention heads and 3 KV heads: no power of two above 1 splits them.
        let mut s = spec(
            json!({"model": {"source": "/m.gguf", "shape": {"preset": "smollm2-135m"}},
                                "tensorParallelSize": 2}),
        );
        let error = resolve(&s, &inventory(&[("a", 8, H100_MIB)])).unwrap_err();
        assert_eq!(error.reason(), Reason::InvalidSpec);
        assert_eq!(
            error.to_string(),
            "tensorParallelSize 2 does not divide the model's 9 attention heads and 3 KV heads (nor is it a multiple of the KV heads): every GPU of a group needs whole heads"
        );
        // Latency would take the whole node; the largest group that splits the heads is 1 GPU.
        s.tensor_parallel_size = IntOrString::String("auto".into());
        s.parallelism_preference = ParallelismPreference::Latency;
        let layout = resolve(&s, &inventory(&[("a", 8, H100_MIB)])).unwrap();
        assert_eq!(layout.tensor_parallel_size, 1);
        // Explicit heads in the shape count too; without them nothing is checked.
        let custom = |heads: serde_json::Value| {
            spec(
                json!({"model": {"source": "/m", "shape": {"weightBytes": "1Gi", "layers": 2,
                        "hiddenSize": 96, "attentionHeads": heads, "kvHeads": 3}},
                        "tensorParallelSize": 4}),
            )
        };
        let error = resolve(&custom(json!(12)), &inventory(&[("a", 8, H100_MIB)])).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("12 attention heads and 3 KV heads"),
            "{error}"
        );
        let unknown = spec(
            json!({"model": {"source": "/m", "shape": {"weightBytes": "1Gi",
                               "layers": 2, "hiddenSize": 96}}, "tensorParallelSize": 4}),
        );
        assert!(resolve(&unknown, &inventory(&[("a", 8, H100_MIB)])).is_ok());
    }
}
