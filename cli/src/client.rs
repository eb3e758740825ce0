//! Connections to the gateway and health checks.

use std::time::{Duration, Instant};

use anyhow::Context;
use densebert4ret_proto::v1::gateway_client::GatewayClient;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

pub const DEFAULT_GATEWAY: &str = "http://127.0.0.1:50051";

const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Adds `http://` when the address has no scheme.
pub fn endpoint_url(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

pub async fn connect_gateway(address: &str) -> anyhow::Result<GatewayClient<Channel>> {
    let url = endpoint_url(address);
    let channel = Endpoint::from_shared(url.clone())
        .with_context(|| format!("invalid gateway address {address:?}"))?
        .connect()
        .await
        .with_context(|| format!("failed to connect to the gateway at {url}; is the cluster running?"))?;
    Ok(GatewayClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Waits until `service` at `address` reports SERVING through the standard
/// health service, or fails after `timeout`.
pub async fn wait_until_serving(address: &str, service: &str, timeout: Duration) -> anyhow::Result<()> {
    let url = endpoint_url(address);
    let started = Instant::now();
    let mut last_state = String::from("not reachable");
    while started.elapsed() < timeout {
        if let Ok(endpoint) = Endpoint::from_shared(url.clone()) {
            if let Ok(channel) = endpoint.connect_timeout(Duration::from_secs(1)).connect().await {
                let mut health = HealthClient::new(channel);
                match health.check(HealthCheckRequest { service: service.to_string() }).await {
                    Ok(response) if response.get_ref().status == ServingStatus::Serving as i32 => return Ok(()),
                    Ok(response) => last_state = format!("health status {}", response.get_ref().status),
                    Err(status) => last_state = status.message().to_string(),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("{service} at {url} was not serving after {} s ({last_state})", timeout.as_secs())
}
