//! Fashion200k reader and TIRG query checks on label files written in the
//! layout of the TIRG release.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{save, solid, write};
use densebert4ret_datasets::fashion200k::{
    neighbour_descriptions, one_word_difference, one_word_queries, read_test_queries, test_queries,
    Fashion200kCategory, Fashion200kSplit, TEST_QUERIES_FILE,
};
use densebert4ret_datasets::{DatasetError, DatasetSpec, LoadOptions, RetrievalBenchmark, Split};

const DRESS_TRAIN: &str = "women/dresses/casual/1001/1001_0.jpeg\t0.91\tred floral midi dress\n\
women/dresses/casual/1002/1002_0.jpeg\t0.87\tblue floral midi dress\n\
women/dresses/casual/1003/1003_0.jpeg\t0.64\tred floral maxi dress\n\
women/dresses/casual/1004/1004_0.jpeg\t0.77\tblack leather mini dress\n";

const TOP_TRAIN: &str = "women/tops/blouses/2001/2001_1.jpeg\t0.95\twhite silk blouse\n\
\n\
women/tops/blouses/2002/2002_0.jpeg\t0.52\tblack silk blouse\n";

const DRESS_TEST: &str = "women/dresses/casual/3001/3001_0.jpeg\t0.90\tred floral midi dress\n\
women/dresses/casual/3002/3002_0.jpeg\t0.80\tblue floral midi dress\n\
women/dresses/casual/3003/3003_0.jpeg\t0.70\tblue floral midi dress\n\
women/dresses/casual/3004/3004_0.jpeg\t0.60\tgreen floral midi dress\n\
women/dresses/casual/3005/3005_0.jpeg\t0.50\tstriped cotton shirt dress\n";

/// Writes train and test label files and one real image under `root`.
fn fixture(root: &Path) {
    write(&root.join("labels/dress_train_detect_all.txt"), DRESS_TRAIN);
    write(&root.join("labels/top_train_detect_all.txt"), TOP_TRAIN);
    write(&root.join("labels/dress_test_detect_all.txt"), DRESS_TEST);
    save(
        &root.join("women/dresses/casual/3001/3001_0.jpeg"),
        &solid(8, [200, 10, 10]),
    );
}

#[test]
fn label_files_load_in_category_order() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let train = Fashion200kSplit::load(dir.path(), Split::Train).unwrap();
    assert_eq!(train.len(), 6, "the blank line is skipped");
    assert_eq!(train.images()[0].category, Fashion200kCategory::Dress);
    assert_eq!(train.images()[4].category, Fashion200kCategory::Top);
    assert_eq!(train.images()[0].description, "red floral midi dress");
    assert_eq!(
        train.images()[0].path,
        "women/dresses/casual/1001/1001_0.jpeg"
    );
    assert!((train.images()[5].detection_score - 0.52).abs() < 1e-12);
    assert_eq!(train.item_id(5), "f200k-train-000005");
    assert_eq!(
        train.image_path(0).unwrap(),
        dir.path().join("women/dresses/casual/1001/1001_0.jpeg")
    );

    let test = Fashion200kSplit::load(dir.path(), Split::Test).unwrap();
    assert_eq!(test.len(), 5);
}

#[test]
fn descriptions_collapse_whitespace() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("labels/skirt_test_detect_all.txt"),
        "a/1.jpeg\t0.5\t  pleated   wool\tskirt  \n",
    );
    let error = Fashion200kSplit::load(dir.path(), Split::Test).unwrap_err();
    // A fourth tab-separated field is malformed even when it looks like text.
    assert!(
        matches!(error, DatasetError::MalformedLine { line: 1, .. }),
        "{error}"
    );

    write(
        &dir.path().join("labels/skirt_test_detect_all.txt"),
        "a/1.jpeg\t0.5\t  pleated   wool skirt  \n",
    );
    let test = Fashion200kSplit::load(dir.path(), Split::Test).unwrap();
    assert_eq!(test.images()[0].description, "pleated wool skirt");
}

