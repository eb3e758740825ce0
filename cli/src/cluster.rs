//! A local cluster on loopback: encoder-svc, N index-svc shards and the
//! gateway as child processes of this command.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use densebert4ret_proto::v1::StatsRequest;
use tokio::process::{Child, Command};

use crate::client::{connect_gateway, wait_until_serving};
use crate::ingest::{self, IngestArgs};

#[derive(Args)]
pub struct ClusterArgs {
    /// Model directory the encoder loads.
    #[arg(long, env = "DB4R_MODEL_DIR", default_value = "artifacts/models/fmnist-colours")]
    model_dir: PathBuf,
    /// Number of index shards.
    #[arg(long, default_value_t = 2)]
    shards: u16,
    /// index-svc processes per shard, each with its own data directory.
    /// Searches read one replica of each shard; writes go to all of them.
    #[arg(long, default_value_t = 1)]
    replicas: u16,
    /// Gateway address; the encoder and the shards take the ports after it
    /// (gateway port + 1 for the encoder, + 10, + 11, ... for the shard
    /// replicas, shard 0 first).
    #[arg(long, default_value = "127.0.0.1:50051")]
    gateway: String,
    /// Directory for shard data and service logs.
    #[arg(long, default_value = "artifacts/cluster")]
    data_dir: PathBuf,
    /// Device the encoder runs on: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Fashion-MNIST test images to ingest (0 skips ingest).
    #[arg(long, default_value_t = 10_000)]
    catalog_size: usize,
    /// Ingest again even when the shards already hold the catalog.
    #[arg(long)]
    reingest: bool,
    /// Seconds to wait for each service to report SERVING.
    #[arg(long, default_value_t = 300)]
    start_timeout: u64,
}

struct Service {
    name: String,
    child: Child,
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    let (host, gateway_port) = args
        .gateway
        .rsplit_once(':')
        .and_then(|(host, port)| port.parse::<u16>().ok().map(|port| (host.to_string(), port)))
        .with_context(|| format!("invalid --gateway {:?}; use HOST:PORT such as 127.0.0.1:50051", args.gateway))?;
    if args.shards == 0 {
        anyhow::bail!("--shards must be at least 1");
    }
    if args.replicas == 0 {
        anyhow::bail!("--replicas must be at least 1");
    }
    let replica_ports = u32::from(args.shards) * u32::from(args.replicas);
    if u32::from(gateway_port) + 10 + replica_ports > u32::from(u16::MAX) {
        anyhow::bail!(
            "--gateway port {gateway_port} leaves no room for {replica_ports} shard replica ports after it; use a lower port"
        );
    }
    if !args.model_dir.join("config.json").exists() {
        anyhow::bail!(
            "no model at {}; run scripts/setup.sh (it trains one) or pass --model-dir",
            args.model_dir.display()
        );
    }
    let logs = args.data_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("failed to create {}", logs.display()))?;
    let bin_dir = std::env::current_exe()?.parent().map(Path::to_path_buf).context("no executable directory")?;

    let encoder_address = format!("{host}:{}", gateway_port + 1);
    // shard_addresses[shard][replica]
    let shard_addresses: Vec<Vec<String>> = (0..args.shards)
        .map(|shard| {
            (0..args.replicas)
                .map(|replica| format!("{host}:{}", gateway_port + 10 + shard * args.replicas + replica))
                .collect()
        })
        .collect();

    let mut services = Vec::new();
    let started = start_all(&args, &bin_dir, &logs, &encoder_address, &shard_addresses, &mut services).await;
    if let Err(error) = started {
        stop_all(&mut services).await;
        return Err(error);
    }
    let shard_list: Vec<String> = shard_addresses.iter().map(|replicas| replicas.join("|")).collect();
    eprintln!("cluster serving: gateway {}, encoder {encoder_address}, shards {}", args.gateway, shard_list.join(", "));
    eprintln!("service logs: {}", logs.display());

    if args.catalog_size > 0 {
        if let Err(error) = ingest_catalog(&args).await {
            stop_all(&mut services).await;
            return Err(error);
        }
    }

    eprintln!();
    eprintln!("try: densebert4ret search --id fmnist-test-00000 --text \"the same but in blue\"");
    eprintln!("     grpcurl -plaintext {} list", args.gateway);
    eprintln!("press Ctrl-C to stop the cluster");

    let outcome = supervise(&mut services).await;
    stop_all(&mut services).await;
    outcome
}

