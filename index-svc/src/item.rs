//! The catalog item as the shard stores it, and its binary encoding.

use std::collections::HashMap;

use crate::codec::{self, Decoder};
use crate::error::DecodeError;

/// One catalog item: its id, joint-space vector, metadata and image features.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredItem {
    /// Catalog id, unique within the shard.
    pub id: String,
    /// Joint-space vector; its length is the shard dimension.
    pub vector: Vec<f32>,
    /// Metadata stored at ingest and returned with search hits.
    pub metadata: HashMap<String, String>,
    /// Backbone features of the item's image (little-endian `f32`), stored
    /// opaquely and returned by `Get`.
    pub image_features: Vec<u8>,
}

impl StoredItem {
    /// Bytes of metadata: the lengths of all keys and values.
    pub fn metadata_bytes(&self) -> usize {
        self.metadata
            .iter()
            .map(|(key, value)| key.len() + value.len())
            .sum()
    }

    /// Approximate heap bytes held besides the vector: id, metadata and image
    /// features.
    pub(crate) fn payload_bytes(&self) -> usize {
        self.id.len() + self.metadata_bytes() + self.image_features.len()
    }

    /// Appends the encoding: id, `dimension` floats, metadata entry count,
    /// key and value strings, image feature bytes.
    pub(crate) fn encode(&self, buffer: &mut Vec<u8>) {
        codec::put_str(buffer, &self.id);
        codec::put_f32s(buffer, &self.vector);
        codec::put_u32(buffer, self.metadata.len() as u32);
        for (key, value) in &self.metadata {
            codec::put_str(buffer, key);
            codec::put_str(buffer, value);
        }
        codec::put_bytes(buffer, &self.image_features);
    }

    /// Reads an item written by [`StoredItem::encode`] with the same
    /// dimension.
    pub(crate) fn decode(decoder: &mut Decoder<'_>, dimension: u32) -> Result<Self, DecodeError> {
        let id = decoder.string()?;
        let vector = decoder.f32s(dimension as usize)?;
        // An entry is at least two empty strings, so 8 bytes.
        let entries = decoder.count("metadata entries", 8)?;
        let mut metadata = HashMap::with_capacity(entries);
        for _ in 0..entries {
            let key = decoder.string()?;
            let value = decoder.string()?;
            metadata.insert(key, value);
        }
        let image_features = decoder.bytes()?.to_vec();
        Ok(Self {
            id,
            vector,
            metadata,
            image_features,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_round_trip() {
        let item = StoredItem {
            id: "sku-1".into(),
            vector: vec![0.5, -1.0, 2.0],
            metadata: HashMap::from([("color".into(), "red".into()), ("size".into(), "M".into())]),
            image_features: vec![0, 0, 128, 63],
        };
        let mut buffer = Vec::new();
        item.encode(&mut buffer);

        let mut decoder = Decoder::new(&buffer);
        let decoded = StoredItem::decode(&mut decoder, 3).unwrap();
        decoder.finish().unwrap();

        assert_eq!(decoded, item);
        assert_eq!(item.metadata_bytes(), 5 + 3 + 4 + 1);
    }

    #[test]
    fn wrong_dimension_fails_to_decode() {
        let item = StoredItem {
            id: "a".into(),
            vector: vec![1.0, 2.0],
            metadata: HashMap::new(),
            image_features: Vec::new(),
        };
        let mut buffer = Vec::new();
        item.encode(&mut buffer);

        let mut decoder = Decoder::new(&buffer);
        let result = StoredItem::decode(&mut decoder, 3).and_then(|_| decoder.finish());

        assert!(result.is_err());
    }
}
