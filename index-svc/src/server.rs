//! gRPC server of one shard: the index service, health checks and
//! reflection.

use std::future::Future;
use std::sync::Arc;

use densebert4ret_proto::v1::index_server::IndexServer;
use densebert4ret_proto::v1::FILE_DESCRIPTOR_SET;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::error::ServeError;
use crate::service::IndexService;
use crate::shard::Shard;

/// Name under which health checks report the index service.
pub const INDEX_SERVICE_NAME: &str = <IndexServer<IndexService> as NamedService>::NAME;

/// Serves `shard` on `listener` until `shutdown` completes, then finishes
/// the requests in flight and returns.
///
/// Health checks report `SERVING` for the index service and for the whole
/// server (`""`) from the start, since the shard is already open, and
/// `NOT_SERVING` once `shutdown` completes. `max_message_bytes` bounds
/// decoded requests and encoded responses.
pub async fn serve<F>(
    shard: Arc<Shard>,
    listener: TcpListener,
    max_message_bytes: usize,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send,
{
    let shard_id = shard.settings().shard_id;
    let address = listener
        .local_addr()
        .map(|address| address.to_string())
        .unwrap_or_default();

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status(INDEX_SERVICE_NAME, ServingStatus::Serving)
        .await;
    health_reporter
        .set_service_status("", ServingStatus::Serving)
        .await;

    // Both reflection versions: grpcurl releases before 1.9 only speak v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let index = IndexServer::new(IndexService::new(shard))
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);

    let shutdown = async move {
        shutdown.await;
        health_reporter
            .set_service_status(INDEX_SERVICE_NAME, ServingStatus::NotServing)
            .await;
        health_reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        tracing::info!(
            shard_id,
            "stopping the gRPC server after the requests in flight"
        );
    };

    tracing::info!(shard_id, %address, "serving gRPC");
    Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(index)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    tracing::info!(shard_id, "gRPC server stopped");
    Ok(())
}
