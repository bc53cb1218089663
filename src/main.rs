//! The `kefu` binary: parse the command line, start logging, call the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = kefu::cli::Cli::parse();
    kefu::telemetry::init(cli.log_format, cli.log.as_deref());
    match kefu::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kefu: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
