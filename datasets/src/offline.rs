//! [`RetrievalBenchmark`]s of the two offline benchmarks.

use std::path::Path;
use std::sync::Arc;

use crate::benchmark::{
    BenchmarkItem, BenchmarkQuery, DatasetSpec, ImageLoader, ImageSource, KeyGroups, LoadOptions,
    QuerySet, RetrievalBenchmark,
};
use crate::catalog::CatalogItem;
use crate::easyvqa::{
    self, default_shape_test_queries, easyvqa_item_id, generate_shape_queries,
    generate_two_step_shape_queries, shape_code, EasyVqa, EasyVqaSplit, ShapeQuery,
    EASY_VQA_TEST_QUERY_COUNT, EASY_VQA_TEST_QUERY_SEED, EASY_VQA_TWO_STEP_TEST_QUERY_SEED,
};
use crate::error::Result;
use crate::idx::SplitData;
use crate::multistep::{generate_two_step_queries, DEFAULT_TWO_STEP_TEST_QUERY_SEED};
use crate::queries::{
    attribute_code, default_test_queries, generate_queries, sample_indices, Phrasing, Query,
    QueryConfig, DEFAULT_TEST_QUERY_COUNT, DEFAULT_TEST_QUERY_SEED,
};
use crate::{default_data_dir, FashionMnist, QueryKind};

/// Splits `count` training queries into single-step and two-step counts.
pub(crate) fn split_two_step(count: usize, fraction: f64) -> (usize, usize) {
    let two_step = ((count as f64) * fraction).round() as usize;
    let two_step = two_step.min(count);
    (count - two_step, two_step)
}

/// Seed of the training queries, derived from the run seed so that the image
/// subset and the queries use different streams.
pub(crate) fn train_query_seed(seed: u64, two_step: bool) -> u64 {
    seed.wrapping_add(if two_step { 2 } else { 1 })
}

pub(crate) fn load_fmnist_colours(
    spec: &DatasetSpec,
    dir: Option<&Path>,
    options: &LoadOptions,
) -> Result<RetrievalBenchmark> {
    let dir = dir.map_or_else(default_data_dir, Path::to_path_buf);
    let data = Arc::new(FashionMnist::load(&dir)?);

    let train_count = options.train_images.unwrap_or(data.train.len());
    let train_pool = sample_indices(data.train.len(), train_count, options.seed)?;
    let query_count = options.train_queries.unwrap_or(train_pool.len());
    let (single, two_step) = split_two_step(query_count, options.two_step_train_fraction);
    let mut train_queries = generate_queries(
        &data.train,
        &train_pool,
        &QueryConfig {
            count: single,
            phrasing: Phrasing::Train,
            seed: train_query_seed(options.seed, false),
        },
    )?;
    if two_step > 0 {
        train_queries.extend(generate_two_step_queries(
            &data.train,
            &train_pool,
            &QueryConfig {
                count: two_step,
                phrasing: Phrasing::Train,
                seed: train_query_seed(options.seed, true),
            },
        )?);
    }
    let train = fmnist_query_set("train", &data.train, &train_pool, &train_queries)?;

    let test_pool: Vec<usize> = (0..data.test.len()).collect();
    let test_queries = match options.test_queries {
        None | Some(DEFAULT_TEST_QUERY_COUNT) => default_test_queries(&data.test)?,
        Some(count) => generate_queries(
            &data.test,
            &test_pool,
            &QueryConfig {
                count,
                phrasing: Phrasing::Test,
                seed: DEFAULT_TEST_QUERY_SEED,
            },
        )?,
    };
    let mut test = vec![fmnist_query_set(
        "test",
        &data.test,
        &test_pool,
        &test_queries,
    )?];
    if options.two_step_test_queries > 0 {
        let queries = generate_two_step_queries(
            &data.test,
            &test_pool,
            &QueryConfig {
                count: options.two_step_test_queries,
                phrasing: Phrasing::Test,
                seed: DEFAULT_TWO_STEP_TEST_QUERY_SEED,
            },
        )?;
        test.push(fmnist_query_set(
            "two-step", &data.test, &test_pool, &queries,
        )?);
    }

    Ok(RetrievalBenchmark {
        spec: spec.clone(),
        protocol: spec.protocol(),
        train,
        test,
        images: ImageLoader::new(Some(data)),
    })
}

