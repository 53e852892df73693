//! The running server: state built once from config, the router, and `run`, which serves a bound
//! listener until a shutdown future resolves, then drains requests and flushes the producers.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::routing::post;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::hook::Hook;
use crate::ingest;
use crate::kafka::Producers;
use crate::state::AppState;

mod answers;

pub use answers::{json, sized_json};
use answers::{method_not_allowed, not_found, reserve};

/// A server ready to run: config turned into runtime types.
pub struct App {
    state: Arc<AppState>,
    admin: Option<TcpListener>,
    cors: Option<crate::listener::Cors>,
    tls: Option<Arc<crate::tls::Tls>>,
}

/// What shutdown left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Records accepted but given up at the flush deadline, or still in flight a second after
    /// it, and not kept in the spool either: the ones lost.
    pub undelivered: usize,
    /// Of those, the records sent with no answer: a broker may have written them, or may yet.
    pub maybe_written: usize,
    /// Records kept in the spool for the next start.
    pub spooled: u64,
    /// Records that failed since the shutdown began, in its drain or its flush (the brokers
    /// refused them, or their message timeout ran out with the brokers away): lost too.
    pub failed: u64,
}

/// Builds an [`App`], optionally with a Rust hook for every produce route.
pub struct AppBuilder {
    config: Config,
    hook: Option<Arc<dyn Hook>>,
}

impl AppBuilder {
    /// Runs `hook` on every produce route that has no Lua script of its own.
    pub fn hook(mut self, hook: impl Hook) -> AppBuilder {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Checks the config and builds routes, hooks and producers. Errors name the key at fault.
    pub fn build(self) -> Result<App, String> {
        App::assemble(&self.config, self.hook)
    }
}

impl App {
    /// A builder, for running kafboy with a Rust hook from your own `main`.
    pub fn builder(config: Config) -> AppBuilder {
        AppBuilder { config, hook: None }
    }

    /// Checks the config and builds routes and producers. The message names the key at fault.
    pub fn build(config: &Config) -> Result<App, String> {
        App::assemble(config, None)
    }

    fn assemble(config: &Config, rust_hook: Option<Arc<dyn Hook>>) -> Result<App, String> {
        let cors = config
            .server
            .cors
            .as_ref()
            .map(crate::listener::Cors::new)
            .transpose()?;
        let tls = config
            .server
            .tls
            .as_ref()
            .map(crate::tls::Tls::load)
            .transpose()?
            .map(Arc::new);
        Ok(App {
            state: Arc::new(AppState::build(config, rust_hook)?),
            admin: None,
            cors,
            tls,
        })
    }

    /// Serves `/metrics`, `/health`, `/ready`, `/`, `/status.json` and `/openapi.json` on
    /// `listener` as well, and `/metrics` only there.
    pub fn with_admin_listener(mut self, listener: TcpListener) -> App {
        self.admin = Some(listener);
        self
    }

    /// The HTTP router, without a socket (tests drive it with `oneshot`).
    pub fn router(&self) -> Router {
        let mut router = Router::new();
        for served in self.state.served() {
            let handler = {
                let served = served.clone();
                move |State(app): State<Arc<AppState>>, request: Request| {
                    ingest::handle(app, served.clone(), request)
                }
            };
            let refused = {
                let served = served.clone();
                move |State(app): State<Arc<AppState>>| method_not_allowed(app, served.clone())
            };
            let method = post(handler).fallback(refused);
            router = router.route(&served.route.pattern, method.clone());
            if served.route.pattern != "/" {
                router = router.route(&format!("{}/", served.route.pattern), method);
            }
        }
        // CORS covers the produce routes only: a web page anyone opens must not read the
        // status page, /metrics or the topic list of a node it can reach.
        let router = match &self.cors {
            Some(cors) => cors.wrap(router),
            None => router,
        };
        let router = router.merge(crate::operations::router(
            crate::operations::Listener::Main {
                private: self.admin.is_none(),
            },
        ));
        reserve(router, self.admin.is_some())
            .fallback(not_found)
            .with_state(self.state.clone())
    }

    /// The producers, for inspection.
    pub fn producers(&self) -> &Arc<Producers> {
        &self.state.producers
    }