#[test]
fn one_word_difference_finds_the_swapped_words() {
    assert_eq!(
        one_word_difference("red floral midi dress", "blue floral midi dress"),
        Some(("red".to_owned(), "blue".to_owned()))
    );
    assert_eq!(
        one_word_difference("red floral midi dress", "red floral maxi dress"),
        Some(("midi".to_owned(), "maxi".to_owned()))
    );
    assert_eq!(
        one_word_difference("red floral midi dress", "red floral midi dress"),
        None
    );
    assert_eq!(
        one_word_difference("red floral midi dress", "blue floral maxi dress"),
        None
    );
    assert_eq!(one_word_difference("red dress", "red midi dress"), None);
    // The same words in another order differ by more than one word.
    assert_eq!(
        one_word_difference("red long dress", "long red dress"),
        None
    );
}

#[test]
fn neighbours_share_a_parent_description() {
    let neighbours = neighbour_descriptions(&[
        "red floral midi dress",
        "blue floral midi dress",
        "red floral maxi dress",
        "black leather mini dress",
    ]);
    let red: BTreeSet<(String, String, String)> = neighbours["red floral midi dress"]
        .iter()
        .cloned()
        .collect();
    assert_eq!(
        red,
        BTreeSet::from([
            (
                "blue floral midi dress".to_owned(),
                "red".to_owned(),
                "blue".to_owned()
            ),
            (
                "red floral maxi dress".to_owned(),
                "midi".to_owned(),
                "maxi".to_owned()
            ),
        ])
    );
    assert!(!neighbours.contains_key("black leather mini dress"));
    // "blue floral midi dress" and "red floral maxi dress" differ by two words.
    assert_eq!(neighbours["blue floral midi dress"].len(), 1);
}

#[test]
fn built_queries_follow_tirg() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let test = Fashion200kSplit::load(dir.path(), Split::Test).unwrap();
    let queries = one_word_queries(&test, 7);
    // Every image but the striped shirt dress has a one-word neighbour.
    assert_eq!(queries.len(), 4);
    for query in &queries {
        let reference = &test.images()[query.reference].description;
        let (removed, added) = one_word_difference(reference, &query.target_description)
            .expect("target differs by one word");
        assert_eq!(query.text, format!("replace {removed} with {added}"));
        let expected: Vec<usize> = (0..test.len())
            .filter(|&index| test.images()[index].description == query.target_description)
            .collect();
        assert_eq!(query.relevant, expected);
        assert!(!query.relevant.contains(&query.reference));
    }
    assert_eq!(
        queries,
        one_word_queries(&test, 7),
        "same seed, same queries"
    );
}

#[test]
fn test_queries_file_is_read_when_present() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    write(
        &dir.path().join(TEST_QUERIES_FILE),
        "women/dresses/casual/3001/3001_0.jpeg women/dresses/casual/3002/3002_0.jpeg\n\
         women/dresses/casual/3004/3004_0.jpeg women/dresses/casual/3001/3001_0.jpeg\n",
    );
    let test = Fashion200kSplit::load(dir.path(), Split::Test).unwrap();
    let queries = test_queries(dir.path(), &test).unwrap();
    assert_eq!(queries.len(), 2);
    assert_eq!(queries[0].reference, 0);
    assert_eq!(queries[0].text, "replace red with blue");
    assert_eq!(
        queries[0].relevant,
        vec![1, 2],
        "both blue midi dresses are relevant"
    );
    assert_eq!(queries[1].text, "replace green with red");
    assert_eq!(queries[1].relevant, vec![0]);
}

