//! The `densebert4ret.v1.Index` gRPC service: converts messages, runs shard
//! operations on blocking threads, and maps [`ShardError`] to status codes.

use std::sync::Arc;

use densebert4ret_proto::v1::index_server::Index;
use densebert4ret_proto::v1::{
    IndexDeleteRequest, IndexDeleteResponse, IndexGetRequest, IndexGetResponse, IndexItem,
    IndexSearchRequest, IndexSearchResponse, IndexSnapshotRequest, IndexSnapshotResponse,
    IndexStatsRequest, IndexStatsResponse, IndexTrainRequest, IndexTrainResponse,
    IndexUpsertRequest, IndexUpsertResponse, ScoredItem, SearchResult,
};
use tonic::{Code, Request, Response, Status};

use crate::error::{IndexError, ShardError, WalError};
use crate::item::StoredItem;
use crate::shard::{SearchParams, Shard};

/// gRPC handler for one shard.
#[derive(Debug, Clone)]
pub struct IndexService {
    shard: Arc<Shard>,
}

impl IndexService {
    /// Serves `shard`.
    pub fn new(shard: Arc<Shard>) -> Self {
        Self { shard }
    }

    /// Runs `operation` on a blocking thread, because shard operations hold
    /// locks, call FAISS and sync files.
    async fn run<T, F>(&self, method: &'static str, operation: F) -> Result<T, Status>
    where
        F: FnOnce(&Shard) -> Result<T, ShardError> + Send + 'static,
        T: Send + 'static,
    {
        let shard = Arc::clone(&self.shard);
        let shard_id = shard.settings().shard_id;
        match tokio::task::spawn_blocking(move || operation(&shard)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                let status = status_from_error(&error);
                if is_server_fault(status.code()) {
                    tracing::error!(method, shard_id, code = ?status.code(), %error, "request failed");
                } else {
                    tracing::warn!(method, shard_id, code = ?status.code(), %error, "request rejected");
                }
                Err(status)
            }
            Err(join_error) => {
                tracing::error!(method, shard_id, error = %join_error, "shard operation panicked or was cancelled");
                Err(Status::internal(format!(
                    "{method} failed inside the shard; see the index-svc log"
                )))
            }
        }
    }
}

#[tonic::async_trait]
impl Index for IndexService {
    async fn upsert(
        &self,
        request: Request<IndexUpsertRequest>,
    ) -> Result<Response<IndexUpsertResponse>, Status> {
        let IndexUpsertRequest {
            items,
            model_fingerprint,
        } = request.into_inner();
        let items: Vec<StoredItem> = items.into_iter().map(StoredItem::from).collect();
        let outcome = self
            .run("Upsert", move |shard| {
                shard.upsert(items, model_fingerprint)
            })
            .await?;
        Ok(Response::new(IndexUpsertResponse {
            upserted: saturating_u32(outcome.upserted),
            replaced: saturating_u32(outcome.replaced),
        }))
    }

    async fn delete(
        &self,
        request: Request<IndexDeleteRequest>,
    ) -> Result<Response<IndexDeleteResponse>, Status> {
        let ids = request.into_inner().ids;
        let outcome = self.run("Delete", move |shard| shard.delete(ids)).await?;
        Ok(Response::new(IndexDeleteResponse {
            deleted: saturating_u32(outcome.deleted),
            not_found: outcome.not_found,
        }))
    }

