//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

pub mod process;

use index_svc::{Metric, Settings, StoredItem};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Settings for a shard in `dir` with small limits and no background
/// snapshots.
pub fn settings(dir: &Path) -> Settings {
    Settings {
        data_dir: dir.to_owned(),
        shard_id: 3,
        max_k: 100,
        max_batch_items: 1000,
        ..Settings::default()
    }
}

/// Seeded generator, so that failures reproduce.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Draws a unit vector whose components start uniform in [-1, 1).
pub fn random_unit_vector(rng: &mut ChaCha8Rng, dimension: usize) -> Vec<f32> {
    let vector: Vec<f32> = (0..dimension)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    let norm = vector.iter().map(|value| value * value).sum::<f32>().sqrt();
    vector.into_iter().map(|value| value / norm).collect()
}

/// Builds an item with metadata and image features derived from its id.
pub fn item(id: &str, vector: Vec<f32>) -> StoredItem {
    StoredItem {
        id: id.to_owned(),
        vector,
        metadata: HashMap::from([("name".to_owned(), format!("name of {id}"))]),
        image_features: densebert4ret_proto::features_to_bytes(&[id.len() as f32, 1.5]),
    }
}

/// Exact top-k by score (higher is closer), computed in f64.
pub fn brute_force_top_k(
    items: &HashMap<String, Vec<f32>>,
    query: &[f32],
    k: usize,
    metric: Metric,
    exclude: &[&str],
) -> Vec<(String, f32)> {
    let mut scored: Vec<(String, f64)> = items
        .iter()
        .filter(|(id, _)| !exclude.contains(&id.as_str()))
        .map(|(id, vector)| (id.clone(), exact_score(vector, query, metric)))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    scored.truncate(k);
    scored
        .into_iter()
        .map(|(id, score)| (id, score as f32))
        .collect()
}

/// Inner product, or negated squared L2 distance, in f64.
pub fn exact_score(vector: &[f32], query: &[f32], metric: Metric) -> f64 {
    match metric {
        Metric::InnerProduct => vector
            .iter()
            .zip(query)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum(),
        Metric::L2 => -vector
            .iter()
            .zip(query)
            .map(|(a, b)| {
                let difference = f64::from(*a) - f64::from(*b);
                difference * difference
            })
            .sum::<f64>(),
    }
}
