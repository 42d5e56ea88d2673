//! Scheduling, apart from any device: which requests run in a step and how many of their tokens
//! (`scheduler`, in the order `admission` gives), the KV blocks they hold and share (`blocks`), and
//! the circuit breaker over failed steps (`breaker`). Pure and generic: nothing here touches a
//! tensor.

pub mod admission;
pub mod blocks;
pub mod breaker;
pub mod scheduler;
