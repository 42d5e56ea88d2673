//! The pool's serving-spec revisions, kept as ControllerRevisions (as a StatefulSet keeps its
//! own): one per serving spec the pool has asked for, named `<pool>-<revision>`, holding the
//! serving fields ([`InferencePoolSpec::serving`]). A rollback runs the stable revision's
//! fields while the spec still asks for the one that regressed; the pool's spec is never
//! rewritten, so whatever wrote it (kubectl, Argo CD, Flux) still owns it.
//!
//! [`InferencePoolSpec::serving`]: parallax_crds::InferencePoolSpec::serving

use crate::children::{POOL_LABEL, owned_by, pool_selector};
use crate::error::Result;
use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use parallax_crds::InferencePool;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Revisions kept besides the current and the stable one.
pub const HISTORY: usize = 10;

/// The label that names a ControllerRevision's serving revision.
pub const REVISION_LABEL: &str = "parallax.dev/revision";

pub fn name(pool: &str, revision: &str) -> String {
    format!("{pool}-{revision}")
}

/// The ControllerRevision of the pool's current serving spec, numbered `number`.
pub fn object(pool: &InferencePool, number: i64) -> ControllerRevision {
    let revision = pool.spec.serving_revision();
    ControllerRevision {
        metadata: ObjectMeta {
            name: Some(name(&pool.name_any(), &revision)),
            namespace: pool.namespace(),
            labels: Some(BTreeMap::from([
                (POOL_LABEL.to_owned(), pool.name_any()),
                (REVISION_LABEL.to_owned(), revision),
            ])),
            owner_references: pool.controller_owner_ref(&()).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        data: Some(RawExtension(pool.spec.serving())),
        revision: number,
    }
}

/// The pool as its groups should run: as written, or, while its spec asks for a revision that
/// regressed, with the stable revision's serving fields. The string says why the spec is not
/// run as written when the stable revision cannot be read (then it is).
pub fn serving_pool<'a>(
    pool: &'a InferencePool,
    revisions: &[ControllerRevision],
) -> (Cow<'a, InferencePool>, Option<String>) {
    let Some(rollback) = pool.status.as_ref().and_then(|s| s.rollback.as_ref()) else {
        return (Cow::Borrowed(pool), None);
    };
    let (Some(failed), Some(stable)) = (&rollback.failed_revision, &rollback.stable_revision)
    else {
        return (Cow::Borrowed(pool), None);
    };
    if *failed != pool.spec.serving_revision() {
        return (Cow::Borrowed(pool), None);
    }
    let data = revisions
        .iter()
        .find(|r| r.labels().get(REVISION_LABEL) == Some(stable))
        .and_then(|r| r.data.as_ref());
    let Some(data) = data else {
        return (
            Cow::Borrowed(pool),
            Some(format!(
                "revision {stable} to roll back to is gone; running the spec as written"
            )),
        );
    };
    match pool.spec.with_serving(&data.0) {
        Ok(spec) => {
            let mut serving = pool.clone();
            serving.spec = spec;
            (Cow::Owned(serving), None)
        }
        Err(error) => (
            Cow::Borrowed(pool),
            Some(format!(
                "revision {stable} to roll back to cannot be read ({error}); running the spec as written"
            )),
        ),
    }
}

/// Names of the revisions beyond the newest [`HISTORY`], oldest first; `keep` never goes.
pub fn pruned(revisions: &[ControllerRevision], keep: &[&str]) -> Vec<String> {
    let mut old: Vec<&ControllerRevision> = revisions
        .iter()
        .filter(|r| {
            r.labels()
                .get(REVISION_LABEL)
                .is_none_or(|rev| !keep.contains(&rev.as_str()))
        })
        .collect();
    old.sort_by_key(|r| std::cmp::Reverse(r.revision));
    old.iter().skip(HISTORY).map(|r| r.name_any()).collect()
}

