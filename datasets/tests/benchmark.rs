//! The common benchmark interface: `--dataset` parsing and the Fashion-MNIST
//! colours benchmark loaded through it.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use densebert4ret_datasets::{
    attribute_code, DatasetError, DatasetSpec, ImageLoader, ImageSource, LoadOptions, QuerySet,
    RetrievalBenchmark, Split, DEFAULT_TEST_QUERY_COUNT,
};

#[test]
fn spec_parses_every_dataset() {
    let cases = [
        ("fmnist-colours", DatasetSpec::FmnistColours { dir: None }),
        (
            "fmnist-colours:/data/fmnist",
            DatasetSpec::FmnistColours {
                dir: Some(PathBuf::from("/data/fmnist")),
            },
        ),
        ("easyvqa-shapes", DatasetSpec::EasyVqaShapes { dir: None }),
        (
            "fashion200k:/data/f200k",
            DatasetSpec::Fashion200k {
                dir: PathBuf::from("/data/f200k"),
            },
        ),
        (
            "mit-states:relative/mit",
            DatasetSpec::MitStates {
                dir: PathBuf::from("relative/mit"),
            },
        ),
        (
            "fashioniq:/data/fiq",
            DatasetSpec::FashionIq {
                dir: PathBuf::from("/data/fiq"),
            },
        ),
    ];
    for (text, expected) in cases {
        let parsed: DatasetSpec = text.parse().unwrap();
        assert_eq!(parsed, expected, "{text}");
        assert_eq!(parsed.to_string(), text);
        // Saved run configurations name the dataset as the command line does.
        let json = serde_json::to_value(&parsed).unwrap();
        assert_eq!(json["dataset"], parsed.name(), "{text}");
        let back: DatasetSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, parsed);
    }
}

#[test]
fn spec_rejects_unknown_or_incomplete_names() {
    for text in [
        "",
        "mnist",
        "fashion200k",
        "mit-states:",
        "fashioniq",
        "fmnist-colours:",
        "Fashion200k:/x",
    ] {
        let error = text.parse::<DatasetSpec>().unwrap_err();
        assert!(
            matches!(error, DatasetError::InvalidDatasetSpec { .. }),
            "{text}: {error}"
        );
        assert!(error.to_string().contains("fashion200k:DIR"), "{error}");
    }
}

#[test]
fn protocols_follow_the_published_papers() {
    let dir = PathBuf::from("/d");
    let f200k = DatasetSpec::Fashion200k { dir: dir.clone() }.protocol();
    assert_eq!(f200k.recall_at, vec![1, 10, 50]);
    assert_eq!(f200k.max_k(), 50);
    assert_eq!(
        DatasetSpec::MitStates { dir: dir.clone() }
            .protocol()
            .recall_at,
        vec![1, 5, 10]
    );
    let fiq = DatasetSpec::FashionIq { dir }.protocol();
    assert_eq!(fiq.recall_at, vec![10, 50]);
    assert!(fiq.average_over_sets);
    assert!(DatasetSpec::FmnistColours { dir: None }.is_offline());
}

#[test]
fn two_step_fraction_outside_unit_range_is_rejected() {
    let options = LoadOptions {
        two_step_train_fraction: 1.5,
        ..LoadOptions::default()
    };
    let error =
        RetrievalBenchmark::load(&DatasetSpec::FmnistColours { dir: None }, &options).unwrap_err();
    assert!(error.to_string().contains("1.5"), "{error}");
}

