//! One interface over every benchmark of the crate: the two offline
//! benchmarks (Fashion-MNIST colours, easy-VQA shapes) and the three published
//! composed retrieval datasets (Fashion200k, MIT-States, FashionIQ).
//!
//! [`DatasetSpec`] parses the `--dataset` value, [`RetrievalBenchmark::load`]
//! reads the data and builds catalogs and queries, and every catalog item
//! carries an [`ImageSource`] that [`ImageLoader`] turns into RGB pixels.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::error::{DatasetError, Result};
use crate::{FashionMnist, Split};

/// A dataset named on the command line, for example `fashion200k:/data/fashion200k`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "dataset")]
pub enum DatasetSpec {
    /// Fashion-MNIST tinted with eight colours; `dir` overrides [`crate::default_data_dir`].
    FmnistColours {
        /// Directory with the four Fashion-MNIST `.gz` files.
        dir: Option<PathBuf>,
    },
    /// The easy-VQA shapes images; `dir` overrides [`crate::easyvqa::default_data_dir`].
    #[serde(rename = "easyvqa-shapes")]
    EasyVqaShapes {
        /// Directory with `train/` and `test/`, each holding `images/` and `questions.json`.
        dir: Option<PathBuf>,
    },
    /// Fashion200k (Han et al., ICCV 2017) in the layout used by TIRG (Vo et al., CVPR 2019).
    Fashion200k {
        /// Directory with `labels/` and the image folders the label files name.
        dir: PathBuf,
    },
    /// MIT-States (Isola, Lim and Adelson, CVPR 2015).
    MitStates {
        /// Directory with `images/<adjective noun>/`.
        dir: PathBuf,
    },
    /// FashionIQ (Wu et al., CVPR 2021).
    #[serde(rename = "fashioniq")]
    FashionIq {
        /// Directory with `captions/`, `image_splits/` and `images/`.
        dir: PathBuf,
    },
}

impl DatasetSpec {
    /// Name of the dataset without its directory, as accepted by [`FromStr`].
    pub fn name(&self) -> &'static str {
        match self {
            DatasetSpec::FmnistColours { .. } => "fmnist-colours",
            DatasetSpec::EasyVqaShapes { .. } => "easyvqa-shapes",
            DatasetSpec::Fashion200k { .. } => "fashion200k",
            DatasetSpec::MitStates { .. } => "mit-states",
            DatasetSpec::FashionIq { .. } => "fashioniq",
        }
    }

    /// Directory given with the name, if any.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            DatasetSpec::FmnistColours { dir } | DatasetSpec::EasyVqaShapes { dir } => {
                dir.as_deref()
            }
            DatasetSpec::Fashion200k { dir }
            | DatasetSpec::MitStates { dir }
            | DatasetSpec::FashionIq { dir } => Some(dir),
        }
    }

    /// Returns true for the two benchmarks built offline from packaged data.
    pub fn is_offline(&self) -> bool {
        matches!(
            self,
            DatasetSpec::FmnistColours { .. } | DatasetSpec::EasyVqaShapes { .. }
        )
    }

    /// Evaluation protocol of the dataset.
    pub fn protocol(&self) -> Protocol {
        match self {
            // R@1/10/50 for Fashion200k follows TIRG (Vo et al., 2019), and
            // R@1/5/10 for MIT-States as well.
            DatasetSpec::Fashion200k { .. } => Protocol::new(vec![1, 10, 50], false),
            DatasetSpec::MitStates { .. } => Protocol::new(vec![1, 5, 10], false),
            // FashionIQ reports R@10 and R@50 per category and their mean
            // over the three categories (Wu et al., 2021).
            DatasetSpec::FashionIq { .. } => Protocol::new(vec![10, 50], true),
            DatasetSpec::FmnistColours { .. } | DatasetSpec::EasyVqaShapes { .. } => {
                Protocol::new(vec![1, 5, 10, 50], false)
            }
        }
    }
}

impl fmt::Display for DatasetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dir() {
            Some(dir) => write!(f, "{}:{}", self.name(), dir.display()),
            None => f.write_str(self.name()),
        }
    }
}

impl FromStr for DatasetSpec {
    type Err = DatasetError;

    /// Parses `fmnist-colours[:DIR]`, `easyvqa-shapes[:DIR]`,
    /// `fashion200k:DIR`, `mit-states:DIR` or `fashioniq:DIR`.
    fn from_str(spec: &str) -> Result<Self> {
        let invalid = || DatasetError::InvalidDatasetSpec {
            spec: spec.to_owned(),
        };
        let (name, dir) = match spec.split_once(':') {
            Some((_, "")) => return Err(invalid()),
            Some((name, dir)) => (name, Some(PathBuf::from(dir))),
            None => (spec, None),
        };
        let required = |dir: Option<PathBuf>| dir.ok_or_else(invalid);
        match name {
            "fmnist-colours" => Ok(DatasetSpec::FmnistColours { dir }),
            "easyvqa-shapes" => Ok(DatasetSpec::EasyVqaShapes { dir }),
            "fashion200k" => Ok(DatasetSpec::Fashion200k {
                dir: required(dir)?,
            }),
            "mit-states" => Ok(DatasetSpec::MitStates {
                dir: required(dir)?,
            }),
            "fashioniq" => Ok(DatasetSpec::FashionIq {
                dir: required(dir)?,
            }),
            _ => Err(invalid()),
        }
    }
}

