//! Leader election on a `coordination.k8s.io/v1` Lease, so that only one operator replica
//! reconciles. The decision is a pure function of the lease and the clock; the loop around it
//! writes with the lease's resourceVersion, so two candidates cannot both win.

use crate::error::{Error, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use std::time::Duration;
use tracing::info;

/// Who competes for which lease, and how long a claim lasts.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
    pub renew_every: Duration,
}

/// What a candidate should do with the lease it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseDecision {
    /// We hold it: write a new renew time.
    Renew,
    /// Nobody holds it, or the holder's claim expired: take it over.
    Acquire,
    /// Someone else holds a live claim.
    Wait,
}

/// Decides from the lease's spec whether `identity` may write it at `now`.
pub fn decide(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> LeaseDecision {
    let Some(spec) = spec else {
        return LeaseDecision::Acquire;
    };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == identity => LeaseDecision::Renew,
        None | Some("") => LeaseDecision::Acquire,
        Some(_) => {
            let renewed = spec
                .renew_time
                .as_ref()
                .or(spec.acquire_time.as_ref())
                .map(|t| t.0);
            let duration =
                SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
            match renewed {
                Some(renewed) if renewed + duration > now => LeaseDecision::Wait,
                _ => LeaseDecision::Acquire,
            }
        }
    }
}

/// One attempt: returns whether this candidate holds the lease afterwards.
pub async fn try_acquire_or_renew(api: &Api<Lease>, settings: &LeaseSettings) -> Result<bool> {
    let now = Timestamp::now();
    let existing = api.get_opt(&settings.name).await?;
    let spec = existing.as_ref().and_then(|l| l.spec.as_ref());
    let decision = decide(spec, &settings.identity, now);
    if decision == LeaseDecision::Wait {
        return Ok(false);
    }
    let transitions = spec.and_then(|s| s.lease_transitions).unwrap_or(0);
    let acquire_time = match decision {
        LeaseDecision::Renew => spec.and_then(|s| s.acquire_time.clone()),
        _ => Some(MicroTime(now)),
    };
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(settings.name.clone()),
            namespace: Some(settings.namespace.clone()),
            resource_version: existing
                .as_ref()
                .and_then(|l| l.metadata.resource_version.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(settings.identity.clone()),
            lease_duration_seconds: Some(settings.duration.as_secs() as i32),
            acquire_time,
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(
                if decision == LeaseDecision::Acquire && existing.is_some() {
                    transitions + 1
                } else {
                    transitions
                },
            ),
            ..LeaseSpec::default()
        }),
    };
    let written = match existing {
        None => api.create(&PostParams::default(), &lease).await,
        Some(_) => {
            api.replace(&settings.name, &PostParams::default(), &lease)
                .await
        }
    };
    match written {
        Ok(_) => {
            if decision == LeaseDecision::Acquire {
                info!(identity = %settings.identity, lease = %settings.name, "acquired leadership");
            }
            Ok(true)
        }
        // Another candidate wrote first.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Waits until this candidate holds the lease.
pub async fn acquire(api: &Api<Lease>, settings: &LeaseSettings) -> Result<()> {
    loop {
        if try_acquire_or_renew(api, settings).await? {
            return Ok(());
        }
        tokio::time::sleep(settings.renew_every).await;
    }
}

/// Renews the lease until a renewal fails for longer than the lease lasts; then returns the
/// error, and the caller must stop reconciling.
pub async fn hold(api: &Api<Lease>, settings: &LeaseSettings) -> Error {
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(settings.renew_every).await;
        match try_acquire_or_renew(api, settings).await {
            Ok(true) => last_renewal = tokio::time::Instant::now(),
            Ok(false) => {
                return Error::Lease(format!(
                    "lease {} was taken by another replica",
                    settings.name
                ));
            }
            Err(e) if last_renewal.elapsed() >= settings.duration => {
                return Error::Lease(format!("could not renew lease {}: {e}", settings.name));
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed_at: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed_at).unwrap())),
            ..LeaseSpec::default()
        }
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    #[test]
    fn no_lease_or_no_holder_is_acquired() {
        assert_eq!(decide(None, "a", at(0)), LeaseDecision::Acquire);
        assert_eq!(
            decide(Some(&LeaseSpec::default()), "a", at(0)),
            LeaseDecision::Acquire
        );
    }

    #[test]
    fn our_own_lease_is_renewed() {
        assert_eq!(
            decide(Some(&spec("a", 0)), "a", at(100)),
            LeaseDecision::Renew
        );
    }

    #[test]
    fn a_live_foreign_claim_waits_and_an_expired_one_is_taken_over() {
        assert_eq!(
            decide(Some(&spec("b", 100)), "a", at(110)),
            LeaseDecision::Wait
        );
        assert_eq!(
            decide(Some(&spec("b", 100)), "a", at(116)),
            LeaseDecision::Acquire
        );
    }
}
