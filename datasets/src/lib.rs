//! Composed image retrieval benchmarks: a reference image plus modification
//! texts, and the catalog images that satisfy them.
//!
//! Two benchmarks are built offline from packaged data:
//!
//! - Fashion-MNIST colours: every Fashion-MNIST image (Xiao, Rasul and
//!   Vollgraf, 2017) is tinted with one of eight colours picked by a fixed hash
//!   of its split and index. A query changes the colour, the class or both, and
//!   the relevant items are the catalog images with the requested class and
//!   colour, the reference excluded.
//! - easy-VQA shapes ([`easyvqa`]): the same construction over the shape and
//!   colour of the easy-VQA images.
//!
//! Training and test queries of both draw their texts from two disjoint sets
//! of phrasings, and both have two-step queries whose texts apply in order.
//! The readers [`fashion200k`], [`mit_states`] and [`fashion_iq`] load the
//! published datasets with their published query protocols, and
//! [`RetrievalBenchmark`] presents all five behind one interface.
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
//!
//! ```no_run
//! use densebert4ret_datasets::{DatasetSpec, LoadOptions, RetrievalBenchmark};
//!
//! let spec: DatasetSpec = "easyvqa-shapes".parse()?;
//! let benchmark = RetrievalBenchmark::load(&spec, &LoadOptions::default())?;
//! let first = &benchmark.test[0].catalog[0];
//! let pixels = benchmark.load_image(first)?;
//! println!("{} is {}x{}", first.id, pixels.width(), pixels.height());
//! # Ok::<(), densebert4ret_datasets::DatasetError>(())
//! ```

pub mod benchmark;
mod catalog;
mod class;
mod colour;
pub mod easyvqa;
mod error;
pub mod fashion200k;
pub mod fashion_iq;
mod files;
mod idx;
pub mod mit_states;
mod multistep;
mod offline;
mod queries;

pub use benchmark::{
    load_rgb_file, BenchmarkItem, BenchmarkQuery, DatasetSpec, ImageLoader, ImageSource,
    LoadOptions, Protocol, QuerySet, RetrievalBenchmark,
};
pub use catalog::{catalog_items, item_id, parse_item_id, CatalogItem, ITEM_ID_PREFIX};
pub use class::FashionClass;
pub use colour::{colour_of, png_bytes, tint, tinted_image, Colour};
pub use error::{DatasetError, Result};
pub use idx::{
    default_data_dir, FashionMnist, Split, SplitData, DATA_DIR_ENV, DEFAULT_DATA_DIR, IMAGE_PIXELS,
    IMAGE_SIDE,
};
pub use multistep::{
    default_two_step_test_queries, generate_two_step_queries, TwoStepPlan,
    DEFAULT_TWO_STEP_TEST_QUERY_COUNT, DEFAULT_TWO_STEP_TEST_QUERY_SEED,
};
pub use queries::{
    attribute_code, default_test_queries, generate_queries, render_template, sample_indices,
    AttributeIndex, Phrasing, Query, QueryConfig, QueryKind, DEFAULT_TEST_QUERY_COUNT,
    DEFAULT_TEST_QUERY_SEED, STEP_SEPARATOR,
};