#[test]
fn test_queries_file_errors_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let test = Fashion200kSplit::load(dir.path(), Split::Test).unwrap();
    let path = dir.path().join(TEST_QUERIES_FILE);

    write(&path, "women/dresses/casual/3001/3001_0.jpeg women/dresses/casual/3002/3002_0.jpeg\nonly-one-path\n");
    let error = read_test_queries(&path, &test).unwrap_err();
    assert!(
        matches!(error, DatasetError::MalformedLine { line: 2, .. }),
        "{error}"
    );

    write(
        &path,
        "women/dresses/casual/3001/3001_0.jpeg women/unknown.jpeg\n",
    );
    let error = read_test_queries(&path, &test).unwrap_err();
    assert!(
        error.to_string().contains("not in the test split"),
        "{error}"
    );

    write(
        &path,
        "women/dresses/casual/3001/3001_0.jpeg women/dresses/casual/3005/3005_0.jpeg\n",
    );
    let error = read_test_queries(&path, &test).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("do not differ by exactly one word"),
        "{error}"
    );
}

#[test]
fn malformed_label_lines_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("labels/pants_train_detect_all.txt");

    write(
        &path,
        "a/1.jpeg\t0.9\tblue jeans\na/2.jpeg 0.9 grey jeans\n",
    );
    let error = Fashion200kSplit::load(dir.path(), Split::Train).unwrap_err();
    match &error {
        DatasetError::MalformedLine {
            path: file,
            line,
            message,
            ..
        } => {
            assert_eq!(file, &path);
            assert_eq!(*line, 2);
            assert!(message.contains("3 tab-separated fields"), "{message}");
        }
        other => panic!("expected a malformed line, got {other}"),
    }
    assert!(
        error.to_string().contains("pants_train_detect_all.txt:2"),
        "{error}"
    );

    write(&path, "a/1.jpeg\thigh\tblue jeans\n");
    let error = Fashion200kSplit::load(dir.path(), Split::Train).unwrap_err();
    assert!(
        error.to_string().contains("detection score \"high\""),
        "{error}"
    );

    write(&path, "a/1.jpeg\t0.3\t   \n");
    let error = Fashion200kSplit::load(dir.path(), Split::Train).unwrap_err();
    assert!(
        error.to_string().contains("description is empty"),
        "{error}"
    );
}

#[test]
fn unknown_category_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("labels/shoes_train_detect_all.txt"),
        "a/1.jpeg\t0.9\tblack boots\n",
    );
    let error = Fashion200kSplit::load(dir.path(), Split::Train).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("shoes_train_detect_all.txt"), "{message}");
    assert!(
        message.contains("unknown Fashion200k category \"shoes\""),
        "{message}"
    );
    assert!(
        message.contains("dress, jacket, pants, skirt, top"),
        "{message}"
    );
}

#[test]
fn missing_labels_folder_names_the_layout() {
    let dir = tempfile::tempdir().unwrap();
    let error = Fashion200kSplit::load(dir.path(), Split::Train).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("labels"), "{message}");
    assert!(
        message.contains("<category>_<split>_detect_all.txt"),
        "{message}"
    );

    write(
        &dir.path().join("labels/dress_test_detect_all.txt"),
        DRESS_TEST,
    );
    let error = Fashion200kSplit::load(dir.path(), Split::Train).unwrap_err();
    assert!(error.to_string().contains("no train label file"), "{error}");
}

#[test]
fn benchmark_exposes_catalog_and_queries() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let spec: DatasetSpec = format!("fashion200k:{}", dir.path().display())
        .parse()
        .unwrap();
    let benchmark = RetrievalBenchmark::load(&spec, &LoadOptions::default()).unwrap();
    assert_eq!(benchmark.protocol.recall_at, vec![1, 10, 50]);
    assert_eq!(benchmark.train.catalog.len(), 6);
    // Train descriptions with a neighbour: red midi, blue midi, red maxi, white blouse, black blouse.
    assert_eq!(benchmark.train.queries.len(), 5);
    assert_eq!(benchmark.test.len(), 1);

    let test = &benchmark.test[0];
    let ids: BTreeSet<&str> = test.catalog.iter().map(|item| item.id.as_str()).collect();
    for query in &test.queries {
        assert!(ids.contains(query.reference_id.as_str()));
        assert_eq!(query.texts.len(), 1);
        assert!(query.texts[0].starts_with("replace "));
        assert!(!query.relevant_ids.is_empty());
        for id in query.relevant_ids.iter() {
            let item = test.catalog.iter().find(|item| &item.id == id).unwrap();
            assert_eq!(item.key, query.target_key);
            assert_ne!(id, &query.reference_id);
        }
    }

    let first = &test.catalog[0];
    assert_eq!(first.metadata["description"], "red floral midi dress");
    assert_eq!(first.metadata["category"], "dress");
    let image = benchmark.load_image(first).unwrap();
    assert_eq!((image.width(), image.height()), (8, 8));
    let error = benchmark.load_image(&test.catalog[1]).unwrap_err();
    assert!(error.to_string().contains("3002_0.jpeg"), "{error}");
}

