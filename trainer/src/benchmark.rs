//! The training and evaluation data of one run, in one form for every dataset.
//!
//! Fashion-MNIST colours keeps its own construction: a seeded subset of the
//! train split with train-phrasing queries, validation queries with phrasings
//! of their own over other train-split images that training never uses, and
//! the test split as the catalog of the test and two-step queries. Every other dataset comes from the datasets crate's
//! [`RetrievalBenchmark`]: its training set, with the last
//! `validation_queries` training queries held out, and its test query sets.
//! Both end up as catalogs of [`BenchmarkItem`]s and queries that point at
//! catalog rows, which is all that feature caching, training and evaluation read.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use densebert4ret_datasets::{
    attribute_code, colour_of, default_test_queries, default_two_step_test_queries,
    generate_queries, generate_two_step_queries, sample_indices, BenchmarkItem, DatasetSpec,
    FashionMnist, ImageLoader, ImageSource, LoadOptions, Phrasing, Protocol, Query, QueryConfig,
    QuerySet, RetrievalBenchmark, Split, SplitData, DEFAULT_TEST_QUERY_COUNT,
    DEFAULT_TEST_QUERY_SEED, DEFAULT_TWO_STEP_TEST_QUERY_COUNT, DEFAULT_TWO_STEP_TEST_QUERY_SEED,
};
use densebert4ret_model::join_modifications;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainerError};

/// Name of the two-step test query set of the offline benchmarks.
pub const TWO_STEP_SET: &str = "two-step";

fn default_dataset() -> DatasetSpec {
    DatasetSpec::FmnistColours { dir: None }
}

/// Dataset, sizes and seed of the benchmark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchmarkConfig {
    /// Dataset to train and evaluate on. Metrics files written before this field existed
    /// describe Fashion-MNIST colours runs.
    #[serde(default = "default_dataset")]
    pub dataset: DatasetSpec,
    /// Directory with the Fashion-MNIST `.gz` files; read for `fmnist-colours` only, where
    /// it wins over a directory given in `dataset`.
    pub data_dir: PathBuf,
    /// Train-split images drawn for training; `None` keeps the whole train split.
    /// Fashion-MNIST colours requires a count.
    pub train_images: Option<usize>,
    /// Training queries, drawn over the training images.
    pub train_queries: usize,
    /// Validation queries: over `validation_images` unseen train-split images, with
    /// validation phrasings, when that is set; else held out from the training draw.
    pub validation_queries: usize,
    /// Fashion-MNIST colours: train-split images outside the training subset that form the
    /// validation catalog. 0, the value of metrics files written before this field existed,
    /// takes the validation queries out of the training draw over the training images.
    #[serde(default)]
    pub validation_images: usize,
    /// Single-step test queries of an offline benchmark; `None` is the benchmark's standard
    /// set. The published datasets use their published test queries.
    pub test_queries: Option<usize>,
    /// Seed of the image subset and of the training queries.
    pub seed: u64,
    /// Two-step training queries over the training images, added to `train_queries`.
    #[serde(default)]
    pub two_step_train_queries: usize,
    /// Two-step test queries of an offline benchmark, evaluated separately; the datasets
    /// crate's standard set when equal to its default count.
    #[serde(default)]
    pub two_step_test_queries: usize,
}

/// A query resolved to a catalog row and a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowQuery {
    /// Row of the reference image in the query's catalog.
    pub reference: usize,
    /// Modification texts in the order they apply; one entry for a single-step query.
    pub texts: Vec<String>,
    /// Text the text encoder reads: the single modification, or the modifications joined
    /// by [`join_modifications`] as the serving path joins them.
    pub text: String,
    /// Attribute key of the relevant catalog items ([`BenchmarkItem::key`]).
    pub target: i64,
    /// Kind of change, for per-kind reports (`colour`, `class`, `shape`, `both`, ...).
    pub kind: String,
}

