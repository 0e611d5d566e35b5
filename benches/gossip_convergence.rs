//! Gossip convergence benchmark (filled in below as the transport lands).
fn main() {}
