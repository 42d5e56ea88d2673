//! The reconcile shell: finalizer dispatch to `apply` and `cleanup`. Everything decided here
//! comes from the pure modules (`tp`, `children`, `groups`, `status`); this file only reads the
//! cluster, applies their results with server-side apply and records events.

use crate::agents::AgentProbe;
use crate::children::{
    ChildBuilder, TEMPLATE_HASH_ANNOTATION, headless_service_name, owned_by, pdb_name,
    pool_selector, service_name, unused_configs,
};
use crate::error::{Error, Result};
use crate::gpu_faults;
use crate::groups::{self, DeleteReason, GroupPlan};
use crate::inventory::{GpuInventory, NodeHealth};
use crate::lws::{self, LWS_NAME_LABEL};
use crate::metrics::Metrics;
use crate::monitoring::{self, PodMonitors, Wanted};
use crate::placement;
use crate::revisions;
use crate::router;
use crate::status::{AgentView, RouterPods, compute_status, restarts_of};
use crate::tp::{self, GroupLayout, LayoutError};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{ControllerRevision, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams,
    PostParams,
};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use parallax_crds::{GroupWorkload, InferencePool, InferencePoolStatus};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;
use tracing::{Span, debug, field, info, instrument, warn};

/// The one field manager every write of the operator uses.
pub const FIELD_MANAGER: &str = "parallax-operator";
/// Finalizer that lets the operator stop a pool's groups before the pool goes.
pub const FINALIZER: &str = "parallax.dev/cleanup";

/// How often a healthy pool is looked at again without any change.
const RESYNC: Duration = Duration::from_secs(300);
/// How often a pool whose pods download the model reads their progress again.
const DOWNLOAD_PROGRESS: Duration = Duration::from_secs(15);
/// How soon a pool that cannot be laid out is looked at again (nodes may have appeared).
const RETRY_LAYOUT: Duration = Duration::from_secs(30);

/// What every reconcile shares.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    /// Nodes, kept by a reflector: the GPU inventory.
    pub nodes: Store<Node>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// The agent image of pools that pin none.
    pub agent_image: String,
    /// Reads download progress from agents that are not ready yet.
    pub agents: AgentProbe,
    /// Whether pools get a PodMonitor.
    pub pod_monitors: PodMonitors,
}

impl Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