#[test]
fn train_subsets_are_seeded() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let spec = DatasetSpec::Fashion200k {
        dir: dir.path().to_owned(),
    };
    let options = LoadOptions {
        train_queries: Some(2),
        seed: 3,
        ..LoadOptions::default()
    };
    let first = RetrievalBenchmark::load(&spec, &options).unwrap();
    let second = RetrievalBenchmark::load(&spec, &options).unwrap();
    assert_eq!(first.train.queries.len(), 2);
    assert_eq!(first.train.queries, second.train.queries);

    let options = LoadOptions {
        train_images: Some(3),
        ..LoadOptions::default()
    };
    let subset = RetrievalBenchmark::load(&spec, &options).unwrap();
    assert_eq!(subset.train.catalog.len(), 3);
    let ids: BTreeSet<&str> = subset
        .train
        .catalog
        .iter()
        .map(|item| item.id.as_str())
        .collect();
    for query in &subset.train.queries {
        assert!(ids.contains(query.reference_id.as_str()));
        assert!(query
            .relevant_ids
            .iter()
            .all(|id| ids.contains(id.as_str())));
    }
}

#[test]
fn reordered_words_are_not_neighbours() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("labels/dress_test_detect_all.txt"),
        "a/1.jpeg\t0.9\tred long dress\na/2.jpeg\t0.9\tlong red dress\na/3.jpeg\t0.9\tred red dress\na/4.jpeg\t0.9\tred blue dress\n",
    );
    let test = Fashion200kSplit::load(dir.path(), Split::Test).unwrap();
    let queries = one_word_queries(&test, 1);
    let pairs: BTreeSet<(String, String)> = queries
        .iter()
        .map(|query| {
            (
                test.images()[query.reference].description.clone(),
                query.target_description.clone(),
            )
        })
        .collect();
    for (source, target) in &pairs {
        assert!(
            one_word_difference(source, target).is_some(),
            "{source:?} -> {target:?}"
        );
    }
    // "red long dress" and "long red dress" share the parent "long dress" by
    // removing the same word, so they are not a one-word swap.
    assert!(!pairs.contains(&("red long dress".to_owned(), "long red dress".to_owned())));
    assert!(!pairs.contains(&("long red dress".to_owned(), "red long dress".to_owned())));
}

#[test]
fn large_parent_groups_stay_one_word_apart() {
    // 3,000 colours of one dress share the parent "floral dress", the shape
    // that would make an all-pairs neighbour list quadratic.
    let dir = tempfile::tempdir().unwrap();
    let lines: String = (0..3_000)
        .map(|index| format!("a/{index}.jpeg\t0.5\tcolour{index} floral dress\n"))
        .collect();
    write(
        &dir.path().join("labels/dress_train_detect_all.txt"),
        &lines,
    );
    let train = Fashion200kSplit::load(dir.path(), Split::Train).unwrap();
    let queries = one_word_queries(&train, 2);
    assert_eq!(queries.len(), 3_000);
    for query in &queries {
        let source = &train.images()[query.reference].description;
        let (removed, added) = one_word_difference(source, &query.target_description).unwrap();
        assert_eq!(query.text, format!("replace {removed} with {added}"));
        assert_eq!(query.relevant.len(), 1);
    }
    let targets: BTreeSet<&str> = queries
        .iter()
        .map(|query| query.target_description.as_str())
        .collect();
    assert!(
        targets.len() > 1_000,
        "targets are spread over the group: {}",
        targets.len()
    );
}
