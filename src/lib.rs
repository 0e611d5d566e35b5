//! Lemonade Nexus: a self-hosted, zero-trust mesh VPN control plane.
//!
//! One module per domain. The pure cores (validation, the op-log fold, the permission tree, IPAM)
//! take time and randomness as arguments and do no IO; the store and the CLI wrap them.
pub mod api;
pub mod authz;
pub mod backbone;
pub mod cli;
pub mod config;
pub mod demo;
pub mod gossip;
pub mod hlc;
pub mod identity;
pub mod ipam;
pub mod keys;
pub mod op;
pub mod server;
pub mod signed;
pub mod state;
pub mod status;
pub mod store;
#[doc(hidden)]
pub mod testkit;
pub mod tls;
pub mod tree;
pub mod trust;