/// Test queries and the catalog they search.
#[derive(Debug, Clone)]
pub struct TestSet {
    /// Name of the query set: `test`, `two-step`, or a FashionIQ category.
    pub name: String,
    /// Position of the catalog in [`Benchmark::test_catalogs`].
    pub catalog: usize,
    /// Queries whose reference and relevant items are in the catalog.
    pub queries: Vec<RowQuery>,
}

impl TestSet {
    /// Returns true for the two-step set of an offline benchmark, reported in its own table.
    pub fn is_two_step(&self) -> bool {
        self.name == TWO_STEP_SET
    }
}

/// The Fashion-MNIST training subset, which names the feature cache of that benchmark.
#[derive(Debug, Clone)]
pub struct FashionMnistSubset {
    /// Sorted train-split indices used for training, one per training catalog row.
    pub train_pool: Vec<usize>,
    /// Images of the test split.
    pub test_images: usize,
}

/// Images, queries and texts of one run.
#[derive(Debug, Clone)]
pub struct Benchmark {
    /// Dataset the benchmark came from.
    pub spec: DatasetSpec,
    /// Recall cut-offs and whether the test sets are averaged.
    pub protocol: Protocol,
    /// Decoder of the catalog images.
    pub images: ImageLoader,
    /// Training images; row `i` is row `i` of the training feature matrix.
    pub train_catalog: Vec<BenchmarkItem>,
    /// Training queries over `train_catalog`, two-step queries excluded.
    pub train_queries: Vec<RowQuery>,
    /// Validation queries over `validation_catalog`, or over `train_catalog` when there is
    /// none.
    ///
    /// NOTE: without a validation catalog (easy-VQA and the published datasets, whose train
    /// splits all go into training) these are held-out queries over training images, so the
    /// validation recall reads higher than the test recall.
    pub validation_queries: Vec<RowQuery>,
    /// Train-split images that training never uses, searched by the validation queries.
    pub validation_catalog: Option<Vec<BenchmarkItem>>,
    /// Two-step training queries over `train_catalog`, texts joined in order.
    pub two_step_train_queries: Vec<RowQuery>,
    /// Distinct catalogs of the test sets; the offline benchmarks share one.
    pub test_catalogs: Vec<Vec<BenchmarkItem>>,
    /// Test query sets in the dataset's order.
    pub test_sets: Vec<TestSet>,
    /// Sorted unique texts of the single-step training and test queries, and of the
    /// validation queries when they search the training images. The feature cache is keyed
    /// on these.
    pub texts: Vec<String>,
    /// Sorted unique texts that are not in `texts`: the joined texts of the two-step queries
    /// and the texts of validation queries over a validation catalog. Their feature rows
    /// follow those of `texts`, and they are cached apart, so that new validation or
    /// two-step queries never rerun the image backbone.
    pub extra_texts: Vec<String>,
    /// Set for Fashion-MNIST colours, whose feature cache is keyed by the training subset.
    pub fashion_mnist: Option<FashionMnistSubset>,
    text_rows: HashMap<String, usize>,
}

impl Benchmark {
    /// Loads the dataset of `config` and draws its subset and queries.
    pub fn build(config: &BenchmarkConfig) -> Result<Self> {
        match &config.dataset {
            DatasetSpec::FmnistColours { .. } => build_fashion_mnist(config),
            spec => build_retrieval(spec, config),
        }
    }

    /// Row of `text` in the text feature matrix: its row in [`Benchmark::texts`], or
    /// `texts.len()` plus its row in [`Benchmark::extra_texts`].
    pub fn text_row(&self, text: &str) -> Result<usize> {
        self.text_rows.get(text).copied().ok_or_else(|| {
            TrainerError::InvalidInput(format!("text {text:?} is not among the benchmark texts"))
        })
    }

    /// Attribute keys of the training catalog, row by row.
    pub fn train_codes(&self) -> Vec<i64> {
        self.train_catalog.iter().map(|item| item.key).collect()
    }

