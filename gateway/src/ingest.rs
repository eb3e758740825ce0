//! Bulk ingest and deletes, routed to the shard that owns each id and
//! written to every replica of that shard.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use densebert4ret_proto::v1::{
    DeleteFailure, DeleteRequest, DeleteResponse, EmbedImagesRequest, IndexDeleteRequest, IndexGetRequest, IndexItem,
    IndexUpsertRequest, UpsertRequest, UpsertResponse, UpsertResult,
};
use futures::stream::{self, FuturesUnordered, StreamExt};
use futures::Stream;
use tonic::{Code, Status};

use crate::cluster::{code_name, timeout_as_deadline, write_failures, Cluster, Shard};
use crate::error::GatewayError;
use crate::routing::shard_for_id;
use crate::settings::GatewaySettings;
use crate::validate::{validate_id, validate_image};

/// Lookups by id in flight at once on one replica when a batch lookup must
/// be split into single ids.
const LOOKUP_CONCURRENCY: usize = 16;

/// An item of the upsert stream with its position in it.
struct Pending {
    position: usize,
    item: UpsertRequest,
}

/// Reads the upsert stream in batches, embeds and stores each batch, and
/// returns one result per streamed item in stream order.
///
/// Batches run concurrently, except that a batch holding an id of a batch
/// still in flight starts only after that batch has finished. So when an id
/// appears several times in one stream, the last one in stream order is
/// stored, within a batch and across batches.
pub async fn upsert_stream<S>(cluster: &Cluster, settings: &GatewaySettings, mut stream: S) -> Result<UpsertResponse, Status>
where
    S: Stream<Item = Result<UpsertRequest, Status>> + Unpin,
{
    let batch_size = settings.ingest_batch_size.max(1);
    let concurrency = settings.ingest_concurrency.max(1);
    let mut results: Vec<Option<UpsertResult>> = Vec::new();
    let mut in_flight = FuturesUnordered::new();
    // Ids of the batches in flight, with the number of such batches each.
    let mut in_flight_ids: HashMap<String, usize> = HashMap::new();
    let mut batch: Vec<Pending> = Vec::with_capacity(batch_size);

    let mut ended = false;
    while !ended || !batch.is_empty() || !in_flight.is_empty() {
        // Start a batch once it is full or the stream has ended, unless it
        // repeats an id that an earlier batch is still writing.
        let ready = !batch.is_empty() && (batch.len() >= batch_size || ended) && in_flight.len() < concurrency;
        if ready && !batch.iter().any(|pending| in_flight_ids.contains_key(&pending.item.id)) {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
            let ids: Vec<String> = full.iter().map(|pending| pending.item.id.clone()).collect::<HashSet<_>>().into_iter().collect();
            for id in &ids {
                *in_flight_ids.entry(id.clone()).or_default() += 1;
            }
            let work = upsert_batch(cluster, settings, full);
            in_flight.push(async move { (work.await, ids) });
            continue;
        }

        let can_read = !ended && batch.len() < batch_size;
        if !can_read && in_flight.is_empty() {
            // Unreachable: a batch that cannot start waits only for batches
            // in flight. Guard against a busy loop all the same.
            tracing::error!(items = batch.len(), "upsert batch cannot start; failing it");
            for pending in batch.drain(..) {
                results[pending.position] = Some(failed(&pending.item.id, 0, "the item was not processed".into()));
            }
            continue;
        }
        tokio::select! {
            finished = in_flight.next(), if !in_flight.is_empty() => {
                if let Some((outcomes, ids)) = finished {
                    for (position, result) in outcomes {
                        results[position] = Some(result);
                    }
                    for id in ids {
                        if let Some(count) = in_flight_ids.get_mut(&id) {
                            *count -= 1;
                            if *count == 0 {
                                in_flight_ids.remove(&id);
                            }
                        }
                    }
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
    let skipped = results.iter().filter(|result| result.skipped).count() as u32;
    let upserted = results.iter().filter(|result| result.ok && !result.skipped).count() as u32;
    let failed_count = results.iter().filter(|result| !result.ok).count() as u32;
    tracing::info!(items = results.len(), upserted, skipped, failed = failed_count, "upsert stream finished");
    Ok(UpsertResponse { results, upserted, failed: failed_count, skipped })
}

fn check_item(item: &UpsertRequest, settings: &GatewaySettings) -> Result<(), GatewayError> {
    validate_id(&item.id, settings)?;
    validate_image(&item.image, &format!("the image of {:?}", item.id), settings)
}

fn failed(id: &str, shard: u32, error: String) -> UpsertResult {
    UpsertResult { id: id.to_string(), ok: false, error, shard, skipped: false }
}

fn stored(id: String, shard: u32, skipped: bool) -> UpsertResult {
    UpsertResult { id, ok: true, error: String::new(), shard, skipped }
}

/// Embeds one batch and writes it to every replica of the owning shards.
/// Items with `skip_existing` whose id every replica already stores are
/// reported as skipped and not embedded.
async fn upsert_batch(cluster: &Cluster, settings: &GatewaySettings, batch: Vec<Pending>) -> Vec<(usize, UpsertResult)> {
    let shard_count = cluster.shards.len();
    let mut outcomes = Vec::with_capacity(batch.len());

    let batch = if batch.iter().any(|pending| pending.item.skip_existing) {
        let existing = existing_ids(cluster, settings, &batch).await;
        let (skip, keep): (Vec<Pending>, Vec<Pending>) = batch
            .into_iter()
            .partition(|pending| pending.item.skip_existing && existing.contains(&pending.item.id));
        for pending in skip {
            let shard = shard_for_id(&pending.item.id, shard_count) as u32;
            outcomes.push((pending.position, stored(pending.item.id, shard, true)));
        }
        keep
    } else {
        batch
    };
    if batch.is_empty() {
        return outcomes;
    }
    outcomes.extend(embed_and_write(cluster, settings, batch).await);
    outcomes
}

/// Returns the ids of `batch` with `skip_existing` that every replica of
/// their owning shard stores.
async fn existing_ids(cluster: &Cluster, settings: &GatewaySettings, batch: &[Pending]) -> HashSet<String> {
    let mut per_shard: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for pending in batch.iter().filter(|pending| pending.item.skip_existing) {
        per_shard.entry(shard_for_id(&pending.item.id, cluster.shards.len())).or_default().push(pending.item.id.clone());
    }
    let timeout = Duration::from_millis(settings.shard_timeout_ms);
    let lookups = per_shard.into_iter().map(|(shard, mut ids)| {
        ids.sort_unstable();
        ids.dedup();
        stored_on_every_replica(&cluster.shards[shard], ids, timeout)
    });
    futures::future::join_all(lookups).await.into_iter().flatten().collect()
}

/// Returns the ids among `ids` that every replica of `shard` stores. A
/// replica that cannot be asked counts as storing none of them, so those
/// items are written again rather than skipped.
async fn stored_on_every_replica(shard: &Shard, ids: Vec<String>, timeout: Duration) -> HashSet<String> {
    let lookups = shard.replicas.iter().map(|replica| {
        let ids = ids.clone();
        async move {
            let client = replica.client();
            match get_ids(client.clone(), ids.clone(), timeout).await {
                Ok(found) => found,
                // The shard rejects the whole lookup when any id is missing,
                // so look the ids up one at a time.
                Err(status) if status.code() == Code::NotFound => {
                    stream::iter(ids)
                        .map(|id| {
                            let client = client.clone();
                            async move { (id.clone(), get_ids(client, vec![id], timeout).await) }
                        })
                        .buffer_unordered(LOOKUP_CONCURRENCY)
                        .filter_map(|(id, result)| async move {
                            match result {
                                Ok(found) => found.into_iter().next(),
                                Err(status) if status.code() == Code::NotFound => None,
                                Err(status) => {
                                    tracing::warn!(shard = shard.id, replica = %replica.endpoint, %id, error = %status.message(), "lookup before upsert failed");
                                    None
                                }
                            }
                        })
                        .collect::<HashSet<String>>()
                        .await
                }
                Err(status) => {
                    tracing::warn!(
                        shard = shard.id,
                        replica = %replica.endpoint,
                        code = code_name(status.code()),
                        error = %status.message(),
                        "lookup before upsert failed; the items are written again"
                    );
                    HashSet::new()
                }
            }
        }
    });
    let mut per_replica = futures::future::join_all(lookups).await.into_iter();
    let first = per_replica.next().unwrap_or_default();
    per_replica.fold(first, |common, found| common.intersection(&found).cloned().collect())
}

/// Calls Index.Get and returns the ids of the items it returned.
async fn get_ids(
    mut client: densebert4ret_proto::v1::index_client::IndexClient<tonic::transport::Channel>,
    ids: Vec<String>,
    timeout: Duration,
) -> Result<HashSet<String>, Status> {
    let mut request = tonic::Request::new(IndexGetRequest { ids });
    request.set_timeout(timeout);
    let deadline = tokio::time::Instant::now() + timeout;
    match tokio::time::timeout_at(deadline, client.get(request)).await {
        Ok(Ok(response)) => Ok(response.into_inner().items.into_iter().map(|item| item.id).collect()),
        Ok(Err(status)) => Err(timeout_as_deadline(status, deadline, timeout)),
        Err(_) => Err(Status::deadline_exceeded(format!("timed out after {} ms", timeout.as_millis()))),
    }
}

/// Embeds the images of `batch` and writes the items to every replica of
/// their owning shards.
async fn embed_and_write(cluster: &Cluster, settings: &GatewaySettings, mut batch: Vec<Pending>) -> Vec<(usize, UpsertResult)> {
    let shard_count = cluster.shards.len();
    // The image bytes move into the encoder request, because only ids and
    // metadata are needed afterwards.
    let images = batch.iter_mut().map(|pending| std::mem::take(&mut pending.item.image)).collect();
    let mut encoder = cluster.encoder.clone();

    let fail_all = |batch: Vec<Pending>, error: String| -> Vec<(usize, UpsertResult)> {
        batch
            .into_iter()
            .map(|pending| {
                let shard = shard_for_id(&pending.item.id, shard_count) as u32;
                (pending.position, failed(&pending.item.id, shard, error.clone()))
            })
            .collect()
    };

    let embedded = match encoder.embed_images(EmbedImagesRequest { images }).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let error = GatewayError::upstream("encoder", status).to_string();
            tracing::warn!(items = batch.len(), %error, "encoder call failed for an ingest batch");
            return fail_all(batch, error);
        }
    };

    if embedded.embeddings.len() != batch.len() {
        let error = format!(
            "encoder: returned {} embeddings for {} images; check that encoder and gateway versions match",
            embedded.embeddings.len(),
            batch.len()
        );
        tracing::error!(%error, "encoder response does not match the ingest batch");
        return fail_all(batch, error);
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
                outcomes.push((entry.0[slot], stored(pending.item.id, shard as u32, false)));
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
    let timeout = Duration::from_millis(settings.write_timeout_ms);
    let writes = per_shard.into_iter().map(|(shard, (positions, _, items))| {
        let target = &cluster.shards[shard];
        let ids: Vec<String> = items.iter().map(|item| item.id.clone()).collect();
        let request = IndexUpsertRequest { items, model_fingerprint: fingerprint.clone() };
        async move {
            let replicas = target
                .call_all(timeout, |mut client, timeout| {
                    let mut call = tonic::Request::new(request.clone());
                    call.set_timeout(timeout);
                    async move { client.upsert(call).await }
                })
                .await;
            let error = write_failures(target, &replicas);
            positions
                .into_iter()
                .zip(ids)
                .map(|(position, id)| {
                    let result = match &error {
                        None => stored(id, target.id, false),
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

/// Deletes ids from every replica of their owning shards. An id counts as
/// deleted or not found only when every replica acknowledged the delete;
/// otherwise it is listed in `failed`. Fails as a whole only when no id was
/// acknowledged.
pub async fn delete(cluster: &Cluster, settings: &GatewaySettings, request: DeleteRequest) -> Result<DeleteResponse, GatewayError> {
    if request.ids.is_empty() {
        return Err(GatewayError::invalid("the delete request has no ids; send at least one"));
    }
    let mut per_shard: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for id in request.ids {
        validate_id(&id, settings)?;
        let ids = per_shard.entry(shard_for_id(&id, cluster.shards.len())).or_default();
        if !ids.contains(&id) {
            ids.push(id);
        }
    }

    let timeout = Duration::from_millis(settings.write_timeout_ms);
    let calls = per_shard.into_iter().map(|(shard, ids)| {
        let target = &cluster.shards[shard];
        async move {
            let replicas = target
                .call_all(timeout, |mut client, timeout| {
                    let mut call = tonic::Request::new(IndexDeleteRequest { ids: ids.clone() });
                    call.set_timeout(timeout);
                    async move { client.delete(call).await }
                })
                .await;
            (target, ids, replicas)
        }
    });

    let mut response = DeleteResponse::default();
    let mut first_failure: Option<Status> = None;
    for (shard, ids, replicas) in futures::future::join_all(calls).await {
        if let Some(error) = write_failures(shard, &replicas) {
            if first_failure.is_none() {
                first_failure = replicas.iter().find_map(|replica| replica.result.as_ref().err().cloned());
            }
            response.failed.extend(ids.into_iter().map(|id| DeleteFailure { id, shard: shard.id, error: error.clone() }));
            continue;
        }
        // An id is not found only when no replica stored it.
        let not_found_everywhere: HashSet<&String> = replicas
            .iter()
            .filter_map(|replica| replica.result.as_ref().ok())
            .map(|deleted| deleted.not_found.iter().collect::<HashSet<_>>())
            .reduce(|common, found| common.intersection(&found).copied().collect())
            .unwrap_or_default();
        for id in &ids {
            if not_found_everywhere.contains(id) {
                response.not_found.push(id.clone());
            } else {
                response.deleted += 1;
            }
        }
    }

    if response.deleted == 0 && response.not_found.is_empty() {
        if let Some(status) = first_failure {
            let mut reasons: Vec<&str> = response.failed.iter().map(|failure| failure.error.as_str()).collect();
            reasons.dedup();
            return Err(GatewayError::Upstream {
                component: "delete failed on every shard".into(),
                code: match status.code() {
                    Code::Unknown | Code::Cancelled | Code::Internal => Code::Unavailable,
                    code => code,
                },
                message: reasons.join("; "),
            });
        }
    }
    if !response.failed.is_empty() {
        tracing::warn!(failed = response.failed.len(), deleted = response.deleted, "delete was not acknowledged by every replica");
    }
    Ok(response)
}