/// Evaluation protocol: which recalls to report and how to summarise them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protocol {
    /// Cut-offs K of the reported Recall@K, ascending.
    pub recall_at: Vec<usize>,
    /// Whether the headline figure is the mean of each Recall@K over the test
    /// query sets (FashionIQ's three categories) rather than one figure per set.
    pub average_over_sets: bool,
}

impl Protocol {
    /// Protocol with the given cut-offs.
    pub fn new(recall_at: Vec<usize>, average_over_sets: bool) -> Self {
        Self {
            recall_at,
            average_over_sets,
        }
    }

    /// Largest cut-off, the number of neighbours a search must return.
    pub fn max_k(&self) -> usize {
        self.recall_at.iter().copied().max().unwrap_or(0)
    }
}

/// Source of the pixels of a catalog item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "source")]
pub enum ImageSource {
    /// A Fashion-MNIST image, tinted with its [`crate::colour_of`] colour.
    FashionMnist {
        /// Split of the image.
        split: Split,
        /// Position in the split.
        index: usize,
    },
    /// An image file (PNG or JPEG) on disk.
    File {
        /// Path of the file.
        path: PathBuf,
    },
}

/// One retrievable image of a benchmark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchmarkItem {
    /// Id unique within the benchmark, for example `fmnist-test-00042`,
    /// `evqa-test-00042`, `f200k-test-000017`, `mits-test-000123` or `fiq-dress-B00006M009`.
    pub id: String,
    /// Attribute key: items of one catalog with equal keys satisfy the same
    /// queries (same class and colour, same description, same adjective and
    /// noun). FashionIQ has no such attributes, so every item there has its own key.
    pub key: i64,
    /// Pixels of the item.
    pub image: ImageSource,
    /// Metadata stored with the item in the index, all values as strings.
    pub metadata: BTreeMap<String, String>,
}

/// A composed retrieval query: a reference image and the modification texts
/// applied to it, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchmarkQuery {
    /// Id of the reference item, in the same catalog as the relevant items.
    pub reference_id: String,
    /// Modification texts in the order they apply; one entry for a
    /// single-step query. The model crate's `join_modifications` composes them.
    pub texts: Vec<String>,
    /// Key of the target attributes, comparable with [`BenchmarkItem::key`]
    /// within the query's catalog.
    pub target_key: i64,
    /// Ids of the catalog items that count as correct: every item whose key
    /// is `target_key`, the reference excluded. Queries with the same target
    /// share one list, because no query of this crate targets its own
    /// reference's attributes.
    pub relevant_ids: Arc<[String]>,
    /// Kind of change, for per-kind reports: `colour`, `class`, `both`,
    /// `shape`, `word`, `adjective` or `caption`.
    pub kind: String,
}

/// Ids of the catalog items of each key, shared by the queries that target it.
#[derive(Debug, Default)]
pub(crate) struct KeyGroups {
    groups: HashMap<i64, Arc<[String]>>,
}

impl KeyGroups {
    /// Groups the ids of `catalog` by key, in catalog order.
    pub(crate) fn new(catalog: &[BenchmarkItem]) -> Self {
        let mut ids: HashMap<i64, Vec<String>> = HashMap::new();
        for item in catalog {
            ids.entry(item.key).or_default().push(item.id.clone());
        }
        Self {
            groups: ids
                .into_iter()
                .map(|(key, ids)| (key, Arc::from(ids)))
                .collect(),
        }
    }

    /// Returns the ids with `key`, `reference` excluded; shared unless the
    /// reference is among them.
    pub(crate) fn relevant(&self, key: i64, reference: &str) -> Arc<[String]> {
        let Some(group) = self.groups.get(&key) else {
            return Arc::from(Vec::new());
        };
        if group.iter().any(|id| id == reference) {
            return group
                .iter()
                .filter(|id| *id != reference)
                .cloned()
                .collect();
        }
        Arc::clone(group)
    }
}

/// Catalog items of one split, and the queries evaluated against them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuerySet {
    /// Name used in reports: `test`, `two-step`, `dress`, `shirt`, `toptee`, ...
    pub name: String,
    /// Items searched by the queries, reference images included.
    pub catalog: Vec<BenchmarkItem>,
    /// Queries whose reference and relevant items are in `catalog`.
    pub queries: Vec<BenchmarkQuery>,
}

