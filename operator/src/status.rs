//! Status as a pure function of (pool, layout, observed groups), and typed conditions merged so
//! that `lastTransitionTime` moves only when a condition's status does.

use crate::agents::{self, Download};
use crate::children::{leader_selector, service_name};
use crate::groups::{
    GroupPlan, Groups, PodProblem, ProblemKind, Restart, Restarts, restarts_after,
};
use crate::tp::{GroupLayout, LayoutError};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use parallax_crds::{
    AGENT_HTTP_PORT as AGENT_PORT, GroupRestart, InferencePool, InferencePoolStatus, ModelDownload,
};
use parallax_crds::{AvoidedNode, GpuFault};

/// Condition types of an InferencePool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionType {
    /// Every wanted group serves.
    Ready,
    /// Groups are being created, updated or removed.
    Progressing,
    /// Something needs a person or will not heal by itself soon.
    Degraded,
    /// The built-in autoscaler is deciding the number of groups.
    ScalingActive,
    /// The autoscaler wanted a number beyond minReplicas/maxReplicas.
    ScalingLimited,
    /// The groups run the last good revision because the one the spec asks for regressed.
    RolledBack,
}

/// Status of a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
}

/// Every reason a condition can give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    GroupsReady,
    GroupsNotReady,
    ScaledToZero,
    RouterNotReady,
    Creating,
    RollingUpdate,
    ScalingDown,
    DownloadingModel,
    Stable,
    GroupFailed,
    AsExpected,
    NoGpuNodes,
    InsufficientGpuMemory,
    NotEnoughNodes,
    InvalidSpec,
    ProgressDeadlineExceeded,
    GroupRestartBackoff,
    ContainerConfigError,
    ImagePullFailing,
    Unschedulable,
    OutOfMemory,
    CrashLooping,
    LeaderWorkerSetMissing,
    GpuUnhealthy,
    ReactiveRules,
    PredictiveAndReactive,
    ExternalAutoscaler,
    TooFewOrTooManyReplicas,
    WithinBounds,
    LatencyRegression,
    ThroughputRegression,
    ErrorRegression,
    AgentDegraded,
    RevisionHealthy,
    JudgingRevision,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::Progressing => "Progressing",
            Self::Degraded => "Degraded",
            Self::ScalingActive => "ScalingActive",
            Self::ScalingLimited => "ScalingLimited",
            Self::RolledBack => "RolledBack",
        }
    }
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
        }
    }
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GroupsReady => "GroupsReady",
            Self::GroupsNotReady => "GroupsNotReady",
            Self::ScaledToZero => "ScaledToZero",
            Self::RouterNotReady => "RouterNotReady",
            Self::Creating => "Creating",
            Self::RollingUpdate => "RollingUpdate",
            Self::ScalingDown => "ScalingDown",
            Self::DownloadingModel => "DownloadingModel",
            Self::Stable => "Stable",
            Self::GroupFailed => "GroupFailed",
            Self::AsExpected => "AsExpected",
            Self::NoGpuNodes => "NoGpuNodes",
            Self::InsufficientGpuMemory => "InsufficientGpuMemory",
            Self::NotEnoughNodes => "NotEnoughNodes",
            Self::ProgressDeadlineExceeded => "ProgressDeadlineExceeded",
            Self::GroupRestartBackoff => "GroupRestartBackoff",
            Self::ContainerConfigError => "ContainerConfigError",
            Self::ImagePullFailing => "ImagePullFailing",
            Self::Unschedulable => "Unschedulable",
            Self::OutOfMemory => "OutOfMemory",
            Self::CrashLooping => "CrashLooping",
            Self::LeaderWorkerSetMissing => "LeaderWorkerSetMissing",
            Self::GpuUnhealthy => "GpuUnhealthy",
            Self::ReactiveRules => "ReactiveRules",
            Self::PredictiveAndReactive => "PredictiveAndReactive",
            Self::ExternalAutoscaler => "ExternalAutoscaler",
            Self::TooFewOrTooManyReplicas => "TooFewOrTooManyReplicas",
            Self::WithinBounds => "WithinBounds",
            Self::LatencyRegression => "LatencyRegression",
            Self::ThroughputRegression => "ThroughputRegression",
            Self::ErrorRegression => "ErrorRegression",
            Self::AgentDegraded => "AgentDegraded",
            Self::RevisionHealthy => "RevisionHealthy",
            Self::JudgingRevision => "JudgingRevision",
            Self::InvalidSpec => "InvalidSpec",
        }
    }
}

