//! Bulk ingest and deletes, routed to the shard that owns each id.

use std::collections::{BTreeMap, HashMap};

use densebert4ret_proto::v1::{
    DeleteRequest, DeleteResponse, EmbedImagesRequest, IndexDeleteRequest, IndexItem, IndexUpsertRequest,
    UpsertRequest, UpsertResponse, UpsertResult,
};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::Stream;
use tonic::Status;

use crate::cluster::Cluster;
use crate::error::GatewayError;
use crate::routing::shard_for_id;
use crate::settings::GatewaySettings;
use crate::validate::{validate_id, validate_image};

/// An item of the upsert stream with its position in it.
struct Pending {
    position: usize,
    item: UpsertRequest,
}

/// Reads the upsert stream in batches, embeds and stores each batch, and
/// returns one result per streamed item in stream order.
///
/// NOTE: batches run concurrently, so when the same id appears in two
/// different batches of one stream, which version is stored last is not
/// defined. Within one batch the later item wins.
pub async fn upsert_stream<S>(cluster: &Cluster, settings: &GatewaySettings, mut stream: S) -> Result<UpsertResponse, Status>
where
    S: Stream<Item = Result<UpsertRequest, Status>> + Unpin,
{
    let batch_size = settings.ingest_batch_size.max(1);
    let concurrency = settings.ingest_concurrency.max(1);
    let mut results: Vec<Option<UpsertResult>> = Vec::new();
    let mut in_flight = FuturesUnordered::new();
    let mut batch: Vec<Pending> = Vec::with_capacity(batch_size);

    let mut ended = false;
    while !ended || !batch.is_empty() || !in_flight.is_empty() {
        // Start a batch once it is full or the stream has ended.
        if !batch.is_empty() && (batch.len() >= batch_size || ended) && in_flight.len() < concurrency {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
            in_flight.push(upsert_batch(cluster, full));
            continue;
        }

        let can_read = !ended && batch.len() < batch_size;
        tokio::select! {
            finished = in_flight.next(), if !in_flight.is_empty() => {
                for (position, result) in finished.into_iter().flatten() {
                    results[position] = Some(result);
                }
            }
            message = stream.next(), if can_read => match message {
                Some(Ok(item)) => {
                    let position = results.len();
                    results.push(None);
                    match check_item(&item, settings) {
                        Ok(()) => batch.push(Pending { position, item }),
                        Err(error) => results[position] = Some(failed(&item.id, 0, error.to_string())),
                    }
                }
                Some(Err(status)) => return Err(status),
                None => ended = true,
            },
        }
    }

    let results: Vec<UpsertResult> = results
        .into_iter()
        .map(|result| result.unwrap_or_else(|| failed("", 0, "the item was not processed".into())))
        .collect();
    let upserted = results.iter().filter(|result| result.ok).count() as u32;
    let failed_count = results.len() as u32 - upserted;
    tracing::info!(items = results.len(), upserted, failed = failed_count, "upsert stream finished");
    Ok(UpsertResponse { results, upserted, failed: failed_count })
}

fn check_item(item: &UpsertRequest, settings: &GatewaySettings) -> Result<(), GatewayError> {
    validate_id(&item.id, settings)?;
    validate_image(&item.image, &format!("the image of {:?}", item.id), settings)
}

fn failed(id: &str, shard: u32, error: String) -> UpsertResult {
    UpsertResult { id: id.to_string(), ok: false, error, shard }
}

