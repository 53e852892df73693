//! The `kafboy` command: read config, bind, serve until SIGTERM/SIGINT.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use kafboy::config::{LogFormat, Overrides, split_list};
use kafboy::{App, Config};

/// A low-latency HTTP server that writes what is POSTed to it into Apache Kafka.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    flags: Flags,
}

/// What the server's configuration is read from. Only the server and `check-config` read it, so
/// only they take these flags.
#[derive(clap::Args, Debug)]
struct Flags {
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

impl Flags {
    /// These flags, each given here or else before the subcommand (`kafboy -c FILE check-config`).
    fn or(self, outer: Flags) -> Flags {
        Flags {
            config: self.config.or(outer.config),
            listen: self.listen.or(outer.listen),
            brokers: self.brokers.or(outer.brokers),
        }
    }

    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen,
            brokers: self.brokers.as_deref().map(split_list),
        }
    }
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Run the original quick start: an embedded Kafka broker, kafboy with the demo hook, and a
    /// printout of every record that lands. Needs nothing else, and reads no configuration.
    Demo {
        /// Address to listen on. Default 127.0.0.1:9903.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Check a configuration file and print the effective configuration (defaults, file,
    /// KAFBOY_* environment and flags merged). Exits 64 if it is not valid.
    CheckConfig {
        /// The file to check; without it, the one --config or KAFBOY_CONFIG names, if any.
        file: Option<PathBuf>,
        #[command(flatten)]
        flags: Flags,
    },
    /// Print a new random API key and the SHA-256 to put in the config (`sha256 = "..."`).
    HashKey,
}

/// Exit status for a configuration error (EX_USAGE), before anything is bound.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Ok((Cli::from_arg_matches(&m)?, m)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        // --help and --version are not errors; a bad flag is a configuration error like any.
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // Flags given on the command line before the subcommand (KAFBOY_CONFIG is not one).
    let given = |id| matches.value_source(id) == Some(ValueSource::CommandLine);
    match cli.command {
        Some(Command::Demo { listen }) => {
            // The demo brings its own broker and configuration: a file or brokers named for
            // it would be ignored without a word.
            if given("config") || given("brokers") {
                return config_error(
                    "the demo runs its own broker and configuration: --config and --brokers do not apply to it",
                );
            }
            demo(listen.or(cli.flags.listen))
        }
        Some(Command::CheckConfig { file, mut flags }) => {
            // KAFBOY_CONFIG fills the subcommand's --config as well: a --config given before
            // the subcommand wins over it.
            let sub = matches.subcommand_matches("check-config");
            if sub.and_then(|m| m.value_source("config")) != Some(ValueSource::CommandLine) {
                flags.config = None;
            }
            let flags = flags.or(cli.flags);
            check_config(file.or(flags.config.clone()).as_deref(), &flags.overrides())
        }
        Some(Command::HashKey) => {
            if given("config") || given("brokers") || given("listen") {
                return config_error(
                    "hash-key reads no configuration: --config, --brokers and --listen do not apply to it",
                );
            }
            let (key, digest) = kafboy::auth::new_key();
            // The key exists nowhere else: output that did not get out is a failure.
            match writeln!(std::io::stdout(), "key:    {key}\nsha256: {digest}") {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("cannot write the key: {e}")),
            }
        }
        None => {
            // SIGHUP ends a process that does not handle it, and a key rotation may send one to
            // a node just started: handled from here on (the handler stays for the process's
            // life), before the configuration is read. So the runtime comes first.
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return fail(&e),
            };
            let _hangups = {
                let _in = rt.enter();
                kafboy::shutdown::hangups()
            };
            let flags = cli.flags;
            run(
                rt,
                Config::load(flags.config.as_deref(), &flags.overrides()),
            )
        }
    }
}

/// Runs the server from `config` on `rt`, or says why the configuration cannot be used.
fn run(
    rt: tokio::runtime::Runtime,
    config: Result<Config, kafboy::config::ConfigError>,
) -> ExitCode {
    match config {
        Ok(config) => {
            // Before the logs exist: a bad filter would hide its own error.
            if let Err(e) = check_logs(&config) {
                return config_error(&e);
            }
            init_logs(config.log.format, &config.log.level);
            for name in kafboy::config::ignored_env(&config) {
                tracing::warn!(
                    variable = %name,
                    "not a setting and ignored: settings are KAFBOY_SECTION__KEY, two underscores after the section"
                );
            }
            let code = rt.block_on(serve(config));
            // The shutdown had its grace. A blocking task still running (a spool file
            // operation on a disk that hangs) would hold the runtime's drop, and the exit,
            // for as long as the disk hangs.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            code
        }
        Err(e) => config_error(&e.to_string()),
    }
}

