//! Helpers shared by the densebert4ret services: layered configuration,
//! logging set-up and graceful shutdown.

pub mod grpc;
pub mod settings;
pub mod telemetry;

pub use grpc::code_name;
pub use settings::load_settings;
pub use telemetry::init_tracing;

/// Completes when the process receives Ctrl-C or SIGTERM, so servers can stop
/// accepting requests and finish the ones in flight.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "failed to listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };

    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "failed to listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();

    tokio::select! {
        _ = ctrl_c => tracing::info!("received Ctrl-C, shutting down"),
        _ = terminate => tracing::info!("received SIGTERM, shutting down"),
    }
}