/// Sizes and seed of a loaded benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadOptions {
    /// Training images to keep, drawn with `seed`; `None` keeps the whole train split.
    pub train_images: Option<usize>,
    /// Training queries to keep. The offline benchmarks generate this many;
    /// the published datasets draw this many of their training pairs with
    /// `seed`. `None` keeps every pair of a published dataset and generates
    /// one per training image for an offline benchmark.
    pub train_queries: Option<usize>,
    /// Single-step test queries of an offline benchmark; `None` is the
    /// benchmark's default set. The published datasets always use their
    /// published test queries.
    pub test_queries: Option<usize>,
    /// Two-step test queries of an offline benchmark, reported as a second
    /// query set named `two-step`; 0 leaves it out.
    pub two_step_test_queries: usize,
    /// Fraction of the generated offline training queries that have two steps, 0.0 to 1.0.
    pub two_step_train_fraction: f64,
    /// Seed of every draw above.
    pub seed: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            train_images: None,
            train_queries: None,
            test_queries: None,
            two_step_test_queries: 0,
            two_step_train_fraction: 0.0,
            seed: 0,
        }
    }
}

/// Decodes the pixels of [`BenchmarkItem`]s; cheap to clone and shareable across threads.
#[derive(Debug, Clone, Default)]
pub struct ImageLoader {
    fashion_mnist: Option<Arc<FashionMnist>>,
}

impl ImageLoader {
    /// Loader for image files and, when `fashion_mnist` is given, tinted Fashion-MNIST images.
    pub fn new(fashion_mnist: Option<Arc<FashionMnist>>) -> Self {
        Self { fashion_mnist }
    }

    /// Decodes the RGB pixels of `source`.
    pub fn load(&self, source: &ImageSource) -> Result<RgbImage> {
        match source {
            ImageSource::FashionMnist { split, index } => {
                let data = self.fashion_mnist.as_ref().ok_or_else(|| {
                    DatasetError::InvalidRequest(format!(
                        "image fmnist-{split}-{index:05} needs Fashion-MNIST, but this loader was built without it; load the fmnist-colours benchmark"
                    ))
                })?;
                crate::tinted_image(data.split(*split), *index)
            }
            ImageSource::File { path } => load_rgb_file(path),
        }
    }
}

/// Decodes an image file (format from its content) into 8-bit RGB.
pub fn load_rgb_file(path: &Path) -> Result<RgbImage> {
    let reader = image::ImageReader::open(path).map_err(|source| DatasetError::DatasetFile {
        path: path.to_owned(),
        source,
        fix: "check that the image named by the dataset files exists".to_owned(),
    })?;
    let reader = reader
        .with_guessed_format()
        .map_err(|source| DatasetError::DatasetFile {
            path: path.to_owned(),
            source,
            fix: "check that the file is readable".to_owned(),
        })?;
    let image = reader
        .decode()
        .map_err(|source| DatasetError::ImageDecode {
            path: path.to_owned(),
            source,
        })?;
    Ok(image.into_rgb8())
}

/// A loaded benchmark: training catalog and queries, test query sets, protocol and image loader.
#[derive(Debug, Clone)]
pub struct RetrievalBenchmark {
    /// Dataset this benchmark was loaded from.
    pub spec: DatasetSpec,
    /// Evaluation protocol.
    pub protocol: Protocol,
    /// Training images and training queries; the relevant ids of the training
    /// queries are in its catalog.
    pub train: QuerySet,
    /// Test query sets: one for Fashion200k and MIT-States, one per category
    /// for FashionIQ, and for the offline benchmarks the single-step set
    /// `test` followed by `two-step` when requested.
    pub test: Vec<QuerySet>,
    /// Decoder of item images.
    pub images: ImageLoader,
}

impl RetrievalBenchmark {
    /// Reads the dataset named by `spec` and builds its catalogs and queries.
    pub fn load(spec: &DatasetSpec, options: &LoadOptions) -> Result<Self> {
        if !(0.0..=1.0).contains(&options.two_step_train_fraction) {
            return Err(DatasetError::InvalidRequest(format!(
                "invalid two-step training fraction {}: expected a value from 0.0 to 1.0",
                options.two_step_train_fraction
            )));
        }
        let benchmark = match spec {
            DatasetSpec::FmnistColours { dir } => {
                crate::offline::load_fmnist_colours(spec, dir.as_deref(), options)?
            }
            DatasetSpec::EasyVqaShapes { dir } => {
                crate::offline::load_easyvqa_shapes(spec, dir.as_deref(), options)?
            }
            DatasetSpec::Fashion200k { dir } => {
                crate::fashion200k::load_benchmark(spec, dir, options)?
            }
            DatasetSpec::MitStates { dir } => {
                crate::mit_states::load_benchmark(spec, dir, options)?
            }
            DatasetSpec::FashionIq { dir } => {
                crate::fashion_iq::load_benchmark(spec, dir, options)?
            }
        };
        tracing::info!(
            dataset = %spec,
            train_items = benchmark.train.catalog.len(),
            train_queries = benchmark.train.queries.len(),
            test_sets = benchmark.test.len(),
            test_queries = benchmark.test.iter().map(|set| set.queries.len()).sum::<usize>(),
            "loaded benchmark"
        );
        Ok(benchmark)
    }

    /// Decodes the RGB pixels of `item`.
    pub fn load_image(&self, item: &BenchmarkItem) -> Result<RgbImage> {
        self.images.load(&item.image)
    }

    /// Returns the test query set called `name`.
    pub fn test_set(&self, name: &str) -> Option<&QuerySet> {
        self.test.iter().find(|set| set.name == name)
    }
}