    /// Catalog the validation queries search: the validation catalog, else the training one.
    pub fn validation_items(&self) -> &[BenchmarkItem] {
        self.validation_catalog
            .as_deref()
            .unwrap_or(&self.train_catalog)
    }

    /// Single-step test sets: every set but the two-step one.
    pub fn single_step_sets(&self) -> impl Iterator<Item = &TestSet> {
        self.test_sets.iter().filter(|set| !set.is_two_step())
    }

    /// The two-step test set, when the run has one.
    pub fn two_step_set(&self) -> Option<&TestSet> {
        self.test_sets.iter().find(|set| set.is_two_step())
    }

    /// Single-step test queries over all sets.
    pub fn test_query_count(&self) -> usize {
        self.single_step_sets().map(|set| set.queries.len()).sum()
    }

    /// Two-step test queries.
    pub fn two_step_test_query_count(&self) -> usize {
        self.two_step_set().map_or(0, |set| set.queries.len())
    }

    /// Catalog images over all test catalogs.
    pub fn catalog_image_count(&self) -> usize {
        self.test_catalogs.iter().map(Vec::len).sum()
    }

    /// Collects the texts of every query and assigns their feature rows.
    fn with_texts(mut self) -> Self {
        // Validation queries over the training images keep their texts in `texts`, where
        // feature caches written before validation catalogs existed have them.
        let held_out: &[RowQuery] = if self.validation_catalog.is_none() {
            &self.validation_queries
        } else {
            &[]
        };
        let single_step: BTreeSet<String> = self
            .train_queries
            .iter()
            .chain(held_out)
            .chain(self.single_step_sets().flat_map(|set| &set.queries))
            .map(|query| query.text.clone())
            .collect();
        let extra: BTreeSet<String> = self
            .two_step_train_queries
            .iter()
            .chain(self.two_step_set().into_iter().flat_map(|set| &set.queries))
            .chain(&self.validation_queries)
            .map(|query| query.text.clone())
            .filter(|text| !single_step.contains(text))
            .collect();
        self.texts = single_step.into_iter().collect();
        self.extra_texts = extra.into_iter().collect();
        self.text_rows = self
            .texts
            .iter()
            .chain(&self.extra_texts)
            .enumerate()
            .map(|(row, text)| (text.clone(), row))
            .collect();
        self
    }
}

