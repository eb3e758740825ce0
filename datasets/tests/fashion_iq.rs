//! FashionIQ reader checks on caption, split and image files written in the
//! layout of the original release.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use common::{save, solid, write};
use densebert4ret_datasets::fashion_iq::{image_files, FashionIqCategory, FashionIqSplit};
use densebert4ret_datasets::{DatasetError, DatasetSpec, LoadOptions, RetrievalBenchmark};

/// Writes both split and caption files of one category and split.
fn write_category(root: &Path, category: &str, split: &str, images: &[&str], captions: &str) {
    let list: Vec<String> = images.iter().map(|name| format!("\"{name}\"")).collect();
    write(
        &root.join(format!("image_splits/split.{category}.{split}.json")),
        &format!("[{}]", list.join(", ")),
    );
    write(
        &root.join(format!("captions/cap.{category}.{split}.json")),
        captions,
    );
}

fn triplet(candidate: &str, target: &str, first: &str, second: &str) -> String {
    format!(
        "{{\"target\": \"{target}\", \"candidate\": \"{candidate}\", \"captions\": [\"{first}\", \"{second}\"]}}"
    )
}

/// Writes every category with two train and three val images, all PNG except one JPEG.
fn fixture(root: &Path) {
    for (offset, category) in ["dress", "shirt", "toptee"].into_iter().enumerate() {
        let base = 100 * (offset + 1);
        let train = [format!("B{base:04}"), format!("B{:04}", base + 1)];
        let val = [
            format!("V{base:04}"),
            format!("V{:04}", base + 1),
            format!("V{:04}", base + 2),
        ];
        write_category(
            root,
            category,
            "train",
            &[&train[0], &train[1]],
            &format!(
                "[\n  {},\n  {}\n]",
                triplet(&train[0], &train[1], "is shorter", "has no sleeves"),
                triplet(&train[1], &train[0], " is longer ", "has sleeves")
            ),
        );
        write_category(
            root,
            category,
            "val",
            &[&val[0], &val[1], &val[2]],
            &format!(
                "[{}, {}]",
                triplet(&val[0], &val[2], "is red", "is darker"),
                triplet(&val[1], &val[0], "is lighter", "has a collar")
            ),
        );
        for name in train.iter().chain(&val) {
            save(
                &root.join(format!("images/{name}.png")),
                &solid(5, [30, 60, 90]),
            );
        }
    }
    // A JPEG in place of one PNG is found too.
    std::fs::remove_file(root.join("images/V0100.png")).unwrap();
    save(&root.join("images/V0100.jpg"), &solid(7, [30, 60, 90]));
}

#[test]
fn modification_text_joins_both_captions() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let files = image_files(dir.path()).unwrap();
    let train =
        FashionIqSplit::load(dir.path(), FashionIqCategory::Dress, "train", &files).unwrap();
    assert_eq!(train.images, vec!["B0100".to_owned(), "B0101".to_owned()]);
    assert_eq!(train.triplets.len(), 2);
    assert_eq!(
        train.triplets[0].modification_text(),
        "is shorter and has no sleeves"
    );
    assert_eq!(
        train.triplets[1].modification_text(),
        "is longer and has sleeves"
    );
    assert_eq!(train.item_id("B0100"), "fiq-dress-B0100");
}

#[test]
fn image_files_accept_png_and_jpeg() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    save(&dir.path().join("images/V0200.jpg"), &solid(3, [0, 0, 0]));
    let files = image_files(dir.path()).unwrap();
    assert_eq!(files["V0100"], dir.path().join("images/V0100.jpg"));
    assert_eq!(
        files["V0200"],
        dir.path().join("images/V0200.png"),
        "PNG wins over JPEG"
    );
}

#[test]
fn missing_images_drop_their_triplets() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    std::fs::remove_file(dir.path().join("images/V0302.png")).unwrap();
    let files = image_files(dir.path()).unwrap();
    let val = FashionIqSplit::load(dir.path(), FashionIqCategory::Toptee, "val", &files).unwrap();
    assert_eq!(val.images, vec!["V0300".to_owned(), "V0301".to_owned()]);
    assert_eq!(val.triplets.len(), 1);
    assert_eq!(val.triplets[0].candidate, "V0301");
}

