//! `index-svc`: one shard of the densebert4ret catalog.
//!
//! A shard stores catalog items (id, joint-space vector, metadata, image
//! features) in a FAISS index and serves upsert, delete, search, get and
//! stats over gRPC. Writes go to a checksummed write-ahead log before they
//! are acknowledged, and periodic snapshots bound the log. On start the shard
//! loads the snapshot, replays the log and rebuilds the index from the stored
//! vectors. Any FAISS factory string works: indexes that need training (IVF,
//! PQ) serve exact searches until they are trained in the background, and
//! indexes without removal (HNSW) filter deleted vectors as tombstones until
//! a background rebuild drops them. A gateway fans searches out to several shards and merges their
//! top-k lists.

pub mod error;
pub mod item;
pub mod server;
pub mod service;
pub mod settings;
pub mod shard;
pub mod snapshot;
pub mod validate;
pub mod vector_index;
pub mod wal;

mod codec;
mod fs_util;
mod state;

pub use error::{ServeError, ShardError};
pub use item::StoredItem;
pub use server::serve;
pub use settings::{Metric, Settings};
pub use shard::{
    DeleteOutcome, RecoveryReport, SearchHit, SearchParams, Shard, ShardStats, SnapshotSummary,
    TrainOutcome, UpsertOutcome,
};
