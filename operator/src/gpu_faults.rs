//! Unhealthy GPUs as the pool's agents report them, kept in status with the time each was first
//! seen: after `gpuHealth.unhealthyGraceSeconds` the pod's group is recreated away from its node,
//! which new pods then keep off for `gpuHealth.avoidNodeSeconds`. Pure.

use crate::agents::AgentReport;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use parallax_crds::{AvoidedNode, GpuFault};

/// The faults now: one per sick GPU of a reporting pod, keeping the time it was first seen.
/// A pod that no longer reports it (recovered, gone, ready) drops out.
pub fn merge(
    previous: &[GpuFault],
    reports: &[(String, AgentReport)],
    pods: &[Pod],
    now: &Time,
) -> Vec<GpuFault> {
    let mut faults = Vec::new();
    for (pod, report) in reports {
        let node = pods
            .iter()
            .find(|p| p.name_any() == *pod)
            .and_then(|p| p.spec.as_ref()?.node_name.clone());
        for gpu in &report.sick_gpus {
            let since = previous
                .iter()
                .find(|f| f.pod == *pod && f.uuid == gpu.uuid)
                .map_or_else(|| now.clone(), |f| f.since.clone());
            faults.push(GpuFault {
                pod: pod.clone(),
                node: node.clone(),
                gpu: gpu.index as i32,
                uuid: gpu.uuid.clone(),
                reason: gpu.reason.clone().unwrap_or_else(|| "unhealthy".into()),
                since,
            });
        }
    }
    faults
}

/// When `fault`'s grace ends.
pub fn due_at(fault: &GpuFault, grace_seconds: i32) -> Timestamp {
    fault
        .since
        .0
        .saturating_add(SignedDuration::from_secs(i64::from(grace_seconds.max(0))))
        .unwrap_or(Timestamp::MAX)
}

/// Pods whose GPU has been unhealthy past the grace period.
pub fn due(faults: &[GpuFault], grace_seconds: i32, now: &Time) -> Vec<String> {
    let mut pods: Vec<String> = faults
        .iter()
        .filter(|f| due_at(f, grace_seconds) <= now.0)
        .map(|f| f.pod.clone())
        .collect();
    pods.dedup();
    pods
}

/// The nodes to keep off after `moved_from` nodes made groups move now: the earlier ones still
/// in force, and these for `avoid_seconds`.
pub fn avoided(
    previous: &[AvoidedNode],
    moved_from: &[String],
    avoid_seconds: i32,
    now: &Time,
) -> Vec<AvoidedNode> {
    let mut nodes: Vec<AvoidedNode> = previous
        .iter()
        .filter(|a| a.until.0 > now.0 && !moved_from.contains(&a.node))
        .cloned()
        .collect();
    let until = now
        .0
        .saturating_add(SignedDuration::from_secs(i64::from(avoid_seconds.max(0))))
        .unwrap_or(Timestamp::MAX);
    for node in moved_from {
        if avoid_seconds > 0 && !nodes.iter().any(|a| a.node == *node) {
            nodes.push(AvoidedNode {
                node: node.clone(),
                until: Time(until),
            });
        }
    }
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::SickGpu;

    fn time(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    fn report(uuid: &str) -> AgentReport {
        AgentReport {
            download: None,
            sick_gpus: vec![SickGpu {
                index: 1,
                uuid: uuid.into(),
                reason: Some("XID 79: GPU has fallen off the bus".into()),
            }],
        }
    }

    #[test]
    fn a_fault_keeps_its_first_sighting_and_falls_due_after_the_grace() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "llama-0-0"}, "spec": {"nodeName": "gpu-a", "containers": []}}))
        .unwrap();
        let reports = vec![("llama-0-0".to_owned(), report("GPU-1"))];
        let first = merge(&[], &reports, std::slice::from_ref(&pod), &time(100));
        assert_eq!(first.len(), 1);
        assert_eq!(
            (
                first[0].node.as_deref(),
                first[0].gpu,
                first[0].since.clone()
            ),
            (Some("gpu-a"), 1, time(100))
        );
        let later = merge(&first, &reports, &[pod], &time(350));
        assert_eq!(later[0].since, time(100));
        assert!(due(&later, 300, &time(399)).is_empty());
        assert_eq!(due(&later, 300, &time(400)), ["llama-0-0"]);
        // Recovered (no longer reported): forgotten.
        assert!(merge(&later, &[], &[], &time(401)).is_empty());
    }

    #[test]
    fn a_node_is_avoided_for_a_while() {
        let now = time(1000);
        let kept = avoided(&[], &["gpu-a".into()], 3600, &now);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].until, time(4600));
        assert_eq!(avoided(&kept, &[], 3600, &time(4599)).len(), 1);
        assert!(avoided(&kept, &[], 3600, &time(4600)).is_empty());
        assert!(avoided(&[], &["gpu-a".into()], 0, &now).is_empty());
    }
}