/// Entry point for the controller: one pool, one pass.
#[instrument(skip(pool, ctx), fields(pool = %pool.name_any(), namespace = field::Empty))]
pub async fn reconcile(pool: Arc<InferencePool>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    let namespace = pool
        .namespace()
        .ok_or(Error::MissingField("InferencePool", "namespace"))?;
    Span::current().record("namespace", namespace.as_str());
    let pools: Api<InferencePool> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&pools, FINALIZER, pool, |event| async {
        match event {
            Finalizer::Apply(pool) => apply(&pool, &ctx).await,
            Finalizer::Cleanup(pool) => cleanup(&pool, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Requeue policy after a failed reconcile; counts the failure by category.
pub fn error_policy(pool: Arc<InferencePool>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(pool = %pool.name_any(), category = error.category(), %error, "reconcile failed");
    ctx.metrics.reconcile_failed(error.category());
    Action::requeue(Duration::from_secs(15))
}

async fn apply(pool: &InferencePool, ctx: &Context) -> Result<Action> {
    let namespace = pool
        .namespace()
        .ok_or(Error::MissingField("InferencePool", "namespace"))?;
    let name = pool.name_any();
    let client = &ctx.client;

    // The groups run the spec as written, or, while it asks for a revision that regressed, the
    // last good revision's serving fields.
    let revisions = revisions::sync(client, pool).await?;
    let (serving, unrolled) = revisions::serving_pool(pool, &revisions);
    let pool = serving.as_ref();
    if let Some(why) = &unrolled {
        warn!(pool = %name, why, "not rolled back");
    }

    // One reading of the clock and of the nodes serves the whole pass.
    let now = Timestamp::now();
    let nodes = ctx.nodes.state();
    // The pinned layout is the spec's as written: a rolled-back pool sizes its revision anew.
    let rolled_back = matches!(serving, std::borrow::Cow::Owned(_));
    let layout = match tp::pinned(pool).filter(|_| !rolled_back) {
        Some(pinned) => Ok(pinned),
        None => tp::resolve(
            &pool.spec,
            &GpuInventory::from_nodes(nodes.iter().map(|n| n.as_ref()), &pool.spec.resources),
        ),
    };

    let pod_api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pods = pod_api
        .list(&ListParams::default().labels(&pool_selector(&name)))
        .await?;
    let pods_per_group = layout.as_ref().map_or(1, |l| l.pods_per_group);
    // The pool's pods: those it made itself, and those its LeaderWorkerSet made. Pods that
    // carry the pool's labels without being either are neither counted nor touched.
    let lws_name = lws::name(&name);
    let (owned, others): (Vec<Pod>, Vec<Pod>) = pods
        .items
        .into_iter()
        .partition(|p| owned_by(&p.metadata, pool));
    let (from_lws, foreign): (Vec<Pod>, Vec<Pod>) = others
        .into_iter()
        .partition(|p| p.labels().get(LWS_NAME_LABEL) == Some(&lws_name));
    for pod in &foreign {
        debug!(pod = %pod.name_any(), "carries the pool's labels but is not the pool's: left alone");
    }
    let workload = pool.spec.group_workload;
    let health = NodeHealth::from_nodes(nodes.iter().map(|n| n.as_ref()), now.as_second());
    let mut observed = match workload {
        GroupWorkload::Pods => groups::observe(&owned, pods_per_group, &health),
        GroupWorkload::LeaderWorkerSet => groups::observe(&from_lws, pods_per_group, &health),
    };

    // What the agents of unready pods say: how far their download is, and GPUs gone bad.
    let pool_pods = match workload {
        GroupWorkload::Pods => &owned,
        GroupWorkload::LeaderWorkerSet => &from_lws,
    };
    let reports = ctx.agents.read(pool_pods).await;
    let previous = pool.status.clone().unwrap_or_default();
    let gpu_health = &pool.spec.gpu_health;
    let faults = gpu_faults::merge(&previous.gpu_faults, &reports, pool_pods, &Time(now));
    let mut events = Vec::new();
    for fault in &faults {
        let known = previous
            .gpu_faults
            .iter()
            .any(|f| f.pod == fault.pod && f.uuid == fault.uuid);
        if !known {
            events.push((
                EventType::Warning,
                "GpuUnhealthy",
                format!(
                    "pod {} on node {}: GPU {} ({}) is unhealthy: {}",
                    fault.pod,
                    fault.node.as_deref().unwrap_or("unknown"),
                    fault.gpu,
                    fault.uuid,
                    fault.reason
                ),
            ));
        }
    }
    // Past the grace, the group goes elsewhere (a LeaderWorkerSet's groups are LWS's to move).
    let due = gpu_faults::due(&faults, gpu_health.unhealthy_grace_seconds, &Time(now));
    if workload == GroupWorkload::Pods {
        for member in observed.values_mut().flat_map(|g| g.members.values_mut()) {
            member.gpu_unhealthy = due.contains(&member.name);
        }
    }
    // Spot: a spot pod unschedulable too long means spot capacity is wanting; its group comes
    // back on on-demand nodes, and new groups go there for a while.
    let placement_spec = &pool.spec.placement;
    let stranded = if placement::enabled(placement_spec) && workload == GroupWorkload::Pods {
        let problems = observed
            .values()
            .flat_map(|g| g.members.values())
            .filter_map(|m| Some((m.name.clone(), m.problem.as_ref()?.kind)))
            .collect();
        placement::stranded_spot_pods(&owned, &problems, &Time(now))
    } else {
        Vec::new()
    };
    let spot_since = placement::enabled(placement_spec)
        .then(|| {
            placement::spot_unavailable_since(
                previous.spot_unavailable_since.as_ref(),
                !stranded.is_empty(),
                &Time(now),
            )
        })
        .flatten();
    for member in observed.values_mut().flat_map(|g| g.members.values_mut()) {
        member.spot_unavailable = stranded.contains(&member.name);
    }
    let mut avoided_nodes = gpu_faults::avoided(
        &previous.avoided_nodes,
        &[],
        gpu_health.avoid_node_seconds,
        &Time(now),
    );

    let restarts = pool.status.as_ref().map(restarts_of).unwrap_or_default();
    let mut plan = GroupPlan::default();
    // The router's Deployment, read once a pass: the pool's Service goes to the router only
    // while one of its pods is ready, and the apply below is checked against it.
    let router_deployment = router_deployment(client, &namespace, pool).await?;
    let router = router_pods(router_deployment.as_ref(), pool);
    let template_hash = match &layout {
        Ok(layout) => {
            let builder = ChildBuilder::with_agent_image(pool, layout, &ctx.agent_image)
                .with_router_serving(router.is_some_and(|r| r.ready > 0));
            let children = builder.children();
            // Applied only where the name is free or the pool's: never taken over.
            let mut taken = Vec::new();
            taken.extend(apply_owned(client, &namespace, &children.config_map, pool).await?);
            taken.extend(apply_owned(client, &namespace, &children.service, pool).await?);
            taken.extend(apply_owned(client, &namespace, &children.headless_service, pool).await?);
            taken.extend(apply_owned(client, &namespace, &children.pdb, pool).await?);
            taken.extend(
                apply_router(
                    client,
                    &namespace,
                    &builder,
                    pool,
                    router_deployment.as_ref(),
                )
                .await?,
            );
            let monitors = monitoring::resource();
            match ctx.pod_monitors.wanted() {
                Wanted::Yes(settings) => {
                    let object = builder.pod_monitor(settings);
                    if let CustomApplied::NameTaken(name) =
                        apply_custom(client, &namespace, &monitors, &object, pool).await?
                    {
                        taken.push(name);
                    }
                }
                Wanted::Removed => {
                    let monitor = monitoring::name(&name);
                    delete_custom_if_owned(client, &namespace, &monitors, &monitor, pool).await?;
                }
                Wanted::NotServed => {}
            }

            let replicas = pool.spec.replicas.max(0) as u32;
            let pod_api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
            // Configurations pods may still read: those of the pool's pods, and while an LWS
            // rolls, every one (a group restarting on its old template reads its old one).
            let in_use: Vec<Pod> = owned.iter().chain(&from_lws).cloned().collect();
            let mut keep_configs = false;
            match workload {
                GroupWorkload::Pods => {
                    // Moved off a LeaderWorkerSet: it goes, and its pods with it.
                    if !from_lws.is_empty() {
                        delete_custom_if_owned(
                            client,
                            &namespace,
                            &lws::resource(),
                            &lws_name,
                            pool,
                        )
                        .await?;
                    }
                    let (max_surge, max_unavailable) = pool.spec.rollout.resolve(replicas);
                    let wanted = groups::Wanted {
                        replicas,
                        size: layout.pods_per_group,
                        hash: builder.template_hash(),
                        max_surge,
                        max_unavailable,
                    };
                    plan = groups::plan(&observed, &wanted, &restarts, now.as_second());
                    delete_groups(&pod_api, &plan, layout, replicas, &mut events).await?;
                    // Groups moved for a GPU keep off its node, and so does every new pod.
                    let moved_from: Vec<String> = plan
                        .delete
                        .iter()
                        .filter(|(_, reason, _)| *reason == DeleteReason::GpuUnhealthy)
                        .flat_map(|(_, _, pods)| pods)
                        .filter_map(|pod| {
                            faults
                                .iter()
                                .find(|f| f.pod == *pod)
                                .and_then(|f| f.node.clone())
                        })
                        .collect();
                    avoided_nodes = gpu_faults::avoided(
                        &avoided_nodes,
                        &moved_from,
                        gpu_health.avoid_node_seconds,
                        &Time(now),
                    );
                    let avoid: Vec<String> = avoided_nodes.iter().map(|a| a.node.clone()).collect();
                    // New groups on-demand first (the floor, what the share leaves), then spot.
                    let mut creating: Vec<u32> = plan.create.iter().map(|(g, _)| *g).collect();
                    creating.dedup();
                    let deleted: Vec<u32> = plan.delete.iter().map(|(g, ..)| *g).collect();
                    let mut existing = placement::observed(&owned);
                    existing.retain(|g, _| !deleted.contains(g));
                    let capacity = placement::enabled(placement_spec).then(|| {
                        placement::assign(
                            &existing,
                            &creating,
                            placement::wanted(placement_spec, replicas, spot_since.is_some()),
                        )
                    });
                    let placing = Placing {
                        builder: &builder,
                        avoid: &avoid,
                        capacity: capacity.as_ref(),
                        spec: placement_spec,
                    };
                    create_pods(&pod_api, &plan, &observed, &placing, &mut events).await?;
                }
                GroupWorkload::LeaderWorkerSet => {
                    let object = builder.leader_worker_set(replicas);
                    match apply_custom(client, &namespace, &lws::resource(), &object, pool).await? {
                        CustomApplied::Applied => {}
                        CustomApplied::NameTaken(name) => taken.push(name),
                        CustomApplied::NotInstalled => {
                            let api = lws::resource();
                            plan.blocked = Some(format!(
                                "groupWorkload is leaderworkerset, but the cluster serves no {}/{}: install LeaderWorkerSet, or set groupWorkload: pods",
                                api.api_version, api.plural
                            ));
                        }
                    }
                    // Pods the operator made itself before the pool moved to LWS go.
                    let own_groups = groups::observe(&owned, pods_per_group, &health);
                    plan.delete = own_groups
                        .iter()
                        .filter_map(|(index, group)| {
                            let names: Vec<String> = group
                                .members
                                .values()
                                .filter(|m| !m.terminating)
                                .map(|m| m.name.clone())
                                .collect();
                            (!names.is_empty()).then_some((*index, DeleteReason::Outdated, names))
                        })
                        .collect();
                    delete_groups(&pod_api, &plan, layout, replicas, &mut events).await?;
                    keep_configs = from_lws.iter().any(|p| {
                        p.annotations()
                            .get(TEMPLATE_HASH_ANNOTATION)
                            .map(String::as_str)
                            != Some(builder.template_hash())
                    });
                }
            }
            for name in taken {
                events.push((
                    EventType::Warning,
                    "ChildNameTaken",
                    format!("{name} exists and is not the pool's: it is left alone, and the pool works without it"),
                ));
            }
            // Revisions no pod reads any more (pods removed above go on the next pass).
            let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
            let revisions = config_maps
                .list(&ListParams::default().labels(&pool_selector(&name)))
                .await?;
            let unused =
                unused_configs(&revisions.items, &in_use, &builder.config_map_name(), pool);
            for unused in unused.iter().filter(|_| !keep_configs) {
                delete_ignoring_absent(&config_maps, unused).await?;
            }
            Some(builder.template_hash().to_owned())
        }
        Err(_) => None,
    };

    // Pods on their way up may be downloading the model: their agents say how far.
    let agents = AgentView {
        downloads: reports
            .iter()
            .filter_map(|(pod, r)| Some((pod.clone(), r.download.clone()?)))
            .collect(),
        gpu_faults: faults,
        avoided_nodes,
        spot_unavailable_since: spot_since,
        router,
    };
    let status = compute_status(
        pool,
        layout.as_ref(),
        &observed,
        template_hash.as_deref(),
        &plan,
        &agents,
        &Time(now),
    );
    events.extend(decision_events(pool, &layout));
    for (type_, reason, note) in one_per_reason(events) {
        info!(reason, %note, "decision");
        publish(ctx, pool, type_, reason, note).await;
    }
    ctx.metrics
        .pool_observed(&namespace, &name, pool.spec.replicas, &status);
    if pool.status.as_ref() != Some(&status) {
        let pools: Api<InferencePool> = Api::namespaced(client.clone(), &namespace);
        let patch = serde_json::json!({ "status": status_patch(pool.status.as_ref(), &status) });
        pools
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    // A failed group waiting out its backoff, or a GPU its grace, is looked at again when due.
    let grace_ends = agents
        .gpu_faults
        .iter()
        .map(|f| gpu_faults::due_at(f, gpu_health.unhealthy_grace_seconds).as_second())
        .filter(|at| *at > now.as_second());
    let due = plan
        .backing_off
        .iter()
        .map(|(_, due)| *due)
        .chain(grace_ends)
        .map(|due| Duration::from_secs((due - now.as_second()).max(1) as u64))
        .min();
    let next = match (due, layout.is_ok()) {
        (Some(due), _) => due.min(RESYNC),
        (None, true) => RESYNC,
        (None, false) => RETRY_LAYOUT,
    };
    // A download moves no object: its progress is read again on a timer.
    Ok(Action::requeue(if agents.downloads.is_empty() {
        next
    } else {
        next.min(DOWNLOAD_PROGRESS)
    }))
}

/// A merge patch from `previous` to `next`: fields `next` leaves out (an absent `Option`, an
/// empty list) are written as null, which a merge patch needs to remove them.
fn status_patch(
    previous: Option<&InferencePoolStatus>,
    next: &InferencePoolStatus,
) -> serde_json::Value {
    let mut patch = serde_json::to_value(next).unwrap_or_default();
    let before = previous
        .and_then(|p| serde_json::to_value(p).ok())
        .unwrap_or_default();
    if let (Some(patch), Some(before)) = (patch.as_object_mut(), before.as_object()) {
        for key in before.keys() {
            patch.entry(key.clone()).or_insert(serde_json::Value::Null);
        }
    }
    patch
}

/// Deletes the pods of the groups `plan` removes, with an event for each group.
async fn delete_groups(
    pod_api: &Api<Pod>,
    plan: &GroupPlan,
    layout: &GroupLayout,
    replicas: u32,
    events: &mut Vec<(EventType, &'static str, String)>,
) -> Result<()> {
    for (group, reason, pods) in &plan.delete {
        for pod in pods {
            delete_ignoring_absent(pod_api, pod).await?;
        }
        let note = match reason {
            DeleteReason::ScaledDown => format!("removed group {group}: replicas is {replicas}"),
            DeleteReason::MemberFailed => format!(
                "group {group} had a failed member; recreating all {} pods",
                layout.pods_per_group
            ),
            DeleteReason::Outdated => format!("removed group {group}, which ran an older template"),
            DeleteReason::NodeLost => format!(
                "a node of group {group} is lost; recreating the group elsewhere under new pod names"
            ),
            DeleteReason::GpuUnhealthy => format!(
                "a GPU of group {group} stayed unhealthy past the grace; recreating the group away from its node"
            ),
            DeleteReason::SpotUnavailable => format!(
                "a spot pod of group {group} could not be scheduled for {}s; the group comes back on on-demand nodes",
                placement::SPOT_WAIT_SECONDS
            ),
        };
        let type_ = if matches!(
            reason,
            DeleteReason::MemberFailed
                | DeleteReason::NodeLost
                | DeleteReason::GpuUnhealthy
                | DeleteReason::SpotUnavailable
        ) {
            EventType::Warning
        } else {
            EventType::Normal
        };
        events.push((type_, reason.event_reason(), note));
    }
    Ok(())
}

/// Where new pods go: the template, nodes to keep off, and each new group's capacity type.
struct Placing<'a, 'b> {
    builder: &'a ChildBuilder<'b>,
    avoid: &'a [String],
    capacity: Option<&'a std::collections::BTreeMap<u32, placement::CapacityType>>,
    spec: &'a parallax_crds::PlacementSpec,
}

/// Creates the pods `plan` asks for, with an event for each group.
async fn create_pods(
    pod_api: &Api<Pod>,
    plan: &GroupPlan,
    observed: &groups::Groups,
    placing: &Placing<'_, '_>,
    events: &mut Vec<(EventType, &'static str, String)>,
) -> Result<()> {
    let builder = placing.builder;
    let mut created_groups = Vec::new();
    for &(group, rank) in &plan.create {
        // Created, not applied: a pod of that name that is not the pool's is never adopted
        // (the create fails and says so).
        let incarnation = observed.get(&group).map_or(0, groups::Group::incarnation);
        let mut pod = keep_off(builder.pod_in(group, rank, incarnation), placing.avoid);
        if let Some(capacity) = placing.capacity.and_then(|c| c.get(&group)) {
            pod = placement::place(pod, *capacity, placing.spec);
        }
        match pod_api.create(&PostParams::default(), &pod).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {
                events.push((
                    EventType::Warning,
                    "PodNameTaken",
                    format!(
                        "pod {} exists and is not the pool's: it is left alone, and group {group} waits for its name",
                        pod.name_any()
                    ),
                ));
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        if !created_groups.contains(&group) {
            created_groups.push(group);
        }
    }
    for group in created_groups {
        events.push((
            EventType::Normal,
            "GroupCreated",
            format!(
                "created pods of group {group} ({} GPUs each)",
                builder.layout.gpus_per_pod
            ),
        ));
    }
    Ok(())
}

/// `pod` with a required node affinity that keeps it off the `avoid` nodes (added to each of
/// its terms; not part of the template: it is where the pod may go, not what it is).
fn keep_off(mut pod: Pod, avoid: &[String]) -> Pod {
    use k8s_openapi::api::core::v1::{
        Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    };
    if avoid.is_empty() {
        return pod;
    }
    let requirement = NodeSelectorRequirement {
        key: "kubernetes.io/hostname".into(),
        operator: "NotIn".into(),
        values: Some(avoid.to_vec()),
    };
    let spec = pod.spec.get_or_insert_with(Default::default);
    let required = spec
        .affinity
        .get_or_insert_with(Affinity::default)
        .node_affinity
        .get_or_insert_with(NodeAffinity::default)
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(|| NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm::default()],
        });
    for term in &mut required.node_selector_terms {
        term.match_expressions
            .get_or_insert_with(Vec::new)
            .push(requirement.clone());
    }
    pod
}

/// What became of a custom resource the pool owns (its LeaderWorkerSet, its PodMonitor).
enum CustomApplied {
    Applied,
    /// An object of its name exists and is not the pool's (`KIND/NAME`).
    NameTaken(String),
    /// The cluster does not serve the resource's API.
    NotInstalled,
}

fn custom_api(client: &Client, namespace: &str, resource: &ApiResource) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, resource)
}

/// Server-side applies `object`, a `resource`, unless its name is taken; a 404 means the API is
/// not there (an apply creates what is missing).
async fn apply_custom(
    client: &Client,
    namespace: &str,
    resource: &ApiResource,
    object: &DynamicObject,
    pool: &InferencePool,
) -> Result<CustomApplied> {
    let api = custom_api(client, namespace, resource);
    let name = object.name_any();
    match api.get_opt(&name).await {
        Ok(Some(existing)) if !owned_by(&existing.metadata, pool) => {
            return Ok(CustomApplied::NameTaken(format!(
                "{}/{name}",
                resource.kind
            )));
        }
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {
            return Ok(CustomApplied::NotInstalled);
        }
        Err(e) => return Err(e.into()),
    }
    let mut value =
        serde_json::to_value(object).map_err(|e| Error::Kube(kube::Error::SerdeError(e)))?;
    value["apiVersion"] = resource.api_version.clone().into();
    value["kind"] = resource.kind.clone().into();
    match api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&value),
        )
        .await
    {
        Ok(_) => Ok(CustomApplied::Applied),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(CustomApplied::NotInstalled),
        Err(e) => Err(e.into()),
    }
}

/// Deletes the pool's `resource` called `name`, if it is there and the pool's; nothing where
/// the cluster does not serve the API.
async fn delete_custom_if_owned(
    client: &Client,
    namespace: &str,
    resource: &ApiResource,
    name: &str,
    pool: &InferencePool,
) -> Result<()> {
    match delete_if_owned(&custom_api(client, namespace, resource), name, pool).await {
        Err(Error::Kube(kube::Error::Api(status))) if status.code == 404 => Ok(()),
        other => other,
    }
}

/// Events for layout decisions, emitted when the decision differs from what status says.
fn decision_events(
    pool: &InferencePool,
    layout: &Result<GroupLayout, LayoutError>,
) -> Vec<(EventType, &'static str, String)> {
    let previous = pool.status.as_ref();
    match layout {
        Ok(l) => {
            let changed = previous.and_then(|s| s.tensor_parallel_reason.as_deref())
                != Some(l.reason.as_str());
            changed
                .then(|| {
                    (
                        EventType::Normal,
                        "TensorParallelSizeResolved",
                        l.reason.clone(),
                    )
                })
                .into_iter()
                .collect()
        }
        Err(e) => {
            let ready_reason = previous
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
                .map(|c| c.reason.as_str());
            (ready_reason != Some(e.reason().as_str()))
                .then(|| (EventType::Warning, e.reason().as_str(), e.to_string()))
                .into_iter()
                .collect()
        }
    }
}

/// Deletes the pool's pods first, so accelerators are freed before Services vanish, then every
/// other child. Owner references would collect them too; doing it here makes deletion prompt
/// and explicit, and works where garbage collection is slow.
async fn cleanup(pool: &InferencePool, ctx: &Context) -> Result<Action> {
    let namespace = pool
        .namespace()
        .ok_or(Error::MissingField("InferencePool", "namespace"))?;
    let name = pool.name_any();
    let client = &ctx.client;
    delete_all_owned(&Api::<Pod>::namespaced(client.clone(), &namespace), pool).await?;
    // A LeaderWorkerSet takes its pods with it (nothing to do where the API is not served).
    delete_custom_if_owned(
        client,
        &namespace,
        &lws::resource(),
        &lws::name(&name),
        pool,
    )
    .await?;
    if ctx.pod_monitors.wanted() != Wanted::NotServed {
        let monitor = monitoring::name(&name);
        delete_custom_if_owned(client, &namespace, &monitoring::resource(), &monitor, pool).await?;
    }
    delete_if_owned(
        &Api::<PodDisruptionBudget>::namespaced(client.clone(), &namespace),
        &pdb_name(&name),
        pool,
    )
    .await?;
    delete_router(client, &namespace, pool).await?;
    let services = Api::<Service>::namespaced(client.clone(), &namespace);
    delete_if_owned(&services, &service_name(&name), pool).await?;
    delete_if_owned(&services, &headless_service_name(&name), pool).await?;
    delete_all_owned(
        &Api::<ControllerRevision>::namespaced(client.clone(), &namespace),
        pool,
    )
    .await?;
    delete_all_owned(
        &Api::<ConfigMap>::namespaced(client.clone(), &namespace),
        pool,
    )
    .await?;
    ctx.metrics.pool_gone(&namespace, &name);
    publish(
        ctx,
        pool,
        EventType::Normal,
        "Deleted",
        "removed every group and child of the pool".into(),
    )
    .await;
    Ok(Action::await_change())
}

async fn server_side_apply<K>(client: &Client, namespace: &str, object: &K) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + Debug + Serialize + DeserializeOwned,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingField("child", "name"))?;
    // Apply bodies must name their type; typed objects leave it to the client.
    let mut value =
        serde_json::to_value(object).map_err(|e| Error::Kube(kube::Error::SerdeError(e)))?;
    value["apiVersion"] = K::api_version(&Default::default()).into();
    value["kind"] = K::kind(&Default::default()).into();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&value),
    )
    .await?;
    Ok(())
}

