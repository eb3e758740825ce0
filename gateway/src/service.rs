//! The public `densebert4ret.v1.Gateway` gRPC service.

use densebert4ret_proto::v1::gateway_server::Gateway;
use densebert4ret_proto::v1::{
    DeleteRequest, DeleteResponse, IndexStatsRequest, ModelInfoRequest, SearchRequest, SearchResponse,
    ShardStats, StatsRequest, StatsResponse, UpsertRequest, UpsertResponse,
};
use futures::future::join_all;
use tonic::{Request, Response, Status, Streaming};

use crate::cluster::Cluster;
use crate::settings::GatewaySettings;
use crate::{ingest, search};

/// Gateway request handlers; stateless apart from the backend clients.
pub struct GatewayService {
    cluster: Cluster,
    settings: GatewaySettings,
}

impl GatewayService {
    pub fn new(cluster: Cluster, settings: GatewaySettings) -> Self {
        Self { cluster, settings }
    }
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn search(&self, request: Request<SearchRequest>) -> Result<Response<SearchResponse>, Status> {
        let response = search::search(&self.cluster, &self.settings, request.into_inner())
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

        let calls = self.cluster.shards.iter().map(|shard| {
            let mut client = shard.client.clone();
            async move {
                match client.stats(IndexStatsRequest {}).await {
                    Ok(response) => ShardStats {
                        shard_id: shard.id,
                        endpoint: shard.endpoint.clone(),
                        reachable: true,
                        error: String::new(),
                        stats: Some(response.into_inner()),
                    },
                    Err(status) => ShardStats {
                        shard_id: shard.id,
                        endpoint: shard.endpoint.clone(),
                        reachable: false,
                        error: status.message().to_string(),
                        stats: None,
                    },
                }
            }
        });
        let shards = join_all(calls).await;
        let total_vectors = shards.iter().filter_map(|shard| shard.stats.as_ref()).map(|stats| stats.vector_count).sum();
        Ok(Response::new(StatsResponse { total_vectors, shards, model }))
    }
}
