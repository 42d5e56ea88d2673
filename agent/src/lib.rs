//! Parallax node agent: the engine (model, paged KV cache, continuous batching), the HTTP server
//! in front of it, the router in front of a pool's groups, the model download from a Hugging
//! Face hub, a load generator and the command line. The engine knows nothing of HTTP or
//! Kubernetes; the server knows the engine only through its handle, the router not at all.

pub mod cli;
pub mod engine;
pub mod gpu;
pub mod http_client;
pub mod hub;
pub mod loadgen;
pub mod router;
pub mod server;
