//! Composed search: encode the query, fan the search out to every shard in
//! parallel, merge the global top-k.

use std::cmp::Ordering;
use std::time::Duration;

use densebert4ret_proto::v1::{
    embed_query_request, search_request, EmbedQueryRequest, IndexGetRequest, IndexSearchRequest, QueryVector,
    ScoredItem, SearchRequest, SearchResponse, ShardFailure,
};
use futures::future::join_all;
use tokio::time::Instant;
use tonic::Code;

use crate::cluster::{Cluster, Shard, ShardError};
use crate::error::GatewayError;
use crate::routing::shard_for_id;
use crate::settings::GatewaySettings;
use crate::validate::{validate_id, validate_image, validate_texts};

/// Limits of one fan-out.
#[derive(Debug, Clone, Copy)]
pub struct FanOutOptions {
    /// Time by which every shard must have responded; a shard that has not is
    /// reported missing.
    pub deadline: Instant,
    /// Time one attempt on one replica may take before the read moves to
    /// another replica of the same shard.
    pub attempt_timeout: Duration,
    /// Whether the merged results of the shards that responded may be
    /// returned when others failed.
    pub allow_partial: bool,
}

/// Result of a fan-out.
#[derive(Debug, Clone, Default)]
pub struct FanOut {
    /// Global top-k of the shards that responded, best first.
    pub items: Vec<ScoredItem>,
    /// Shards that failed or missed the deadline; empty when complete.
    pub missing: Vec<ShardFailure>,
    /// Time each shard took to respond, retries included, in shard order;
    /// `None` for a missing shard.
    pub shard_latencies: Vec<Option<Duration>>,
}

/// Runs one composed search. `client_deadline` is the deadline the client
/// sent as grpc-timeout, if any.
#[tracing::instrument(skip_all, fields(k = request.k))]
pub async fn search(
    cluster: &Cluster,
    settings: &GatewaySettings,
    request: SearchRequest,
    client_deadline: Option<Instant>,
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

    // Work stops this long before the client gives up, so that a partial
    // response still reaches it.
    let response_deadline =
        client_deadline.map(|deadline| deadline.checked_sub(Duration::from_millis(settings.deadline_margin_ms)).unwrap_or(deadline));
    let shard_deadline = |settings: &GatewaySettings| {
        let own = Instant::now() + Duration::from_millis(settings.shard_timeout_ms);
        response_deadline.map_or(own, |deadline| deadline.min(own))
    };

    let (reference, exclude_ids) = match request.reference {
        Some(search_request::Reference::Image(image)) => {
            validate_image(&image, "image", settings)?;
            (embed_query_request::Reference::Image(image), Vec::new())
        }
        Some(search_request::Reference::CatalogId(id)) => {
            validate_id(&id, settings)?;
            let features = stored_features(cluster, settings, &id, shard_deadline(settings)).await?;
            (embed_query_request::Reference::ImageFeatures(features), vec![id])
        }
        None => {
            return Err(GatewayError::invalid(
                "the search has no reference; set `image` (encoded bytes) or `catalog_id`",
            ))
        }
    };

    let mut encoder = cluster.encoder.clone();
    let mut embed_request = tonic::Request::new(EmbedQueryRequest { reference: Some(reference), texts });
    let encoded = match response_deadline {
        Some(deadline) => {
            embed_request.set_timeout(deadline.saturating_duration_since(Instant::now()));
            match tokio::time::timeout_at(deadline, encoder.embed_query(embed_request)).await {
                Ok(result) => result,
                Err(_) => Err(tonic::Status::deadline_exceeded("the query was not encoded before the client's deadline")),
            }
        }
        None => encoder.embed_query(embed_request).await,
    }
    .map_err(|status| GatewayError::upstream("encoder", status))?
    .into_inner();

    let started = Instant::now();
    let index_request = IndexSearchRequest {
        queries: vec![QueryVector { values: encoded.embedding }],
        k: request.k,
        model_fingerprint: encoded.model_fingerprint.clone(),
        exclude_ids,
        params: request.params,
    };
    let options = FanOutOptions {
        deadline: shard_deadline(settings),
        attempt_timeout: Duration::from_millis(settings.read_attempt_timeout_ms),
        allow_partial: request.allow_partial.unwrap_or(settings.allow_partial),
    };
    let fan_out = fan_out(&cluster.shards, index_request, request.k as usize, options).await?;
    if !fan_out.missing.is_empty() {
        tracing::warn!(
            missing = ?fan_out.missing.iter().map(|failure| failure.shard_id).collect::<Vec<_>>(),
            "search returned partial results"
        );
    }

    Ok(SearchResponse {
        items: fan_out.items,
        encode_timing: encoded.timing,
        search_us: started.elapsed().as_micros() as u64,
        model_fingerprint: encoded.model_fingerprint,
        partial: !fan_out.missing.is_empty(),
        missing_shards: fan_out.missing,
    })
}

