//! `switchyard`: config → tracing → build → run.

/// jemalloc, not glibc malloc: small long-lived objects (sessions, tasks) pack into per-size
/// slabs away from the short-lived handshake buffers, and freed pages go back to the OS after a
/// connection burst. Measured: 3.5 vs 4.6 KiB RSS per idle socket, and a few % less CPU per
/// delivery and per upgrade (BENCHMARKS.md).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use clap::Parser;
use std::process::ExitCode;
use switchyard::config::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;

use switchyard::exit::{FAILURE, USAGE as EX_USAGE};

/// How long the runtime's shutdown waits for blocking tasks still running (a Kafka flush or
/// metadata call in `spawn_blocking`) once `App::run` has returned.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(1);

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let line = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments");
            eprintln!("switchyard: {}", line.trim_start_matches("error: "));
            return ExitCode::from(EX_USAGE);
        }
    };
    #[cfg(feature = "kafka")]
    if let Some(switchyard::config::Command::Replay(args)) = &cli.command {
        return replay(args.clone(), &cli.opts);
    }
    let settings = match cli.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("switchyard: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let filter = match EnvFilter::try_new(&cli.opts.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("switchyard: --log {:?}: {e}", cli.opts.log);
            return ExitCode::from(EX_USAGE);
        }
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match cli.opts.log_format {
        LogFormat::Json => fmt.json().init(),
        LogFormat::Text => fmt.init(),
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchyard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async move {
        let app = match settings.build().await {
            Ok(app) => app,
            Err(e) => {
                eprintln!("switchyard: {e}");
                return ExitCode::from(e.exit_code());
            }
        };
        let token = app.shutdown_token();
        tokio::spawn(async move {
            wait_for_signal().await;
            token.cancel();
        });
        if let Some(tls) = app.edge.as_ref().and_then(|e| e.tls.clone()) {
            // SIGHUP: re-read the certificate and key now (they are also polled).
            tokio::spawn(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let Ok(mut hup) = signal(SignalKind::hangup()) else {
                    return;
                };
                while hup.recv().await.is_some() {
                    let _ = tls.reload();
                }
            });
        }
        match app.run().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("switchyard: {e}");
                ExitCode::from(FAILURE)
            }
        }
    });
    rt.shutdown_timeout(RUNTIME_SHUTDOWN);
    code
}

#[cfg(feature = "kafka")]
fn replay(args: switchyard::replay::ReplayArgs, opts: &switchyard::config::Options) -> ExitCode {
    if let Err(e) = switchyard::replay::validate(&args, &opts.bus) {
        eprintln!("switchyard: {e}");
        return ExitCode::from(EX_USAGE);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchyard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let security = match (opts.bus_tls(), opts.bus_auth(&|var| std::env::var(var).ok())) {
        (Ok(tls), Ok(auth)) => switchyard_bus::kafka::Security { tls, auth },
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("switchyard: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match rt.block_on(switchyard::replay::run(
        args,
        opts.bus.clone(),
        opts.bus_options.prefix.clone(),
        security,
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
    }
}
