//! Catalog items: the ids and metadata under which tinted images are indexed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::colour::colour_of;
use crate::error::{DatasetError, Result};
use crate::idx::SplitData;
use crate::{Colour, FashionClass, Split};

/// Prefix of every catalog item id.
pub const ITEM_ID_PREFIX: &str = "fmnist";

/// One retrievable image with its attributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogItem {
    /// Id of the form `fmnist-<split>-<index>`, index zero-padded to five digits.
    pub id: String,
    /// Split the image comes from.
    pub split: Split,
    /// Position of the image in its split.
    pub index: usize,
    /// Garment class.
    pub class: FashionClass,
    /// Tint colour.
    pub colour: Colour,
}

impl CatalogItem {
    /// Item for image `index` of `data`.
    pub fn new(data: &SplitData, index: usize) -> Result<Self> {
        let class = data.class(index)?;
        let split = data.split();
        Ok(Self {
            id: item_id(split, index),
            split,
            index,
            class,
            colour: colour_of(split, index),
        })
    }

    /// Metadata stored with the item: `class`, `colour`, `split` and `index`, all as strings.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("class".to_owned(), self.class.name().to_owned()),
            ("colour".to_owned(), self.colour.name().to_owned()),
            ("split".to_owned(), self.split.as_str().to_owned()),
            ("index".to_owned(), self.index.to_string()),
        ])
    }
}

/// Id of image `index` of `split`, e.g. `fmnist-test-00042`.
pub fn item_id(split: Split, index: usize) -> String {
    format!("{ITEM_ID_PREFIX}-{split}-{index:05}")
}

/// Splits an id made by [`item_id`] back into its split and index.
pub fn parse_item_id(id: &str) -> Result<(Split, usize)> {
    let invalid = || DatasetError::InvalidItemId { id: id.to_owned() };
    let rest = id
        .strip_prefix(ITEM_ID_PREFIX)
        .and_then(|rest| rest.strip_prefix('-'))
        .ok_or_else(invalid)?;
    let (split, index) = rest.split_once('-').ok_or_else(invalid)?;
    let split = split.parse::<Split>().map_err(|_| invalid())?;
    if index.is_empty() || !index.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(invalid());
    }
    let index = index.parse::<usize>().map_err(|_| invalid())?;
    Ok((split, index))
}

/// Items for every image of `data`, in index order.
pub fn catalog_items(data: &SplitData) -> Vec<CatalogItem> {
    let split = data.split();
    data.labels()
        .iter()
        .enumerate()
        .map(|(index, &class)| CatalogItem {
            id: item_id(split, index),
            split,
            index,
            class,
            colour: colour_of(split, index),
        })
        .collect()
}
