//! The `lemonade-nexus` binary: one program, one subcommand per job (see `lemonade_nexus::cli`).

use std::process::ExitCode;

use clap::Parser;
use lemonade_nexus::cli::{Cli, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    match run(cli, &mut stdout.lock()) {
        Ok(()) => ExitCode::SUCCESS,
        // Output closed early (e.g. piped into `head`): not an error worth reporting.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            // The chain says what failed and what to fix; no backtrace, no panic.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