/// Catalog of `pool` and the given queries in the common form.
fn fmnist_query_set(
    name: &str,
    data: &SplitData,
    pool: &[usize],
    queries: &[Query],
) -> Result<QuerySet> {
    let mut catalog = Vec::with_capacity(pool.len());
    for &position in pool {
        let item = CatalogItem::new(data, position)?;
        catalog.push(BenchmarkItem {
            key: attribute_code(item.class, item.colour),
            image: ImageSource::FashionMnist {
                split: item.split,
                index: item.index,
            },
            metadata: item.metadata(),
            id: item.id,
        });
    }
    let groups = KeyGroups::new(&catalog);
    let queries = queries
        .iter()
        .map(|query| {
            let reference_id = query.reference_id();
            BenchmarkQuery {
                relevant_ids: groups.relevant(query.target_code(), &reference_id),
                reference_id,
                texts: query.texts.clone(),
                target_key: query.target_code(),
                kind: query.kind.as_str().to_owned(),
            }
        })
        .collect();
    Ok(QuerySet {
        name: name.to_owned(),
        catalog,
        queries,
    })
}

pub(crate) fn load_easyvqa_shapes(
    spec: &DatasetSpec,
    dir: Option<&Path>,
    options: &LoadOptions,
) -> Result<RetrievalBenchmark> {
    let dir = dir.map_or_else(easyvqa::default_data_dir, Path::to_path_buf);
    let data = EasyVqa::load(&dir)?;

    let train_count = options.train_images.unwrap_or(data.train.len());
    let train_pool = sample_indices(data.train.len(), train_count, options.seed)?;
    let query_count = options.train_queries.unwrap_or(train_pool.len());
    let (single, two_step) = split_two_step(query_count, options.two_step_train_fraction);
    let mut train_queries = generate_shape_queries(
        &data.train,
        &train_pool,
        &QueryConfig {
            count: single,
            phrasing: Phrasing::Train,
            seed: train_query_seed(options.seed, false),
        },
    )?;
    if two_step > 0 {
        train_queries.extend(generate_two_step_shape_queries(
            &data.train,
            &train_pool,
            &QueryConfig {
                count: two_step,
                phrasing: Phrasing::Train,
                seed: train_query_seed(options.seed, true),
            },
        )?);
    }
    let train = shape_query_set("train", &data.train, &train_pool, &train_queries)?;

    let test_pool: Vec<usize> = (0..data.test.len()).collect();
    let test_queries = match options.test_queries {
        None | Some(EASY_VQA_TEST_QUERY_COUNT) => default_shape_test_queries(&data.test)?,
        Some(count) => generate_shape_queries(
            &data.test,
            &test_pool,
            &QueryConfig {
                count,
                phrasing: Phrasing::Test,
                seed: EASY_VQA_TEST_QUERY_SEED,
            },
        )?,
    };
    let mut test = vec![shape_query_set(
        "test",
        &data.test,
        &test_pool,
        &test_queries,
    )?];
    if options.two_step_test_queries > 0 {
        let queries = generate_two_step_shape_queries(
            &data.test,
            &test_pool,
            &QueryConfig {
                count: options.two_step_test_queries,
                phrasing: Phrasing::Test,
                seed: EASY_VQA_TWO_STEP_TEST_QUERY_SEED,
            },
        )?;
        test.push(shape_query_set(
            "two-step", &data.test, &test_pool, &queries,
        )?);
    }

    Ok(RetrievalBenchmark {
        spec: spec.clone(),
        protocol: spec.protocol(),
        train,
        test,
        images: ImageLoader::new(None),
    })
}

/// Report name of a query kind, with the shape in the place of the class.
fn shape_kind_name(kind: QueryKind) -> &'static str {
    match kind {
        QueryKind::Colour => "colour",
        QueryKind::Class => "shape",
        QueryKind::Both => "both",
    }
}

/// Catalog of `pool` and the given easy-VQA queries in the common form.
fn shape_query_set(
    name: &str,
    data: &EasyVqaSplit,
    pool: &[usize],
    queries: &[ShapeQuery],
) -> Result<QuerySet> {
    let mut catalog = Vec::with_capacity(pool.len());
    for &position in pool {
        let image = data.image(position)?;
        catalog.push(BenchmarkItem {
            id: easyvqa_item_id(data.split(), position),
            key: shape_code(image.shape, image.colour),
            image: ImageSource::File {
                path: data.image_path(position),
            },
            metadata: image.metadata(data.split()),
        });
    }
    let groups = KeyGroups::new(&catalog);
    let queries = queries
        .iter()
        .map(|query| {
            let reference_id = query.reference_id();
            BenchmarkQuery {
                relevant_ids: groups.relevant(query.target_code(), &reference_id),
                reference_id,
                texts: query.texts.clone(),
                target_key: query.target_code(),
                kind: shape_kind_name(query.kind).to_owned(),
            }
        })
        .collect();
    Ok(QuerySet {
        name: name.to_owned(),
        catalog,
        queries,
    })
}