    /// Serves `listener` until `shutdown` resolves; then stops accepting, lets in-flight requests
    /// finish (at most `server.shutdown_timeout`), and flushes the producers (again at most that
    /// long). The listener is bound by the caller, so tests can use port 0.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> ShutdownReport {
        let state = self.state.clone();
        start_background(&state);
        let grace = state.server.shutdown_timeout;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // The drain has one `grace` from the signal, and the flush another.
        {
            let state = state.clone();
            tokio::spawn(async move {
                shutdown.await;
                state.begin_shutdown();
                tracing::info!("shutting down: no new connections, finishing requests");
                let _ = stop_tx.send(true);
            });
        }
        let limits = crate::listener::Limits {
            header_read_timeout: state.server.header_read_timeout,
            max_headers: state.server.max_headers,
            max_header_bytes: state.server.max_header_bytes,
            max_connections: state.server.max_connections,
            write_timeout: state.server.write_timeout,
        };
        let router = self.router();
        let mut admin_drain = None;
        if let Some(admin) = self.admin {
            let admin_router = crate::operations::router(crate::operations::Listener::Admin)
                .fallback(not_found)
                .with_state(state.clone());
            let stop = stop_rx.clone();
            admin_drain = Some(tokio::spawn(crate::listener::serve(
                admin,
                admin_router,
                limits,
                None,
                stop,
                grace,
            )));
        }
        if let Some(tls) = &self.tls {
            tls.spawn_watch();
        }
        let drained =
            crate::listener::serve(listener, router, limits, self.tls.clone(), stop_rx, grace)
                .await;
        // The admin listener drains beside the main one, started by the same stop: its
        // connections' answers are out before the process goes on to exit.
        let admin_in_time = match admin_drain {
            Some(admin) => admin.await.is_ok_and(|d| d.in_time),
            None => true,
        };
        if !drained.in_time || !admin_in_time {
            tracing::warn!(?grace, "requests still open at the shutdown deadline");
        }
        let report = finish(&state, grace, &drained).await;
        // The log lines of the last second, before the process ends.
        crate::throttle::tell_all();
        report
    }
}

/// How long requests still running after the final flush get to write their answers, and
/// connections to finish their lingering closes.
const LAST_ANSWERS: std::time::Duration = std::time::Duration::from_secs(1);

/// The tasks and threads that run beside the listener for the server's life.
fn start_background(state: &Arc<AppState>) {
    state
        .producers
        .topics
        .spawn_refresher(state.metadata_refresh);
    // Fatal producer errors are rare; a tenth of a second to notice one is plenty.
    state
        .producers
        .spawn_supervisor(std::time::Duration::from_millis(100));
    crate::status::spawn_sampler(Arc::downgrade(state));
    // Histogram samples pile up until upkeep folds them; without a scraper that is a leak.
    crate::metrics::spawn_upkeep();
    // Without a handler SIGHUP would end the process with no drain and no flush.
    tokio::spawn(async {
        let mut hangups = crate::shutdown::hangups();
        loop {
            hangups.next().await;
            tracing::info!("SIGHUP received");
        }
    });
    if let Some(spool) = &state.spool {
        let producers = state.producers.clone();
        let for_topic =
            move |topic: &str| producers.for_mode(crate::config::Mode::BatchAsync, topic);
        spool.start_sender(for_topic, state.producers.message_timeout());
    }
    if let Some(cluster) = &state.cluster {
        cluster.spawn();
    }
    if let Some(keys) = &state.keys {
        crate::auth::spawn_watch(keys);
    }
}

/// After the listener stopped: sends the spool's last records, flushes the producers and lets
/// hooks that replied before their acks have them, all at once, under one more `grace`; then
/// gives requests still running and records still in flight their last second.
async fn finish(
    state: &AppState,
    grace: std::time::Duration,
    drained: &crate::listener::Drained,
) -> ShutdownReport {
    // The spool's last sends and the producers' flush run at once, under one grace: a stop
    // takes at most two (the drain's and this one), as the docs size a supervisor's
    // timeout, and a spool backlog cannot leave the flush of records held only in memory
    // no time. Spooled records that are not sent stay on disk for the next start.
    let spool_done = async {
        match &state.spool {
            Some(spool) => spool.shutdown(grace).await,
            None => 0,
        }
    };
    // Hooks that replied before their records' acks still wait for them (to report a
    // failure): alongside the flush, which is what sends a record waiting for its batch.
    let deadline = tokio::time::Instant::now() + grace;
    let acks_after_replies = async {
        if !state.background.wait(deadline).await {
            tracing::warn!(
                ?grace,
                "acks after a hook's reply still awaited at the deadline"
            );
        }
    };
    let ((), spooled, ()) =
        tokio::join!(acks_after_replies, spool_done, state.producers.flush(grace));
    let (flushed, ()) = tokio::join!(
        state.producers.outcome(LAST_ANSWERS),
        drained.settle(LAST_ANSWERS)
    );
    let crate::kafka::Flushed {
        undelivered,
        maybe_written,
        failed,
    } = flushed;
    if spooled > 0 {
        tracing::info!(spooled, "records kept in the spool for the next start");
    }
    if undelivered > 0 {
        tracing::error!(
            undelivered,
            maybe_written,
            "records undelivered at the shutdown"
        );
    }
    if failed > 0 {
        tracing::error!(failed, "records failed during the shutdown");
    }
    if undelivered == 0 && failed == 0 {
        tracing::info!("all accepted records delivered or reported");
    }
    ShutdownReport {
        undelivered,
        maybe_written,
        spooled,
        failed,
    }
}
