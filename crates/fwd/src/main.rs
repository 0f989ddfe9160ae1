//! `fwd --config FILE`: the daemon; `fwd --check-config FILE`: validate a configuration.
//!
//! The binary is thin: it parses the command line and the configuration, binds the status
//! socket and the metrics address (so a port in use fails at start, not later), starts the
//! reconcile loop on its own thread ([`fwd::engine`]) and the servers on a single-threaded
//! tokio runtime, and turns SIGTERM and SIGINT into an orderly stop that leaves enforcement in
//! place.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use clap::Parser;
use fw_compiler::model::HostIdentity;
use fwd::config::{Config, hostname};
use fwd::engine::{Engine, Msg};
use fwd::metrics::Metrics;
use fwd::status::Status;
use tracing::{error, info};

/// The GitOps reconcile daemon of the host firewall.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Run the daemon with this configuration.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "check_config",
        required_unless_present = "check_config"
    )]
    config: Option<PathBuf>,
    /// Validate this configuration, print the effective settings and exit.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = &cli.check_config {
        return match Config::load(path) {
            Ok(c) => {
                println!("{}: ok", path.display());
                println!("source {} every {:?}", c.source, c.source.interval);
                match c.host_name(hostname) {
                    Ok(h) => println!("host {h} labels {:?}", c.host.labels),
                    Err(e) => println!("host: {e}"),
                }
                println!("interfaces {:?}", c.interfaces);
                println!(
                    "cgroup {}",
                    c.cgroup
                        .as_ref()
                        .map_or("(the cgroup v2 mount)".into(), |p| p.display().to_string())
                );
                println!("bpffs {}", c.bpffs.display());
                println!("state {}", c.state.display());
                println!("status {}", c.status.display());
                println!("metrics {}", c.metrics);
                println!("drift_interval {:?}", c.drift_interval);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FWD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let Some(path) = cli.config else { return ExitCode::from(2) };
    match run(&path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(path: &std::path::Path) -> Result<()> {
    let cfg = Config::load(path)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 && std::env::var_os("FWD_ALLOW_NON_ROOT").is_none() {
        // Capabilities instead of root are fine (the systemd unit); say what is needed when
        // the first kernel operation fails rather than guessing here.
        info!("not running as root: the capabilities of the systemd unit are needed");
    }
    let host = HostIdentity {
        name: cfg.host_name(hostname).map_err(anyhow::Error::msg)?,
        labels: cfg.host.labels.clone(),
    };
    let cgroup = match &cfg.cgroup {
        Some(c) => c.clone(),
        None => fw_loader::cgroup2_mount().context("finding the cgroup v2 mount")?,
    };
    if !cgroup.is_dir() {
        bail!("cgroup {} is not a directory", cgroup.display());
    }
    std::fs::create_dir_all(&cfg.state)
        .with_context(|| format!("creating the state folder {}", cfg.state.display()))?;

    let status = Arc::new(Mutex::new(Status::default()));
    let metrics = Arc::new(Metrics::new(status.clone()));
    let (tx, rx) = std::sync::mpsc::channel::<Msg>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let status_listener = {
        let _guard = runtime.enter();
        fwd::server::bind_status(&cfg.status)?
    };
    let metrics_listener = runtime.block_on(fwd::server::bind_metrics(&cfg.metrics))?;
    info!(
        host = %host.name,
        source = %cfg.source,
        bpffs = %cfg.bpffs.display(),
        cgroup = %cgroup.display(),
        status = %cfg.status.display(),
        metrics = %cfg.metrics,
        "starting"
    );

    let engine =
        Engine::new(cfg.clone(), host, cgroup, tx.clone(), status.clone(), metrics.clone());
    let worker = std::thread::Builder::new()
        .name("reconcile".into())
        .spawn(move || engine.run(&rx))
        .context("starting the reconcile thread")?;

    let shared_tx = Arc::new(Mutex::new(tx.clone()));
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        tokio::spawn(fwd::server::serve_status(status_listener, status.clone(), shared_tx.clone()));
        tokio::spawn(fwd::server::serve_metrics(
            metrics_listener,
            metrics.clone(),
            shared_tx.clone(),
        ));
        tokio::select! {
            _ = term.recv() => info!("SIGTERM"),
            _ = int.recv() => info!("SIGINT"),
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let _ = tx.send(Msg::Shutdown);
    let _ = worker.join();
    let _ = std::fs::remove_file(&cfg.status);
    Ok(())
}
