//! Gateway configuration: defaults, then a TOML file, then `GATEWAY__*`
//! environment variables.
//!
//! The shard map is a list with one entry per shard, shard 0 first. Each
//! entry lists the endpoints of that shard's replicas, written either as one
//! string with the replicas joined by `|` or as a list of strings:
//!
//! ```toml
//! # two shards, one replica each
//! shards = ["http://10.0.0.5:50061", "http://10.0.0.6:50061"]
//! # two shards, two replicas each
//! shards = [["http://10.0.0.5:50061", "http://10.0.0.7:50061"],
//!           ["http://10.0.0.6:50061", "http://10.0.0.8:50061"]]
//! ```
//!
//! In the environment, shards are separated by `,` and replicas by `|`:
//! `GATEWAY__SHARDS=http://a1:50061|http://a2:50061,http://b1:50061|http://b2:50061`.

use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Separator between the replicas of one shard in the string form.
pub const REPLICA_SEPARATOR: char = '|';

/// Endpoints of the replicas of one shard. Every replica stores the whole
/// shard: writes go to all of them, a read goes to one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardReplicas(pub Vec<String>);

impl ShardReplicas {
    /// Parses the string form, replicas joined by `|`; blanks around each
    /// endpoint are ignored.
    pub fn parse(text: &str) -> Self {
        Self(text.split(REPLICA_SEPARATOR).map(|endpoint| endpoint.trim().to_string()).collect())
    }

    /// Endpoints in configuration order.
    pub fn endpoints(&self) -> &[String] {
        &self.0
    }
}

impl From<&str> for ShardReplicas {
    fn from(text: &str) -> Self {
        Self::parse(text)
    }
}

impl fmt::Display for ShardReplicas {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0.join(&REPLICA_SEPARATOR.to_string()))
    }
}

impl Serialize for ShardReplicas {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ShardReplicas {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ReplicasVisitor;

        impl<'de> Visitor<'de> for ReplicasVisitor {
            type Value = ShardReplicas;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("an endpoint string (replicas joined by `|`) or a list of endpoint strings")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
                Ok(ShardReplicas::parse(value))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut sequence: A) -> Result<Self::Value, A::Error> {
                let mut endpoints = Vec::new();
                while let Some(endpoint) = sequence.next_element::<String>()? {
                    endpoints.push(endpoint.trim().to_string());
                }
                Ok(ShardReplicas(endpoints))
            }
        }

        deserializer.deserialize_any(ReplicasVisitor)
    }
}

/// Settings of one gateway process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GatewaySettings {
    /// Address the public gRPC server listens on.
    pub listen: String,
    /// encoder-svc endpoint.
    pub encoder: String,
    /// index-svc replicas of each shard; shard `i` is the `i`-th entry.
    /// Changing the number of shards changes which shard owns an id, so the
    /// catalog must be re-ingested afterwards. Adding a replica to a shard
    /// needs no re-ingest of the other shards, but the new replica must be
    /// filled with the shard's items before it serves reads.
    pub shards: Vec<ShardReplicas>,
    /// Largest k a search may ask for.
    pub max_k: u32,
    /// Maximum modification text length, in characters.
    pub max_text_chars: usize,
    /// Most modification texts in one search (`text` plus `more_texts`).
    pub max_texts: usize,
    /// Largest reference or catalog image, in bytes.
    pub max_image_bytes: usize,
    /// Maximum catalog id length, in bytes.
    pub max_id_bytes: usize,
    /// Images sent to the encoder per EmbedImages call during ingest.
    pub ingest_batch_size: usize,
    /// Ingest batches in flight at once.
    pub ingest_concurrency: usize,
    /// Deadline of each encoder call, in milliseconds.
    pub encoder_timeout_ms: u64,
    /// Deadline of one shard's part of a read (a search, or a lookup by id),
    /// retries on other replicas included, in milliseconds. A search whose
    /// client set a shorter deadline (grpc-timeout) uses that one instead.
    pub shard_timeout_ms: u64,
    /// Deadline of one read attempt on one replica, in milliseconds. When it
    /// passes and the shard has a replica not tried yet, the read is retried
    /// there within `shard_timeout_ms`. The last untried replica gets all the
    /// time that is left.
    pub read_attempt_timeout_ms: u64,
    /// Deadline of a write (upsert or delete) on each replica, in
    /// milliseconds.
    pub write_timeout_ms: u64,
    /// Time a replica that failed a read is avoided for, in milliseconds. It
    /// is still used when every replica of its shard is avoided.
    pub replica_cooldown_ms: u64,
    /// Whether a search may return the merged results of the shards that
    /// responded, marked partial, when other shards failed or missed their
    /// deadline. A request overrides it with `allow_partial`.
    pub allow_partial: bool,
    /// Time kept back from the client's deadline for merging and sending the
    /// response, in milliseconds.
    pub deadline_margin_ms: u64,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            encoder: "http://127.0.0.1:50052".into(),
            shards: vec!["http://127.0.0.1:50061".into(), "http://127.0.0.1:50062".into()],
            max_k: 100,
            max_text_chars: 2_000,
            max_texts: 8,
            max_image_bytes: 16 * 1024 * 1024,
            max_id_bytes: 256,
            ingest_batch_size: 32,
            ingest_concurrency: 4,
            encoder_timeout_ms: 30_000,
            shard_timeout_ms: 2_000,
            read_attempt_timeout_ms: 1_000,
            write_timeout_ms: 10_000,
            replica_cooldown_ms: 2_000,
            allow_partial: true,
            deadline_margin_ms: 10,
        }
    }
}

