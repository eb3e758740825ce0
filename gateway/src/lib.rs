//! gateway: the public gRPC API of densebert4ret. It encodes each query
//! through encoder-svc, searches one replica of every index shard in
//! parallel and merges the global top-k. Ingest and deletes go to every
//! replica of the shard that owns each id.

pub mod cluster;
pub mod error;
pub mod ingest;
pub mod routing;
pub mod search;
pub mod service;
pub mod settings;
pub mod validate;

pub use cluster::{connect_shards, Cluster, Shard};
pub use search::{fan_out, merge_top_k, FanOut, FanOutOptions};
pub use service::GatewayService;
pub use settings::{GatewaySettings, ShardReplicas};
