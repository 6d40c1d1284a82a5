//! Command-line parsing shared by both binaries, so that a usage error reads
//! like every other error: one line on stderr.

use std::process::ExitCode;

/// Parses the process's arguments. `Err` carries the exit code once clap's
/// output (help or version, to stdout) or a one-line usage error (to stderr,
/// exit code 2) has been printed.
pub fn parse<C: clap::Parser>(program: &str) -> Result<C, ExitCode> {
    C::try_parse().map_err(|e| {
        if !e.use_stderr() {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        let message = e.to_string();
        let first = message.lines().next().unwrap_or_default();
        eprintln!("{program}: {} (see --help)", first.trim_start_matches("error: "));
        ExitCode::from(2)
    })
}
