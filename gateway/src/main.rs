use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use densebert4ret_common::{init_tracing, load_settings, shutdown_signal};
use densebert4ret_proto::v1::gateway_server::GatewayServer;
use gateway::cluster::MAX_MESSAGE_BYTES;
use gateway::{Cluster, GatewayService, GatewaySettings};
use tonic::transport::Server;

/// Serves the public densebert4ret gateway over gRPC.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; `GATEWAY__*` environment variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing("gateway");
    let args = Args::parse();
    let settings: GatewaySettings = load_settings(args.config.as_deref(), "GATEWAY")?;
    settings.validate().map_err(|message| anyhow::anyhow!("invalid gateway configuration: {message}"))?;
    let cluster = Cluster::connect(&settings)?;
    let shards: Vec<String> = settings.shards.iter().map(ToString::to_string).collect();
    tracing::info!(encoder = %settings.encoder, ?shards, "backends configured");

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // Both reflection versions: grpcurl releases before 1.9 only speak v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(densebert4ret_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("failed to listen on {}; set listen to a free address", settings.listen))?;
    let address = listener.local_addr()?;
    let service = GatewayService::new(cluster, settings);
    health_reporter.set_serving::<GatewayServer<GatewayService>>().await;
    tracing::info!(%address, "gateway serving");

    Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            GatewayServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown_signal())
        .await?;
    tracing::info!("gateway stopped");
    Ok(())
}