async fn delete_ignoring_absent<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The pool's router, its leaders' Service and its disruption budget where the pool has a
/// router (the names found
/// taken), else removes the pool's own.
/// `existing`: the router Deployment as [`router_deployment`] read it this pass.
async fn apply_router(
    client: &Client,
    namespace: &str,
    builder: &ChildBuilder<'_>,
    pool: &InferencePool,
    existing: Option<&Deployment>,
) -> Result<Vec<String>> {
    let Some(router) = builder.router() else {
        delete_router(client, namespace, pool).await?;
        return Ok(Vec::new());
    };
    let mut taken = Vec::new();
    taken.extend(apply_owned(client, namespace, &router.leaders, pool).await?);
    let existing = existing.map(Resource::meta);
    taken.extend(apply_unless_taken(client, namespace, &router.deployment, pool, existing).await?);
    taken.extend(apply_owned(client, namespace, &router.pdb, pool).await?);
    Ok(taken)
}

/// The Deployment of the pool's router's name, where the pool has a router.
async fn router_deployment(
    client: &Client,
    namespace: &str,
    pool: &InferencePool,
) -> Result<Option<Deployment>> {
    if !pool.spec.router.enabled {
        return Ok(None);
    }
    let api = Api::<Deployment>::namespaced(client.clone(), namespace);
    Ok(api
        .get_opt(&router::deployment_name(&pool.name_any()))
        .await?)
}