impl GatewaySettings {
    /// Checks values that would otherwise fail later with a less clear
    /// message, and names the setting and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.shards.is_empty() {
            return Err("shards is empty; list the index-svc endpoints of every shard".into());
        }
        for (shard, replicas) in self.shards.iter().enumerate() {
            if replicas.endpoints().is_empty() || replicas.endpoints().iter().any(String::is_empty) {
                return Err(format!(
                    "shards[{shard}] = {replicas:?} has an empty endpoint; join replica URLs with `|` and shards with `,`"
                ));
            }
        }
        let positive = [
            ("max_k", u64::from(self.max_k)),
            ("encoder_timeout_ms", self.encoder_timeout_ms),
            ("shard_timeout_ms", self.shard_timeout_ms),
            ("read_attempt_timeout_ms", self.read_attempt_timeout_ms),
            ("write_timeout_ms", self.write_timeout_ms),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("{name} = 0 is invalid; use a value of at least 1"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_bad_values() {
        assert!(GatewaySettings::default().validate().is_ok());
        let empty_replica = GatewaySettings { shards: vec![ShardReplicas::parse("http://a:1|")], ..Default::default() };
        assert!(empty_replica.validate().unwrap_err().contains("shards[0]"));
        let no_deadline = GatewaySettings { shard_timeout_ms: 0, ..Default::default() };
        assert!(no_deadline.validate().unwrap_err().contains("shard_timeout_ms"));
    }

    #[test]
    fn shard_string_splits_replicas() {
        let shard = ShardReplicas::parse("http://a:1 | http://b:2");
        assert_eq!(shard.endpoints(), ["http://a:1", "http://b:2"]);
        assert_eq!(shard.to_string(), "http://a:1|http://b:2");
    }

    #[test]
    fn toml_accepts_strings_and_lists() {
        let dir = std::env::temp_dir().join(format!("gateway-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gateway.toml");
        std::fs::write(&path, "shards = [\"http://a:1|http://a:2\", [\"http://b:1\", \"http://b:2\"], \"http://c:1\"]\n").unwrap();

        let settings: GatewaySettings =
            densebert4ret_common::load_settings(Some(&path), "GATEWAY_SETTINGS_TEST_TOML").unwrap();

        let shards: Vec<&[String]> = settings.shards.iter().map(ShardReplicas::endpoints).collect();
        assert_eq!(shards.len(), 3);
        assert_eq!(shards[0], ["http://a:1", "http://a:2"]);
        assert_eq!(shards[1], ["http://b:1", "http://b:2"]);
        assert_eq!(shards[2], ["http://c:1"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn environment_takes_replica_form() {
        std::env::set_var("GATEWAY_SETTINGS_TEST_ENV__SHARDS", "http://a1:1|http://a2:1,http://b1:1|http://b2:1");
        std::env::set_var("GATEWAY_SETTINGS_TEST_ENV__ALLOW_PARTIAL", "false");

        let settings: GatewaySettings = densebert4ret_common::load_settings(None, "GATEWAY_SETTINGS_TEST_ENV").unwrap();

        assert_eq!(settings.shards.len(), 2);
        assert_eq!(settings.shards[0].endpoints(), ["http://a1:1", "http://a2:1"]);
        assert_eq!(settings.shards[1].endpoints(), ["http://b1:1", "http://b2:1"]);
        assert!(!settings.allow_partial);
    }

    #[test]
    fn environment_takes_single_replica_form() {
        std::env::set_var("GATEWAY_SETTINGS_TEST_SINGLE__SHARDS", "http://a:1,http://b:1");

        let settings: GatewaySettings = densebert4ret_common::load_settings(None, "GATEWAY_SETTINGS_TEST_SINGLE").unwrap();

        assert_eq!(settings.shards, vec![ShardReplicas::parse("http://a:1"), ShardReplicas::parse("http://b:1")]);
    }
}
