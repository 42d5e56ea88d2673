//! Spot placement: which groups run on spot nodes and which on on-demand ones, and pods placed
//! accordingly. A group keeps the capacity type it was created with (its pods carry it in a
//! label); new groups take on-demand places first (the floor, then what the share leaves), then
//! spot. When spot capacity is found wanting — a spot group's pod unschedulable for five minutes
//! — new groups go on-demand for thirty minutes, and that group comes back on on-demand nodes.
//! Pure; the placement is outside the pod template (nothing rolls when it changes).

use crate::children::GROUP_LABEL;
use crate::groups::ProblemKind;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::SignedDuration;
use kube::ResourceExt;
use parallax_crds::PlacementSpec;
use std::collections::BTreeMap;

/// The label a group's pods carry their capacity type in.
pub const CAPACITY_LABEL: &str = "parallax.dev/capacity-type";
/// How long a spot pod may stay unschedulable before spot counts as unavailable.
pub const SPOT_WAIT_SECONDS: i64 = 300;
/// How long new groups go on-demand after that.
pub const SPOT_BACKOFF_SECONDS: i64 = 1800;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CapacityType {
    OnDemand,
    Spot,
}

impl CapacityType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnDemand => "on-demand",
            Self::Spot => "spot",
        }
    }

    pub fn of(pod: &Pod) -> Option<Self> {
        match pod.labels().get(CAPACITY_LABEL).map(String::as_str) {
            Some("spot") => Some(Self::Spot),
            Some("on-demand") => Some(Self::OnDemand),
            _ => None,
        }
    }
}

/// Whether the pool places groups by capacity type at all.
pub fn enabled(spec: &PlacementSpec) -> bool {
    spec.spot_share > 0.0
}

/// (on-demand, spot) groups wanted of `replicas`.
pub fn wanted(spec: &PlacementSpec, replicas: u32, spot_unavailable: bool) -> (u32, u32) {
    if !enabled(spec) || spot_unavailable {
        return (replicas, 0);
    }
    let floor = (spec.on_demand_floor.max(0) as u32).min(replicas);
    let spot = ((f64::from(replicas) * spec.spot_share.clamp(0.0, 1.0)).floor() as u32)
        .min(replicas - floor);
    (replicas - spot, spot)
}

/// The capacity type of each group in `creating`: its pods' own when it has some, else
/// on-demand until `wanted`'s on-demand count is met, then spot.
pub fn assign(
    existing: &BTreeMap<u32, CapacityType>,
    creating: &[u32],
    wanted: (u32, u32),
) -> BTreeMap<u32, CapacityType> {
    let mut on_demand = existing
        .values()
        .filter(|c| **c == CapacityType::OnDemand)
        .count() as u32;
    let mut assigned = BTreeMap::new();
    for group in creating {
        let capacity = existing.get(group).copied().unwrap_or_else(|| {
            if on_demand < wanted.0 {
                on_demand += 1;
                CapacityType::OnDemand
            } else {
                CapacityType::Spot
            }
        });
        assigned.insert(*group, capacity);
    }
    assigned
}

/// Each group's capacity type, read from its pods.
pub fn observed(pods: &[Pod]) -> BTreeMap<u32, CapacityType> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let group = p.labels().get(GROUP_LABEL)?.parse().ok()?;
            Some((group, CapacityType::of(p)?))
        })
        .collect()
}

/// `pod` on `capacity`'s nodes: the label, the node selector, spot's tolerations.
pub fn place(mut pod: Pod, capacity: CapacityType, spec: &PlacementSpec) -> Pod {
    pod.labels_mut()
        .insert(CAPACITY_LABEL.into(), capacity.as_str().into());
    let pod_spec = pod.spec.get_or_insert_with(Default::default);
    let (selector, tolerations) = match capacity {
        CapacityType::Spot => (&spec.spot_node_selector, spec.spot_tolerations.as_slice()),
        CapacityType::OnDemand => (&spec.on_demand_node_selector, &[][..]),
    };
    if !selector.is_empty() {
        pod_spec
            .node_selector
            .get_or_insert_with(BTreeMap::new)
            .extend(selector.clone());
    }
    if !tolerations.is_empty() {
        pod_spec
            .tolerations
            .get_or_insert_with(Vec::new)
            .extend(tolerations.iter().cloned());
    }
    pod
}