fn check_set(set: &QuerySet) {
    let keys: HashMap<&str, i64> = set
        .catalog
        .iter()
        .map(|item| (item.id.as_str(), item.key))
        .collect();
    assert_eq!(
        keys.len(),
        set.catalog.len(),
        "ids are unique in {}",
        set.name
    );
    for query in &set.queries {
        assert!(
            keys.contains_key(query.reference_id.as_str()),
            "{}",
            query.reference_id
        );
        assert!(!query.relevant_ids.contains(&query.reference_id));
        assert!(!query.relevant_ids.is_empty());
        for id in query.relevant_ids.iter() {
            assert_eq!(keys[id.as_str()], query.target_key, "{id} in {}", set.name);
        }
        // Every catalog item with the target key is relevant, except the reference.
        let expected = set
            .catalog
            .iter()
            .filter(|item| item.key == query.target_key && item.id != query.reference_id)
            .count();
        assert_eq!(query.relevant_ids.len(), expected);
    }
}

#[test]
fn fmnist_benchmark_through_the_common_interface() {
    let options = LoadOptions {
        train_images: Some(2_000),
        train_queries: Some(600),
        test_queries: None,
        two_step_test_queries: 150,
        two_step_train_fraction: 0.5,
        seed: 21,
    };
    let spec = DatasetSpec::FmnistColours { dir: None };
    let benchmark = RetrievalBenchmark::load(&spec, &options).unwrap();
    assert_eq!(benchmark.protocol.recall_at, vec![1, 5, 10, 50]);
    assert_eq!(benchmark.train.catalog.len(), 2_000);
    assert_eq!(benchmark.train.queries.len(), 600);
    assert_eq!(
        benchmark
            .train
            .queries
            .iter()
            .filter(|query| query.texts.len() == 2)
            .count(),
        300
    );

    let test = benchmark.test_set("test").unwrap();
    assert_eq!(test.catalog.len(), 10_000);
    assert_eq!(test.queries.len(), DEFAULT_TEST_QUERY_COUNT);
    let two_step = benchmark.test_set("two-step").unwrap();
    assert_eq!(two_step.queries.len(), 150);
    assert!(two_step.queries.iter().all(|query| query.texts.len() == 2));
    for set in [&benchmark.train, test, two_step] {
        check_set(set);
    }

    let item = &test.catalog[42];
    assert_eq!(item.id, "fmnist-test-00042");
    assert_eq!(
        item.image,
        ImageSource::FashionMnist {
            split: Split::Test,
            index: 42
        }
    );
    let class = item.metadata["class"].parse().unwrap();
    let colour = item.metadata["colour"].parse().unwrap();
    assert_eq!(item.key, attribute_code(class, colour));
    let image = benchmark.load_image(item).unwrap();
    assert_eq!((image.width(), image.height()), (28, 28));

    // Queries with the same target share one relevant list.
    let mut first_by_key: HashMap<i64, &densebert4ret_datasets::BenchmarkQuery> = HashMap::new();
    let mut shared = 0;
    for query in &test.queries {
        if let Some(first) = first_by_key.get(&query.target_key) {
            assert!(std::sync::Arc::ptr_eq(
                &first.relevant_ids,
                &query.relevant_ids
            ));
            shared += 1;
        } else {
            first_by_key.insert(query.target_key, query);
        }
    }
    assert!(shared > 1_000, "only {shared} queries share a target");

    let again = RetrievalBenchmark::load(&spec, &options).unwrap();
    assert_eq!(again.train.queries, benchmark.train.queries, "seeded");
    let kinds: BTreeSet<&str> = test
        .queries
        .iter()
        .map(|query| query.kind.as_str())
        .collect();
    assert_eq!(kinds, BTreeSet::from(["both", "class", "colour"]));
}

#[test]
fn loader_without_fashion_mnist_names_the_fix() {
    let loader = ImageLoader::default();
    let error = loader
        .load(&ImageSource::FashionMnist {
            split: Split::Test,
            index: 3,
        })
        .unwrap_err();
    assert!(error.to_string().contains("fmnist-test-00003"), "{error}");
    let error = loader
        .load(&ImageSource::File {
            path: PathBuf::from("/nonexistent/image.png"),
        })
        .unwrap_err();
    assert!(
        error.to_string().contains("/nonexistent/image.png"),
        "{error}"
    );
}