/// Embeds one batch and writes it to the owning shards.
async fn upsert_batch(cluster: &Cluster, mut batch: Vec<Pending>) -> Vec<(usize, UpsertResult)> {
    let shard_count = cluster.shards.len();
    // The image bytes move into the encoder request, because only ids and
    // metadata are needed afterwards.
    let images = batch.iter_mut().map(|pending| std::mem::take(&mut pending.item.image)).collect();
    let mut encoder = cluster.encoder.clone();

    let embedded = match encoder.embed_images(EmbedImagesRequest { images }).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let error = GatewayError::upstream("encoder", status).to_string();
            tracing::warn!(items = batch.len(), %error, "encoder call failed for an ingest batch");
            return batch
                .into_iter()
                .map(|pending| {
                    let shard = shard_for_id(&pending.item.id, shard_count) as u32;
                    (pending.position, failed(&pending.item.id, shard, error.clone()))
                })
                .collect();
        }
    };

    if embedded.embeddings.len() != batch.len() {
        let error = format!(
            "encoder: returned {} embeddings for {} images; check that encoder and gateway versions match",
            embedded.embeddings.len(),
            batch.len()
        );
        tracing::error!(%error, "encoder response does not match the ingest batch");
        return batch
            .into_iter()
            .map(|pending| {
                let shard = shard_for_id(&pending.item.id, shard_count) as u32;
                (pending.position, failed(&pending.item.id, shard, error.clone()))
            })
            .collect();
    }

    let mut outcomes = Vec::with_capacity(batch.len());
    // Per shard: id -> (position, item); a later item with the same id
    // replaces the earlier one, which then reports success as overwritten.
    let mut per_shard: BTreeMap<usize, (Vec<usize>, HashMap<String, usize>, Vec<IndexItem>)> = BTreeMap::new();
    for (pending, embedding) in batch.into_iter().zip(embedded.embeddings) {
        let shard = shard_for_id(&pending.item.id, shard_count);
        if !embedding.error.is_empty() {
            outcomes.push((pending.position, failed(&pending.item.id, shard as u32, embedding.error)));
            continue;
        }
        let entry = per_shard.entry(shard).or_default();
        let item = IndexItem {
            id: pending.item.id.clone(),
            vector: embedding.embedding,
            metadata: pending.item.metadata,
            image_features: embedding.image_features,
        };
        match entry.1.get(&pending.item.id) {
            Some(&slot) => {
                outcomes.push((entry.0[slot], UpsertResult { id: pending.item.id, ok: true, error: String::new(), shard: shard as u32 }));
                entry.0[slot] = pending.position;
                entry.2[slot] = item;
            }
            None => {
                entry.1.insert(pending.item.id, entry.2.len());
                entry.0.push(pending.position);
                entry.2.push(item);
            }
        }
    }

    let fingerprint = embedded.model_fingerprint;
    let writes = per_shard.into_iter().map(|(shard, (positions, _, items))| {
        let target = &cluster.shards[shard];
        let mut client = target.client.clone();
        let ids: Vec<String> = items.iter().map(|item| item.id.clone()).collect();
        let request = IndexUpsertRequest { items, model_fingerprint: fingerprint.clone() };
        async move {
            let outcome = client.upsert(request).await;
            let error = outcome.err().map(|status| GatewayError::upstream(target.label(), status).to_string());
            if let Some(error) = &error {
                tracing::warn!(shard = target.id, items = ids.len(), %error, "shard upsert failed");
            }
            positions
                .into_iter()
                .zip(ids)
                .map(|(position, id)| {
                    let result = match &error {
                        None => UpsertResult { id, ok: true, error: String::new(), shard: target.id },
                        Some(error) => failed(&id, target.id, error.clone()),
                    };
                    (position, result)
                })
                .collect::<Vec<_>>()
        }
    });
    for shard_outcomes in futures::future::join_all(writes).await {
        outcomes.extend(shard_outcomes);
    }
    outcomes
}

/// Deletes ids from their owning shards.
pub async fn delete(cluster: &Cluster, settings: &GatewaySettings, request: DeleteRequest) -> Result<DeleteResponse, GatewayError> {
    if request.ids.is_empty() {
        return Err(GatewayError::invalid("the delete request has no ids; send at least one"));
    }
    let mut per_shard: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for id in request.ids {
        validate_id(&id, settings)?;
        per_shard.entry(shard_for_id(&id, cluster.shards.len())).or_default().push(id);
    }

    let calls = per_shard.into_iter().map(|(shard, ids)| {
        let target = &cluster.shards[shard];
        let mut client = target.client.clone();
        async move {
            client
                .delete(IndexDeleteRequest { ids })
                .await
                .map(|response| response.into_inner())
                .map_err(|status| GatewayError::upstream(target.label(), status))
        }
    });

    let mut response = DeleteResponse::default();
    for outcome in futures::future::join_all(calls).await {
        let shard_response = outcome?;
        response.deleted += shard_response.deleted;
        response.not_found.extend(shard_response.not_found);
    }
    Ok(response)
}