/// Fetches the backbone features stored with a catalog item by its owning
/// shard.
async fn stored_features(
    cluster: &Cluster,
    settings: &GatewaySettings,
    id: &str,
    deadline: Instant,
) -> Result<Vec<u8>, GatewayError> {
    let not_found = || GatewayError::NotFound(format!("catalog item {id:?} not found; upsert it first or search with an image"));
    let shard = &cluster.shards[shard_for_id(id, cluster.shards.len())];
    let attempt_timeout = Duration::from_millis(settings.read_attempt_timeout_ms);
    let response = shard
        .read(deadline, attempt_timeout, |mut client, timeout| {
            let mut request = tonic::Request::new(IndexGetRequest { ids: vec![id.to_string()] });
            request.set_timeout(timeout);
            async move { client.get(request).await }
        })
        .await
        .map_err(|error| match error.code {
            Code::NotFound => not_found(),
            code => GatewayError::Upstream { component: format!("shard {}", error.shard_id), code, message: error.message },
        })?;

    let item = response.items.into_iter().find(|item| item.id == id).ok_or_else(not_found)?;
    if item.image_features.is_empty() {
        return Err(GatewayError::FailedPrecondition(format!(
            "catalog item {id:?} has no stored image features; upsert it again through the gateway"
        )));
    }
    Ok(item.image_features)
}

/// Searches every shard in parallel, one replica each, and merges their
/// results into the global top-`k`.
///
/// A shard that fails or misses `options.deadline` is listed in
/// [`FanOut::missing`] when `options.allow_partial` is set; otherwise the
/// whole call fails. It fails in any case when no shard responded. The error
/// takes the failed shards' status code when they agree (DEADLINE_EXCEEDED
/// when all of them missed the deadline), and UNAVAILABLE otherwise.
pub async fn fan_out(
    shards: &[Shard],
    request: IndexSearchRequest,
    k: usize,
    options: FanOutOptions,
) -> Result<FanOut, GatewayError> {
    let calls = shards.iter().map(|shard| {
        let request = &request;
        async move {
            let started = Instant::now();
            let response = shard
                .read(options.deadline, options.attempt_timeout, |mut client, timeout| {
                    let mut call = tonic::Request::new(request.clone());
                    call.set_timeout(timeout);
                    async move { client.search(call).await }
                })
                .await?;
            let mut items: Vec<ScoredItem> =
                response.results.into_iter().next().map(|result| result.items).unwrap_or_default();
            for item in &mut items {
                item.shard = shard.id;
            }
            Ok::<_, ShardError>((items, started.elapsed()))
        }
    });

    let mut per_shard = Vec::with_capacity(shards.len());
    let mut failures: Vec<ShardError> = Vec::new();
    let mut shard_latencies = Vec::with_capacity(shards.len());
    for result in join_all(calls).await {
        match result {
            Ok((items, latency)) => {
                per_shard.push(items);
                shard_latencies.push(Some(latency));
            }
            Err(error) => {
                failures.push(error);
                shard_latencies.push(None);
            }
        }
    }

    if !failures.is_empty() && (per_shard.is_empty() || !options.allow_partial) {
        return Err(shards_failed(&failures, shards.len()));
    }
    Ok(FanOut {
        items: merge_top_k(per_shard, k),
        missing: failures.iter().map(ShardError::to_failure).collect(),
        shard_latencies,
    })
}

/// Combines shard failures into the error of a search that cannot return
/// results.
fn shards_failed(failures: &[ShardError], shard_count: usize) -> GatewayError {
    let first = failures[0].code;
    let code = if failures.iter().all(|failure| failure.code == first) { first } else { Code::Unavailable };
    let code = match code {
        Code::Unknown | Code::Cancelled | Code::Internal => Code::Unavailable,
        code => code,
    };
    let reasons: Vec<String> = failures.iter().map(ToString::to_string).collect();
    let hint = if failures.len() < shard_count {
        "; set allow_partial to accept the other shards' results"
    } else {
        ""
    };
    GatewayError::Upstream {
        component: format!("{} of {shard_count} shards failed", failures.len()),
        code,
        message: format!("{}{hint}", reasons.join("; ")),
    }
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

    fn shard_error(shard_id: u32, code: Code) -> ShardError {
        ShardError { shard_id, code, message: format!("replica of shard {shard_id} failed") }
    }

    #[test]
    fn failures_keep_a_common_code() {
        let error = shards_failed(&[shard_error(0, Code::DeadlineExceeded), shard_error(1, Code::DeadlineExceeded)], 2);
        assert_eq!(error.code(), Code::DeadlineExceeded);
        let error = shards_failed(&[shard_error(0, Code::InvalidArgument)], 1);
        assert_eq!(error.code(), Code::InvalidArgument);
    }

    #[test]
    fn mixed_failures_are_unavailable() {
        let error = shards_failed(&[shard_error(0, Code::DeadlineExceeded), shard_error(2, Code::Unavailable)], 3);
        assert_eq!(error.code(), Code::Unavailable);
        let message = error.to_string();
        assert!(message.contains("shard 0"), "{message}");
        assert!(message.contains("shard 2"), "{message}");
        assert!(message.contains("allow_partial"), "{message}");
    }

    #[test]
    fn merge_returns_fewer_when_catalog_is_small() {
        assert_eq!(merge_top_k(vec![vec![item("a", 0.1)]], 10).len(), 1);
    }
}
