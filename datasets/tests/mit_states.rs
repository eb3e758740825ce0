//! MIT-States reader, noun split and TIRG query checks on image folders
//! written in the layout of the original release.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{save, solid, write};
use densebert4ret_datasets::mit_states::{
    all_adjective_queries, sampled_adjective_queries, MitStates, NounSplit,
    DEFAULT_TEST_NOUN_COUNT, TEST_NOUNS_FILE,
};
use densebert4ret_datasets::{DatasetError, DatasetSpec, LoadOptions, RetrievalBenchmark, Split};

/// Folders and image counts of the fixture.
const STATES: &[(&str, usize)] = &[
    ("ripe apple", 2),
    ("rotten apple", 1),
    ("sliced apple", 1),
    ("adj apple", 3),
    ("broken bottle", 2),
    ("empty bottle", 1),
    ("old castle", 1),
    ("ruined castle", 2),
    ("new chair", 1),
];

fn fixture(root: &Path) {
    for &(folder, count) in STATES {
        for number in 0..count {
            save(
                &root
                    .join("images")
                    .join(folder)
                    .join(format!("img_{number}.jpg")),
                &solid(6, [10 * number as u8, 80, 160]),
            );
        }
    }
    // Folders without a space are not states and are skipped.
    save(&root.join("images/misc/img_0.jpg"), &solid(6, [0, 0, 0]));
    write(&root.join("images/ripe apple/.DS_Store"), "");
}

#[test]
fn folders_become_adjective_noun_pairs() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let data = MitStates::load(dir.path()).unwrap();
    // 3 "adj apple" images and the "misc" folder are skipped.
    assert_eq!(data.images().len(), 11);
    assert!(data.images().iter().all(|image| image.adjective != "adj"));
    assert_eq!(data.images()[0].adjective, "broken");
    assert_eq!(data.images()[0].noun, "bottle");
    assert_eq!(
        data.nouns(),
        BTreeSet::from(["apple", "bottle", "castle", "chair"].map(String::from))
    );
}

#[test]
fn noun_file_selects_test_nouns() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    write(
        &dir.path().join(TEST_NOUNS_FILE),
        "# held-out nouns\napple\n\ncastle\n",
    );
    let data = MitStates::load(dir.path()).unwrap();
    let split = NounSplit::for_root(dir.path()).unwrap();
    let test_nouns = split.test_nouns(&data.nouns()).unwrap();
    assert_eq!(
        test_nouns,
        BTreeSet::from(["apple".to_owned(), "castle".to_owned()])
    );

    let test = data.split(&test_nouns, Split::Test);
    let train = data.split(&test_nouns, Split::Train);
    assert_eq!(test.len(), 7);
    assert_eq!(train.len(), 4);
    assert!(train.iter().all(|image| !test_nouns.contains(&image.noun)));
}

#[test]
fn noun_file_errors_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(TEST_NOUNS_FILE);
    write(&path, "apple\nred apple\n");
    let error = NounSplit::from_file(&path).unwrap_err();
    assert!(
        matches!(error, DatasetError::MalformedLine { line: 2, .. }),
        "{error}"
    );

    fixture(dir.path());
    write(&path, "apple\nunicorn\n");
    let data = MitStates::load(dir.path()).unwrap();
    let error = NounSplit::for_root(dir.path())
        .unwrap()
        .test_nouns(&data.nouns())
        .unwrap_err();
    assert!(error.to_string().contains("unicorn"), "{error}");
}

#[test]
fn seeded_split_draws_the_count() {
    let nouns: BTreeSet<String> = (0..245).map(|index| format!("noun{index:03}")).collect();
    let split = NounSplit::Seeded {
        count: DEFAULT_TEST_NOUN_COUNT,
        seed: 11,
    };
    let test = split.test_nouns(&nouns).unwrap();
    assert_eq!(test.len(), 49);
    assert!(test.is_subset(&nouns));
    assert_eq!(
        test,
        split.test_nouns(&nouns).unwrap(),
        "same seed, same nouns"
    );
    let other = NounSplit::Seeded {
        count: 49,
        seed: 12,
    }
    .test_nouns(&nouns)
    .unwrap();
    assert_ne!(test, other);

    let too_many = NounSplit::Seeded {
        count: 245,
        seed: 1,
    }
    .test_nouns(&nouns)
    .unwrap_err();
    assert!(
        too_many.to_string().contains("cannot hold out 245"),
        "{too_many}"
    );
}

