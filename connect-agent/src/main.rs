//! `connect-agent`: parse the command line, set up logging, run, and turn errors into
//! a one-line message and a non-zero exit code.

use std::process::ExitCode;

use clap::Parser;
use connect_agent::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse_from(cli::normalize_args(std::env::args_os()));
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if cli.agent.worker_threads > 0 {
        builder.worker_threads(cli.agent.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(command) => {
            if command.streams_logs() {
                init_tracing(false);
            }
            runtime.block_on(cli::run(command))
        }
        None => {
            init_tracing(cli.agent.log_json);
            let config = match cli.agent.into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("Error: {e}");
                    return ExitCode::from(2);
                }
            };
            match runtime.block_on(connect_agent::app::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("Error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Logs to stderr; `RUST_LOG` filters (default `info`), `--log-json` for JSON lines.
fn init_tracing(json: bool) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