    async fn search(
        &self,
        request: Request<IndexSearchRequest>,
    ) -> Result<Response<IndexSearchResponse>, Status> {
        let IndexSearchRequest {
            queries,
            k,
            model_fingerprint,
            exclude_ids,
            params,
        } = request.into_inner();
        let queries: Vec<Vec<f32>> = queries.into_iter().map(|query| query.values).collect();
        let params = params
            .map(|params| SearchParams {
                nprobe: params.nprobe,
                ef_search: params.ef_search,
            })
            .unwrap_or_default();
        let results = self
            .run("Search", move |shard| {
                shard.search(&queries, k, &model_fingerprint, &exclude_ids, params)
            })
            .await?;

        let shard_id = self.shard.settings().shard_id;
        let results = results
            .into_iter()
            .map(|hits| SearchResult {
                items: hits
                    .into_iter()
                    .map(|hit| ScoredItem {
                        id: hit.id,
                        score: hit.score,
                        metadata: hit.metadata,
                        shard: shard_id,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(IndexSearchResponse { results }))
    }

    async fn get(
        &self,
        request: Request<IndexGetRequest>,
    ) -> Result<Response<IndexGetResponse>, Status> {
        let ids = request.into_inner().ids;
        let items = self.run("Get", move |shard| shard.get(&ids)).await?;
        Ok(Response::new(IndexGetResponse {
            items: items.into_iter().map(IndexItem::from).collect(),
        }))
    }

    async fn stats(
        &self,
        _request: Request<IndexStatsRequest>,
    ) -> Result<Response<IndexStatsResponse>, Status> {
        let stats = self.run("Stats", |shard| Ok(shard.stats())).await?;
        Ok(Response::new(IndexStatsResponse {
            vector_count: stats.vector_count,
            dimension: stats.dimension,
            index_type: stats.index_type,
            model_fingerprint: stats.model_fingerprint,
            shard_id: stats.shard_id,
            memory_bytes: stats.memory_bytes,
            last_snapshot_unix_ms: stats.last_snapshot_unix_ms,
            wal_records: stats.wal_records,
            trained: stats.trained,
            tombstones: stats.tombstones,
            metric: stats.metric.to_owned(),
        }))
    }

    async fn train(
        &self,
        _request: Request<IndexTrainRequest>,
    ) -> Result<Response<IndexTrainResponse>, Status> {
        let outcome = self.run("Train", |shard| shard.train()).await?;
        Ok(Response::new(IndexTrainResponse {
            trained_on: outcome.trained_on,
            already_trained: outcome.already_trained,
        }))
    }

    async fn snapshot(
        &self,
        _request: Request<IndexSnapshotRequest>,
    ) -> Result<Response<IndexSnapshotResponse>, Status> {
        let summary = self.run("Snapshot", |shard| shard.snapshot()).await?;
        Ok(Response::new(IndexSnapshotResponse {
            snapshot_unix_ms: summary.created_unix_ms,
            vector_count: summary.items,
        }))
    }
}

/// Maps a shard error to the gRPC status returned to the client.
pub fn status_from_error(error: &ShardError) -> Status {
    let code = match error {
        ShardError::InvalidK { .. }
        | ShardError::InvalidSearchParam { .. }
        | ShardError::TooManyEntries { .. }
        | ShardError::EmptyId { .. }
        | ShardError::IdTooLong { .. }
        | ShardError::DuplicateId { .. }
        | ShardError::DimensionMismatch { .. }
        | ShardError::InvalidDimension { .. }
        | ShardError::NonFinite { .. }
        | ShardError::MetadataTooLarge { .. }
        | ShardError::ImageFeaturesTooLarge { .. }
        | ShardError::ImageFeaturesNotF32 { .. }
        | ShardError::Wal(WalError::RecordTooLarge { .. }) => Code::InvalidArgument,
        ShardError::NotFound { .. } => Code::NotFound,
        // The configured index cannot serve: an operator must change the
        // settings, and retrying the request does not help.
        ShardError::FingerprintMismatch { .. }
        | ShardError::Index(
            IndexError::Build { .. } | IndexError::TooFewTrainingVectors { .. },
        )
        | ShardError::DimensionConflict { .. }
        | ShardError::DataDirLocked { .. }
        | ShardError::Settings(_) => Code::FailedPrecondition,
        ShardError::IndexUnavailable { .. } | ShardError::Wal(WalError::Poisoned { .. }) => {
            Code::Unavailable
        }
        ShardError::Index(IndexError::Faiss { .. })
        | ShardError::Io { .. }
        | ShardError::Wal(_)
        | ShardError::Snapshot(_) => Code::Internal,
    };
    Status::new(code, error.to_string())
}

/// Returns true when a status code blames the server rather than the request.
fn is_server_fault(code: Code) -> bool {
    matches!(
        code,
        Code::Internal | Code::Unavailable | Code::Unknown | Code::DataLoss
    )
}

fn saturating_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

impl From<IndexItem> for StoredItem {
    fn from(item: IndexItem) -> Self {
        Self {
            id: item.id,
            vector: item.vector,
            metadata: item.metadata,
            image_features: item.image_features,
        }
    }
}

impl From<StoredItem> for IndexItem {
    fn from(item: StoredItem) -> Self {
        Self {
            id: item.id,
            vector: item.vector,
            metadata: item.metadata,
            image_features: item.image_features,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_codes() {
        let cases = [
            (
                ShardError::InvalidK { k: 0, max_k: 10 },
                Code::InvalidArgument,
            ),
            (
                ShardError::NotFound {
                    ids: vec!["a".into()],
                },
                Code::NotFound,
            ),
            (
                ShardError::FingerprintMismatch {
                    shard: "a".into(),
                    request: "b".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ShardError::IndexUnavailable {
                    reason: "out of memory".into(),
                },
                Code::Unavailable,
            ),
            (
                ShardError::Index(IndexError::Faiss {
                    operation: "add",
                    message: "bad".into(),
                }),
                Code::Internal,
            ),
        ];
        for (error, code) in cases {
            let status = status_from_error(&error);
            assert_eq!(status.code(), code, "{error}");
            assert_eq!(status.message(), error.to_string());
        }
    }
}