/// A condition as computed, before it is merged with what the status already says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredCondition {
    pub type_: ConditionType,
    pub status: ConditionStatus,
    pub reason: Reason,
    pub message: String,
}

impl DesiredCondition {
    pub fn new(
        type_: ConditionType,
        status: ConditionStatus,
        reason: Reason,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// Merges desired conditions into the existing ones: `lastTransitionTime` is kept unless the
/// status changed; conditions of other types (written by someone else) are kept as they are.
pub fn merge_conditions(
    existing: &[Condition],
    desired: &[DesiredCondition],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    let mut merged: Vec<Condition> = existing
        .iter()
        .filter(|c| !desired.iter().any(|d| d.type_.as_str() == c.type_))
        .cloned()
        .collect();
    for d in desired {
        let previous = existing.iter().find(|c| c.type_ == d.type_.as_str());
        let last_transition_time = match previous {
            Some(p) if p.status == d.status.as_str() => p.last_transition_time.clone(),
            _ => now.clone(),
        };
        merged.push(Condition {
            type_: d.type_.as_str().to_owned(),
            status: d.status.as_str().to_owned(),
            reason: d.reason.as_str().to_owned(),
            message: d.message.clone(),
            observed_generation: generation,
            last_transition_time,
        });
    }
    merged.sort_by_key(|c| match c.type_.as_str() {
        "Ready" => 0,
        "Progressing" => 1,
        "Degraded" => 2,
        _ => 3,
    });
    merged
}

/// What the pool's agents said this pass, and what the operator made of it.
#[derive(Debug, Clone, Default)]
pub struct AgentView {
    /// Downloads under way, by pod.
    pub downloads: Vec<(String, Download)>,
    /// Unhealthy GPUs, with when each was first seen.
    pub gpu_faults: Vec<GpuFault>,
    /// Nodes new pods keep off.
    pub avoided_nodes: Vec<AvoidedNode>,
    /// Since when spot capacity has been found wanting, while it counts.
    pub spot_unavailable_since: Option<Time>,
    /// The router's pods as its Deployment reports them, where the pool has a router and the
    /// Deployment has said.
    pub router: Option<RouterPods>,
}

/// The router Deployment's pods: ready, of wanted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterPods {
    pub ready: i32,
    pub wanted: i32,
}

/// Computes the pool's status from its layout (or why there is none) and its groups.
pub fn compute_status(
    pool: &InferencePool,
    layout: Result<&GroupLayout, &LayoutError>,
    groups: &Groups,
    template_hash: Option<&str>,
    plan: &GroupPlan,
    agents: &AgentView,
    now: &Time,
) -> InferencePoolStatus {
    let downloads = agents.downloads.as_slice();
    use ConditionStatus::{False, True};
    use ConditionType::{Degraded, Progressing, Ready};
    let previous = pool.status.clone().unwrap_or_default();
    let wanted = pool.spec.replicas.max(0) as u32;
    let name = pool.name_any();

    let size = layout
        .as_ref()
        .map_or(previous.pods_per_group.unwrap_or(1).max(1) as u32, |l| {
            l.pods_per_group
        });
    let live = groups
        .values()
        .filter(|g| g.members.values().any(|m| !m.terminating))
        .count() as i32;
    let ready = groups.values().filter(|g| g.ready(size)).count() as i32;
    let updated = template_hash.map_or(0, |hash| {
        groups
            .values()
            .filter(|g| {
                g.members.len() as u32 == size
                    && g.members.values().all(|m| m.hash == hash && !m.terminating)
            })
            .count() as i32
    });
    let outdated = template_hash.map_or(0, |hash| {
        groups
            .values()
            .filter(|g| g.members.values().any(|m| !m.terminating && m.hash != hash))
            .count()
    });
    let failed = groups
        .iter()
        .filter(|(_, g)| g.members.values().any(|m| m.failed))
        .map(|(i, _)| i.to_string())
        .collect::<Vec<_>>();

    // Downloads under way, summed over the pods.
    let model_download = (!downloads.is_empty()).then(|| ModelDownload {
        pods: downloads.len() as i32,
        bytes_done: downloads.iter().map(|(_, d)| d.bytes_done as i64).sum(),
        bytes: downloads.iter().map(|(_, d)| d.bytes as i64).sum(),
    });

    // Progress: a spec to roll out, a group more ready or updated than before, or a download
    // further along.
    let downloaded_more = match (&model_download, &previous.model_download) {
        (Some(now), Some(before)) => now.bytes_done > before.bytes_done,
        (Some(now), None) => now.bytes_done > 0,
        (None, _) => false,
    };
    let progressed = previous.observed_generation != pool.metadata.generation
        || ready > previous.ready_replicas
        || updated > previous.updated_replicas
        || downloaded_more;
    let last_progress = match &previous.last_progress_time {
        Some(at) if !progressed => Some(at.clone()),
        _ => Some(now.clone()),
    };

    let previous_restarts = restarts_of(&previous);
    let restarts = restarts_after(&previous_restarts, plan, groups, size, now.0.as_second());

    let problems: Vec<(&str, &PodProblem)> = groups
        .values()
        .flat_map(|g| g.members.values())
        .filter(|m| !m.terminating)
        .filter_map(|m| m.problem.as_ref().map(|p| (m.name.as_str(), p)))
        .collect();

    let conditions = match layout {
        Err(e) => {
            let reason = e.reason();
            vec![
                DesiredCondition::new(Ready, False, reason, e.to_string()),
                DesiredCondition::new(
                    Progressing,
                    False,
                    reason,
                    "groups cannot be laid out until this is resolved",
                ),
                DesiredCondition::new(Degraded, True, reason, e.to_string()),
            ]
        }
        Ok(_) => {
            let ready_condition = if wanted == 0 {
                let waking = pool.spec.autoscaling.enabled
                    && pool.spec.autoscaling.scale_to_zero_after_seconds.is_some();
                let message = if waking {
                    "replicas is 0: the router holds the next request and the autoscaler wakes the pool for it"
                } else {
                    "replicas is 0"
                };
                DesiredCondition::new(Ready, True, Reason::ScaledToZero, message)
            } else if ready as u32 >= wanted {
                DesiredCondition::new(
                    Ready,
                    True,
                    Reason::GroupsReady,
                    format!("{ready} of {wanted} groups ready"),
                )
            } else {
                DesiredCondition::new(
                    Ready,
                    False,
                    Reason::GroupsNotReady,
                    format!("{ready} of {wanted} groups ready"),
                )
            };
            let extra = (live as u32).saturating_sub(wanted);
            let progressing = if extra > 0 && outdated == 0 {
                DesiredCondition::new(
                    Progressing,
                    True,
                    Reason::ScalingDown,
                    format!("removing {extra} groups"),
                )
            } else if outdated > 0 {
                DesiredCondition::new(
                    Progressing,
                    True,
                    Reason::RollingUpdate,
                    format!("{updated} of {wanted} groups on the current template"),
                )
            } else if (ready as u32) < wanted {
                DesiredCondition::new(
                    Progressing,
                    True,
                    Reason::Creating,
                    format!("{ready} of {wanted} groups ready"),
                )
            } else {
                DesiredCondition::new(
                    Progressing,
                    False,
                    Reason::Stable,
                    "every group is ready on the current template",
                )
            };
            // Groups on their way up that are still downloading say so, with how far.
            let progressing = if progressing.status == True
                && matches!(progressing.reason, Reason::Creating | Reason::RollingUpdate)
                && !downloads.is_empty()
            {
                DesiredCondition::new(
                    Progressing,
                    True,
                    Reason::DownloadingModel,
                    format!("{}: {}", progressing.message, agents::summary(downloads)),
                )
            } else {
                progressing
            };
            let progressing = past_deadline(progressing, pool, last_progress.as_ref(), now);
            let degraded = if !agents.gpu_faults.is_empty() {
                DesiredCondition::new(
                    Degraded,
                    True,
                    Reason::GpuUnhealthy,
                    gpu_fault_message(pool, &agents.gpu_faults, now),
                )
            } else if let Some(waiting) = backoff_message(plan, &previous_restarts, now) {
                DesiredCondition::new(Degraded, True, Reason::GroupRestartBackoff, waiting)
            } else if let Some(kind) = problems.iter().map(|(_, p)| p.kind).min() {
                DesiredCondition::new(
                    Degraded,
                    True,
                    Reason::from(kind),
                    problems_message(&problems),
                )
            } else if !failed.is_empty() {
                DesiredCondition::new(
                    Degraded,
                    True,
                    Reason::GroupFailed,
                    format!(
                        "groups {} have a failed member and are being recreated",
                        failed.join(", ")
                    ),
                )
            } else if let Some(router) = agents.router.filter(|r| r.ready == 0) {
                DesiredCondition::new(
                    Degraded,
                    True,
                    Reason::RouterNotReady,
                    format!(
                        "no router pod is ready (0 of {}): the pool's Service sends straight to the group leaders, without the router's load balancing, retries or holding, until one is",
                        router.wanted
                    ),
                )
            } else {
                DesiredCondition::new(
                    Degraded,
                    False,
                    Reason::AsExpected,
                    "no group has a failed member",
                )
            };
            match &plan.blocked {
                // The workload that runs the groups is not there: nothing starts or changes.
                Some(why) => vec![
                    if ready as u32 >= wanted {
                        ready_condition
                    } else {
                        DesiredCondition::new(
                            Ready,
                            False,
                            Reason::LeaderWorkerSetMissing,
                            format!("{ready} of {wanted} groups ready: {why}"),
                        )
                    },
                    DesiredCondition::new(
                        Progressing,
                        False,
                        Reason::LeaderWorkerSetMissing,
                        why.clone(),
                    ),
                    DesiredCondition::new(
                        Degraded,
                        True,
                        Reason::LeaderWorkerSetMissing,
                        why.clone(),
                    ),
                ],
                None => vec![ready_condition, progressing, degraded],
            }
        }
    };

    let generation = pool.metadata.generation;
    InferencePoolStatus {
        conditions: merge_conditions(&previous.conditions, &conditions, generation, now),
        observed_generation: generation,
        replicas: live,
        ready_replicas: ready,
        updated_replicas: updated,
        tensor_parallel_size: layout.as_ref().map_or(previous.tensor_parallel_size, |l| {
            Some(l.tensor_parallel_size as i32)
        }),
        pods_per_group: layout
            .as_ref()
            .map_or(previous.pods_per_group, |l| Some(l.pods_per_group as i32)),
        tensor_parallel_reason: layout
            .as_ref()
            .map_or(previous.tensor_parallel_reason, |l| Some(l.reason.clone())),
        last_progress_time: last_progress,
        model_download,
        // The autoscaler's and the rollback judge's, kept as they wrote them.
        autoscaling: previous.autoscaling.clone(),
        rollback: previous.rollback.clone(),
        gpu_hours: previous.gpu_hours.clone(),
        spot_unavailable_since: agents.spot_unavailable_since.clone(),
        gpu_faults: agents.gpu_faults.clone(),
        avoided_nodes: agents.avoided_nodes.clone(),
        group_restarts: restarts
            .iter()
            .map(|(group, r)| GroupRestart {
                group: *group as i32,
                count: r.count as i32,
                last: Time(Timestamp::from_second(r.at).unwrap_or_default()),
            })
            .collect(),
        gpus_per_pod: layout
            .as_ref()
            .map_or(previous.gpus_per_pod, |l| Some(l.gpus_per_pod as i32)),
        gpu_products: layout
            .as_ref()
            .map_or(previous.gpu_products, |l| l.gpu_products.clone()),
        // Pinned for this spec unless resolved before any GPU node was seen; a layout error
        // leaves the previous pin, which no longer matches the generation.
        layout_generation: match layout {
            Ok(l) if !l.provisional => generation,
            Ok(_) => None,
            Err(_) => previous.layout_generation,
        },
        selector: Some(leader_selector(&name)),
        endpoint: Some(format!(
            "http://{}.{}.svc:{AGENT_PORT}/v1",
            service_name(&name),
            pool.namespace().unwrap_or_default()
        )),
    }
}

/// The restarts a status records.
pub fn restarts_of(status: &InferencePoolStatus) -> Restarts {
    status
        .group_restarts
        .iter()
        .filter_map(|r| {
            let restart = Restart {
                count: u32::try_from(r.count).ok()?,
                at: r.last.0.as_second(),
            };
            Some((u32::try_from(r.group).ok()?, restart))
        })
        .collect()
}

/// Which failed groups wait to be recreated, and until when.
fn backoff_message(plan: &GroupPlan, restarts: &Restarts, now: &Time) -> Option<String> {
    let waits: Vec<String> = plan
        .backing_off
        .iter()
        .map(|(group, due)| {
            let count = restarts.get(group).map_or(0, |r| r.count);
            format!(
                "group {group} failed again after {count} recreations in a row; recreating it in {}s",
                (due - now.0.as_second()).max(0)
            )
        })
        .collect();
    (!waits.is_empty()).then(|| waits.join("; "))
}

/// `progressing`, or — a rollout with no progress for `progressDeadlineSeconds` —
/// `Progressing=False` with `ProgressDeadlineExceeded`, as a Deployment says it.
fn past_deadline(
    progressing: DesiredCondition,
    pool: &InferencePool,
    last_progress: Option<&Time>,
    now: &Time,
) -> DesiredCondition {
    let deadline = i64::from(pool.spec.progress_deadline_seconds.max(1));
    let stalled = last_progress.map_or(0, |at| now.0.as_second() - at.0.as_second());
    if progressing.status != ConditionStatus::True
        || progressing.reason == Reason::ScalingDown
        || stalled <= deadline
    {
        return progressing;
    }
    DesiredCondition::new(
        ConditionType::Progressing,
        ConditionStatus::False,
        Reason::ProgressDeadlineExceeded,
        format!(
            "no group became ready or updated for {stalled}s (progressDeadlineSeconds {deadline}): {}",
            progressing.message
        ),
    )
}

/// `pod P on node N: GPU i (UUID): reason; …` for the first few faults, with what happens next.
fn gpu_fault_message(pool: &InferencePool, faults: &[GpuFault], now: &Time) -> String {
    const SHOWN: usize = 4;
    let grace = pool.spec.gpu_health.unhealthy_grace_seconds;
    let mut text = faults
        .iter()
        .take(SHOWN)
        .map(|f| {
            let left = (crate::gpu_faults::due_at(f, grace).as_second() - now.0.as_second()).max(0);
            let next = if left > 0 {
                format!("its group moves off the node in {left}s unless the GPU recovers")
            } else {
                "its group is recreated away from the node".to_owned()
            };
            format!(
                "pod {} on node {}: GPU {} ({}) is unhealthy: {}; {next}",
                f.pod,
                f.node.as_deref().unwrap_or("unknown"),
                f.gpu,
                f.uuid,
                f.reason
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    if faults.len() > SHOWN {
        text.push_str(&format!("; and {} more GPUs", faults.len() - SHOWN));
    }
    text
}

impl From<ProblemKind> for Reason {
    fn from(kind: ProblemKind) -> Self {
        match kind {
            ProblemKind::ContainerConfig => Self::ContainerConfigError,
            ProblemKind::ImagePull => Self::ImagePullFailing,
            ProblemKind::Unschedulable => Self::Unschedulable,
            ProblemKind::OutOfMemory => Self::OutOfMemory,
            ProblemKind::CrashLoop => Self::CrashLooping,
        }
    }
}

/// `pod NAME: what is wrong` for the first few pods, most pressing first.
fn problems_message(problems: &[(&str, &PodProblem)]) -> String {
    const SHOWN: usize = 4;
    let mut sorted = problems.to_vec();
    sorted.sort_by_key(|(name, p)| (p.kind, *name));
    let mut text = sorted
        .iter()
        .take(SHOWN)
        .map(|(name, p)| format!("pod {name}: {}", p.message))
        .collect::<Vec<_>>()
        .join("; ");
    if sorted.len() > SHOWN {
        text.push_str(&format!("; and {} more pods", sorted.len() - SHOWN));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::{DeleteReason, Group, Member};
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    fn time(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    fn pool(replicas: i32) -> InferencePool {
        let mut pool: InferencePool = serde_json::from_value(json!({
            "apiVersion": "parallax.dev/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": "llama", "namespace": "ml", "generation": 3},
            "spec": {"model": {"source": "/m.gguf"}, "tensorParallelSize": 1, "replicas": replicas, "maxReplicas": 10}
        })).unwrap();
        pool.status = None;
        pool
    }

    fn layout() -> GroupLayout {
        GroupLayout {
            tensor_parallel_size: 1,
            pods_per_group: 1,
            gpus_per_pod: 1,
            reason: "r".into(),
            gpu_products: Vec::new(),
            provisional: false,
        }
    }

    fn groups(ready: &[bool], hash: &str) -> Groups {
        ready
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let m = Member {
                    name: format!("llama-{i}-0"),
                    hash: hash.into(),
                    ready: *r,
                    failed: false,
                    terminating: false,
                    group_size: None,
                    problem: None,
                    node_lost: false,
                    incarnation: 0,
                    gpu_unhealthy: false,
                    spot_unavailable: false,
                };
                (
                    i as u32,
                    Group {
                        members: [(0, m)].into(),
                        abandoned: None,
                    },
                )
            })
            .collect()
    }

    fn condition<'a>(s: &'a InferencePoolStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn ready_when_every_wanted_group_is_ready() {
        let p = pool(2);
        let s = compute_status(
            &p,
            Ok(&layout()),
            &groups(&[true, true], "h"),
            Some("h"),
            &GroupPlan::default(),
            &AgentView::default(),
            &time(10),
        );
        assert_eq!(
            (s.replicas, s.ready_replicas, s.updated_replicas),
            (2, 2, 2)
        );
        let ready = condition(&s, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "GroupsReady")
        );
        assert_eq!(ready.observed_generation, Some(3));
        assert_eq!(condition(&s, "Progressing").status, "False");
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(
            s.selector.as_deref(),
            Some("parallax.dev/pool=llama,parallax.dev/rank=0")
        );
        assert_eq!(s.endpoint.as_deref(), Some("http://llama.ml.svc:8000/v1"));
    }

    #[test]
    fn not_ready_and_progressing_while_groups_start() {
        let s = compute_status(
            &pool(2),
            Ok(&layout()),
            &groups(&[true, false], "h"),
            Some("h"),
            &GroupPlan::default(),
            &AgentView::default(),
            &time(10),
        );
        let ready = condition(&s, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.message.as_str()),
            ("False", "1 of 2 groups ready")
        );
        assert_eq!(condition(&s, "Progressing").reason, "Creating");
    }

    #[test]
    fn pods_that_cannot_run_are_named_in_degraded_most_pressing_first() {
        let mut g = groups(&[false, false, false, false, false, false], "h");
        let kinds = [
            ProblemKind::CrashLoop,
            ProblemKind::ImagePull,
            ProblemKind::Unschedulable,
            ProblemKind::ImagePull,
            ProblemKind::OutOfMemory,
            ProblemKind::CrashLoop,
        ];
        for (i, kind) in kinds.into_iter().enumerate() {
            g.get_mut(&(i as u32))
                .unwrap()
                .members
                .get_mut(&0)
                .unwrap()
                .problem = Some(PodProblem {
                kind,
                message: format!("{kind:?} here"),
            });
        }
        let s = compute_status(
            &pool(6),
            Ok(&layout()),
            &g,
            Some("h"),
            &GroupPlan::default(),
            &AgentView::default(),
            &time(10),
        );
        let degraded = condition(&s, "Degraded");
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "ImagePullFailing")
        );
        assert_eq!(
            degraded.message,
            "pod llama-1-0: ImagePull here; pod llama-3-0: ImagePull here; \
             pod llama-2-0: Unschedulable here; pod llama-4-0: OutOfMemory here; and 2 more pods"
        );
        // A pod on its way out is not a problem of the pool's.
        let mut g = groups(&[true], "h");
        let member = g.get_mut(&0).unwrap().members.get_mut(&0).unwrap();
        member.terminating = true;
        member.problem = Some(PodProblem {
            kind: ProblemKind::CrashLoop,
            message: "x".into(),
        });
        let s = compute_status(
            &pool(1),
            Ok(&layout()),
            &g,
            Some("h"),
            &GroupPlan::default(),
            &AgentView::default(),
            &time(10),
        );
        assert_eq!(condition(&s, "Degraded").reason, "AsExpected");
    }

    #[test]
    fn a_rollout_without_progress_past_its_deadline_stops_progressing() {
        // Group 1 never becomes ready; the default deadline is 1800 s.
        let stuck = groups(&[true, false], "h");
        let mut p = pool(2);
        let first = compute_status(
            &p,
            Ok(&layout()),
            &stuck,
            Some("h"),
            &GroupPlan::default(),
            &AgentView::default(),
            &time(0),
        );
        assert_eq!(
            first.last_progress_time,
            Some(time(0)),
            "a new spec is progress"
        );
        p.status = Some(first);
        let at = |p: &InferencePool, seconds| {
            compute_status(
                p,
                Ok(&layout()),
                &stuck,
                Some("h"),
                &GroupPlan::default(),
                &AgentView::default(),
                &time(seconds),
            )
        };
        let waiting = at(&p, 1800);
        assert_eq!(condition(&waiting, "Progressing").reason, "Creating");
        let late = at(&p, 1801);
        let progressing = condition(&late, "Progressing");
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("False", "ProgressDeadlineExceeded")
        );
        assert!(
            progressing
                .message
                .starts_with("no group became ready or updated for 1801s"),
            "{}",
            progressing.message
        );
        // It stays so while nothing moves, and a group becoming ready starts the clock again.
        p.status = Some(late);
        assert_eq!(
            condition(&at(&p, 4000), "Progressing").reason,
            "ProgressDeadlineExceeded"
        );
        let moved = compute_status(
            &p,
            Ok(&layout()),
            &groups(&[true, true], "h"),
            Some("h"),
            &GroupPlan::default(),
            &AgentView::default(),
            &time(4000),
        );
        assert_eq!(moved.last_progress_time, Some(time(4000)));
        assert_eq!(condition(&moved, "Progressing").reason, "Stable");
        // A spec change is progress too.
        p.metadata.generation = Some(4);
        assert_eq!(condition(&at(&p, 5000), "Progressing").reason, "Creating");
    }

    #[test]
    fn a_group_waiting_out_its_restart_backoff_is_degraded_and_its_count_kept() {
        let mut p = pool(1);
        let mut failing = groups(&[false], "h");
        failing
            .get_mut(&0)
            .unwrap()
            .members
            .get_mut(&0)
            .unwrap()
            .failed = true;
        p.status = Some(InferencePoolStatus {
            group_restarts: vec![GroupRestart {
                group: 0,
                count: 3,
                last: time(100),
            }],
            ..Default::default()
        });
        let plan = GroupPlan {
            backing_off: vec![(0, 140)],
            ..GroupPlan::default()
        };
        let s = compute_status(
            &p,
            Ok(&layout()),
            &failing,
            Some("h"),
            &plan,
            &AgentView::default(),
            &time(110),
        );
        let degraded = condition(&s, "Degraded");
        assert_eq!(
            (degraded.reason.as_str(), degraded.message.as_str()),
            (
                "GroupRestartBackoff",
                "group 0 failed again after 3 recreations in a row; recreating it in 30s"
            )
        );
        assert_eq!(s.group_restarts, p.status.as_ref().unwrap().group_restarts);
        // Recreated now: one more in a row, at now.
        let recreated = GroupPlan {
            delete: vec![(0, DeleteReason::MemberFailed, vec!["llama-0-0".into()])],
            ..GroupPlan::default()
        };
        let s = compute_status(
            &p,
            Ok(&layout()),
            &failing,
            Some("h"),
            &recreated,
            &AgentView::default(),
            &time(140),
        );
        assert_eq!(
            s.group_restarts,
            [GroupRestart {
                group: 0,
                count: 4,
                last: time(140)
            }]
        );
    }

    #[test]
    fn a_new_template_is_a_rolling_update() {
        let s = compute_status(
            &pool(2),
            Ok(&layout()),
            &groups(&[true, true], "old"),
            Some("new"),
            &GroupPlan::default(),
            &AgentView::default(),
            &time(10),
        );
        assert_eq!(s.updated_replicas, 0);
        assert_eq!(condition(&s, "Progressing").reason, "RollingUpdate");
    }

    #[test]
    fn a_layout_error_is_ready_false_with_its_reason() {
        let err = LayoutError::NoGpuNodes {
            resource: "nvidia.com/gpu".into(),
            unknown_memory: vec![],
        };
        let s = compute_status(
            &pool(1),
            Err(&err),
            &Groups::new(),
            None,
            &GroupPlan::default(),
            &AgentView::default(),
            &time(10),
        );
        let ready = condition(&s, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "NoGpuNodes")
        );
        assert!(ready.message.contains("allocatable nvidia.com/gpu"));
        assert_eq!(condition(&s, "Degraded").status, "True");
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let mut p = pool(1);
        let first = compute_status(
            &p,
            Ok(&layout()),
            &groups(&[false], "h"),
            Some("h"),
            &GroupPlan::default(),
            &AgentView::default(),
            &time(10),
        );
        p.status = Some(first);
        // Same status, new message: the time stays.
        let mut g = groups(&[false], "h");
        g.insert(1, g[&0].clone());
        let second = compute_status(
            &p,
            Ok(&layout()),
            &g,
            Some("h"),
            &GroupPlan::default(),
            &AgentView::default(),
            &time(20),
        );
        assert_eq!(condition(&second, "Ready").last_transition_time, time(10));
        p.status = Some(second);
        let third = compute_status(
            &p,
            Ok(&layout()),
            &groups(&[true], "h"),
            Some("h"),
            &GroupPlan::default(),
            &AgentView::default(),
            &time(30),
        );
        assert_eq!(condition(&third, "Ready").last_transition_time, time(30));
        assert_eq!(condition(&third, "Degraded").last_transition_time, time(10));
    }

    #[test]
    fn foreign_conditions_survive_the_merge() {
        let foreign = Condition {
            type_: "Autoscaling".into(),
            status: "True".into(),
            reason: "X".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: time(1),
        };
        let merged = merge_conditions(std::slice::from_ref(&foreign), &[], Some(1), &time(5));
        assert_eq!(merged, vec![foreign]);
    }

    #[test]
    fn groups_that_download_say_how_far_and_a_moving_download_is_progress() {
        let download = |done: u64| Download {
            model: "hf://org/m@main".into(),
            files_done: 0,
            files: 2,
            bytes_done: done << 30,
            bytes: 8 << 30,
        };
        let mut p = pool(2);
        let starting = groups(&[true, false], "h");
        let at = |p: &InferencePool, done: u64, now: i64| {
            compute_status(
                p,
                Ok(&layout()),
                &starting,
                Some("h"),
                &GroupPlan::default(),
                &AgentView {
                    downloads: vec![("llama-1-0".into(), download(done))],
                    ..AgentView::default()
                },
                &time(now),
            )
        };
        let first = at(&p, 2, 100);
        let progressing = condition(&first, "Progressing");
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("True", "DownloadingModel")
        );
        assert_eq!(
            progressing.message,
            "1 of 2 groups ready: downloading hf://org/m@main: pod llama-1-0: 0 of 2 files, 2.00 of 8.00 GiB (25%)"
        );
        assert_eq!(
            first.model_download,
            Some(ModelDownload {
                pods: 1,
                bytes_done: 2 << 30,
                bytes: 8 << 30
            })
        );
        // A download that keeps moving never runs into the progress deadline (1800 s here);
        // one that stalls does.
        p.status = Some(first);
        let moving = at(&p, 3, 2000);
        assert_eq!(condition(&moving, "Progressing").reason, "DownloadingModel");
        assert_eq!(moving.last_progress_time, Some(time(2000)));
        p.status = Some(moving);
        let stalled = at(&p, 3, 3900);
        assert_eq!(
            condition(&stalled, "Progressing").reason,
            "ProgressDeadlineExceeded"
        );
        // Done downloading: nothing to report.
        let done = compute_status(
            &p,
            Ok(&layout()),
            &starting,
            Some("h"),
            &GroupPlan::default(),
            &AgentView::default(),
            &time(3901),
        );
        assert_eq!(done.model_download, None);
    }

    #[test]
    fn a_router_with_no_ready_pod_degrades_the_pool_but_leaves_it_ready() {
        let p = pool(2);
        let ready = groups(&[true, true], "h");
        let with_router = |router| {
            compute_status(
                &p,
                Ok(&layout()),
                &ready,
                Some("h"),
                &GroupPlan::default(),
                &AgentView {
                    router,
                    ..AgentView::default()
                },
                &time(0),
            )
        };
        let reason = |s: &InferencePoolStatus, t: &str| {
            let c = condition(s, t);
            (c.status.clone(), c.reason.clone())
        };
        let as_expected = ("False".to_owned(), "AsExpected".to_owned());
        assert_eq!(reason(&with_router(None), "Degraded"), as_expected);
        let serving = with_router(Some(RouterPods {
            ready: 1,
            wanted: 2,
        }));
        assert_eq!(reason(&serving, "Degraded"), as_expected);
        let dark = with_router(Some(RouterPods {
            ready: 0,
            wanted: 1,
        }));
        // The Service falls back to the leaders: the pool serves, without the router.
        assert_eq!(
            reason(&dark, "Ready"),
            ("True".to_owned(), "GroupsReady".to_owned())
        );
        assert_eq!(
            reason(&dark, "Degraded"),
            ("True".to_owned(), "RouterNotReady".to_owned())
        );
        let message = &condition(&dark, "Degraded").message;
        assert!(
            message.starts_with("no router pod is ready (0 of 1)"),
            "{message}"
        );
    }
}