fn demo(listen: Option<SocketAddr>) -> ExitCode {
    init_logs(LogFormat::Text, "info");
    let listen = match listen {
        Some(l) => l,
        None => match kafboy::demo::DEMO_ADDR.parse() {
            Ok(l) => l,
            Err(e) => return fail(&format!("{e}")),
        },
    };
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let stop = kafboy::shutdown::signal();
            let mut hangups = kafboy::shutdown::hangups();
            // Closing the demo's terminal sends SIGHUP: it ends the demo, which has nothing
            // to reload, instead of leaving it holding its port.
            let stop = async move {
                tokio::select! {
                    () = stop => {}
                    () = hangups.next() => tracing::info!("SIGHUP received"),
                }
            };
            kafboy::demo::run(listen, None, stop).await
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("demo: {e}")),
    }
}

/// `log.level`, and `KAFBOY_LOG`, which wins over it, held to the same rules.
fn check_logs(config: &Config) -> Result<(), String> {
    config.log.check()?;
    match std::env::var("KAFBOY_LOG") {
        Ok(filter) => kafboy::config::check_log_filter("KAFBOY_LOG", &filter),
        Err(_) => Ok(()),
    }
}

fn check_config(file: Option<&std::path::Path>, overrides: &Overrides) -> ExitCode {
    // The warnings a start would log (a certificate past its dates, SASL PLAIN in clear), on
    // stderr: a check that says "valid" must not keep them back.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .init();
    let config = match Config::load(file, overrides) {
        Ok(c) => c,
        Err(e) => return config_error(&e.to_string()),
    };
    // What parsing cannot check: routes, hooks, keys, librdkafka properties. Nothing is bound
    // and no producer is created, so no broker is contacted. The environment is checked as a
    // start would check it.
    if let Err(e) = check_logs(&config).and_then(|()| kafboy::state::AppState::check(&config)) {
        return config_error(&e);
    }
    // Under this shell's open-file limit, which may not be the service's.
    warn_of(&config, config.server.listen);
    for name in kafboy::config::ignored_env(&config) {
        complain(format_args!(
            "warning: {name} is not a setting and ignored: settings are KAFBOY_SECTION__KEY, two underscores after the section"
        ));
    }
    // Key digests stay out of what is printed: a key a person chose can be guessed from its
    // digest offline.
    let mut shown = config.clone();
    for key in &mut shown.auth.keys {
        if key.sha256.is_some() {
            key.sha256 = Some("<redacted>".into());
        }
    }
    // A discovery URL's Basic auth or token; what any cluster URL may hold.
    let cluster = &mut shown.cluster;
    let urls = cluster.peers.iter_mut().chain(&mut cluster.discovery_url);
    for url in urls.chain(&mut cluster.advertise_url) {
        *url = kafboy::cluster::redacted(url);
    }
    for (key, value) in shown.kafka.options.iter_mut() {
        if key.contains("password") || key.contains("secret") {
            *value = "<redacted>".into();
        }
    }
    match toml::to_string_pretty(&shown) {
        Ok(text) => {
            // A closed pipe (`| head`) is not an error worth a panic.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "# {}: valid; effective configuration:\n{text}",
                file.map_or("no file".into(), |f| f.display().to_string())
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("cannot print the configuration: {e}")),
    }
}

fn init_logs(format: LogFormat, level: &str) {
    // KAFBOY_LOG wins over log.level, for a quick look without editing the file.
    let filter = tracing_subscriber::EnvFilter::try_from_env("KAFBOY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().with_current_span(false).init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
    }
}

