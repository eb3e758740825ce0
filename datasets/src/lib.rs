//! Fashion-MNIST colours: a composed image retrieval benchmark.
//!
//! Every Fashion-MNIST image (Xiao, Rasul and Vollgraf, 2017) is tinted with
//! one of eight colours picked by a fixed hash of its split and index. A query
//! is a reference image plus a text that changes its colour, its class or
//! both. The relevant items are the catalog images with the requested class
//! and colour, the reference excluded. Training and test queries draw their texts
//! from two disjoint sets of phrasings.
//!
//! ```no_run
//! use densebert4ret_datasets::{default_test_queries, AttributeIndex, FashionMnist};
//!
//! let data = FashionMnist::load_default()?;
//! let queries = default_test_queries(&data.test)?;
//! let catalog = AttributeIndex::full(&data.test);
//! println!("{} relevant items for {:?}", catalog.relevant(&queries[0]).len(), queries[0].text);
//! # Ok::<(), densebert4ret_datasets::DatasetError>(())
//! ```

mod catalog;
mod class;
mod colour;
mod error;
mod idx;
mod queries;

pub use catalog::{catalog_items, item_id, parse_item_id, CatalogItem, ITEM_ID_PREFIX};
pub use class::FashionClass;
pub use colour::{colour_of, png_bytes, tint, tinted_image, Colour};
pub use error::{DatasetError, Result};
pub use idx::{
    default_data_dir, FashionMnist, Split, SplitData, DATA_DIR_ENV, DEFAULT_DATA_DIR, IMAGE_PIXELS,
    IMAGE_SIDE,
};
pub use queries::{
    attribute_code, default_test_queries, generate_queries, render_template, sample_indices,
    AttributeIndex, Phrasing, Query, QueryConfig, QueryKind, DEFAULT_TEST_QUERY_COUNT,
    DEFAULT_TEST_QUERY_SEED,
};
