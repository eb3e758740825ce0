//! Composed search: encode the query, fan the search out to every shard in
//! parallel, merge the global top-k.

use std::cmp::Ordering;
use std::time::Instant;

use densebert4ret_proto::v1::{
    embed_query_request, search_request, EmbedQueryRequest, IndexGetRequest, IndexSearchRequest,
    QueryVector, ScoredItem, SearchRequest, SearchResponse,
};
use futures::future::join_all;

use crate::cluster::{Cluster, Shard};
use crate::error::GatewayError;
use crate::routing::shard_for_id;
use crate::settings::GatewaySettings;
use crate::validate::{validate_id, validate_image, validate_texts};

/// Runs one composed search.
#[tracing::instrument(skip_all, fields(k = request.k))]
pub async fn search(
    cluster: &Cluster,
    settings: &GatewaySettings,
    request: SearchRequest,
) -> Result<SearchResponse, GatewayError> {
    if request.k == 0 || request.k > settings.max_k {
        return Err(GatewayError::invalid(format!(
            "k = {} is out of range; ask for 1 to {} results",
            request.k, settings.max_k
        )));
    }
    let mut texts = Vec::with_capacity(1 + request.more_texts.len());
    texts.push(request.text);
    texts.extend(request.more_texts);
    validate_texts(&texts, settings)?;

    let (reference, exclude_ids) = match request.reference {
        Some(search_request::Reference::Image(image)) => {
            validate_image(&image, "image", settings)?;
            (embed_query_request::Reference::Image(image), Vec::new())
        }
        Some(search_request::Reference::CatalogId(id)) => {
            validate_id(&id, settings)?;
            let features = stored_features(cluster, &id).await?;
            (embed_query_request::Reference::ImageFeatures(features), vec![id])
        }
        None => {
            return Err(GatewayError::invalid(
                "the search has no reference; set `image` (encoded bytes) or `catalog_id`",
            ))
        }
    };

    let mut encoder = cluster.encoder.clone();
    let encoded = encoder
        .embed_query(EmbedQueryRequest { reference: Some(reference), texts })
        .await
        .map_err(|status| GatewayError::upstream("encoder", status))?
        .into_inner();

    let started = Instant::now();
    let index_request = IndexSearchRequest {
        queries: vec![QueryVector { values: encoded.embedding }],
        k: request.k,
        model_fingerprint: encoded.model_fingerprint.clone(),
        exclude_ids,
    };
    let items = fan_out(&cluster.shards, index_request, request.k as usize).await?;

    Ok(SearchResponse {
        items,
        encode_timing: encoded.timing,
        search_us: started.elapsed().as_micros() as u64,
        model_fingerprint: encoded.model_fingerprint,
    })
}

/// Fetches the backbone features stored with a catalog item by its owning
/// shard.
async fn stored_features(cluster: &Cluster, id: &str) -> Result<Vec<u8>, GatewayError> {
    let shard = &cluster.shards[shard_for_id(id, cluster.shards.len())];
    let mut client = shard.client.clone();
    let response = client
        .get(IndexGetRequest { ids: vec![id.to_string()] })
        .await
        .map_err(|status| match status.code() {
            tonic::Code::NotFound => GatewayError::NotFound(format!(
                "catalog item {id:?} not found; upsert it first or search with an image"
            )),
            _ => GatewayError::upstream(shard.label(), status),
        })?
        .into_inner();

    let item = response
        .items
        .into_iter()
        .find(|item| item.id == id)
        .ok_or_else(|| GatewayError::NotFound(format!("catalog item {id:?} not found; upsert it first or search with an image")))?;
    if item.image_features.is_empty() {
        return Err(GatewayError::FailedPrecondition(format!(
            "catalog item {id:?} has no stored image features; upsert it again through the gateway"
        )));
    }
    Ok(item.image_features)
}

/// Searches every shard in parallel and merges their results.
///
/// NOTE: one failed shard fails the whole search; returning the other
/// shards' results marked as partial is not implemented yet.
async fn fan_out(shards: &[Shard], request: IndexSearchRequest, k: usize) -> Result<Vec<ScoredItem>, GatewayError> {
    let calls = shards.iter().map(|shard| {
        let mut client = shard.client.clone();
        let request = request.clone();
        async move {
            let response = client
                .search(request)
                .await
                .map_err(|status| GatewayError::upstream(shard.label(), status))?;
            let mut items: Vec<ScoredItem> =
                response.into_inner().results.into_iter().next().map(|result| result.items).unwrap_or_default();
            for item in &mut items {
                item.shard = shard.id;
            }
            Ok::<_, GatewayError>(items)
        }
    });

    let mut per_shard = Vec::with_capacity(shards.len());
    for result in join_all(calls).await {
        per_shard.push(result?);
    }
    Ok(merge_top_k(per_shard, k))
}

/// Merges per-shard rankings into the global top-k, best score first. Ties
/// are broken by id so the order does not depend on which shard responded
/// first.
pub fn merge_top_k(per_shard: Vec<Vec<ScoredItem>>, k: usize) -> Vec<ScoredItem> {
    let mut items: Vec<ScoredItem> = per_shard.into_iter().flatten().collect();
    items.sort_by(|a, b| match b.score.total_cmp(&a.score) {
        Ordering::Equal => a.id.cmp(&b.id),
        order => order,
    });
    items.truncate(k);
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, score: f32) -> ScoredItem {
        ScoredItem { id: id.into(), score, ..Default::default() }
    }

    #[test]
    fn merge_keeps_global_best() {
        let merged = merge_top_k(
            vec![vec![item("a", 0.9), item("b", 0.5)], vec![item("c", 0.95), item("d", 0.1)], vec![]],
            3,
        );
        let ids: Vec<&str> = merged.iter().map(|item| item.id.as_str()).collect();
        assert_eq!(ids, ["c", "a", "b"]);
    }

    #[test]
    fn merge_breaks_ties_by_id() {
        let merged = merge_top_k(vec![vec![item("z", 0.5)], vec![item("m", 0.5)]], 2);
        assert_eq!(merged[0].id, "m");
        assert_eq!(merged[1].id, "z");
    }

    #[test]
    fn merge_returns_fewer_when_catalog_is_small() {
        assert_eq!(merge_top_k(vec![vec![item("a", 0.1)]], 10).len(), 1);
    }
}