/// A listener that cannot be bound. A port this process may not take is the configuration's
/// fault (64: no restart fixes it). A port in use may come free, and an address this host
/// does not have yet may come (a VRRP address, an IPv6 address still tentative at boot): 1, so
/// that a supervisor tries again.
fn bind_failed(addr: SocketAddr, e: &std::io::Error) -> ExitCode {
    use std::io::ErrorKind as K;
    let message = format!("cannot listen on {addr}: {e}");
    match e.kind() {
        K::PermissionDenied | K::InvalidInput => config_error(&message),
        _ => fail(&message),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

async fn serve(config: Config) -> ExitCode {
    // SIGTERM and SIGINT from here on end the node as soon as it serves (SIGHUP is handled
    // from the start, in `main`).
    let stopped = kafboy::shutdown::Stopped::listen();
    // Built on a blocking thread, so that a stop still ends a start that takes long (a spool
    // replaying, a disk that hangs): nothing has been accepted yet.
    let mut build = tokio::task::spawn_blocking({
        let config = config.clone();
        move || App::build(&config)
    });
    let built = tokio::select! {
        built = &mut build => built,
        () = stopped.clone().wait() => {
            tracing::info!("stopped while starting; nothing was accepted");
            // A build that ends within the grace is dropped here, its Kafka clients shut down
            // before the exit; one that hangs (a disk) is left behind.
            let _ = tokio::time::timeout(config.server.shutdown_timeout, build).await;
            return ExitCode::SUCCESS;
        }
    };
    let mut app = match built {
        Ok(Ok(app)) => app,
        // What check-config would refuse is the configuration's fault (64: a restart cannot fix
        // it); anything else (a spool directory that cannot be opened, a thread that cannot
        // start) may pass, and a supervisor should try again (1).
        Ok(Err(e)) if kafboy::state::AppState::check(&config).is_err() => return config_error(&e),
        Ok(Err(e)) => return fail(&e),
        Err(e) => return fail(&format!("start failed: {e}")),
    };
    let listener = match tokio::net::TcpListener::bind(config.server.listen).await {
        Ok(l) => l,
        Err(e) => return bind_failed(config.server.listen, &e),
    };
    if let Some(admin) = config.server.admin_listen {
        match tokio::net::TcpListener::bind(admin).await {
            Ok(l) => app = app.with_admin_listener(l),
            Err(e) => return bind_failed(admin, &e),
        }
    }
    let addr = listener.local_addr().map_or(config.server.listen, |a| a);
    warn_of(&config, addr);
    tracing::info!(%addr, brokers = %config.kafka.brokers.join(","), version = env!("CARGO_PKG_VERSION"), "kafboy listening");
    let report = app.run(listener, stopped.wait()).await;
    if report.undelivered > 0 || report.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// What a start warns of, and `check-config` too: a setting that works, but not as its
/// operator may think. `addr` is where the main listener listens.
fn warn_of(config: &Config, addr: std::net::SocketAddr) {
    let listeners = 1 + usize::from(config.server.admin_listen.is_some());
    kafboy::listener::warn_if_few_files(config.server.max_connections.saturating_mul(listeners));
    let auth_off = config.auth.keys.is_empty() && config.auth.keys_file.is_none();
    // With client certificates required, only their holders can write: a different warning.
    let certificates = config
        .server
        .tls
        .as_ref()
        .is_some_and(|t| t.client_ca.is_some());
    if !addr.ip().to_canonical().is_loopback() && auth_off {
        if certificates {
            tracing::warn!(%addr, "no API keys: every holder of a certificate server.tls.client_ca admits can write to any topic topics.allow admits; see docs/SECURITY.md");
        } else {
            tracing::warn!(%addr, "auth is off and kafboy listens beyond loopback: anyone who can reach it can write; see docs/SECURITY.md");
        }
    }
    for setting in kafboy::config::batch_waits_past_sync_timeout(config) {
        tracing::warn!(%setting, "not below server.sync_timeout: a /batch/sync request whose batch does not fill first is answered 504, and its record written after");
    }
}

fn fail(message: &str) -> ExitCode {
    complain(format_args!("kafboy: {message}"));
    ExitCode::FAILURE
}

fn config_error(message: &str) -> ExitCode {
    complain(format_args!("kafboy: config error: {message}"));
    ExitCode::from(EXIT_CONFIG)
}

/// A line on stderr. Not `eprintln!`, which panics (exit 101) when stderr is a pipe closed
/// early (`kafboy check-config 2>&1 | head -1`): the exit code is the answer that matters.
fn complain(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{line}");
}
