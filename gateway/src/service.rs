//! The public `densebert4ret.v1.Gateway` gRPC service.

use std::time::Duration;

use densebert4ret_proto::v1::gateway_server::Gateway;
use densebert4ret_proto::v1::{
    DeleteRequest, DeleteResponse, IndexStatsRequest, ModelInfoRequest, ReplicaStats, SearchRequest, SearchResponse,
    ShardStats, StatsRequest, StatsResponse, UpsertRequest, UpsertResponse,
};
use futures::future::join_all;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::cluster::{code_name, Cluster, Shard};
use crate::settings::GatewaySettings;
use crate::{ingest, search};

/// Gateway request handlers; stateless apart from the backend clients.
pub struct GatewayService {
    cluster: Cluster,
    settings: GatewaySettings,
}

impl GatewayService {
    /// Creates the service over connected backends.
    pub fn new(cluster: Cluster, settings: GatewaySettings) -> Self {
        Self { cluster, settings }
    }
}

/// Parses the `grpc-timeout` request header (an integer of at most 8 digits
/// followed by a unit: H, M, S, m, u or n, as the gRPC over HTTP/2
/// specification defines it). Returns `None` when it is absent or malformed.
pub fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    match unit {
        "H" => Some(Duration::from_secs(amount.saturating_mul(3600))),
        "M" => Some(Duration::from_secs(amount.saturating_mul(60))),
        "S" => Some(Duration::from_secs(amount)),
        "m" => Some(Duration::from_millis(amount)),
        "u" => Some(Duration::from_micros(amount)),
        "n" => Some(Duration::from_nanos(amount)),
        _ => None,
    }
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn search(&self, request: Request<SearchRequest>) -> Result<Response<SearchResponse>, Status> {
        let deadline = grpc_timeout(request.metadata()).map(|timeout| Instant::now() + timeout);
        let response = search::search(&self.cluster, &self.settings, request.into_inner(), deadline)
            .await
            .inspect_err(|error| tracing::debug!(%error, "search failed"))?;
        Ok(Response::new(response))
    }

    async fn upsert(&self, request: Request<Streaming<UpsertRequest>>) -> Result<Response<UpsertResponse>, Status> {
        let response = ingest::upsert_stream(&self.cluster, &self.settings, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn delete(&self, request: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let response = ingest::delete(&self.cluster, &self.settings, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn stats(&self, _request: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let mut encoder = self.cluster.encoder.clone();
        let model = match encoder.model_info(ModelInfoRequest {}).await {
            Ok(response) => Some(response.into_inner()),
            Err(status) => {
                tracing::warn!(error = %status.message(), "encoder ModelInfo call failed");
                None
            }
        };

        let timeout = Duration::from_millis(self.settings.shard_timeout_ms);
        let shards = join_all(self.cluster.shards.iter().map(|shard| shard_stats(shard, timeout))).await;
        let total_vectors = shards.iter().filter_map(|shard| shard.stats.as_ref()).map(|stats| stats.vector_count).sum();
        Ok(Response::new(StatsResponse { total_vectors, shards, model }))
    }
}

/// Asks every replica of `shard` for its statistics.
async fn shard_stats(shard: &Shard, timeout: Duration) -> ShardStats {
    let replies = shard
        .call_all(timeout, |mut client, timeout| {
            let mut request = Request::new(IndexStatsRequest {});
            request.set_timeout(timeout);
            async move { client.stats(request).await }
        })
        .await;

    let mut stats = None;
    let mut errors = Vec::new();
    let mut replicas = Vec::with_capacity(replies.len());
    for reply in replies {
        match reply.result {
            Ok(replica) => {
                replicas.push(ReplicaStats {
                    endpoint: reply.endpoint,
                    reachable: true,
                    error: String::new(),
                    vector_count: replica.vector_count,
                });
                stats.get_or_insert(replica);
            }
            Err(status) => {
                let error = format!("{}: {}", code_name(status.code()), status.message());
                errors.push(format!("{}: {error}", reply.endpoint));
                replicas.push(ReplicaStats { endpoint: reply.endpoint, reachable: false, error, vector_count: 0 });
            }
        }
    }
    ShardStats {
        shard_id: shard.id,
        endpoint: replicas.iter().map(|replica| replica.endpoint.as_str()).collect::<Vec<_>>().join("|"),
        reachable: stats.is_some(),
        error: errors.join("; "),
        stats,
        replicas,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: &str) -> MetadataMap {
        let mut map = MetadataMap::new();
        map.insert("grpc-timeout", value.parse().unwrap());
        map
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(grpc_timeout(&metadata("250m")), Some(Duration::from_millis(250)));
        assert_eq!(grpc_timeout(&metadata("3S")), Some(Duration::from_secs(3)));
        assert_eq!(grpc_timeout(&metadata("2M")), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout(&metadata("1H")), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout(&metadata("1500u")), Some(Duration::from_micros(1500)));
        assert_eq!(grpc_timeout(&metadata("7n")), Some(Duration::from_nanos(7)));
    }

    #[test]
    fn grpc_timeout_rejects_malformed() {
        for value in ["", "m", "12x", "123456789m", "-5m"] {
            let map = if value.is_empty() { MetadataMap::new() } else { metadata(value) };
            assert_eq!(grpc_timeout(&map), None, "{value:?}");
        }
    }
}
