//! Harness for the end-to-end tests: starts encoder-svc, index-svc shard
//! replicas and the gateway as separate processes on free loopback ports,
//! kills or pauses single processes for fault tests, and stops them all when
//! dropped.

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
    paused: bool,
}

/// Child processes with their logs in one temporary directory. Every
/// process is resumed if paused and killed on drop.
pub struct ProcessGroup {
    processes: Vec<Process>,
    /// Holds the logs and the data directories of the processes.
    pub dir: tempfile::TempDir,
}

impl ProcessGroup {
    /// Creates an empty group with a new temporary directory.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self { processes: Vec::new(), dir: tempfile::tempdir()? })
    }

    /// Starts `binary` from `bin` under `name`, with its output in
    /// `<dir>/<name>.log`.
    pub fn spawn(&mut self, bin: &Path, binary: &str, name: &str, env: &[(&str, String)]) -> anyhow::Result<()> {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(bin.join(binary))
            .envs(env.iter().map(|(key, value)| (*key, value.as_str())))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("failed to start {binary}"))?;
        self.processes.push(Process { name: name.to_string(), child, log, paused: false });
        Ok(())
    }

    fn find(&mut self, name: &str) -> anyhow::Result<&mut Process> {
        self.processes
            .iter_mut()
            .find(|process| process.name == name)
            .with_context(|| format!("no process named {name:?} in this group"))
    }

    /// Kills the process `name` (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let process = self.find(name)?;
        process.child.kill()?;
        process.child.wait()?;
        process.paused = false;
        Ok(())
    }

    /// Stops the process `name` with SIGSTOP: its sockets stay open but it
    /// responds to nothing until [`ProcessGroup::resume`].
    pub fn pause(&mut self, name: &str) -> anyhow::Result<()> {
        let process = self.find(name)?;
        signal(&process.child, libc::SIGSTOP)?;
        process.paused = true;
        Ok(())
    }

    /// Continues a process stopped by [`ProcessGroup::pause`] (SIGCONT).
    pub fn resume(&mut self, name: &str) -> anyhow::Result<()> {
        let process = self.find(name)?;
        signal(&process.child, libc::SIGCONT)?;
        process.paused = false;
        Ok(())
    }

    /// Returns the last lines of every process log, for failure messages.
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
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        for process in &mut self.processes {
            if process.paused {
                let _ = signal(&process.child, libc::SIGCONT);
            }
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
    }
}