/// Builds Fashion-MNIST colours exactly as the trainer always has, so that earlier runs,
/// their feature caches and their metrics stay reproducible.
fn build_fashion_mnist(config: &BenchmarkConfig) -> Result<Benchmark> {
    let Some(train_images) = config.train_images else {
        return Err(TrainerError::InvalidInput(
            "fmnist-colours needs a training image count; pass --train-images".to_owned(),
        ));
    };
    let data = Arc::new(FashionMnist::load(&config.data_dir)?);
    if train_images > data.train.len() {
        return Err(TrainerError::InvalidInput(format!(
            "--train-images is {train_images}, but the train split has only {} images",
            data.train.len()
        )));
    }
    let train_pool = sample_indices(data.train.len(), train_images, config.seed)?;
    let pool_rows: HashMap<usize, usize> = train_pool
        .iter()
        .enumerate()
        .map(|(row, &index)| (index, row))
        .collect();

    let (train_queries, validation) = if config.validation_images == 0 {
        // The scheme of metrics files written before validation images existed: one draw,
        // its tail held out.
        let query_config = QueryConfig {
            count: config.train_queries + config.validation_queries,
            phrasing: Phrasing::Train,
            seed: config.seed.wrapping_add(1),
        };
        let mut train_queries = generate_queries(&data.train, &train_pool, &query_config)?;
        let validation_queries = train_queries.split_off(config.train_queries);
        (train_queries, Validation::HeldOut(validation_queries))
    } else {
        let query_config = QueryConfig {
            count: config.train_queries,
            phrasing: Phrasing::Train,
            seed: config.seed.wrapping_add(1),
        };
        let train_queries = generate_queries(&data.train, &train_pool, &query_config)?;
        let pool = unseen_indices(
            data.train.len(),
            &train_pool,
            config.validation_images,
            config.seed.wrapping_add(VALIDATION_POOL_SEED_OFFSET),
        )?;
        // Validation phrasings: unseen in training like the test phrasings, which stay
        // unread until the test, so that model selection cannot favour them.
        let queries = generate_queries(
            &data.train,
            &pool,
            &QueryConfig {
                count: config.validation_queries,
                phrasing: Phrasing::Validation,
                seed: config.seed.wrapping_add(VALIDATION_QUERY_SEED_OFFSET),
            },
        )?;
        (train_queries, Validation::Unseen { pool, queries })
    };

    let test_count = config.test_queries.unwrap_or(DEFAULT_TEST_QUERY_COUNT);
    let test_queries = if test_count == DEFAULT_TEST_QUERY_COUNT {
        default_test_queries(&data.test)?
    } else {
        let pool: Vec<usize> = (0..data.test.len()).collect();
        let query_config = QueryConfig {
            count: test_count,
            phrasing: Phrasing::Test,
            seed: DEFAULT_TEST_QUERY_SEED,
        };
        generate_queries(&data.test, &pool, &query_config)?
    };
    let two_step_train_queries = if config.two_step_train_queries == 0 {
        Vec::new()
    } else {
        generate_two_step_queries(
            &data.train,
            &train_pool,
            &QueryConfig {
                count: config.two_step_train_queries,
                phrasing: Phrasing::Train,
                seed: config.seed.wrapping_add(2),
            },
        )?
    };
    let two_step_test_queries = match config.two_step_test_queries {
        0 => Vec::new(),
        DEFAULT_TWO_STEP_TEST_QUERY_COUNT => default_two_step_test_queries(&data.test)?,
        count => {
            let pool: Vec<usize> = (0..data.test.len()).collect();
            generate_two_step_queries(
                &data.test,
                &pool,
                &QueryConfig {
                    count,
                    phrasing: Phrasing::Test,
                    seed: DEFAULT_TWO_STEP_TEST_QUERY_SEED,
                },
            )?
        }
    };

    let train_row = |index: usize| -> Result<usize> {
        pool_rows.get(&index).copied().ok_or_else(|| {
            TrainerError::InvalidInput(format!("train image {index} is not in the training subset"))
        })
    };
    let train_rows = |queries: &[Query]| -> Result<Vec<RowQuery>> {
        queries
            .iter()
            .map(|query| Ok(fashion_mnist_row_query(query, train_row(query.reference)?)))
            .collect()
    };
    let test_rows = |queries: &[Query]| -> Vec<RowQuery> {
        queries
            .iter()
            .map(|query| fashion_mnist_row_query(query, query.reference))
            .collect()
    };

    let test_pool: Vec<usize> = (0..data.test.len()).collect();
    let mut test_sets = vec![TestSet {
        name: "test".to_owned(),
        catalog: 0,
        queries: test_rows(&test_queries),
    }];
    if !two_step_test_queries.is_empty() {
        test_sets.push(TestSet {
            name: TWO_STEP_SET.to_owned(),
            catalog: 0,
            queries: test_rows(&two_step_test_queries),
        });
    }
    let (validation_queries, validation_catalog) = match &validation {
        Validation::HeldOut(queries) => (train_rows(queries)?, None),
        Validation::Unseen { pool, queries } => {
            let rows: HashMap<usize, usize> = pool
                .iter()
                .enumerate()
                .map(|(row, &index)| (index, row))
                .collect();
            let queries = queries
                .iter()
                .map(|query| {
                    let row = rows.get(&query.reference).copied().ok_or_else(|| {
                        TrainerError::InvalidInput(format!(
                            "train image {} is not in the validation subset",
                            query.reference
                        ))
                    })?;
                    Ok(fashion_mnist_row_query(query, row))
                })
                .collect::<Result<Vec<_>>>()?;
            (queries, Some(fashion_mnist_items(&data.train, pool)?))
        }
    };
    let benchmark = Benchmark {
        spec: config.dataset.clone(),
        protocol: config.dataset.protocol(),
        images: ImageLoader::new(Some(Arc::clone(&data))),
        train_catalog: fashion_mnist_items(&data.train, &train_pool)?,
        train_queries: train_rows(&train_queries)?,
        validation_queries,
        validation_catalog,
        two_step_train_queries: train_rows(&two_step_train_queries)?,
        test_catalogs: vec![fashion_mnist_items(&data.test, &test_pool)?],
        test_sets,
        texts: Vec::new(),
        extra_texts: Vec::new(),
        fashion_mnist: Some(FashionMnistSubset {
            test_images: data.test.len(),
            train_pool,
        }),
        text_rows: HashMap::new(),
    };
    Ok(benchmark.with_texts())
}