#[test]
fn malformed_caption_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let files = image_files(dir.path()).unwrap();

    let captions = dir.path().join("captions/cap.shirt.val.json");
    write(
        &captions,
        "[\n  {\"candidate\": \"V0200\", \"target\": \"V0201\"}\n]",
    );
    let error =
        FashionIqSplit::load(dir.path(), FashionIqCategory::Shirt, "val", &files).unwrap_err();
    match &error {
        DatasetError::InvalidJson { path, line, .. } => {
            assert_eq!(path, &captions);
            assert_eq!(*line, 2);
        }
        other => panic!("expected invalid JSON, got {other}"),
    }
    assert!(error.to_string().contains("captions"), "{error}");

    write(
        &captions,
        &format!(
            "[{}]",
            "{\"candidate\": \"V0200\", \"target\": \"V0201\", \"captions\": [\"is blue\"]}"
        ),
    );
    let error =
        FashionIqSplit::load(dir.path(), FashionIqCategory::Shirt, "val", &files).unwrap_err();
    assert!(
        error.to_string().contains("entry 0 has 1 captions"),
        "{error}"
    );

    write(
        &captions,
        &format!("[{}]", triplet("V0200", "X9999", "a", "b")),
    );
    let error =
        FashionIqSplit::load(dir.path(), FashionIqCategory::Shirt, "val", &files).unwrap_err();
    assert!(error.to_string().contains("\"X9999\""), "{error}");
    assert!(
        error.to_string().contains("split.shirt.val.json"),
        "{error}"
    );
}

#[test]
fn missing_files_name_the_layout() {
    let dir = tempfile::tempdir().unwrap();
    let error = image_files(dir.path()).unwrap_err();
    assert!(error.to_string().contains("images"), "{error}");

    fixture(dir.path());
    std::fs::remove_file(dir.path().join("image_splits/split.toptee.val.json")).unwrap();
    let spec = DatasetSpec::FashionIq {
        dir: dir.path().to_owned(),
    };
    let error = RetrievalBenchmark::load(&spec, &LoadOptions::default()).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("split.toptee.val.json"), "{message}");
    assert!(
        message.contains("image_splits/split.<category>.<split>.json"),
        "{message}"
    );
}

#[test]
fn unknown_category_lists_the_three() {
    let error = "pants".parse::<FashionIqCategory>().unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("unknown FashionIQ category \"pants\""),
        "{message}"
    );
    assert!(message.contains("dress, shirt, toptee"), "{message}");
    assert_eq!(
        "toptee".parse::<FashionIqCategory>().unwrap(),
        FashionIqCategory::Toptee
    );
}

#[test]
fn benchmark_has_one_test_set_per_category() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let spec: DatasetSpec = format!("fashioniq:{}", dir.path().display())
        .parse()
        .unwrap();
    let benchmark = RetrievalBenchmark::load(&spec, &LoadOptions::default()).unwrap();
    assert_eq!(benchmark.protocol.recall_at, vec![10, 50]);
    assert!(benchmark.protocol.average_over_sets);

    let names: Vec<&str> = benchmark.test.iter().map(|set| set.name.as_str()).collect();
    assert_eq!(names, vec!["dress", "shirt", "toptee"]);
    for set in &benchmark.test {
        assert_eq!(set.catalog.len(), 3, "{}", set.name);
        assert_eq!(set.queries.len(), 2, "{}", set.name);
        let prefix = format!("fiq-{}-", set.name);
        assert!(set.catalog.iter().all(|item| item.id.starts_with(&prefix)));
        let keys: BTreeSet<i64> = set.catalog.iter().map(|item| item.key).collect();
        assert_eq!(keys.len(), 3, "every FashionIQ item has its own key");
        for query in &set.queries {
            assert_eq!(query.relevant_ids.len(), 1);
            let target = set
                .catalog
                .iter()
                .find(|item| item.id == query.relevant_ids[0])
                .unwrap();
            assert_eq!(target.key, query.target_key);
            assert!(query.texts[0].contains(" and "));
        }
    }
    assert_eq!(benchmark.train.catalog.len(), 6);
    assert_eq!(benchmark.train.queries.len(), 6);
    let keys: BTreeSet<i64> = benchmark
        .train
        .catalog
        .iter()
        .map(|item| item.key)
        .collect();
    assert_eq!(keys.len(), 6, "train keys are unique across categories");

    let dress = benchmark.test_set("dress").unwrap();
    let query = &dress.queries[0];
    assert_eq!(query.reference_id, "fiq-dress-V0100");
    assert_eq!(query.texts, vec!["is red and is darker".to_owned()]);
    assert_eq!(
        query.relevant_ids.to_vec(),
        vec!["fiq-dress-V0102".to_owned()]
    );
    let reference = dress
        .catalog
        .iter()
        .find(|item| item.id == query.reference_id)
        .unwrap();
    let image = benchmark.load_image(reference).unwrap();
    assert_eq!(
        (image.width(), image.height()),
        (7, 7),
        "the JPEG is decoded"
    );

    let by_id: HashMap<&str, &str> = dress
        .catalog
        .iter()
        .map(|item| (item.id.as_str(), item.metadata["name"].as_str()))
        .collect();
    assert_eq!(by_id["fiq-dress-V0101"], "V0101");
}