/// The router's pods as its Deployment's status counts them; none while the pool has no router
/// (or one of that name it does not own) or the Deployment has not said yet.
fn router_pods(deployment: Option<&Deployment>, pool: &InferencePool) -> Option<RouterPods> {
    let deployment = deployment.filter(|d| owned_by(d.meta(), pool))?;
    let status = deployment.status.as_ref()?;
    Some(RouterPods {
        ready: status.ready_replicas.unwrap_or(0),
        wanted: deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(status.replicas.unwrap_or(0)),
    })
}

/// Deletes the pool's router Deployment, its disruption budget and its leaders' Service, where
/// they are the pool's.
async fn delete_router(client: &Client, namespace: &str, pool: &InferencePool) -> Result<()> {
    let name = pool.name_any();
    delete_if_owned(
        &Api::<Deployment>::namespaced(client.clone(), namespace),
        &router::deployment_name(&name),
        pool,
    )
    .await?;
    delete_if_owned(
        &Api::<PodDisruptionBudget>::namespaced(client.clone(), namespace),
        &router::deployment_name(&name),
        pool,
    )
    .await?;
    delete_if_owned(
        &Api::<Service>::namespaced(client.clone(), namespace),
        &router::leaders_service_name(&name),
        pool,
    )
    .await
}

