//! The `lemonade-nexus` binary: one program, one subcommand per job.

use clap::Parser;

/// Lemonade Nexus: a self-hosted, zero-trust mesh VPN control plane.
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
