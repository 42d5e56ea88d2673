//! Groups as they are (read from pods) and what to do about them: create missing members,
//! recreate a group whose member failed, roll groups to a new template within the rollout's
//! surge and unavailability, remove groups beyond `replicas`. Pure: `plan` returns actions,
//! `reconcile` carries them out.

use crate::children::{
    GROUP_LABEL, GROUP_SIZE_ANNOTATION, INCARNATION_LABEL, RANK_LABEL, TEMPLATE_HASH_ANNOTATION,
};
use crate::inventory::NodeHealth;
use crate::lws::{LWS_GROUP_INDEX_LABEL, LWS_WORKER_INDEX_LABEL};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use std::collections::BTreeMap;

/// One pod as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub hash: String,
    pub ready: bool,
    /// Phase `Failed`, or any container restarted (RecreateGroupOnPodRestart for groups of
    /// several pods, whose peers cannot rejoin a collective on their own).
    pub failed: bool,
    pub terminating: bool,
    /// Pods in the group this pod was built for, when it says.
    pub group_size: Option<u32>,
    /// What keeps the pod from running, as the scheduler and the kubelet say it.
    pub problem: Option<PodProblem>,
    /// Its node is gone, or down past the grace period.
    pub node_lost: bool,
    /// The incarnation of its group it belongs to.
    pub incarnation: u32,
    /// Its agent has reported an unhealthy GPU for longer than the pool's grace.
    pub gpu_unhealthy: bool,
    /// A spot pod that could not be scheduled for long: spot capacity is wanting.
    pub spot_unavailable: bool,
}

/// Why a pod does not run as it should.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodProblem {
    pub kind: ProblemKind,
    /// The scheduler's or the kubelet's words.
    pub message: String,
}

/// Pod trouble, most in need of a person first (the order a condition picks its reason by).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProblemKind {
    /// The container cannot be made from its spec (a missing Secret or ConfigMap key).
    ContainerConfig,
    /// The image cannot be pulled.
    ImagePull,
    /// No node admits the pod.
    Unschedulable,
    /// The container was killed for using more memory than its limit.
    OutOfMemory,
    /// The container keeps failing; the kubelet backs off restarting it.
    CrashLoop,
}

/// The most pressing problem of `pod`, if any.
pub fn problem(pod: &Pod) -> Option<PodProblem> {
    let status = pod.status.as_ref()?;
    let unschedulable = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    });
    let mut found: Vec<PodProblem> = unschedulable
        .map(|c| PodProblem {
            kind: ProblemKind::Unschedulable,
            message: c.message.clone().unwrap_or_default(),
        })
        .into_iter()
        .collect();
    for container in status.container_statuses.iter().flatten() {
        let waiting = container.state.as_ref().and_then(|s| s.waiting.as_ref());
        if let Some(waiting) = waiting {
            let reason = waiting.reason.as_deref().unwrap_or_default();
            let kind = match reason {
                "CreateContainerConfigError" | "CreateContainerError" => {
                    Some(ProblemKind::ContainerConfig)
                }
                "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" => {
                    Some(ProblemKind::ImagePull)
                }
                "CrashLoopBackOff" => Some(ProblemKind::CrashLoop),
                _ => None,
            };
            if let Some(kind) = kind {
                let message = waiting.message.as_deref().unwrap_or_default();
                found.push(PodProblem {
                    kind,
                    message: format!("{reason}: {message}")
                        .trim_end_matches([':', ' '])
                        .to_owned(),
                });
            }
        }
        let terminations = [&container.state, &container.last_state]
            .into_iter()
            .filter_map(|s| s.as_ref().and_then(|s| s.terminated.as_ref()));
        for terminated in terminations {
            if terminated.reason.as_deref() == Some("OOMKilled") {
                found.push(PodProblem {
                    kind: ProblemKind::OutOfMemory,
                    message: format!(
                        "container {} was OOMKilled (exit code {}): raise resources.memory",
                        container.name, terminated.exit_code
                    ),
                });
            }
        }
    }
    found.into_iter().min_by_key(|p| p.kind)
}

/// One group: its members by rank.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Group {
    pub members: BTreeMap<u32, Member>,
    /// The latest incarnation whose pods are stuck terminating on a lost node: they are no
    /// longer members, and the group comes back under the next incarnation's names.
    pub abandoned: Option<u32>,
}