/// Server-side applies `object` unless an object of its name exists that the pool does not
/// own; then returns `KIND/NAME` and changes nothing.
async fn apply_owned<K>(
    client: &Client,
    namespace: &str,
    object: &K,
    pool: &InferencePool,
) -> Result<Option<String>>
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + Debug + Serialize + DeserializeOwned,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let existing = api.get_opt(&object.name_any()).await?;
    apply_unless_taken(
        client,
        namespace,
        object,
        pool,
        existing.as_ref().map(Resource::meta),
    )
    .await
}

/// [`apply_owned`] with the object of `object`'s name already read (`existing`).
async fn apply_unless_taken<K>(
    client: &Client,
    namespace: &str,
    object: &K,
    pool: &InferencePool,
    existing: Option<&ObjectMeta>,
) -> Result<Option<String>>
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + Debug + Serialize + DeserializeOwned,
    K::DynamicType: Default,
{
    if existing.is_some_and(|meta| !owned_by(meta, pool)) {
        return Ok(Some(format!(
            "{}/{}",
            K::kind(&K::DynamicType::default()),
            object.name_any()
        )));
    }
    server_side_apply(client, namespace, object).await?;
    Ok(None)
}

/// Deletes every object of `api` that carries the pool's label and is the pool's.
async fn delete_all_owned<K>(api: &Api<K>, pool: &InferencePool) -> Result<()>
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    let selector = pool_selector(&pool.name_any());
    for object in api.list(&ListParams::default().labels(&selector)).await? {
        if owned_by(object.meta(), pool) {
            delete_ignoring_absent(api, &object.name_any()).await?;
        }
    }
    Ok(())
}

