//! Clients of the services behind the gateway: the encoder, and the replicas
//! of every index shard.
//!
//! A read goes to one replica of its shard. The replica is chosen by the
//! power of two choices (Mitzenmacher, "The Power of Two Choices in
//! Randomized Load Balancing", 2001), the rule of `tower::balance::p2c`: two
//! random candidates, the one with fewer requests in flight wins. The gateway
//! makes that choice itself, rather than through a `tower` balancer, so that
//! a retry can leave out the replica that just failed. A replica that fails
//! a read with a fault of its own (unreachable, timed out, internal error) is
//! avoided for `replica_cooldown_ms`.
//!
//! A write goes to every replica of the owning shard.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use densebert4ret_proto::v1::encoder_client::EncoderClient;
use densebert4ret_proto::v1::index_client::IndexClient;
use densebert4ret_proto::v1::ShardFailure;
use rand::Rng;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::settings::{GatewaySettings, ShardReplicas};

/// Largest gRPC message the gateway sends to or accepts from its backends.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

pub use densebert4ret_common::code_name;

/// Returns true when a failed call points to a fault of the replica rather
/// than of the request, so another replica may succeed.
fn is_replica_fault(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Internal
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::DataLoss
    )
}

/// Reports a call that tonic cut off at its grpc-timeout as
/// DEADLINE_EXCEEDED. tonic's client ends such a call with CANCELLED
/// ("Timeout expired"), which would otherwise read as a cancelled request.
pub(crate) fn timeout_as_deadline(status: Status, deadline: Instant, budget: Duration) -> Status {
    if status.code() == Code::Cancelled && Instant::now() >= deadline {
        return Status::deadline_exceeded(format!("timed out after {} ms", budget.as_millis()));
    }
    status
}

/// Failed read of one shard, after every attempt it was allowed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("shard {shard_id}: {} ({message})", code_name(*.code))]
pub struct ShardError {
    /// Shard that failed.
    pub shard_id: u32,
    /// Status code of the last attempt; `DEADLINE_EXCEEDED` when the shard's
    /// deadline passed.
    pub code: Code,
    /// Reason of every attempt, replica endpoints included.
    pub message: String,
}

impl ShardError {
    /// Converts into the failure entry of a partial search response.
    pub fn to_failure(&self) -> ShardFailure {
        ShardFailure { shard_id: self.shard_id, code: code_name(self.code).to_string(), message: self.message.clone() }
    }
}

/// One index-svc process serving a shard.
pub struct Replica {
    /// URL of the replica, as configured.
    pub endpoint: String,
    client: IndexClient<Channel>,
    in_flight: AtomicUsize,
    avoided_until: Mutex<Option<Instant>>,
}

impl Replica {
    fn is_avoided(&self, now: Instant) -> bool {
        self.avoided_until
            .lock()
            .map(|until| until.is_some_and(|until| until > now))
            .unwrap_or(false)
    }

    fn set_avoided_until(&self, until: Option<Instant>) {
        if let Ok(mut slot) = self.avoided_until.lock() {
            *slot = until;
        }
    }

    /// Returns a client for one call to this replica.
    pub fn client(&self) -> IndexClient<Channel> {
        self.client.clone()
    }
}

/// Counts a request in flight on a replica until dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn start(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The replicas of one index shard.
pub struct Shard {
    /// Position in the shard map; ids are routed by it.
    pub id: u32,
    /// Replicas in configuration order.
    pub replicas: Vec<Replica>,
    cooldown: Duration,
}

/// Outcome of a call on one replica.
pub struct ReplicaOutcome<T> {
    /// Endpoint of the replica.
    pub endpoint: String,
    /// The replica's response, or why it failed.
    pub result: Result<T, Status>,
}

impl Shard {
    /// Creates lazily connected clients for the replicas of shard `id`.
    pub fn connect(id: u32, replicas: &ShardReplicas, settings: &GatewaySettings) -> anyhow::Result<Self> {
        if replicas.endpoints().is_empty() || replicas.endpoints().iter().any(String::is_empty) {
            anyhow::bail!(
                "shard {id} has an empty replica endpoint in {replicas:?}; list one or more URLs joined by `|`"
            );
        }
        let mut list = Vec::with_capacity(replicas.endpoints().len());
        for endpoint in replicas.endpoints() {
            let client = IndexClient::new(endpoint_config(endpoint)?.connect_lazy())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            list.push(Replica {
                endpoint: endpoint.clone(),
                client,
                in_flight: AtomicUsize::new(0),
                avoided_until: Mutex::new(None),
            });
        }
        Ok(Self { id, replicas: list, cooldown: Duration::from_millis(settings.replica_cooldown_ms) })
    }

    /// Name used in logs and error messages.
    pub fn label(&self) -> String {
        let endpoints: Vec<&str> = self.replicas.iter().map(|replica| replica.endpoint.as_str()).collect();
        format!("shard {} ({})", self.id, endpoints.join(" | "))
    }

