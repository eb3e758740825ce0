//! Request checks that need no shard state.

use std::collections::HashSet;

use crate::error::ShardError;
use crate::item::StoredItem;
use crate::settings::Settings;

/// Maximum item id length, in bytes.
pub const MAX_ID_BYTES: usize = 1024;

/// Rejects a list of `count` entries above `limit`.
pub(crate) fn check_count(field: &'static str, count: usize, limit: u32) -> Result<(), ShardError> {
    if count > limit as usize {
        return Err(ShardError::TooManyEntries {
            field,
            count,
            limit,
        });
    }
    Ok(())
}

/// Rejects empty, overlong and repeated ids.
pub(crate) fn check_ids<'a>(
    field: &'static str,
    ids: impl ExactSizeIterator<Item = &'a str>,
) -> Result<(), ShardError> {
    let mut seen = HashSet::with_capacity(ids.len());
    for (position, id) in ids.enumerate() {
        if id.is_empty() {
            return Err(ShardError::EmptyId { field, position });
        }
        if id.len() > MAX_ID_BYTES {
            return Err(ShardError::IdTooLong {
                field,
                position,
                bytes: id.len(),
                limit: MAX_ID_BYTES,
            });
        }
        if !seen.insert(id) {
            return Err(ShardError::DuplicateId {
                field,
                id: id.to_owned(),
            });
        }
    }
    Ok(())
}

/// Checks the parts of an upsert batch that do not depend on the shard:
/// size, ids, metadata and image features.
pub(crate) fn check_upsert_items(
    items: &[StoredItem],
    settings: &Settings,
) -> Result<(), ShardError> {
    check_count("items", items.len(), settings.max_batch_items)?;
    check_ids("items", items.iter().map(|item| item.id.as_str()))?;
    for item in items {
        let metadata_bytes = item.metadata_bytes();
        if metadata_bytes > settings.max_metadata_bytes as usize {
            return Err(ShardError::MetadataTooLarge {
                id: item.id.clone(),
                bytes: metadata_bytes,
                limit: settings.max_metadata_bytes,
            });
        }
        let feature_bytes = item.image_features.len();
        if feature_bytes > settings.max_image_features_bytes as usize {
            return Err(ShardError::ImageFeaturesTooLarge {
                id: item.id.clone(),
                bytes: feature_bytes,
                limit: settings.max_image_features_bytes,
            });
        }
        if feature_bytes % 4 != 0 {
            return Err(ShardError::ImageFeaturesNotF32 {
                id: item.id.clone(),
                bytes: feature_bytes,
            });
        }
    }
    Ok(())
}

/// Rejects a vector whose length is not `dimension` or that contains NaN or an
/// infinity. `what` names the vector in the error, for example `query 3`.
pub(crate) fn check_vector(
    what: impl FnOnce() -> String,
    vector: &[f32],
    dimension: u32,
) -> Result<(), ShardError> {
    if vector.len() != dimension as usize {
        return Err(ShardError::DimensionMismatch {
            what: what(),
            expected: dimension,
            given: vector.len(),
        });
    }
    check_finite(what, vector)
}

/// Rejects a vector that contains NaN or an infinity.
pub(crate) fn check_finite(
    what: impl FnOnce() -> String,
    vector: &[f32],
) -> Result<(), ShardError> {
    match vector.iter().position(|value| !value.is_finite()) {
        Some(position) => Err(ShardError::NonFinite {
            what: what(),
            position,
            value: vector[position],
        }),
        None => Ok(()),
    }
}

/// Rejects a request fingerprint that differs from the shard's. An empty
/// fingerprint on either side matches anything.
pub(crate) fn check_fingerprint(shard: &str, request: &str) -> Result<(), ShardError> {
    if !shard.is_empty() && !request.is_empty() && shard != request {
        return Err(ShardError::FingerprintMismatch {
            shard: shard.to_owned(),
            request: request.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn item(id: &str) -> StoredItem {
        StoredItem {
            id: id.into(),
            vector: vec![1.0],
            metadata: HashMap::new(),
            image_features: Vec::new(),
        }
    }

    #[test]
    fn ids_reject_empty_long_and_repeated() {
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let cases = [
            (vec!["a", ""], "items[1] is an empty id"),
            (vec![long.as_str()], "items[0] is an id of 1025 bytes"),
            (vec!["a", "b", "a"], "id \"a\" appears more than once"),
        ];
        for (ids, expected) in cases {
            let error = check_ids("items", ids.into_iter()).unwrap_err();
            assert!(error.to_string().starts_with(expected), "{error}");
        }
        check_ids("items", ["a", "b"].into_iter()).unwrap();
    }

    #[test]
    fn vector_checks_name_the_problem() {
        let error = check_vector(|| "query 2".into(), &[1.0, 2.0], 3).unwrap_err();
        assert_eq!(
            error.to_string(),
            "query 2 has dimension 2, but the shard dimension is 3; send vectors of length 3"
        );

        let error = check_vector(|| "query 0".into(), &[1.0, f32::NAN], 2).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("non-finite value NaN at position 1"),
            "{error}"
        );

        let error = check_finite(|| "query 0".into(), &[f32::NEG_INFINITY]).unwrap_err();
        assert!(error.to_string().contains("-inf"), "{error}");

        check_vector(|| "query 0".into(), &[1.0, 2.0], 2).unwrap();
    }

    #[test]
    fn fingerprints_match_when_either_is_empty() {
        check_fingerprint("", "model-b").unwrap();
        check_fingerprint("model-a", "").unwrap();
        check_fingerprint("model-a", "model-a").unwrap();
        let error = check_fingerprint("model-a", "model-b").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("\"model-b\" does not match the shard's fingerprint \"model-a\""),
            "{error}"
        );
    }

    #[test]
    fn upsert_items_limits() {
        let settings = Settings {
            max_batch_items: 2,
            max_metadata_bytes: 4,
            max_image_features_bytes: 8,
            ..Settings::default()
        };

        let error = check_upsert_items(&[item("a"), item("b"), item("c")], &settings).unwrap_err();
        assert!(
            matches!(
                error,
                ShardError::TooManyEntries {
                    count: 3,
                    limit: 2,
                    ..
                }
            ),
            "{error}"
        );

        let mut large_metadata = item("a");
        large_metadata.metadata.insert("key".into(), "value".into());
        let error = check_upsert_items(&[large_metadata], &settings).unwrap_err();
        assert!(
            matches!(
                error,
                ShardError::MetadataTooLarge {
                    bytes: 8,
                    limit: 4,
                    ..
                }
            ),
            "{error}"
        );

        let mut large_features = item("a");
        large_features.image_features = vec![0; 12];
        let error = check_upsert_items(&[large_features], &settings).unwrap_err();
        assert!(
            matches!(error, ShardError::ImageFeaturesTooLarge { bytes: 12, .. }),
            "{error}"
        );

        let mut partial_float = item("a");
        partial_float.image_features = vec![0; 6];
        let error = check_upsert_items(&[partial_float], &settings).unwrap_err();
        assert!(
            matches!(error, ShardError::ImageFeaturesNotF32 { bytes: 6, .. }),
            "{error}"
        );

        check_upsert_items(&[item("a"), item("b")], &settings).unwrap();
    }
}