impl Group {
    /// A group is complete at the size its pods were built for; `size` when they do not say.
    fn complete(&self, size: u32) -> bool {
        let size = self
            .members
            .values()
            .find_map(|m| m.group_size)
            .unwrap_or(size);
        (0..size).all(|r| self.members.contains_key(&r))
    }
    pub fn ready(&self, size: u32) -> bool {
        self.complete(size) && self.members.values().all(|m| m.ready && !m.terminating)
    }
    fn current(&self, hash: &str) -> bool {
        self.members.values().all(|m| m.hash == hash)
    }
    fn terminating(&self) -> bool {
        self.members.values().any(|m| m.terminating)
    }
    /// Why the group must start again elsewhere at once, whatever its restart history: the
    /// place failed, not the group (a lost node, a GPU unhealthy past its grace, no spot
    /// capacity).
    fn must_move(&self) -> Option<DeleteReason> {
        let any = |flag: fn(&Member) -> bool| self.members.values().any(flag);
        if any(|m| m.node_lost) {
            Some(DeleteReason::NodeLost)
        } else if any(|m| m.gpu_unhealthy) {
            Some(DeleteReason::GpuUnhealthy)
        } else if any(|m| m.spot_unavailable) {
            Some(DeleteReason::SpotUnavailable)
        } else {
            None
        }
    }

    /// The incarnation new members join: the members', or the one after an abandoned one.
    pub fn incarnation(&self) -> u32 {
        match self.members.values().map(|m| m.incarnation).max() {
            Some(current) => current,
            None => self.abandoned.map_or(0, |i| i + 1),
        }
    }
}

/// The pool's groups by index.
pub type Groups = BTreeMap<u32, Group>;

/// Reads groups from the pool's pods; pods without group and rank labels are ignored, and pods
/// being deleted on a lost node only mark their incarnation abandoned.
pub fn observe<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    pods_per_group: u32,
    nodes: &NodeHealth,
) -> Groups {
    let mut groups = Groups::new();
    for pod in pods {
        let labels = pod.labels();
        // The operator's labels, or those of the LeaderWorkerSet that made the pod.
        let label = |ours: &str, theirs: &str| {
            labels
                .get(ours)
                .or_else(|| labels.get(theirs))
                .and_then(|v| v.parse().ok())
        };
        let (Some(group), Some(rank)) = (
            label(GROUP_LABEL, LWS_GROUP_INDEX_LABEL),
            label(RANK_LABEL, LWS_WORKER_INDEX_LABEL),
        ) else {
            continue;
        };
        let incarnation: u32 = labels
            .get(INCARNATION_LABEL)
            .and_then(|i| i.parse().ok())
            .unwrap_or(0);
        let node_lost = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .is_some_and(|node| nodes.is_lost(node));
        let terminating = pod.metadata.deletion_timestamp.is_some();
        if terminating && node_lost {
            let entry = groups.entry(group).or_default();
            entry.abandoned = entry.abandoned.max(Some(incarnation));
            continue;
        }
        let status = pod.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let phase_failed = status.and_then(|s| s.phase.as_deref()) == Some("Failed");
        let restarted = status
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.restart_count > 0));
        groups.entry(group).or_default().members.insert(
            rank,
            Member {
                name: pod.name_any(),
                hash: pod
                    .annotations()
                    .get(TEMPLATE_HASH_ANNOTATION)
                    .cloned()
                    .unwrap_or_default(),
                ready,
                failed: phase_failed || (pods_per_group > 1 && restarted),
                terminating,
                group_size: pod
                    .annotations()
                    .get(GROUP_SIZE_ANNOTATION)
                    .and_then(|s| s.parse().ok()),
                problem: problem(pod),
                node_lost,
                incarnation,
                gpu_unhealthy: false,
                spot_unavailable: false,
            },
        );
    }
    groups
}

/// Why a group's pods are deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteReason {
    /// Index at or above `replicas`.
    ScaledDown,
    /// A member failed: the whole group starts again.
    MemberFailed,
    /// Built from an older template.
    Outdated,
    /// A member's node is lost: the group starts again elsewhere, under new names.
    NodeLost,
    /// A member's GPU stayed unhealthy past the grace: the group starts again on other nodes.
    GpuUnhealthy,
    /// A spot member could not be scheduled: the group starts again on on-demand nodes.
    SpotUnavailable,
}