#[test]
fn test_queries_cover_every_other_adjective() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let data = MitStates::load(dir.path()).unwrap();
    let test_nouns = BTreeSet::from(["apple".to_owned(), "chair".to_owned()]);
    let test = data.split(&test_nouns, Split::Test);
    let queries = all_adjective_queries(&test);
    // 4 apple images x 2 other adjectives each; the single-state chair has none.
    assert_eq!(queries.len(), 8);
    for query in &queries {
        let reference = &test[query.reference];
        assert_ne!(query.target_adjective, reference.adjective);
        assert!(!query.relevant.is_empty());
        for &index in &query.relevant {
            assert_eq!(test[index].adjective, query.target_adjective);
            assert_eq!(test[index].noun, reference.noun);
        }
    }
    let ripe_to_rotten = queries
        .iter()
        .filter(|query| {
            test[query.reference].adjective == "ripe" && query.target_adjective == "rotten"
        })
        .count();
    assert_eq!(ripe_to_rotten, 2, "one query per ripe apple image");
}

#[test]
fn training_queries_sample_one_adjective_per_image() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let data = MitStates::load(dir.path()).unwrap();
    let images = data.images().to_vec();
    let queries = sampled_adjective_queries(&images, 5);
    // Every image except the single-state chair gets one query.
    assert_eq!(queries.len(), 10);
    let references: BTreeSet<usize> = queries.iter().map(|query| query.reference).collect();
    assert_eq!(references.len(), 10);
    for query in &queries {
        assert_ne!(query.target_adjective, images[query.reference].adjective);
    }
    assert_eq!(queries, sampled_adjective_queries(&images, 5));
}

#[test]
fn non_image_files_and_bad_folders_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    write(&dir.path().join("images/ripe apple/notes.txt"), "x");
    let error = MitStates::load(dir.path()).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("notes.txt"), "{message}");
    assert!(message.contains("only .jpg files"), "{message}");

    let dir = tempfile::tempdir().unwrap();
    save(
        &dir.path().join("images/very old castle/a.jpg"),
        &solid(4, [1, 2, 3]),
    );
    let error = MitStates::load(dir.path()).unwrap_err();
    assert!(error.to_string().contains("very old castle"), "{error}");

    let dir = tempfile::tempdir().unwrap();
    let error = MitStates::load(dir.path()).unwrap_err();
    assert!(
        error.to_string().contains("images/<adjective noun>"),
        "{error}"
    );
}

#[test]
fn benchmark_uses_the_noun_split() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    write(&dir.path().join(TEST_NOUNS_FILE), "apple\n");
    let spec: DatasetSpec = format!("mit-states:{}", dir.path().display())
        .parse()
        .unwrap();
    let benchmark = RetrievalBenchmark::load(&spec, &LoadOptions::default()).unwrap();
    assert_eq!(benchmark.protocol.recall_at, vec![1, 5, 10]);
    assert_eq!(benchmark.train.catalog.len(), 7);
    assert!(benchmark
        .train
        .catalog
        .iter()
        .all(|item| item.metadata["noun"] != "apple"));

    let test = &benchmark.test[0];
    assert_eq!(test.catalog.len(), 4);
    assert_eq!(test.queries.len(), 8);
    for query in &test.queries {
        assert_eq!(query.kind, "adjective");
        let adjective = &query.texts[0];
        for id in query.relevant_ids.iter() {
            let item = test.catalog.iter().find(|item| &item.id == id).unwrap();
            assert_eq!(&item.metadata["adjective"], adjective);
            assert_eq!(item.key, query.target_key);
        }
    }
    assert!(test.catalog[0].id.starts_with("mits-test-"));
    let image = benchmark.load_image(&test.catalog[0]).unwrap();
    assert_eq!((image.width(), image.height()), (6, 6));
}
