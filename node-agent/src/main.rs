//! `fleetproxy-agent`: see [`fleetproxy_agent::agent`] and `--help`.

use std::process::ExitCode;

use clap::Parser;
use fleetproxy_agent::cli::{Args, LogFormat};
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    match fleetproxy_agent::agent::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "fleetproxy agent stopped");
            ExitCode::FAILURE
        }
    }
}
