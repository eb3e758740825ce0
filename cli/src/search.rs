//! Composed queries, deletes and statistics from the command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use densebert4ret_proto::v1::{search_request, DeleteRequest, SearchParams, SearchRequest, StatsRequest};

use crate::client::{connect_gateway, DEFAULT_GATEWAY};

#[derive(Args)]
pub struct SearchArgs {
    /// Reference image file (PNG, JPEG, WebP, BMP or GIF).
    #[arg(long, conflicts_with = "id", required_unless_present = "id")]
    image: Option<PathBuf>,
    /// Id of a catalog item to use as the reference.
    #[arg(long)]
    id: Option<String>,
    /// Modification text, for example "the same but in blue".
    #[arg(long)]
    text: String,
    /// Further modification texts, applied after --text in order.
    #[arg(long = "then")]
    then: Vec<String>,
    /// Number of results.
    #[arg(short, long, default_value_t = 10)]
    k: u32,
    /// Whether the gateway may return the results of the shards that
    /// responded when others failed; unset takes the gateway's setting.
    #[arg(long)]
    allow_partial: Option<bool>,
    /// Inverted lists each shard visits (IVF indexes); 0 takes the shard's
    /// default.
    #[arg(long, default_value_t = 0)]
    nprobe: u32,
    /// Candidate list size of each shard (HNSW indexes); 0 takes the shard's
    /// default.
    #[arg(long, default_value_t = 0)]
    ef_search: u32,
    /// Deadline of the search in milliseconds, sent as grpc-timeout; 0 sends
    /// none.
    #[arg(long, default_value_t = 0)]
    timeout_ms: u64,
    #[arg(long, default_value = DEFAULT_GATEWAY)]
    gateway: String,
}

pub async fn run(args: SearchArgs) -> anyhow::Result<()> {
    let reference = match (&args.image, &args.id) {
        (Some(path), _) => search_request::Reference::Image(
            std::fs::read(path).with_context(|| format!("failed to read {}", path.display()))?,
        ),
        (None, Some(id)) => search_request::Reference::CatalogId(id.clone()),
        (None, None) => anyhow::bail!("pass --image FILE or --id CATALOG_ID"),
    };
    let mut gateway = connect_gateway(&args.gateway).await?;
    let params = (args.nprobe > 0 || args.ef_search > 0)
        .then_some(SearchParams { nprobe: args.nprobe, ef_search: args.ef_search });
    let mut request = tonic::Request::new(SearchRequest {
        reference: Some(reference),
        text: args.text,
        k: args.k,
        more_texts: args.then,
        allow_partial: args.allow_partial,
        params,
    });
    if args.timeout_ms > 0 {
        request.set_timeout(std::time::Duration::from_millis(args.timeout_ms));
    }
    let response = gateway
        .search(request)
        .await
        .map_err(|status| anyhow::anyhow!("search failed ({:?}): {}", status.code(), status.message()))?
        .into_inner();

    println!("{:>4}  {:<22} {:>7}  {:>5}  metadata", "rank", "id", "score", "shard");
    for (rank, item) in response.items.iter().enumerate() {
        let mut metadata: Vec<String> = item.metadata.iter().map(|(key, value)| format!("{key}={value}")).collect();
        metadata.sort();
        println!("{:>4}  {:<22} {:>7.4}  {:>5}  {}", rank + 1, item.id, item.score, item.shard, metadata.join(" "));
    }
    if response.partial {
        println!("PARTIAL: these results leave out {} shard(s):", response.missing_shards.len());
        for missing in &response.missing_shards {
            println!("  shard {} missing: {}: {}", missing.shard_id, missing.code, missing.message);
        }
    }
    if let Some(timing) = response.encode_timing {
        println!(
            "encode: preprocess {} us, queue {} us, inference {} us (batch of {}); search {} us; model {}",
            timing.preprocess_us,
            timing.queue_us,
            timing.inference_us,
            timing.batch_size,
            response.search_us,
            response.model_fingerprint
        );
    }
    Ok(())
}

pub async fn delete(gateway: &str, ids: Vec<String>) -> anyhow::Result<()> {
    let mut gateway = connect_gateway(gateway).await?;
    let response = gateway
        .delete(DeleteRequest { ids })
        .await
        .map_err(|status| anyhow::anyhow!("delete failed ({:?}): {}", status.code(), status.message()))?
        .into_inner();
    println!("deleted {}", response.deleted);
    if !response.not_found.is_empty() {
        println!("not found: {}", response.not_found.join(", "));
    }
    for failure in &response.failed {
        println!("not deleted on every replica: {} (shard {}): {}", failure.id, failure.shard, failure.error);
    }
    if !response.failed.is_empty() {
        anyhow::bail!("{} ids may still be stored on some replicas; send the delete again", response.failed.len());
    }
    Ok(())
}

pub async fn stats(gateway: &str) -> anyhow::Result<()> {
    let mut gateway = connect_gateway(gateway).await?;
    let stats = gateway.stats(StatsRequest {}).await?.into_inner();
    println!("total vectors: {}", stats.total_vectors);
    if let Some(model) = stats.model {
        println!(
            "model: {} ({} + {}), dimension {}, device {}",
            model.fingerprint, model.image_backbone, model.text_encoder, model.dimension, model.device
        );
    }
    for shard in stats.shards {
        match shard.stats {
            Some(index) => println!(
                "shard {} {}: {} vectors, {}, {} bytes",
                shard.shard_id, shard.endpoint, index.vector_count, index.index_type, index.memory_bytes
            ),
            None => println!("shard {} {}: unreachable ({})", shard.shard_id, shard.endpoint, shard.error),
        }
        if shard.replicas.len() > 1 {
            for replica in &shard.replicas {
                if replica.reachable {
                    println!("  replica {}: {} vectors", replica.endpoint, replica.vector_count);
                } else {
                    println!("  replica {}: unreachable ({})", replica.endpoint, replica.error);
                }
            }
        }
    }
    Ok(())
}