/// Offset of the validation image draw from the run seed; 1 and 2 seed the training queries.
const VALIDATION_POOL_SEED_OFFSET: u64 = 3;
/// Offset of the validation query draw from the run seed.
const VALIDATION_QUERY_SEED_OFFSET: u64 = 4;

/// Validation queries of Fashion-MNIST colours.
enum Validation {
    /// Held out from the training draw, over the training images.
    HeldOut(Vec<Query>),
    /// Over `pool`, sorted train-split indices outside the training subset.
    Unseen {
        pool: Vec<usize>,
        queries: Vec<Query>,
    },
}

/// Draws `count` sorted indices below `len` that are not in the sorted `excluded`.
fn unseen_indices(len: usize, excluded: &[usize], count: usize, seed: u64) -> Result<Vec<usize>> {
    let free: Vec<usize> = (0..len)
        .filter(|index| excluded.binary_search(index).is_err())
        .collect();
    if count > free.len() {
        return Err(TrainerError::InvalidInput(format!(
            "--validation-images is {count}, but only {} train-split images are left outside \
             the {} training images; lower --validation-images or --train-images",
            free.len(),
            excluded.len()
        )));
    }
    Ok(sample_indices(free.len(), count, seed)?
        .into_iter()
        .map(|position| free[position])
        .collect())
}

fn fashion_mnist_row_query(query: &Query, reference: usize) -> RowQuery {
    // The text encoder reads a multi-step query as the texts joined by the model crate,
    // exactly as the serving path joins them.
    let text = if query.texts.len() > 1 {
        join_modifications(&query.texts)
    } else {
        query.text.clone()
    };
    let texts = if query.texts.is_empty() {
        vec![query.text.clone()]
    } else {
        query.texts.clone()
    };
    RowQuery {
        reference,
        texts,
        text,
        target: query.target_code(),
        kind: query.kind.as_str().to_owned(),
    }
}

fn fashion_mnist_items(data: &SplitData, indices: &[usize]) -> Result<Vec<BenchmarkItem>> {
    let split: Split = data.split();
    indices
        .iter()
        .map(|&index| {
            Ok(BenchmarkItem {
                id: format!("fmnist-{split}-{index:05}"),
                key: attribute_code(data.class(index)?, colour_of(split, index)),
                image: ImageSource::FashionMnist { split, index },
                metadata: Default::default(),
            })
        })
        .collect()
}

