//! Parallax node agent: the engine (model, paged KV cache, continuous batching) and its command
//! line. The engine knows nothing of HTTP or Kubernetes.

pub mod cli;
pub mod engine;
