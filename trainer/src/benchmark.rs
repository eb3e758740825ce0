//! The training and evaluation data of one run: a seeded subset of the
//! Fashion-MNIST train split with train-phrasing queries, and the test split
//! as the catalog with test-phrasing queries, plus two-step queries over both.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use densebert4ret_datasets::{
    default_test_queries, default_two_step_test_queries, generate_queries,
    generate_two_step_queries, sample_indices, AttributeIndex, FashionMnist, Phrasing, Query,
    QueryConfig, DEFAULT_TEST_QUERY_COUNT, DEFAULT_TEST_QUERY_SEED,
    DEFAULT_TWO_STEP_TEST_QUERY_COUNT, DEFAULT_TWO_STEP_TEST_QUERY_SEED,
};
use densebert4ret_model::join_modifications;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainerError};

/// Sizes and seed of the benchmark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchmarkConfig {
    /// Directory with the Fashion-MNIST `.gz` files.
    pub data_dir: PathBuf,
    /// Train-split images drawn for training.
    pub train_images: usize,
    /// Training queries, drawn over the training images.
    pub train_queries: usize,
    /// Queries held out from the same draw for validation.
    pub validation_queries: usize,
    /// Test queries over the 10,000 test images.
    pub test_queries: usize,
    /// Seed of the image subset and of the training queries.
    pub seed: u64,
    /// Two-step training queries over the training images, added to `train_queries`.
    #[serde(default)]
    pub two_step_train_queries: usize,
    /// Two-step test queries over the 10,000 test images, evaluated separately; the
    /// datasets crate's standard set when equal to its default count.
    #[serde(default)]
    pub two_step_test_queries: usize,
}

/// Images, queries and texts of one run.
#[derive(Debug)]
pub struct Benchmark {
    /// Both Fashion-MNIST splits.
    pub data: FashionMnist,
    /// Sorted train-split indices used for training.
    pub train_pool: Vec<usize>,
    /// Training queries with train phrasings.
    pub train_queries: Vec<Query>,
    /// Held-out queries with train phrasings, whose relevant items come from `train_pool`.
    ///
    /// NOTE: their reference and relevant images are training images, so the validation
    /// recall reads higher than the test recall; a split over unseen train-split images
    /// would need their backbone features in the cache too.
    pub validation_queries: Vec<Query>,
    /// Test queries with test phrasings, whose relevant items come from the test split.
    pub test_queries: Vec<Query>,
    /// `train_pool` grouped by (class, colour).
    pub train_index: AttributeIndex,
    /// Two-step training queries with train phrasings, texts joined in order.
    pub two_step_train_queries: Vec<Query>,
    /// Two-step test queries with test phrasings over the test split.
    pub two_step_test_queries: Vec<Query>,
    /// Sorted unique texts of the single-step queries. The feature cache is keyed on these.
    pub texts: Vec<String>,
    /// Sorted unique joined texts of the two-step queries that are not in `texts`. Their
    /// feature rows follow those of `texts`.
    pub two_step_texts: Vec<String>,
    text_rows: HashMap<String, usize>,
    pool_rows: HashMap<usize, usize>,
}

impl Benchmark {
    /// Loads Fashion-MNIST and draws the subset and queries.
    pub fn build(config: &BenchmarkConfig) -> Result<Self> {
        let data = FashionMnist::load(&config.data_dir)?;
        if config.train_images > data.train.len() {
            return Err(TrainerError::InvalidInput(format!(
                "--train-images is {}, but the train split has only {} images",
                config.train_images,
                data.train.len()
            )));
        }
        let train_pool = sample_indices(data.train.len(), config.train_images, config.seed)?;
        let train_index = AttributeIndex::new(&data.train, &train_pool)?;

        let drawn = config.train_queries + config.validation_queries;
        let query_config = QueryConfig {
            count: drawn,
            phrasing: Phrasing::Train,
            seed: config.seed.wrapping_add(1),
        };
        let mut train_queries = generate_queries(&data.train, &train_pool, &query_config)?;
        let validation_queries = train_queries.split_off(config.train_queries);

        let test_queries = if config.test_queries == DEFAULT_TEST_QUERY_COUNT {
            default_test_queries(&data.test)?
        } else {
            let pool: Vec<usize> = (0..data.test.len()).collect();
            let query_config = QueryConfig {
                count: config.test_queries,
                phrasing: Phrasing::Test,
                seed: DEFAULT_TEST_QUERY_SEED,
            };
            generate_queries(&data.test, &pool, &query_config)?
        };

        let texts: Vec<String> = train_queries
            .iter()
            .chain(&validation_queries)
            .chain(&test_queries)
            .map(|query| query.text.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
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
        // The text encoder reads a multi-step query as the texts joined by the model crate,
        // exactly as the serving path joins them.
        let rejoin = |mut queries: Vec<Query>| -> Vec<Query> {
            for query in &mut queries {
                if !query.texts.is_empty() {
                    query.text = join_modifications(&query.texts);
                }
            }
            queries
        };
        let two_step_train_queries = rejoin(two_step_train_queries);
        let two_step_test_queries = rejoin(two_step_test_queries);
        let single_step: BTreeSet<&String> = texts.iter().collect();
        let two_step_texts: Vec<String> = two_step_train_queries
            .iter()
            .chain(&two_step_test_queries)
            .map(|query| &query.text)
            .filter(|text| !single_step.contains(text))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let text_rows = texts
            .iter()
            .chain(&two_step_texts)
            .enumerate()
            .map(|(row, text)| (text.clone(), row))
            .collect();
        let pool_rows = train_pool
            .iter()
            .enumerate()
            .map(|(row, &index)| (index, row))
            .collect();

        Ok(Self {
            data,
            train_pool,
            train_queries,
            validation_queries,
            test_queries,
            train_index,
            two_step_train_queries,
            two_step_test_queries,
            texts,
            two_step_texts,
            text_rows,
            pool_rows,
        })
    }

    /// Row of `text` in the text feature matrix: its row in [`Benchmark::texts`], or
    /// `texts.len()` plus its row in [`Benchmark::two_step_texts`].
    pub fn text_row(&self, text: &str) -> Result<usize> {
        self.text_rows.get(text).copied().ok_or_else(|| {
            TrainerError::InvalidInput(format!("text {text:?} is not among the benchmark texts"))
        })
    }

    /// Row of train-split image `index` in [`Benchmark::train_pool`] and in the train feature matrix.
    pub fn pool_row(&self, index: usize) -> Result<usize> {
        self.pool_rows.get(&index).copied().ok_or_else(|| {
            TrainerError::InvalidInput(format!("train image {index} is not in the training subset"))
        })
    }
}
