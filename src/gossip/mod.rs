//! Server-to-server replication: every server holds the same signed op log, hence the same state
//! hash. Design and rationale: `docs/replication.md`.
//!
//! * [`wire`]: the messages (Hello, datagrams, anti-entropy requests) and their bounded codec;
//! * [`membership`]: SWIM membership and failure detection (foca), sans-IO;
//! * [`core`]: the sans-IO replication state machine (push, anti-entropy, out-of-order buffer);
//! * `harness` (tests only): N cores with real stores on a simulated network and a virtual clock.
//!
//! Ops received from peers go through `Store::submit_batch`, exactly like local writes.

pub mod core;
#[cfg(test)]
mod harness;
pub mod membership;
pub mod node;
pub mod transport;
pub mod wire;
