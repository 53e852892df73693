//! The `kafboy` command: read config, bind, serve until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kafboy::config::{Overrides, split_list};
use kafboy::{App, Config};

/// A low-latency HTTP server that writes what is POSTed to it into Apache Kafka.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file (see kafboy.example.toml).
    #[arg(long, short, env = "KAFBOY_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:8000 (overrides server.listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Bootstrap brokers, HOST:PORT[,HOST:PORT...] (overrides kafka.brokers).
    #[arg(long)]
    brokers: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Run the original quick start: an embedded Kafka broker, kafboy with the demo hook, and a
    /// printout of every record that lands. Needs nothing else.
    Demo {
        /// Address to listen on.
        #[arg(long, default_value = kafboy::demo::DEMO_ADDR)]
        listen: SocketAddr,
    },
}

/// Exit status for a configuration error (EX_USAGE), before anything is bound.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KAFBOY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    if let Some(Command::Demo { listen }) = cli.command {
        return match runtime()
            .map(|rt| rt.block_on(kafboy::demo::run(listen, None, kafboy::shutdown::signal())))
        {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) | Err(e) => {
                eprintln!("kafboy demo: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let overrides = Overrides {
        listen: cli.listen,
        brokers: cli.brokers.as_deref().map(split_list),
    };
    let config = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => return config_error(&e.to_string()),
    };
    match runtime() {
        Ok(rt) => rt.block_on(serve(config)),
        Err(e) => {
            eprintln!("kafboy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

async fn serve(config: Config) -> ExitCode {
    let app = match App::build(&config) {
        Ok(app) => app,
        Err(e) => return config_error(&e),
    };
    let listener = match tokio::net::TcpListener::bind(config.server.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kafboy: cannot listen on {}: {e}", config.server.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().map_or(config.server.listen, |a| a);
    tracing::info!(%addr, brokers = %config.kafka.brokers.join(","), "kafboy listening");
    let report = app.run(listener, kafboy::shutdown::signal()).await;
    if report.undelivered > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn config_error(message: &str) -> ExitCode {
    eprintln!("kafboy: config error: {message}");
    ExitCode::from(EXIT_CONFIG)
}