async fn start_all(
    args: &ClusterArgs,
    bin_dir: &Path,
    logs: &Path,
    encoder_address: &str,
    shard_addresses: &[Vec<String>],
    services: &mut Vec<Service>,
) -> anyhow::Result<()> {
    let encoder_env = vec![
        ("ENCODER__LISTEN".to_string(), encoder_address.to_string()),
        ("ENCODER__MODEL_DIR".to_string(), args.model_dir.display().to_string()),
        ("ENCODER__DEVICE".to_string(), args.device.clone()),
    ];
    services.push(spawn(bin_dir, "encoder-svc", "encoder-svc", encoder_env, logs)?);

    for (shard, replicas) in shard_addresses.iter().enumerate() {
        for (replica, address) in replicas.iter().enumerate() {
            // Replica 0 keeps the directory of a cluster without replicas.
            let (directory, name) = if replica == 0 {
                (format!("shard-{shard}"), format!("index-svc-{shard}"))
            } else {
                (format!("shard-{shard}-replica-{replica}"), format!("index-svc-{shard}-replica-{replica}"))
            };
            let env = vec![
                ("INDEX__LISTEN".to_string(), address.clone()),
                ("INDEX__SHARD_ID".to_string(), shard.to_string()),
                ("INDEX__DATA_DIR".to_string(), args.data_dir.join(directory).display().to_string()),
            ];
            services.push(spawn(bin_dir, "index-svc", &name, env, logs)?);
        }
    }

    let shard_urls: Vec<String> = shard_addresses
        .iter()
        .map(|replicas| replicas.iter().map(|address| format!("http://{address}")).collect::<Vec<_>>().join("|"))
        .collect();
    let gateway_env = vec![
        ("GATEWAY__LISTEN".to_string(), args.gateway.clone()),
        ("GATEWAY__ENCODER".to_string(), format!("http://{encoder_address}")),
        ("GATEWAY__SHARDS".to_string(), shard_urls.join(",")),
    ];
    services.push(spawn(bin_dir, "gateway", "gateway", gateway_env, logs)?);

    let timeout = Duration::from_secs(args.start_timeout);
    for address in shard_addresses.iter().flatten() {
        wait_until_serving(address, "densebert4ret.v1.Index", timeout).await?;
    }
    wait_until_serving(&args.gateway, "densebert4ret.v1.Gateway", timeout).await?;
    eprintln!("waiting for the encoder to load the model and warm up...");
    wait_until_serving(encoder_address, "densebert4ret.v1.Encoder", timeout).await?;
    Ok(())
}

fn spawn(bin_dir: &Path, binary: &str, name: &str, env: Vec<(String, String)>, logs: &Path) -> anyhow::Result<Service> {
    let path = bin_dir.join(binary);
    if !path.exists() {
        anyhow::bail!("{} not found; build the workspace with `cargo build --release`", path.display());
    }
    let log_path = logs.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path).with_context(|| format!("failed to create {}", log_path.display()))?;
    let child = Command::new(&path)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("failed to start {}", path.display()))?;
    tracing::info!(service = name, pid = child.id(), log = %log_path.display(), "started");
    Ok(Service { name: name.to_string(), child })
}

async fn ingest_catalog(args: &ClusterArgs) -> anyhow::Result<()> {
    let mut gateway = connect_gateway(&args.gateway).await?;
    let stats = gateway.stats(StatsRequest {}).await?.into_inner();
    // A replica that missed writes (for example one added later) stores
    // fewer items than the other replicas of its shard, so count each shard
    // by its emptiest replica.
    let complete: u64 = stats
        .shards
        .iter()
        .map(|shard| shard.replicas.iter().map(|replica| replica.vector_count).min().unwrap_or(0))
        .sum();
    if !args.reingest && complete as usize >= args.catalog_size {
        eprintln!("every replica already stores its part of {complete} vectors; skipping ingest (pass --reingest to ingest again)");
        return Ok(());
    }
    // Without --reingest, items every replica stores already are skipped.
    let summary = ingest::run(IngestArgs {
        gateway: args.gateway.clone(),
        limit: args.catalog_size,
        batch: 256,
        resume: !args.reingest,
    })
    .await?;
    if summary.failed > 0 {
        anyhow::bail!("{} of {} catalog items failed to ingest; see the messages above", summary.failed, summary.total);
    }
    Ok(())
}

/// Waits for Ctrl-C or SIGTERM, or for a child to exit on its own.
async fn supervise(services: &mut [Service]) -> anyhow::Result<()> {
    let exits = services.iter_mut().map(|service| {
        Box::pin(async move {
            let status = service.child.wait().await;
            (service.name.clone(), status)
        })
    });
    tokio::select! {
        _ = densebert4ret_common::shutdown_signal() => Ok(()),
        ((name, status), _, _) = futures::future::select_all(exits) => {
            anyhow::bail!("{name} exited unexpectedly ({status:?}); see its log")
        }
    }
}

/// Sends SIGTERM to every child so shards can write a final snapshot, then
/// kills those still running after 10 seconds.
async fn stop_all(services: &mut [Service]) {
    for service in services.iter() {
        if let Some(pid) = service.child.id() {
            // SAFETY: kill(2) with a pid this process spawned and has not reaped.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
    }
    for service in services.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(10), service.child.wait()).await {
            Ok(_) => tracing::info!(service = %service.name, "stopped"),
            Err(_) => {
                tracing::warn!(service = %service.name, "did not stop within 10 s; killing it");
                let _ = service.child.kill().await;
            }
        }
    }
}