fn signal(child: &Child, signal: libc::c_int) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    // SAFETY: kill(2) on a child this process spawned and has not reaped.
    let result = unsafe { libc::kill(pid, signal) };
    if result != 0 {
        anyhow::bail!("kill({pid}, {signal}) failed: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Shape and settings of a [`LocalCluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of shards.
    pub shards: usize,
    /// index-svc processes per shard.
    pub replicas: usize,
    /// Extra `GATEWAY__*` settings, for example shorter deadlines.
    pub gateway_env: Vec<(String, String)>,
}

impl ClusterOptions {
    /// `shards` shards of one replica each, default gateway settings.
    pub fn shards(shards: usize) -> Self {
        Self { shards, replicas: 1, gateway_env: Vec::new() }
    }
}

/// Name of the index-svc process serving `replica` of `shard`.
pub fn replica_name(shard: usize, replica: usize) -> String {
    format!("index-svc-{shard}-{replica}")
}

/// A running cluster; every process is killed on drop.
pub struct LocalCluster {
    /// The service processes; use it to kill or pause one.
    pub processes: ProcessGroup,
    pub gateway_address: String,
    pub encoder_address: String,
    /// Address of the first replica of each shard.
    pub shard_addresses: Vec<String>,
    /// Addresses of every replica, `replica_addresses[shard][replica]`.
    pub replica_addresses: Vec<Vec<String>>,
}

impl LocalCluster {
    /// Starts the encoder, `shards` index shards and the gateway, and waits
    /// until all of them report SERVING.
    pub async fn start(shards: usize) -> anyhow::Result<Self> {
        Self::start_with(ClusterOptions::shards(shards)).await
    }

    /// Starts a cluster of the given shape.
    pub async fn start_with(options: ClusterOptions) -> anyhow::Result<Self> {
        let bin = binary_dir()?;
        for binary in ["encoder-svc", "index-svc", "gateway"] {
            if !bin.join(binary).exists() {
                anyhow::bail!("{} is missing; run `cargo build --release --workspace --bins` first", bin.join(binary).display());
            }
        }
        let model = model_dir()?;
        let mut cluster = Self {
            processes: ProcessGroup::new()?,
            gateway_address: format!("127.0.0.1:{}", free_port()?),
            encoder_address: format!("127.0.0.1:{}", free_port()?),
            shard_addresses: Vec::new(),
            replica_addresses: Vec::new(),
        };

        cluster.processes.spawn(
            &bin,
            "encoder-svc",
            "encoder-svc",
            &[
                ("ENCODER__LISTEN", cluster.encoder_address.clone()),
                ("ENCODER__MODEL_DIR", model.display().to_string()),
                ("ENCODER__DEVICE", "cpu".into()),
            ],
        )?;
        for shard in 0..options.shards {
            let mut replicas = Vec::with_capacity(options.replicas);
            for replica in 0..options.replicas.max(1) {
                let address = format!("127.0.0.1:{}", free_port()?);
                let data = cluster.processes.dir.path().join(format!("shard-{shard}-{replica}"));
                cluster.processes.spawn(
                    &bin,
                    "index-svc",
                    &replica_name(shard, replica),
                    &[
                        ("INDEX__LISTEN", address.clone()),
                        ("INDEX__SHARD_ID", shard.to_string()),
                        ("INDEX__DATA_DIR", data.display().to_string()),
                    ],
                )?;
                replicas.push(address);
            }
            cluster.shard_addresses.push(replicas[0].clone());
            cluster.replica_addresses.push(replicas);
        }
        let shard_urls: Vec<String> = cluster
            .replica_addresses
            .iter()
            .map(|replicas| replicas.iter().map(|address| format!("http://{address}")).collect::<Vec<_>>().join("|"))
            .collect();
        let mut gateway_env = vec![
            ("GATEWAY__LISTEN", cluster.gateway_address.clone()),
            ("GATEWAY__ENCODER", format!("http://{}", cluster.encoder_address)),
            ("GATEWAY__SHARDS", shard_urls.join(",")),
        ];
        gateway_env.extend(options.gateway_env.iter().map(|(key, value)| (key.as_str(), value.clone())));
        cluster.processes.spawn(&bin, "gateway", "gateway", &gateway_env)?;

        let timeout = Duration::from_secs(180);
        let mut waits = vec![
            (cluster.encoder_address.clone(), "densebert4ret.v1.Encoder"),
            (cluster.gateway_address.clone(), "densebert4ret.v1.Gateway"),
        ];
        waits.extend(cluster.replica_addresses.iter().flatten().map(|address| (address.clone(), "densebert4ret.v1.Index")));
        for (address, service) in waits {
            if let Err(error) = wait_until_serving(&address, service, timeout).await {
                anyhow::bail!("{error}\n{}", cluster.log_tails());
            }
        }
        Ok(cluster)
    }

    /// Returns the last lines of every service log, for failure messages.
    pub fn log_tails(&self) -> String {
        self.processes.log_tails()
    }

    pub async fn gateway(&self) -> anyhow::Result<GatewayClient<Channel>> {
        let channel = Endpoint::from_shared(format!("http://{}", self.gateway_address))?.connect().await?;
        Ok(GatewayClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
    }
}

/// index-svc processes without an encoder or a gateway, for tests that
/// drive the gateway library's fan-out directly.
pub struct IndexProcesses {
    /// The processes, named `index-svc-<i>`.
    pub processes: ProcessGroup,
    /// Address of process `i`.
    pub addresses: Vec<String>,
}

impl IndexProcesses {
    /// Starts `count` index-svc processes with `env` added to their
    /// settings, and waits until all report SERVING.
    pub async fn start(count: usize, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let bin = binary_dir()?;
        if !bin.join("index-svc").exists() {
            anyhow::bail!("{} is missing; run `cargo build --release --workspace --bins` first", bin.join("index-svc").display());
        }
        let mut processes = ProcessGroup::new()?;
        let mut addresses = Vec::with_capacity(count);
        for index in 0..count {
            let address = format!("127.0.0.1:{}", free_port()?);
            let data = processes.dir.path().join(format!("index-{index}"));
            let mut settings = vec![
                ("INDEX__LISTEN", address.clone()),
                ("INDEX__SHARD_ID", index.to_string()),
                ("INDEX__DATA_DIR", data.display().to_string()),
            ];
            settings.extend(env.iter().cloned());
            processes.spawn(&bin, "index-svc", &format!("index-svc-{index}"), &settings)?;
            addresses.push(address);
        }
        for address in &addresses {
            if let Err(error) = wait_until_serving(address, "densebert4ret.v1.Index", Duration::from_secs(60)).await {
                anyhow::bail!("{error}\n{}", processes.log_tails());
            }
        }
        Ok(Self { processes, addresses })
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
