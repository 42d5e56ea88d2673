//! The Parallax operator: `InferencePool` → tensor-parallel pod groups, Services and status.
//!
//! Pure modules decide (`inventory`, `tp`, `children`, `router`, `groups`, `status`, `leader::decide`);
//! `reconcile` reads the cluster and applies their results; `controller` wires the watches.

pub mod agents;
pub mod autoscale;
pub mod children;
pub mod controller;
pub mod error;
pub mod gpu_faults;
pub mod groups;
pub mod http;
pub mod inventory;
pub mod leader;
pub mod lws;
pub mod metrics;
pub mod monitoring;
pub mod placement;
pub mod reconcile;
pub mod render;
pub mod revisions;
pub mod router;
pub mod scaler;
pub mod status;
pub mod tp;

pub use error::{Error, Result};
