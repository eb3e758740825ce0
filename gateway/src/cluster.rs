//! Clients of the services behind the gateway.

use std::time::Duration;

use anyhow::Context;
use densebert4ret_proto::v1::encoder_client::EncoderClient;
use densebert4ret_proto::v1::index_client::IndexClient;
use tonic::transport::{Channel, Endpoint};

use crate::settings::GatewaySettings;

/// Largest gRPC message the gateway sends to or accepts from its backends.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// One index shard.
#[derive(Clone)]
pub struct Shard {
    /// Position in the shard map; ids are routed by it.
    pub id: u32,
    pub endpoint: String,
    pub client: IndexClient<Channel>,
}

impl Shard {
    /// Name used in logs and error messages.
    pub fn label(&self) -> String {
        format!("shard {} ({})", self.id, self.endpoint)
    }
}

/// The encoder and the shards, connected lazily: the gateway starts even when
/// a backend is not up yet, and reconnects when it comes back.
#[derive(Clone)]
pub struct Cluster {
    pub encoder: EncoderClient<Channel>,
    pub shards: Vec<Shard>,
}

impl Cluster {
    pub fn connect(settings: &GatewaySettings) -> anyhow::Result<Self> {
        if settings.shards.is_empty() {
            anyhow::bail!("no shards configured; set shards to a list of index-svc endpoints");
        }
        let encoder = EncoderClient::new(lazy_channel(&settings.encoder, settings.encoder_timeout_ms)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);

        let mut shards = Vec::with_capacity(settings.shards.len());
        for (id, endpoint) in settings.shards.iter().enumerate() {
            let client = IndexClient::new(lazy_channel(endpoint, settings.shard_timeout_ms)?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            shards.push(Shard { id: id as u32, endpoint: endpoint.clone(), client });
        }
        Ok(Self { encoder, shards })
    }
}

fn lazy_channel(endpoint: &str, timeout_ms: u64) -> anyhow::Result<Channel> {
    let channel = Endpoint::from_shared(endpoint.to_string())
        .with_context(|| format!("invalid endpoint {endpoint:?}; use a URL such as http://127.0.0.1:50061"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_millis(timeout_ms))
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(channel)
}