/// Keeps a revision of the pool's current serving spec (numbered newest) and no more than
/// [`HISTORY`] others; returns the pool's revisions.
pub async fn sync(client: &Client, pool: &InferencePool) -> Result<Vec<ControllerRevision>> {
    let namespace = pool.namespace().unwrap_or_default();
    let api: Api<ControllerRevision> = Api::namespaced(client.clone(), &namespace);
    let mut revisions = api
        .list(&ListParams::default().labels(&pool_selector(&pool.name_any())))
        .await?
        .items;
    revisions.retain(|r| owned_by(r.meta(), pool));
    let current = pool.spec.serving_revision();
    let newest = revisions.iter().map(|r| r.revision).max().unwrap_or(0);
    match revisions
        .iter_mut()
        .find(|r| r.labels().get(REVISION_LABEL) == Some(&current))
    {
        // Asked for again: it becomes the newest, as a Deployment's old ReplicaSet does.
        Some(existing) if existing.revision < newest => {
            let patch = serde_json::json!({"revision": newest + 1});
            *existing = api
                .patch(
                    &existing.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
        }
        Some(_) => {}
        None => {
            let created = api
                .create(&PostParams::default(), &object(pool, newest + 1))
                .await?;
            revisions.push(created);
        }
    }
    let stable = pool
        .status
        .as_ref()
        .and_then(|s| s.rollback.as_ref())
        .and_then(|r| r.stable_revision.clone())
        .unwrap_or_default();
    for gone in pruned(&revisions, &[&current, &stable]) {
        api.delete(&gone, &Default::default()).await?;
        revisions.retain(|r| r.name_any() != gone);
    }
    Ok(revisions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parallax_crds::RollbackStatus;
    use serde_json::json;

    fn pool(image: &str) -> InferencePool {
        serde_json::from_value(json!({
            "apiVersion": "parallax.dev/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": "llama", "namespace": "ml", "uid": "u1"},
            "spec": {"model": {"source": "hf://m"}, "replicas": 3, "maxReplicas": 5,
                "agent": {"image": image}}
        }))
        .unwrap()
    }

    #[test]
    fn a_revision_is_what_the_groups_serve_not_how_many() {
        let a = pool("agent:1");
        let mut scaled = a.clone();
        scaled.spec.replicas = 5;
        scaled.spec.autoscaling.enabled = true;
        assert_eq!(a.spec.serving_revision(), scaled.spec.serving_revision());
        assert_ne!(
            a.spec.serving_revision(),
            pool("agent:2").spec.serving_revision()
        );
    }

    #[test]
    fn a_pool_asking_for_a_failed_revision_runs_the_stable_one() {
        let good = pool("agent:1");
        let mut bad = pool("agent:2");
        bad.spec.replicas = 4;
        let revisions = vec![object(&good, 1), object(&bad, 2)];
        // No verdict yet: the spec as written.
        let (serving, note) = serving_pool(&bad, &revisions);
        assert_eq!(serving.spec.agent.image.as_deref(), Some("agent:2"));
        assert_eq!(note, None);

        bad.status = Some(parallax_crds::InferencePoolStatus {
            rollback: Some(RollbackStatus {
                stable_revision: Some(good.spec.serving_revision()),
                failed_revision: Some(bad.spec.serving_revision()),
                ..RollbackStatus::default()
            }),
            ..Default::default()
        });
        let (serving, note) = serving_pool(&bad, &revisions);
        assert_eq!(serving.spec.agent.image.as_deref(), Some("agent:1"));
        assert_eq!(serving.spec.replicas, 4, "how many groups is the spec's");
        assert_eq!(note, None);

        // A new spec is tried as written.
        let newer = {
            let mut p = pool("agent:3");
            p.status = bad.status.clone();
            p
        };
        assert_eq!(
            serving_pool(&newer, &revisions)
                .0
                .spec
                .agent
                .image
                .as_deref(),
            Some("agent:3")
        );
        // The stable revision gone: the spec as written, and why.
        let (serving, note) = serving_pool(&bad, &revisions[1..]);
        assert_eq!(serving.spec.agent.image.as_deref(), Some("agent:2"));
        assert!(note.unwrap().contains("is gone"));
    }

    #[test]
    fn history_keeps_the_newest_and_whatever_must_stay() {
        let revisions: Vec<ControllerRevision> = (1..=14)
            .map(|n| object(&pool(&format!("agent:{n}")), n))
            .collect();
        let first = revisions[0].labels()[REVISION_LABEL].clone();
        let gone = pruned(&revisions, &[&first]);
        // 13 besides the kept first: the oldest three of them go.
        assert_eq!(gone.len(), 3);
        assert!(!gone.contains(&revisions[0].name_any()));
        assert!(gone.contains(&revisions[1].name_any()));
        assert!(!gone.contains(&revisions[13].name_any()));
    }
}
