//! `index-svc` binary: opens one shard and serves it over gRPC until Ctrl-C
//! or SIGTERM, then takes a snapshot.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use index_svc::{Settings, Shard};

/// One FAISS-backed shard of the densebert4ret catalog, served over gRPC.
#[derive(Debug, Parser)]
#[command(name = "index-svc", version)]
struct Cli {
    /// TOML settings file. Environment variables such as INDEX__SHARD_ID=1
    /// override its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    densebert4ret_common::init_tracing("index-svc");
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %format_args!("{error:#}"), "index-svc failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings: Settings = densebert4ret_common::load_settings(cli.config.as_deref(), "INDEX")?;
    settings.validate()?;
    let listen = settings.listen.clone();
    let max_message_bytes = settings.max_message_bytes;

    let (shard, report) = tokio::task::spawn_blocking(move || Shard::open(settings))
        .await
        .context("shard recovery stopped unexpectedly")??;
    tracing::info!(
        items = report.items,
        snapshot_items = report.snapshot_items,
        snapshot_unix_ms = report.snapshot_unix_ms,
        wal_records_replayed = report.wal_records_replayed,
        wal_records_skipped = report.wal_records_skipped,
        wal_discarded_bytes = report.wal_discarded_bytes,
        "recovered shard contents from the snapshot and the write-ahead log"
    );
    let shard = Arc::new(shard);

    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("failed to bind {listen}; set listen to a free address"))?;
    index_svc::serve(
        Arc::clone(&shard),
        listener,
        max_message_bytes,
        densebert4ret_common::shutdown_signal(),
    )
    .await?;

    let checkpoint = tokio::task::spawn_blocking(move || shard.checkpoint())
        .await
        .context("the final snapshot stopped unexpectedly")??;
    match checkpoint {
        Some(summary) => tracing::info!(
            items = summary.items,
            bytes = summary.bytes,
            "took the final snapshot"
        ),
        None => tracing::info!("no writes since the last snapshot; skipped the final snapshot"),
    }
    tracing::info!("index-svc stopped");
    Ok(())
}
