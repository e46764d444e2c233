//! `omnigen serve`: the OpenAI images API, a jobs API and a web page over one loaded pipeline.
//!
//! - [`openai`]: OpenAI's error shape and the request fields read into a `GenerationRequest`;
//! - [`jobs`]: the bounded queue, the blocking worker threads, job state and expiry;
//! - [`routes`]: the endpoints;
//! - [`metrics`]: the Prometheus counters;
//! - `page.html`: the page at `/`, embedded in the binary.
//!
//! The server binds at once and answers 503 while the model loads on its own thread;
//! generations run on `--workers` dedicated threads, never on the async runtime's. Connections
//! are served by hyper directly (not `axum::serve`) for the header-read timeout that closes
//! slow-loris clients and a cap on open connections.

pub mod jobs;
pub mod metrics;
pub mod openai;
pub mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use omnigen::prelude::*;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use self::jobs::{cancel_unstarted, JobStore, Queue};
use self::metrics::Metrics;
use self::openai::Limits;
use self::routes::{AppState, LOADING, READY, SHUTTING_DOWN};

/// The flags of `omnigen serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model directory (official or diffusers layout) or hub id, e.g. Shitao/OmniGen-v1.
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on; 0.0.0.0 exposes the server to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Generations run at once (each already uses every core).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,
    /// Jobs that may wait for a worker; beyond that submissions get 429 with Retry-After.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub queue: u32,
    /// Key clients must send as `Authorization: Bearer KEY` on /v1 (default: none required).
    #[arg(long, env = "OMNIGEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The model name listed by /v1/models and accepted in a request's `model` field.
    #[arg(long, default_value = "omnigen")]
    pub model_name: String,
    /// Image size of a generation that gives none, WIDTHxHEIGHT.
    #[arg(long, default_value = "1024x1024", value_parser = parse_size)]
    pub default_size: (usize, usize),
    /// Most images per request (`n`).
    #[arg(long, default_value_t = 4)]
    pub max_n: usize,
    /// Most denoising steps per request.
    #[arg(long, default_value_t = 100)]
    pub max_steps: usize,
    /// Largest request body in bytes (uploaded images included); larger ones get 413.
    #[arg(long, default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
    /// Seconds a client has to send its request headers before the connection is closed.
    #[arg(long, default_value_t = 10)]
    pub header_timeout: u64,
    /// Seconds a client has to send its request body.
    #[arg(long, default_value_t = 120)]
    pub body_timeout: u64,
    /// Open connections at most; more are closed at once.
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Seconds a finished job of /v1/jobs stays readable.
    #[arg(long, default_value_t = 600)]
    pub job_ttl: u64,
    /// Seconds running jobs get to finish at shutdown before they are cancelled.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
    #[command(flatten)]
    pub precision: crate::generate::PrecisionArgs,
}

fn parse_size(text: &str) -> Result<(usize, usize), String> {
    let bad = || format!("`{text}` is not WIDTHxHEIGHT, e.g. 1024x1024");
    let (w, h) = text.split_once('x').ok_or_else(bad)?;
    Ok((w.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?))
}

/// Runs `omnigen serve` until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    omnigen::models::tune_host_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // The runtime only moves bytes; the generation threads are the workers'.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("omnigen-http")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let addr = SocketAddr::new(args.host, args.port);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("--port: cannot listen on {addr}"))?;
    let local = listener.local_addr().context("the bound address")?;
    let workers = usize::from(args.workers);
    let queue = Arc::new(Queue::new(args.queue as usize));
    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(AppState {
        phase: AtomicU8::new(LOADING),
        queue: queue.clone(),
        jobs: JobStore::new(Duration::from_secs(args.job_ttl)),
        metrics: metrics.clone(),
        limits: Limits {
            model_name: args.model_name.clone(),
            max_n: args.max_n.max(1),
            max_steps: args.max_steps.max(1),
            default_size: args.default_size,
        },
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        max_body: args.max_body_bytes,
        body_timeout: Duration::from_secs(args.body_timeout),
        workers,
        started: jobs::unix_now(),
    });
    eprintln!("omnigen serve: listening on http://{local}");

    // The model loads while the server already answers (503 until it is ready).
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
    let model = args.model.clone();
    let precision = args.precision;
    std::thread::Builder::new()
        .name("omnigen-load".into())
        .spawn(move || {
            let started = Instant::now();
            let built = precision
                .apply(OmniGenPipeline::<DefaultBackend>::builder(&model))
                .download_progress(true)
                .build();
            let _ = loaded_tx.send(built.map(|p| (p, started.elapsed())));
        })
        .context("cannot start the loading thread")?;

    let shutdown = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(wait_for_signal(shutdown.clone()));
    let expiry = {
        let state = state.clone();
        let every = Duration::from_secs((args.job_ttl / 4).clamp(1, 60));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                state.jobs.expire();
            }
        })
    };

    let app = routes::router(state.clone());
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(args.max_connections.max(1)));
    let header_timeout = Duration::from_secs(args.header_timeout.max(1));
    let mut loaded_rx = loaded_rx;
    let mut loading = true;
    let mut worker_threads = Vec::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    metrics.refused_connections.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let _ = connection.await;
                    drop(permit);
                });
            }
            built = &mut loaded_rx, if loading => {
                loading = false;
                match built {
                    Ok(Ok((pipeline, took))) => {
                        eprintln!("omnigen serve: loaded {} in {took:.2?}; ready", args.model.display());
                        worker_threads = jobs::start_workers(workers, queue.clone(), Arc::new(pipeline), metrics.clone())
                            .context("cannot start the worker threads")?;
                        // Shutdown may have begun while the model loaded.
                        let _ = state.phase.compare_exchange(LOADING, READY, Ordering::SeqCst, Ordering::SeqCst);
                    }
                    Ok(Err(e)) => return Err(crate::flags::name_flag(e.into())),
                    Err(_) => anyhow::bail!("the loading thread stopped without a result"),
                }
            }
            () = shutdown.notified() => break,
        }
    }

    // Stop accepting; refuse new jobs; cancel the waiting ones; give the running ones time.
    drop(listener);
    state.phase.store(SHUTTING_DOWN, Ordering::SeqCst);
    eprintln!("omnigen serve: shutting down");
    for job in queue.close() {
        cancel_unstarted(&job, &metrics);
    }
    let deadline = Instant::now() + Duration::from_secs(args.shutdown_timeout);
    while queue.running() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if queue.running() > 0 {
        eprintln!("omnigen serve: cancelling the jobs still running");
        queue.cancel_running();
    }
    for worker in worker_threads {
        let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    }
    expiry.abort();
    // Open connections finish their current response; idle keep-alive ones close now.
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!("omnigen serve: closing connections still open");
    }
    eprintln!("omnigen serve: stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn wait_for_signal(shutdown: Arc<tokio::sync::Notify>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    shutdown.notify_one();
}