    /// Picks the replica for the next read attempt among those not in
    /// `tried`: power of two choices by requests in flight, preferring
    /// replicas that are not avoided after a recent failure.
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        let now = Instant::now();
        let untried: Vec<usize> = (0..self.replicas.len()).filter(|index| !tried.contains(index)).collect();
        let healthy: Vec<usize> = untried.iter().copied().filter(|&index| !self.replicas[index].is_avoided(now)).collect();
        let candidates = if healthy.is_empty() { untried } else { healthy };
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0]),
            count => {
                let mut random = rand::thread_rng();
                let first_slot = random.gen_range(0..count);
                let mut second_slot = random.gen_range(0..count - 1);
                if second_slot >= first_slot {
                    second_slot += 1;
                }
                let (first, second) = (candidates[first_slot], candidates[second_slot]);
                let load = |index: usize| self.replicas[index].in_flight.load(Ordering::Relaxed);
                Some(if load(second) < load(first) { second } else { first })
            }
        }
    }

    /// Runs a read on one replica, and retries it on another replica when
    /// the attempt fails with a fault of the replica or misses
    /// `attempt_timeout`, as long as `deadline` allows. `call` receives the
    /// client and the time the attempt may take, to send as grpc-timeout.
    pub async fn read<T, F, Fut>(&self, deadline: Instant, attempt_timeout: Duration, call: F) -> Result<T, ShardError>
    where
        F: Fn(IndexClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut tried: Vec<usize> = Vec::with_capacity(self.replicas.len());
        let mut reasons: Vec<String> = Vec::new();
        let mut last_code = Code::DeadlineExceeded;

        while let Some(index) = self.pick(&tried) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            tried.push(index);
            let replica = &self.replicas[index];
            let last_candidate = tried.len() == self.replicas.len();
            let attempt_deadline = if last_candidate { deadline } else { deadline.min(now + attempt_timeout) };

            let guard = InFlight::start(&replica.in_flight);
            let outcome = tokio::time::timeout_at(attempt_deadline, call(replica.client(), attempt_deadline - now)).await;
            drop(guard);

            let status = match outcome {
                Ok(Ok(response)) => {
                    replica.set_avoided_until(None);
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) => timeout_as_deadline(status, attempt_deadline, attempt_deadline - now),
                Err(_) => Status::deadline_exceeded(format!(
                    "timed out after {} ms",
                    (attempt_deadline - now).as_millis()
                )),
            };
            last_code = status.code();
            reasons.push(format!("{}: {}: {}", replica.endpoint, code_name(status.code()), status.message()));
            if !is_replica_fault(status.code()) {
                // The request itself is at fault; another replica would
                // reject it too.
                break;
            }
            replica.set_avoided_until(Some(Instant::now() + self.cooldown));
            tracing::warn!(
                shard = self.id,
                replica = %replica.endpoint,
                code = code_name(status.code()),
                error = %status.message(),
                "shard read attempt failed"
            );
        }

        if reasons.is_empty() {
            reasons.push("the deadline passed before any replica was tried".into());
        }
        Err(ShardError { shard_id: self.id, code: last_code, message: reasons.join("; ") })
    }

    /// Runs a call on every replica at once, each bounded by `timeout`, and
    /// returns one outcome per replica in configuration order. Writes and
    /// statistics use it.
    pub async fn call_all<T, F, Fut>(&self, timeout: Duration, call: F) -> Vec<ReplicaOutcome<T>>
    where
        F: Fn(IndexClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let calls = self.replicas.iter().map(|replica| {
            let future = call(replica.client(), timeout);
            async move {
                let deadline = Instant::now() + timeout;
                let result = match tokio::time::timeout_at(deadline, future).await {
                    Ok(Ok(response)) => Ok(response.into_inner()),
                    Ok(Err(status)) => Err(timeout_as_deadline(status, deadline, timeout)),
                    Err(_) => Err(Status::deadline_exceeded(format!("timed out after {} ms", timeout.as_millis()))),
                };
                if let Err(status) = &result {
                    tracing::warn!(
                        shard = self.id,
                        replica = %replica.endpoint,
                        code = code_name(status.code()),
                        error = %status.message(),
                        "shard call failed on a replica"
                    );
                }
                ReplicaOutcome { endpoint: replica.endpoint.clone(), result }
            }
        });
        futures::future::join_all(calls).await
    }
}

/// Summarises the failed replicas of a write, or returns `None` when every
/// replica acknowledged it.
pub fn write_failures<T>(shard: &Shard, outcomes: &[ReplicaOutcome<T>]) -> Option<String> {
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|outcome| {
            outcome.result.as_ref().err().map(|status| {
                format!("{}: {}: {}", outcome.endpoint, code_name(status.code()), status.message())
            })
        })
        .collect();
    if failed.is_empty() {
        return None;
    }
    Some(format!(
        "shard {}: written to {} of {} replicas; failed on {}",
        shard.id,
        outcomes.len() - failed.len(),
        outcomes.len(),
        failed.join("; ")
    ))
}

/// The encoder and the shards, connected lazily: the gateway starts even when
/// a backend is not up yet, and reconnects when it comes back.
#[derive(Clone)]
pub struct Cluster {
    /// encoder-svc client.
    pub encoder: EncoderClient<Channel>,
    /// Shards in routing order.
    pub shards: Arc<Vec<Shard>>,
}

impl Cluster {
    /// Creates clients for the encoder and every shard replica in `settings`.
    pub fn connect(settings: &GatewaySettings) -> anyhow::Result<Self> {
        let encoder_timeout = Duration::from_millis(settings.encoder_timeout_ms);
        let encoder = EncoderClient::new(endpoint_config(&settings.encoder)?.timeout(encoder_timeout).connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self { encoder, shards: Arc::new(connect_shards(settings)?) })
    }
}

/// Creates lazily connected clients for every shard in `settings`, without
/// an encoder; the fan-out functions need only these.
pub fn connect_shards(settings: &GatewaySettings) -> anyhow::Result<Vec<Shard>> {
    if settings.shards.is_empty() {
        anyhow::bail!("no shards configured; set shards to a list of index-svc endpoints");
    }
    settings
        .shards
        .iter()
        .enumerate()
        .map(|(id, replicas)| Shard::connect(id as u32, replicas, settings))
        .collect()
}

fn endpoint_config(endpoint: &str) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(endpoint.to_string())
        .with_context(|| format!("invalid endpoint {endpoint:?}; use a URL such as http://127.0.0.1:50061"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    Ok(endpoint)
}