/// Builds any dataset but Fashion-MNIST colours through [`RetrievalBenchmark::load`].
fn build_retrieval(spec: &DatasetSpec, config: &BenchmarkConfig) -> Result<Benchmark> {
    // The offline loaders draw the two-step share of all generated queries, validation
    // included, so this fraction yields `two_step_train_queries` of them.
    let drawn = config.train_queries + config.two_step_train_queries + config.validation_queries;
    let options = LoadOptions {
        train_images: config.train_images,
        train_queries: Some(drawn),
        test_queries: config.test_queries,
        two_step_test_queries: config.two_step_test_queries,
        two_step_train_fraction: if spec.is_offline() && drawn > 0 {
            config.two_step_train_queries as f64 / drawn as f64
        } else {
            0.0
        },
        seed: config.seed,
    };
    let loaded = RetrievalBenchmark::load(spec, &options)?;

    let train_ids = row_ids(&loaded.train.catalog);
    let mut queries = row_queries(&loaded.train, &train_ids)?;
    // The loaders put the two-step training queries after the single-step ones, so the
    // held-out validation queries come from the single-step draw. A published dataset
    // with fewer pairs than requested keeps all of them, in the same order.
    let mut two_step_train_queries = Vec::new();
    let mut single_step = Vec::with_capacity(queries.len());
    for (query, source) in queries.drain(..).zip(&loaded.train.queries) {
        // Only the offline benchmarks have multi-step queries.
        if spec.is_offline() && source.texts.len() > 1 {
            two_step_train_queries.push(query);
        } else {
            single_step.push(query);
        }
    }
    if single_step.len() < 2 {
        return Err(TrainerError::InvalidInput(format!(
            "{spec} has {} single-step training queries, too few to hold out validation queries",
            single_step.len()
        )));
    }
    let validation_count = config.validation_queries.min(single_step.len() / 2).max(1);
    let validation_queries = single_step.split_off(single_step.len() - validation_count);

    let mut test_catalogs: Vec<Vec<BenchmarkItem>> = Vec::new();
    let mut test_sets = Vec::with_capacity(loaded.test.len());
    for set in &loaded.test {
        let catalog = match test_catalogs
            .iter()
            .position(|catalog| *catalog == set.catalog)
        {
            Some(position) => position,
            None => {
                test_catalogs.push(set.catalog.clone());
                test_catalogs.len() - 1
            }
        };
        let ids = row_ids(&set.catalog);
        test_sets.push(TestSet {
            name: set.name.clone(),
            catalog,
            queries: row_queries(set, &ids)?,
        });
    }

    let benchmark = Benchmark {
        spec: spec.clone(),
        protocol: loaded.protocol.clone(),
        images: loaded.images.clone(),
        train_catalog: loaded.train.catalog,
        train_queries: single_step,
        validation_queries,
        validation_catalog: None,
        two_step_train_queries,
        test_catalogs,
        test_sets,
        texts: Vec::new(),
        extra_texts: Vec::new(),
        fashion_mnist: None,
        text_rows: HashMap::new(),
    };
    Ok(benchmark.with_texts())
}

fn row_ids(catalog: &[BenchmarkItem]) -> HashMap<&str, usize> {
    catalog
        .iter()
        .enumerate()
        .map(|(row, item)| (item.id.as_str(), row))
        .collect()
}

fn row_queries(set: &QuerySet, rows: &HashMap<&str, usize>) -> Result<Vec<RowQuery>> {
    set.queries
        .iter()
        .map(|query| {
            let reference = rows
                .get(query.reference_id.as_str())
                .copied()
                .ok_or_else(|| {
                    TrainerError::InvalidInput(format!(
                        "query set {} names reference {}, which is not in its catalog",
                        set.name, query.reference_id
                    ))
                })?;
            let text = match query.texts.as_slice() {
                [] => {
                    return Err(TrainerError::InvalidInput(format!(
                        "a query of set {} on {} has no modification text",
                        set.name, query.reference_id
                    )))
                }
                [single] => single.clone(),
                texts => join_modifications(texts),
            };
            Ok(RowQuery {
                reference,
                texts: query.texts.clone(),
                text,
                target: query.target_key,
                kind: query.kind.clone(),
            })
        })
        .collect()
}