impl DeleteReason {
    pub fn event_reason(self) -> &'static str {
        match self {
            Self::ScaledDown => "GroupRemoved",
            Self::MemberFailed => "GroupRecreated",
            Self::Outdated => "GroupUpdated",
            Self::NodeLost | Self::GpuUnhealthy | Self::SpotUnavailable => "GroupRescheduled",
        }
    }
}

/// What to do to the pool's groups now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupPlan {
    /// (group, rank) of pods to create.
    pub create: Vec<(u32, u32)>,
    /// Groups whose pods to delete, and why.
    pub delete: Vec<(u32, DeleteReason, Vec<String>)>,
    /// Failed groups left as they are until the second given (their restart backoff).
    pub backing_off: Vec<(u32, i64)>,
    /// Why no group can run, when the workload the pool asks for is not there.
    pub blocked: Option<String>,
}

/// A group's recreations after a member failed: how many in a row, and when the last one was
/// (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restart {
    pub count: u32,
    pub at: i64,
}

/// Recent restarts by group.
pub type Restarts = BTreeMap<u32, Restart>;

/// A group ready this long after its last recreation has its count forgotten.
pub const RESTART_MEMORY_SECONDS: i64 = 600;

/// How long after its `count`-th recreation in a row a group that failed again is recreated:
/// at once the first time, then 10 s doubling to 10 minutes (as the kubelet backs off a crashing
/// container), so a group that cannot start does not pull images and download models in a loop.
pub fn restart_delay(count: u32) -> i64 {
    if count == 0 {
        return 0;
    }
    (10_i64 << (count - 1).min(6)).min(600)
}

/// The restarts after this pass: groups recreated now count one more; a group that has been
/// ready since long enough after its last recreation is forgotten, and so is one that is gone
/// and not being created again (scaled away). A group whose pods are gone for the moment is
/// created again at its index in the same pass, so it is remembered.
pub fn restarts_after(
    previous: &Restarts,
    plan: &GroupPlan,
    groups: &Groups,
    size: u32,
    now: i64,
) -> Restarts {
    let mut next: Restarts = previous
        .iter()
        .filter(|(group, restart)| {
            let settled = groups.get(group).is_some_and(|g| g.ready(size))
                && now - restart.at >= RESTART_MEMORY_SECONDS;
            let present =
                groups.contains_key(group) || plan.create.iter().any(|(g, _)| g == *group);
            present && !settled
        })
        .map(|(g, r)| (*g, *r))
        .collect();
    for (group, reason, _) in &plan.delete {
        if *reason == DeleteReason::MemberFailed {
            let count = previous.get(group).map_or(0, |r| r.count) + 1;
            next.insert(*group, Restart { count, at: now });
        }
    }
    next
}

/// What the pool should run: `replicas` groups of `size` pods built from template `hash`,
/// replaced within the rollout's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted<'a> {
    pub replicas: u32,
    pub size: u32,
    pub hash: &'a str,
    /// Groups beyond `replicas` a rolling update may create.
    pub max_surge: u32,
    /// Groups below `replicas` that may be unready while it runs.
    pub max_unavailable: u32,
}

