//! Harness for the end-to-end tests: starts encoder-svc, index-svc shards
//! and the gateway as separate processes on free loopback ports, and stops
//! them when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use densebert4ret_proto::v1::gateway_client::GatewayClient;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Directory of the workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Directory holding the service binaries of the profile the tests were
/// built with (the test executable lives in its `deps/` subdirectory).
pub fn binary_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let deps = exe.parent().context("test executable has no directory")?;
    let dir = if deps.ends_with("deps") { deps.parent().context("deps/ has no parent")? } else { deps };
    Ok(dir.to_path_buf())
}

/// Returns the trained model the tests serve: `DB4R_MODEL_DIR`, else the
/// default model, else the one that scripts/test.sh trains.
pub fn model_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("DB4R_MODEL_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let artifacts = std::env::var("DB4R_ARTIFACTS").map(PathBuf::from).unwrap_or_else(|_| workspace_root().join("artifacts"));
    for name in ["fmnist-colours", "fmnist-colours-quick"] {
        let dir = artifacts.join("models").join(name);
        if dir.join("config.json").exists() {
            return Ok(dir);
        }
    }
    anyhow::bail!("no trained model under {}/models; run scripts/test.sh, which trains one", artifacts.display())
}

/// Returns a port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

/// A running cluster; every process is killed on drop.
pub struct LocalCluster {
    processes: Vec<Process>,
    pub gateway_address: String,
    pub encoder_address: String,
    pub shard_addresses: Vec<String>,
    pub data_dir: tempfile::TempDir,
}

impl LocalCluster {
    /// Starts the encoder, `shards` index shards and the gateway, and waits
    /// until all of them report SERVING.
    pub async fn start(shards: usize) -> anyhow::Result<Self> {
        let bin = binary_dir()?;
        for binary in ["encoder-svc", "index-svc", "gateway"] {
            if !bin.join(binary).exists() {
                anyhow::bail!("{} is missing; run `cargo build --release --workspace --bins` first", bin.join(binary).display());
            }
        }
        let model = model_dir()?;
        let data_dir = tempfile::tempdir()?;
        let mut cluster = Self {
            processes: Vec::new(),
            gateway_address: format!("127.0.0.1:{}", free_port()?),
            encoder_address: format!("127.0.0.1:{}", free_port()?),
            shard_addresses: Vec::new(),
            data_dir,
        };

        cluster.spawn(
            &bin,
            "encoder-svc",
            "encoder-svc",
            &[
                ("ENCODER__LISTEN", cluster.encoder_address.clone()),
                ("ENCODER__MODEL_DIR", model.display().to_string()),
                ("ENCODER__DEVICE", "cpu".into()),
            ],
        )?;
        for shard in 0..shards {
            let address = format!("127.0.0.1:{}", free_port()?);
            cluster.shard_addresses.push(address.clone());
            let data = cluster.data_dir.path().join(format!("shard-{shard}"));
            cluster.spawn(
                &bin,
                "index-svc",
                &format!("index-svc-{shard}"),
                &[
                    ("INDEX__LISTEN", address),
                    ("INDEX__SHARD_ID", shard.to_string()),
                    ("INDEX__DATA_DIR", data.display().to_string()),
                ],
            )?;
        }
        let shard_urls: Vec<String> = cluster.shard_addresses.iter().map(|address| format!("http://{address}")).collect();
        cluster.spawn(
            &bin,
            "gateway",
            "gateway",
            &[
                ("GATEWAY__LISTEN", cluster.gateway_address.clone()),
                ("GATEWAY__ENCODER", format!("http://{}", cluster.encoder_address)),
                ("GATEWAY__SHARDS", shard_urls.join(",")),
            ],
        )?;

        let timeout = Duration::from_secs(180);
        let mut waits = vec![
            (cluster.encoder_address.clone(), "densebert4ret.v1.Encoder"),
            (cluster.gateway_address.clone(), "densebert4ret.v1.Gateway"),
        ];
        waits.extend(cluster.shard_addresses.iter().map(|address| (address.clone(), "densebert4ret.v1.Index")));
        for (address, service) in waits {
            if let Err(error) = wait_until_serving(&address, service, timeout).await {
                anyhow::bail!("{error}\n{}", cluster.log_tails());
            }
        }
        Ok(cluster)
    }

    fn spawn(&mut self, bin: &Path, binary: &str, name: &str, env: &[(&str, String)]) -> anyhow::Result<()> {
        let log = self.data_dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(bin.join(binary))
            .envs(env.iter().map(|(key, value)| (*key, value.as_str())))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("failed to start {binary}"))?;
        self.processes.push(Process { name: name.to_string(), child, log });
        Ok(())
    }

    /// Returns the last lines of every service log, for failure messages.
    pub fn log_tails(&self) -> String {
        let mut text = String::new();
        for process in &self.processes {
            let content = std::fs::read_to_string(&process.log).unwrap_or_default();
            let lines: Vec<&str> = content.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            text.push_str(&format!("--- {} ({}) ---\n{}\n", process.name, process.log.display(), tail.join("\n")));
        }
        text
    }

    pub async fn gateway(&self) -> anyhow::Result<GatewayClient<Channel>> {
        let channel = Endpoint::from_shared(format!("http://{}", self.gateway_address))?.connect().await?;
        Ok(GatewayClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for process in &mut self.processes {
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
    }
}

/// Waits until `service` at `address` reports SERVING.
pub async fn wait_until_serving(address: &str, service: &str, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last = String::from("not reachable");
    while started.elapsed() < timeout {
        if let Ok(channel) = Endpoint::from_shared(format!("http://{address}"))?.connect().await {
            match HealthClient::new(channel).check(HealthCheckRequest { service: service.into() }).await {
                Ok(response) if response.get_ref().status == ServingStatus::Serving as i32 => return Ok(()),
                Ok(response) => last = format!("status {}", response.get_ref().status),
                Err(status) => last = status.message().to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("{service} at {address} not serving after {} s: {last}", timeout.as_secs())
}