/// Deletes `name` if it is there and the pool's.
async fn delete_if_owned<K>(api: &Api<K>, name: &str, pool: &InferencePool) -> Result<()>
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    match api.get_opt(name).await? {
        Some(object) if owned_by(object.meta(), pool) => delete_ignoring_absent(api, name).await,
        _ => Ok(()),
    }
}

/// A pass's events, one per type and reason with their notes joined by "; ", in the order each
/// reason first came: the event recorder folds events of one reason on one object into a series
/// that keeps its first note, so a second note of the same reason would never be seen.
fn one_per_reason(
    events: Vec<(EventType, &'static str, String)>,
) -> Vec<(EventType, &'static str, String)> {
    let mut merged: Vec<(EventType, &'static str, String)> = Vec::new();
    for (type_, reason, note) in events {
        match merged
            .iter_mut()
            .find(|(t, r, _)| *t == type_ && *r == reason)
        {
            Some((_, _, notes)) if !notes.split("; ").any(|n| n == note) => {
                notes.push_str("; ");
                notes.push_str(&note);
            }
            Some(_) => {}
            None => merged.push((type_, reason, note)),
        }
    }
    merged
}

/// Events are best effort: a failure to record one is logged, never fails the reconcile.
async fn publish(
    ctx: &Context,
    pool: &InferencePool,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &pool.object_ref(&())).await {
        warn!(%error, reason, "could not record event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_records_one_event_per_reason_with_every_note() {
        let events = vec![
            (EventType::Normal, "GroupCreated", "group 0".to_owned()),
            (EventType::Warning, "ChildNameTaken", "Service/a".to_owned()),
            (EventType::Normal, "GroupCreated", "group 1".to_owned()),
            (EventType::Warning, "ChildNameTaken", "Service/a".to_owned()),
            (
                EventType::Warning,
                "ChildNameTaken",
                "PodMonitor/a-agents".to_owned(),
            ),
        ];
        assert_eq!(
            one_per_reason(events),
            vec![
                (
                    EventType::Normal,
                    "GroupCreated",
                    "group 0; group 1".to_owned()
                ),
                (
                    EventType::Warning,
                    "ChildNameTaken",
                    "Service/a; PodMonitor/a-agents".to_owned()
                ),
            ]
        );
    }
}