/// Spot pods unschedulable for longer than `SPOT_WAIT_SECONDS` at `now`, by name.
pub fn stranded_spot_pods(
    pods: &[Pod],
    problems: &BTreeMap<String, ProblemKind>,
    now: &Time,
) -> Vec<String> {
    pods.iter()
        .filter(|p| CapacityType::of(p) == Some(CapacityType::Spot))
        .filter(|p| problems.get(&p.name_any()) == Some(&ProblemKind::Unschedulable))
        .filter(|p| {
            p.metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|created| {
                    now.0.duration_since(created.0) >= SignedDuration::from_secs(SPOT_WAIT_SECONDS)
                })
        })
        .map(ResourceExt::name_any)
        .collect()
}

/// Since when spot is unavailable: from now when pods are stranded, the earlier time while
/// it is recent enough, none after the backoff.
pub fn spot_unavailable_since(previous: Option<&Time>, stranded: bool, now: &Time) -> Option<Time> {
    let recent = previous.filter(|since| {
        now.0.duration_since(since.0) < SignedDuration::from_secs(SPOT_BACKOFF_SECONDS)
    });
    match (recent, stranded) {
        (_, true) => Some(now.clone()),
        (Some(since), false) => Some(since.clone()),
        (None, false) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn spec(share: f64, floor: i32) -> PlacementSpec {
        serde_json::from_value(serde_json::json!({
            "spotShare": share, "onDemandFloor": floor,
            "spotNodeSelector": {"karpenter.sh/capacity-type": "spot"},
            "spotTolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
            "onDemandNodeSelector": {"karpenter.sh/capacity-type": "on-demand"}}))
        .unwrap()
    }

    #[test]
    fn the_floor_holds_and_the_share_goes_to_spot() {
        assert_eq!(
            wanted(&spec(0.0, 0), 4, false),
            (4, 0),
            "no share: all on-demand"
        );
        assert_eq!(wanted(&spec(0.75, 1), 4, false), (1, 3));
        assert_eq!(
            wanted(&spec(1.0, 2), 4, false),
            (2, 2),
            "the floor wins over the share"
        );
        assert_eq!(wanted(&spec(1.0, 6), 4, false), (4, 0));
        assert_eq!(wanted(&spec(0.5, 0), 3, false), (2, 1));
        assert_eq!(
            wanted(&spec(1.0, 1), 4, true),
            (4, 0),
            "spot unavailable: on-demand"
        );
        // Groups keep their type; new ones fill on-demand first.
        let existing = BTreeMap::from([(0, CapacityType::OnDemand), (1, CapacityType::Spot)]);
        let assigned = assign(&existing, &[1, 2, 3], (2, 2));
        assert_eq!(
            assigned.into_iter().collect::<Vec<_>>(),
            [
                (1, CapacityType::Spot),
                (2, CapacityType::OnDemand),
                (3, CapacityType::Spot)
            ]
        );
    }

    #[test]
    fn pods_go_where_their_type_says() {
        let pod = Pod::default();
        let spot = place(pod.clone(), CapacityType::Spot, &spec(1.0, 0));
        let s = spot.spec.as_ref().unwrap();
        assert_eq!(spot.labels()[CAPACITY_LABEL], "spot");
        assert_eq!(
            s.node_selector.as_ref().unwrap()["karpenter.sh/capacity-type"],
            "spot"
        );
        assert_eq!(
            s.tolerations.as_ref().unwrap()[0].key.as_deref(),
            Some("spot")
        );
        let on_demand = place(pod, CapacityType::OnDemand, &spec(1.0, 0));
        let s = on_demand.spec.as_ref().unwrap();
        assert_eq!(
            s.node_selector.as_ref().unwrap()["karpenter.sh/capacity-type"],
            "on-demand"
        );
        assert!(s.tolerations.is_none());
    }

    #[test]
    fn spot_is_unavailable_for_a_while_after_a_pod_waits_too_long() {
        let time = |s| Time(Timestamp::from_second(s).unwrap());
        let pod: Pod = serde_json::from_value(serde_json::json!({"metadata": {
            "name": "p-1-0", "creationTimestamp": "1970-01-01T00:00:00Z",
            "labels": {"parallax.dev/capacity-type": "spot"}}}))
        .unwrap();
        let problems = BTreeMap::from([("p-1-0".to_owned(), ProblemKind::Unschedulable)]);
        let pods = [pod];
        assert!(stranded_spot_pods(&pods, &problems, &time(299)).is_empty());
        assert_eq!(stranded_spot_pods(&pods, &problems, &time(300)), ["p-1-0"]);
        let since = spot_unavailable_since(None, true, &time(300));
        assert_eq!(since, Some(time(300)));
        assert_eq!(
            spot_unavailable_since(since.as_ref(), false, &time(2099)),
            since
        );
        assert_eq!(
            spot_unavailable_since(since.as_ref(), false, &time(2100)),
            None
        );
    }
}