/// Plans the groups for `wanted` at `now` (Unix seconds) after the `restarts` so far.
///
/// Groups are not tied to their index: a rolling update creates groups on the new template at
/// free indices (up to `replicas + max_surge` groups in all, counting those still terminating)
/// and removes ready old ones while `replicas - max_unavailable` ready groups remain, as a
/// Deployment replaces pods. A failed group comes back at its own index, so its restart
/// history follows it.
pub fn plan(groups: &Groups, wanted: &Wanted<'_>, restarts: &Restarts, now: i64) -> GroupPlan {
    let Wanted {
        replicas,
        size,
        hash,
        max_surge,
        max_unavailable,
    } = *wanted;
    let mut plan = GroupPlan::default();
    let mut delete = |index: u32, reason, group: &Group| {
        let names = group
            .members
            .values()
            .filter(|m| !m.terminating)
            .map(|m| m.name.clone())
            .collect::<Vec<_>>();
        if !names.is_empty() {
            plan.delete.push((index, reason, names));
        }
    };

    // Failures first, whatever the template: the group goes whole and comes back at its index.
    // Those and the groups still terminating keep their index taken.
    let mut coming_back = Vec::new();
    let mut on_the_way_out = 0;
    let mut live: Vec<(u32, &Group)> = Vec::new();
    for (&index, group) in groups {
        if group.terminating() {
            if restarts.contains_key(&index) && group.current(hash) {
                coming_back.push(index);
            } else {
                on_the_way_out += 1;
            }
        } else if let Some(reason) = group.must_move() {
            delete(index, reason, group);
            coming_back.push(index);
        } else if group.members.values().any(|m| m.failed) {
            let due = restarts
                .get(&index)
                .map_or(now, |r| r.at + restart_delay(r.count));
            if now >= due {
                delete(index, DeleteReason::MemberFailed, group);
            } else {
                plan.backing_off.push((index, due));
            }
            coming_back.push(index);
        } else {
            live.push((index, group));
        }
    }
    let (current, outdated): (Vec<_>, Vec<_>) =
        live.into_iter().partition(|(_, g)| g.current(hash));

    // Outdated groups that serve nothing go at once; ready ones while enough others stay ready.
    let mut ready = current
        .iter()
        .chain(&outdated)
        .filter(|(_, g)| g.ready(size))
        .count() as u32
        + coming_back
            .iter()
            .filter(|i| groups[*i].ready(size))
            .count() as u32;
    let min_ready = replicas.saturating_sub(max_unavailable);
    for (index, group) in outdated.iter().filter(|(_, g)| !g.ready(size)) {
        delete(*index, DeleteReason::Outdated, group);
    }
    for (index, group) in outdated.iter().filter(|(_, g)| g.ready(size)) {
        if ready > min_ready {
            delete(*index, DeleteReason::Outdated, group);
            ready -= 1;
        }
    }

    // Beyond `replicas` on the current template: the least useful go, then the highest.
    let kept_current = current.len() + coming_back.len();
    let extra = kept_current.saturating_sub(replicas as usize);
    let mut by_use: Vec<_> = current.iter().collect();
    by_use.sort_by_key(|(i, g)| (g.ready(size), !g.members.is_empty(), std::cmp::Reverse(*i)));
    let scaled_down: Vec<u32> = by_use.iter().take(extra).map(|(i, _)| *i).collect();
    for (index, group) in by_use.iter().take(extra) {
        delete(*index, DeleteReason::ScaledDown, group);
    }

    // Members missing from current groups, then new groups at free indices (a group with a
    // restart history first) while the surge allows.
    for (index, group) in current.iter().filter(|(i, _)| !scaled_down.contains(i)) {
        for rank in 0..size {
            if !group.members.contains_key(&rank) {
                plan.create.push((*index, rank));
            }
        }
    }
    // Every group counts against the surge until its pods are gone, being removed or not.
    let occupying = (kept_current + outdated.len()) as u32 + on_the_way_out;
    let missing = replicas.saturating_sub((kept_current - extra) as u32);
    let room = (replicas + max_surge).saturating_sub(occupying);
    let free = restarts
        .keys()
        .copied()
        .chain(0..)
        .filter(|i| !groups.contains_key(i));
    let mut fresh: Vec<u32> = Vec::new();
    for index in free {
        if fresh.len() as u32 >= missing.min(room) {
            break;
        }
        if !fresh.contains(&index) {
            fresh.push(index);
        }
    }
    for index in fresh {
        plan.create.extend((0..size).map(|rank| (index, rank)));
    }
    plan.create.sort_unstable();
    plan.delete.sort_by_key(|(index, ..)| *index);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plans without surge, one group unavailable at a time (the defaults).
    fn plan(
        groups: &Groups,
        replicas: u32,
        size: u32,
        hash: &str,
        restarts: &Restarts,
        now: i64,
    ) -> GroupPlan {
        let wanted = Wanted {
            replicas,
            size,
            hash,
            max_surge: 0,
            max_unavailable: 1,
        };
        super::plan(groups, &wanted, restarts, now)
    }

    fn member(name: &str, hash: &str, ready: bool) -> Member {
        Member {
            name: name.into(),
            hash: hash.into(),
            ready,
            failed: false,
            terminating: false,
            group_size: None,
            problem: None,
            node_lost: false,
            incarnation: 0,
            gpu_unhealthy: false,
            spot_unavailable: false,
        }
    }

    fn pod_with_status(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "llama-0-0"},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn pod_problems_are_read_from_the_scheduler_and_the_kubelet_most_pressing_first() {
        let waiting = |reason: &str, message: &str| {
            serde_json::json!({"containerStatuses": [{"name": "agent", "image": "i", "imageID": "",
                "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": message}}}]})
        };
        let read = |status| problem(&pod_with_status(status));
        let pull = read(waiting("ImagePullBackOff", "Back-off pulling image \"x\"")).unwrap();
        assert_eq!(pull.kind, ProblemKind::ImagePull);
        assert_eq!(
            pull.message,
            "ImagePullBackOff: Back-off pulling image \"x\""
        );
        let config = read(waiting(
            "CreateContainerConfigError",
            "secret \"hf\" not found",
        ))
        .unwrap();
        assert_eq!(config.kind, ProblemKind::ContainerConfig);
        assert_eq!(read(waiting("ContainerCreating", "")), None);
        let unschedulable = read(serde_json::json!({"conditions": [{"type": "PodScheduled",
            "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}))
        .unwrap();
        assert_eq!(
            (unschedulable.kind, unschedulable.message.as_str()),
            (
                ProblemKind::Unschedulable,
                "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
            )
        );
        // Crash-looping after an OOM kill: the kill is what a person needs to know.
        let mut oom = waiting(
            "CrashLoopBackOff",
            "back-off 40s restarting failed container",
        );
        oom["containerStatuses"][0]["lastState"] =
            serde_json::json!({"terminated": {"reason": "OOMKilled", "exitCode": 137}});
        let oom = read(oom).unwrap();
        assert_eq!(oom.kind, ProblemKind::OutOfMemory);
        assert!(
            oom.message.contains("agent was OOMKilled (exit code 137)"),
            "{}",
            oom.message
        );
        let crash = read(waiting("CrashLoopBackOff", "back-off 40s")).unwrap();
        assert_eq!(crash.kind, ProblemKind::CrashLoop);
        assert_eq!(read(serde_json::json!({"phase": "Running"})), None);
    }

    /// (rank, template hash, ready) of each member.
    type Members<'a> = &'a [(u32, &'a str, bool)];

    fn groups(spec: &[(u32, Members<'_>)]) -> Groups {
        spec.iter()
            .map(|(g, members)| {
                let members = members
                    .iter()
                    .map(|(r, h, ready)| (*r, member(&format!("p-{g}-{r}"), h, *ready)))
                    .collect();
                (
                    *g,
                    Group {
                        members,
                        abandoned: None,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn an_empty_pool_creates_every_member_of_every_group() {
        let plan = plan(&Groups::new(), 2, 2, "h", &Restarts::new(), 0);
        assert_eq!(plan.create, vec![(0, 0), (0, 1), (1, 0), (1, 1)]);
        assert!(plan.delete.is_empty());
    }

    #[test]
    fn a_missing_member_is_created_alone() {
        let g = groups(&[(0, &[(0, "h", true)])]);
        assert_eq!(
            plan(&g, 1, 2, "h", &Restarts::new(), 0).create,
            vec![(0, 1)]
        );
    }

    #[test]
    fn a_failed_member_recreates_its_whole_group() {
        let mut g = groups(&[
            (0, &[(0, "h", true), (1, "h", false)]),
            (1, &[(0, "h", true), (1, "h", true)]),
        ]);
        g.get_mut(&0).unwrap().members.get_mut(&1).unwrap().failed = true;
        let plan = plan(&g, 2, 2, "h", &Restarts::new(), 0);
        assert_eq!(
            plan.delete,
            vec![(
                0,
                DeleteReason::MemberFailed,
                vec!["p-0-0".into(), "p-0-1".into()]
            )]
        );
        assert!(
            plan.create.is_empty(),
            "nothing is created until the old pods are gone"
        );
    }

    #[test]
    fn a_group_that_keeps_failing_waits_longer_each_time_and_is_forgotten_once_it_holds() {
        assert_eq!(
            (0..=8).map(restart_delay).collect::<Vec<_>>(),
            [0, 10, 20, 40, 80, 160, 320, 600, 600]
        );
        let mut g = groups(&[(0, &[(0, "h", true), (1, "h", false)])]);
        g.get_mut(&0).unwrap().members.get_mut(&1).unwrap().failed = true;
        // The first failure: at once, and counted.
        let first = plan(&g, 1, 2, "h", &Restarts::new(), 1000);
        assert_eq!(first.delete.len(), 1);
        let after_first = restarts_after(&Restarts::new(), &first, &g, 2, 1000);
        assert_eq!(after_first[&0], Restart { count: 1, at: 1000 });
        // Failing again 5 s later: it waits until 10 s after the last recreation.
        let early = plan(&g, 1, 2, "h", &after_first, 1005);
        assert!(early.delete.is_empty() && early.create.is_empty());
        assert_eq!(early.backing_off, [(0, 1010)]);
        assert_eq!(
            restarts_after(&after_first, &early, &g, 2, 1005),
            after_first
        );
        let due = plan(&g, 1, 2, "h", &after_first, 1010);
        assert_eq!(due.delete.len(), 1);
        let after_second = restarts_after(&after_first, &due, &g, 2, 1010);
        assert_eq!(after_second[&0], Restart { count: 2, at: 1010 });
        // Pods gone: the group comes back at its own index and is remembered. Ready ten
        // minutes after its last recreation, or scaled away: forgotten.
        let recreated = plan(&Groups::new(), 1, 2, "h", &after_second, 1011);
        assert_eq!(recreated.create, [(0, 0), (0, 1)]);
        assert_eq!(
            restarts_after(&after_second, &recreated, &Groups::new(), 2, 1011),
            after_second
        );
        let quiet = GroupPlan::default();
        let healthy = groups(&[(0, &[(0, "h", true), (1, "h", true)])]);
        let kept = restarts_after(&after_second, &quiet, &healthy, 2, 1500);
        assert_eq!(kept.len(), 1);
        assert!(restarts_after(&after_second, &quiet, &healthy, 2, 1610).is_empty());
        let scaled_away = plan(&Groups::new(), 0, 2, "h", &after_second, 1100);
        assert!(restarts_after(&after_second, &scaled_away, &Groups::new(), 2, 1100).is_empty());
    }

    fn pod(name: &str, group: u32, rank: u32, incarnation: u32, node: &str, deleting: bool) -> Pod {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {
                "parallax.dev/group": group.to_string(), "parallax.dev/rank": rank.to_string(),
                "parallax.dev/incarnation": incarnation.to_string()}},
            "spec": {"nodeName": node, "containers": []},
        }))
        .unwrap();
        if deleting {
            pod.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    jiff::Timestamp::from_second(1).unwrap(),
                ));
        }
        pod
    }

    #[test]
    fn a_group_on_a_lost_node_starts_again_under_its_next_incarnation() {
        let node = |name: &str, ready: &str| -> k8s_openapi::api::core::v1::Node {
            serde_json::from_value(serde_json::json!({"metadata": {"name": name},
                "status": {"conditions": [{"type": "Ready", "status": ready,
                    "lastTransitionTime": "1970-01-01T00:00:00Z"}]}}))
            .unwrap()
        };
        // Node "b" has been down an hour; "a" is fine.
        let nodes = NodeHealth::from_nodes(&[node("a", "True"), node("b", "Unknown")], 3600);
        let pods = [
            pod("p-0-0", 0, 0, 0, "a", false),
            pod("p-0-1", 0, 1, 0, "b", false),
        ];
        let g = observe(&pods, 2, &nodes);
        assert!(g[&0].members[&1].node_lost && !g[&0].members[&0].node_lost);
        // Recreated at once, whatever its restart history: the node, not the group, failed.
        let history = Restarts::from([(0, Restart { count: 5, at: 0 })]);
        let lost = plan(&g, 1, 2, "", &history, 1);
        assert_eq!(
            lost.delete,
            [(
                0,
                DeleteReason::NodeLost,
                vec!["p-0-0".to_owned(), "p-0-1".to_owned()]
            )]
        );
        // The deleted pod on the lost node never goes (its kubelet is gone): it no longer
        // counts, and the group comes back under incarnation 1's names.
        let stuck = [pod("p-0-1", 0, 1, 0, "b", true)];
        let g = observe(&stuck, 2, &nodes);
        assert!(g[&0].members.is_empty());
        assert_eq!((g[&0].abandoned, g[&0].incarnation()), (Some(0), 1));
        assert_eq!(
            plan(&g, 1, 2, "", &Restarts::new(), 1).create,
            [(0, 0), (0, 1)]
        );
        // Its new members keep that incarnation until the group is whole.
        let rejoining = [
            pod("p-0-1", 0, 1, 0, "b", true),
            pod("p-0-0-i1", 0, 0, 1, "a", false),
        ];
        let g = observe(&rejoining, 2, &nodes);
        assert_eq!(g[&0].incarnation(), 1);
        assert_eq!(plan(&g, 1, 2, "", &Restarts::new(), 1).create, [(0, 1)]);
    }

    #[test]
    fn scale_down_removes_the_highest_groups() {
        let g = groups(&[
            (0, &[(0, "h", true)]),
            (1, &[(0, "h", true)]),
            (2, &[(0, "h", true)]),
        ]);
        let plan = plan(&g, 1, 1, "h", &Restarts::new(), 0);
        let removed: Vec<_> = plan.delete.iter().map(|(i, r, _)| (*i, *r)).collect();
        assert_eq!(
            removed,
            vec![(1, DeleteReason::ScaledDown), (2, DeleteReason::ScaledDown)]
        );
    }

    #[test]
    fn a_rolling_update_replaces_one_ready_group_at_a_time() {
        let g = groups(&[
            (0, &[(0, "old", true)]),
            (1, &[(0, "old", true)]),
            (2, &[(0, "old", true)]),
        ]);
        let first = plan(&g, 3, 1, "new", &Restarts::new(), 0);
        assert_eq!(
            first.delete,
            vec![(0, DeleteReason::Outdated, vec!["p-0-0".into()])]
        );

        // Group 0 came back on the new template but is not ready yet: wait.
        let g = groups(&[
            (0, &[(0, "new", false)]),
            (1, &[(0, "old", true)]),
            (2, &[(0, "old", true)]),
        ]);
        assert_eq!(
            plan(&g, 3, 1, "new", &Restarts::new(), 0),
            GroupPlan::default()
        );

        // Ready: the next one goes.
        let g = groups(&[
            (0, &[(0, "new", true)]),
            (1, &[(0, "old", true)]),
            (2, &[(0, "old", true)]),
        ]);
        assert_eq!(
            plan(&g, 3, 1, "new", &Restarts::new(), 0).delete,
            vec![(1, DeleteReason::Outdated, vec!["p-1-0".into()])]
        );
    }

    #[test]
    fn outdated_groups_that_are_not_ready_are_replaced_at_once() {
        let g = groups(&[(0, &[(0, "old", false)]), (1, &[(0, "old", false)])]);
        let plan = plan(&g, 2, 1, "new", &Restarts::new(), 0);
        assert_eq!(plan.delete.len(), 2);
    }

    #[test]
    fn an_outdated_group_is_not_topped_up_when_groups_grow() {
        // TP grew from one pod per group to two: the old single-pod group is replaced, not
        // joined by a new-template member.
        let mut g = groups(&[(0, &[(0, "old", true)]), (1, &[(0, "old", true)])]);
        for group in g.values_mut() {
            group.members.get_mut(&0).unwrap().group_size = Some(1);
        }
        let plan = plan(&g, 2, 2, "new", &Restarts::new(), 0);
        assert!(plan.create.is_empty(), "{plan:?}");
        assert_eq!(
            plan.delete,
            vec![(0, DeleteReason::Outdated, vec!["p-0-0".into()])]
        );
    }

    #[test]
    fn terminating_groups_are_left_to_finish() {
        let mut g = groups(&[(0, &[(0, "h", false)])]);
        g.get_mut(&0)
            .unwrap()
            .members
            .get_mut(&0)
            .unwrap()
            .terminating = true;
        assert_eq!(
            plan(&g, 1, 1, "h", &Restarts::new(), 0),
            GroupPlan::default()
        );
    }

    /// Runs a rolling update of `replicas` one-pod groups from "old" to "new" to its end: each
    /// pass carries out the plan, pods created on one pass are ready on the next, and deleted
    /// ones are gone a pass later. Returns the passes and the groups created.
    fn roll(replicas: u32, max_surge: u32, max_unavailable: u32) -> (u32, u32) {
        let mut g = groups(
            &(0..replicas)
                .map(|i| (i, &[(0, "old", true)][..]))
                .collect::<Vec<_>>(),
        );
        let wanted = Wanted {
            replicas,
            size: 1,
            hash: "new",
            max_surge,
            max_unavailable,
        };
        let floor = replicas.saturating_sub(max_unavailable.max(u32::from(max_surge == 0)));
        let mut created = 0;
        for pass in 1..100 {
            // Last pass's changes take effect: new pods turn ready, deleted ones go.
            g.retain(|_, group| !group.terminating());
            for member in g.values_mut().flat_map(|g| g.members.values_mut()) {
                member.ready = true;
            }
            let ready = g.values().filter(|group| group.ready(1)).count() as u32;
            assert!(ready >= floor, "pass {pass}: {ready} ready of {replicas}");
            assert!(g.len() as u32 <= replicas + max_surge, "pass {pass}: {g:?}");
            let plan = super::plan(&g, &wanted, &Restarts::new(), 0);
            if plan == GroupPlan::default() {
                assert!(g.values().all(|group| group.current("new")));
                assert_eq!(g.len() as u32, replicas);
                return (pass, created);
            }
            for (index, _, _) in &plan.delete {
                for member in g.get_mut(index).unwrap().members.values_mut() {
                    member.terminating = true;
                }
            }
            for (index, rank) in plan.create {
                created += 1;
                g.entry(index)
                    .or_default()
                    .members
                    .insert(rank, member(&format!("p-{index}-{rank}"), "new", false));
            }
        }
        panic!("the rollout of {replicas} groups did not finish");
    }

    #[test]
    fn rollouts_stay_within_surge_and_unavailability_and_start_each_group_once() {
        for (replicas, surge, unavailable) in [
            (1, 1, 0),
            (1, 0, 1),
            (3, 0, 1),
            (3, 1, 0),
            (4, 2, 1),
            (5, 1, 2),
            (2, 3, 0),
        ] {
            let (_, created) = roll(replicas, surge, unavailable);
            assert_eq!(
                created, replicas,
                "{replicas} groups, surge {surge}, unavailable {unavailable}"
            );
        }
        // Surge and unavailability speed it up.
        assert!(roll(4, 2, 2).0 < roll(4, 0, 1).0);
    }

    #[test]
    fn a_one_group_pool_with_surge_serves_throughout_its_update() {
        let old = groups(&[(0, &[(0, "old", true)])]);
        let wanted = Wanted {
            replicas: 1,
            size: 1,
            hash: "new",
            max_surge: 1,
            max_unavailable: 0,
        };
        let first = super::plan(&old, &wanted, &Restarts::new(), 0);
        assert_eq!((first.create, first.delete), (vec![(1, 0)], vec![]));
        let starting = groups(&[(0, &[(0, "old", true)]), (1, &[(0, "new", false)])]);
        assert_eq!(
            super::plan(&starting, &wanted, &Restarts::new(), 0),
            GroupPlan::default(),
            "the old group stays until the new one is ready"
        );
        let both = groups(&[(0, &[(0, "old", true)]), (1, &[(0, "new", true)])]);
        let last = super::plan(&both, &wanted, &Restarts::new(), 0);
        assert_eq!(
            (last.create, last.delete),
            (
                vec![],
                vec![(0, DeleteReason::Outdated, vec!["p-0-0".into()])]
            )
        );
    }

    #[test]
    fn a_failed_group_comes_back_at_its_own_index_under_surge() {
        // Groups 1 and 2 after an update (0 is free); group 2 failed and its pods are gone.
        let history = Restarts::from([(2, Restart { count: 1, at: 0 })]);
        let g = groups(&[(1, &[(0, "h", true)])]);
        let wanted = Wanted {
            replicas: 2,
            size: 1,
            hash: "h",
            max_surge: 1,
            max_unavailable: 0,
        };
        assert_eq!(super::plan(&g, &wanted, &history, 100).create, [(2, 0)]);
        // While its pods terminate, nothing takes its place elsewhere.
        let mut g = groups(&[(1, &[(0, "h", true)]), (2, &[(0, "h", false)])]);
        g.get_mut(&2)
            .unwrap()
            .members
            .get_mut(&0)
            .unwrap()
            .terminating = true;
        assert_eq!(
            super::plan(&g, &wanted, &history, 100),
            GroupPlan::default()
        );
    }

    #[test]
    fn a_group_with_a_gpu_unhealthy_past_its_grace_starts_again_at_once() {
        let mut g = groups(&[
            (0, &[(0, "h", false), (1, "h", true)]),
            (1, &[(0, "h", true), (1, "h", true)]),
        ]);
        g.get_mut(&0)
            .unwrap()
            .members
            .get_mut(&0)
            .unwrap()
            .gpu_unhealthy = true;
        // Whatever its restart history: the GPU, not the group, failed.
        let history = Restarts::from([(0, Restart { count: 5, at: 0 })]);
        let moved = plan(&g, 2, 2, "h", &history, 1);
        assert_eq!(
            moved.delete,
            [(
                0,
                DeleteReason::GpuUnhealthy,
                vec!["p-0-0".to_owned(), "p-0-1".to_owned()]
            )]
        );
        assert!(moved.backing_off.is_empty());
        assert_eq!(
            DeleteReason::GpuUnhealthy.event_reason(),
            "GroupRescheduled"
        );
    }
}
