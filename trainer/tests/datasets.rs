//! End-to-end training runs with the real backbones on every dataset other than
//! Fashion-MNIST colours: the published datasets from fixture folders written in
//! their published layouts, and easy-VQA shapes from its packaged data. Each run
//! must write a metrics file with the Recall@K cut-offs of the dataset's protocol.
//! Fine-tuning of the last image block and the top text layer runs on the MIT-States
//! fixture: the written model directory, its re-evaluation, and a resumed fine-tuning.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use densebert4ret_datasets::{default_data_dir, DatasetSpec};
use densebert4ret_model::{HeadConfig, ImageArchitecture, Pooling};
use densebert4ret_trainer::benchmark::{Benchmark, BenchmarkConfig};
use densebert4ret_trainer::evaluate::Method;
use densebert4ret_trainer::features::FeatureSpec;
use densebert4ret_trainer::finetune::{load_or_compute_trunks, FineTuneSpec, Tails};
use densebert4ret_trainer::offline::{evaluate_model_dir, EvaluateConfig};
use densebert4ret_trainer::report::{Metrics, METRICS_FILE};
use densebert4ret_trainer::run::{run, RunConfig};
use densebert4ret_trainer::train::{fine_tune_heads, Checkpointing, TrainSettings, Variant};
use image::{Rgb, RgbImage};
use tch::Tensor;

/// Root of the trained weights: `$DB4R_ARTIFACTS`, or `artifacts/` of the workspace.
fn artifacts() -> PathBuf {
    std::env::var_os("DB4R_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../artifacts"))
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Saves a 12-pixel image filled with `rgb`, in the format the extension names.
fn save_solid(path: &Path, rgb: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_pixel(12, 12, Rgb(rgb)).save(path).unwrap();
}

fn colour_of(word: &str) -> [u8; 3] {
    match word {
        "red" => [200, 20, 20],
        "blue" => [20, 20, 200],
        "black" => [10, 10, 10],
        "green" => [20, 180, 40],
        "white" => [240, 240, 240],
        _ => [120, 120, 120],
    }
}

/// Fashion200k as released with TIRG (Vo et al., CVPR 2019): `labels/CATEGORY_SPLIT_detect_all.txt`
/// with `PATH<TAB>SCORE<TAB>DESCRIPTION` lines, and the images at those paths.
fn fashion200k_fixture(root: &Path) {
    let mut lines = Vec::new();
    let mut number = 1000;
    for split in ["train", "test"] {
        lines.clear();
        for colour in ["red", "blue", "black", "green"] {
            for pattern in ["floral", "striped"] {
                for length in ["midi", "maxi"] {
                    number += 1;
                    let path = format!("women/dresses/casual/{number}/{number}_0.jpeg");
                    lines.push(format!("{path}\t0.9\t{colour} {pattern} {length} dress"));
                    save_solid(&root.join(&path), colour_of(colour));
                }
            }
        }
        write(
            &root.join(format!("labels/dress_{split}_detect_all.txt")),
            &(lines.join("\n") + "\n"),
        );
    }
}

/// MIT-States (Isola, Lim and Adelson, CVPR 2015): `images/ADJECTIVE NOUN/*.jpg`, with the
/// held-out nouns listed in `test_nouns.txt`.
fn mit_states_fixture(root: &Path) {
    let states = [
        ("ripe", "apple"),
        ("rotten", "apple"),
        ("sliced", "apple"),
        ("broken", "bottle"),
        ("empty", "bottle"),
        ("full", "bottle"),
        ("old", "castle"),
        ("ruined", "castle"),
        ("new", "chair"),
        ("broken", "chair"),
        ("wooden", "chair"),
    ];
    for (position, (adjective, noun)) in states.iter().enumerate() {
        for number in 0..3u8 {
            save_solid(
                &root
                    .join("images")
                    .join(format!("{adjective} {noun}"))
                    .join(format!("img_{number}.jpg")),
                [20 * position as u8, 40 * number, 150],
            );
        }
    }
    write(&root.join("test_nouns.txt"), "apple\n");
}

/// FashionIQ (Wu et al., CVPR 2021): `image_splits/split.CATEGORY.SPLIT.json`,
/// `captions/cap.CATEGORY.SPLIT.json` and `images/ASIN.png`.
fn fashion_iq_fixture(root: &Path) {
    let triplet = |candidate: &str, target: &str, first: &str, second: &str| {
        format!(
            "{{\"target\": \"{target}\", \"candidate\": \"{candidate}\", \"captions\": [\"{first}\", \"{second}\"]}}"
        )
    };
    for (offset, category) in ["dress", "shirt", "toptee"].into_iter().enumerate() {
        for (split, prefix, count) in [("train", "B", 4), ("val", "V", 3)] {
            let names: Vec<String> = (0..count)
                .map(|number| format!("{prefix}{:04}", 100 * (offset + 1) + number))
                .collect();
            let list: Vec<String> = names.iter().map(|name| format!("\"{name}\"")).collect();
            write(
                &root.join(format!("image_splits/split.{category}.{split}.json")),
                &format!("[{}]", list.join(", ")),
            );
            let triplets: Vec<String> = (0..count)
                .map(|number| {
                    let next = (number + 1) % count;
                    triplet(
                        &names[number],
                        &names[next],
                        "is darker",
                        "has longer sleeves",
                    )
                })
                .collect();
            write(
                &root.join(format!("captions/cap.{category}.{split}.json")),
                &format!("[{}]", triplets.join(",\n")),
            );
            for (number, name) in names.iter().enumerate() {
                save_solid(
                    &root.join(format!("images/{name}.png")),
                    [60 * number as u8, 30 * offset as u8, 90],
                );
            }
        }
    }
}

/// A small run: 32-pixel images, small heads, two epochs, TIRG included.
fn tiny_config(dataset: DatasetSpec, work: &Path) -> RunConfig {
    let weights = artifacts().join("weights");
    RunConfig {
        benchmark: BenchmarkConfig {
            dataset,
            data_dir: default_data_dir(),
            train_images: None,
            train_queries: 200,
            validation_queries: 20,
            validation_images: 0,
            test_queries: Some(60),
            seed: 3,
            two_step_train_queries: 40,
            two_step_test_queries: 30,
        },
        features: FeatureSpec {
            architecture: ImageArchitecture::EfficientNetLite0,
            image_weights: weights.join("efficientnet_lite0.safetensors"),
            text_dir: weights.join("minilm"),
            image_size: 32,
            max_tokens: 32,
            pooling: Pooling::Mean,
        },
        training: TrainSettings {
            batch_size: 4,
            learning_rate: 1e-3,
            seed: 11,
            head: HeadConfig {
                hidden_dim: 32,
                joint_dim: 16,
                ..common::settings(2).head
            },
            ..common::settings(2)
        },
        cache_dir: work.join("cache"),
        output_dir: work.join("model"),
        overwrite: false,
        threads: 1,
        train_threads: 1,
        quick: true,
        train_tirg: true,
        checkpoint_dir: work.join("checkpoints"),
        resume: false,
        fine_tune: None,
    }
}

/// Trains on `dataset`, checks the metrics file against the protocol's cut-offs and
/// returns it.
fn train_and_check(dataset: DatasetSpec, work: &Path) -> Metrics {
    let cutoffs = dataset.protocol().recall_at;
    let config = tiny_config(dataset.clone(), work);
    let report = run(&config).unwrap_or_else(|error| panic!("{dataset}: {error}"));
    let bytes = std::fs::read(config.output_dir.join(METRICS_FILE)).unwrap();
    let metrics: Metrics = serde_json::from_slice(&bytes).unwrap();
    // Recalls are ratios of small counts and survive the JSON round trip exactly.
    assert_eq!(metrics.methods, report.metrics.methods, "{dataset}");
    assert_eq!(metrics.config.benchmark.dataset, dataset);

    let expected: Vec<String> = cutoffs.iter().map(|k| format!("R@{k}")).collect();
    assert_eq!(metrics.methods.len(), Method::ALL.len(), "{dataset}");
    for (method, result) in &metrics.methods {
        let keys: Vec<&String> = result.recalls.0.keys().collect();
        let mut sorted = expected.iter().collect::<Vec<_>>();
        sorted.sort();
        assert_eq!(keys, sorted, "{dataset} {method}");
        for (key, value) in &result.recalls.0 {
            assert!(
                (0.0..=1.0).contains(value),
                "{dataset} {method} {key} = {value}"
            );
        }
    }
    for k in &cutoffs {
        let table_header = format!("R@{k} |");
        assert!(
            report.table.contains(&table_header),
            "{dataset}: {}",
            report.table
        );
    }
    metrics
}

#[test]
fn fashion200k_fixture_trains() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("fashion200k");
    fashion200k_fixture(&root);
    let dataset: DatasetSpec = format!("fashion200k:{}", root.display()).parse().unwrap();
    let metrics = train_and_check(dataset, &dir.path().join("run"));
    assert!(metrics.counts.train_queries > 0);
    assert!(metrics.two_step_methods.is_empty());
    assert!(metrics.per_set_methods.is_empty());
}

#[test]
fn mit_states_fixture_trains_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("mit-states");
    mit_states_fixture(&root);
    let dataset: DatasetSpec = format!("mit-states:{}", root.display()).parse().unwrap();
    let work = dir.path().join("run");
    let metrics = train_and_check(dataset.clone(), &work);
    // Three apple states, three images each.
    assert_eq!(metrics.counts.catalog_images, 9);

    // The evaluate subcommand rebuilds the benchmark from metrics.json and reuses the
    // cached features, so it reproduces the recalls of the training run.
    let config = EvaluateConfig {
        model_dir: work.join("model"),
        dataset: Some(dataset),
        cache_dir: work.join("cache"),
        output_dir: dir.path().join("evaluation"),
        data_dir: None,
        threads: 1,
    };
    let (evaluation, _) = evaluate_model_dir(&config).unwrap();
    for (method, result) in &metrics.methods {
        assert_eq!(
            evaluation.methods[method].recalls, result.recalls,
            "{method} evaluated differently"
        );
    }

    let wrong = EvaluateConfig {
        dataset: Some("fashion200k:/data/fashion200k".parse().unwrap()),
        output_dir: dir.path().join("wrong"),
        ..config
    };
    let error = evaluate_model_dir(&wrong).unwrap_err().to_string();
    assert!(error.contains("mit-states"), "{error}");
}

#[test]
fn fashion_iq_fixture_averages_categories() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("fashioniq");
    fashion_iq_fixture(&root);
    let dataset: DatasetSpec = format!("fashioniq:{}", root.display()).parse().unwrap();
    let metrics = train_and_check(dataset, &dir.path().join("run"));

    let sets: Vec<&String> = metrics.per_set_methods.keys().collect();
    assert_eq!(sets, ["dress", "shirt", "toptee"]);
    for (method, result) in &metrics.methods {
        for key in result.recalls.0.keys() {
            let mean = metrics
                .per_set_methods
                .values()
                .map(|results| results[method].recalls.0[key])
                .sum::<f64>()
                / 3.0;
            let reported = result.recalls.0[key];
            assert!(
                (mean - reported).abs() < 1e-12,
                "{method} {key}: {reported} is not the category mean {mean}"
            );
        }
    }
}

#[test]
fn easyvqa_shapes_trains_with_two_step_table() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = DatasetSpec::EasyVqaShapes { dir: None };
    let mut config = tiny_config(dataset.clone(), dir.path());
    // The 1,000 test images are the catalog; a training subset keeps the backbone pass short.
    config.benchmark.train_images = Some(120);
    let report = run(&config).unwrap();
    let metrics = report.metrics;
    assert_eq!(metrics.counts.train_images, 120);
    assert_eq!(metrics.counts.test_queries, 60);
    assert_eq!(metrics.counts.two_step_test_queries, 30);
    assert_eq!(metrics.counts.two_step_train_queries, 40);
    assert_eq!(metrics.counts.train_queries, 200);
    assert_eq!(metrics.counts.validation_queries, 20);
    assert!(
        report.table.contains("| Two-step queries |"),
        "{}",
        report.table
    );
    for results in [&metrics.methods, &metrics.two_step_methods] {
        assert_eq!(results.len(), Method::ALL.len());
        for result in results.values() {
            assert_eq!(result.recalls.cutoffs(), [1, 5, 10, 50]);
            for kind in result.per_kind.keys() {
                assert!(
                    ["colour", "shape", "both"].contains(&kind.as_str()),
                    "unexpected kind {kind}"
                );
            }
        }
    }
    // 60 single-step queries over three kinds drawn with a fixed seed include shape changes.
    for result in metrics.methods.values() {
        assert!(
            result.per_kind.contains_key("shape"),
            "{:?}",
            result.per_kind
        );
    }
}

fn fine_tune_spec() -> FineTuneSpec {
    // A full-rate backbone update, so that two short epochs move the tail weights.
    FineTuneSpec {
        text_layers: 1,
        learning_rate_scale: 1.0,
    }
}

/// Returns the tiny MIT-States run with the fusion model's tails fine-tuned.
fn fine_tune_config(root: &Path, work: &Path) -> RunConfig {
    let dataset: DatasetSpec = format!("mit-states:{}", root.display()).parse().unwrap();
    RunConfig {
        train_tirg: false,
        fine_tune: Some(fine_tune_spec()),
        ..tiny_config(dataset, work)
    }
}

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

/// Names of the tensors of `tuned` that differ from those of `original`.
fn changed(original: &Path, tuned: &Path) -> Vec<String> {
    let original = tensors(original);
    tensors(tuned)
        .into_iter()
        .filter(|(name, tensor)| {
            let before = &original[name];
            (tensor - before).abs().max().double_value(&[]) > 0.0
        })
        .map(|(name, _)| name)
        .collect()
}

#[test]
fn fine_tuned_run_writes_tuned_tails_only() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("mit-states");
    mit_states_fixture(&root);
    let work = dir.path().join("run");
    let config = fine_tune_config(&root, &work);
    let report = run(&config).unwrap();
    assert_eq!(report.metrics.config.fine_tune, Some(fine_tune_spec()));

    let model = &config.output_dir;
    let image_changes = changed(
        &config.features.image_weights,
        &model.join("image_backbone.safetensors"),
    );
    assert!(
        !image_changes.is_empty(),
        "fine-tuning left the image backbone unchanged"
    );
    for name in &image_changes {
        let in_tail = ["_blocks.15.", "_conv_head.", "_bn1."]
            .iter()
            .any(|prefix| name.starts_with(prefix));
        assert!(in_tail, "{name} changed, but it is below the last block");
    }
    let text_changes = changed(
        &config.features.text_dir.join("model.safetensors"),
        &model.join("text_encoder/model.safetensors"),
    );
    assert!(
        !text_changes.is_empty(),
        "fine-tuning left the text encoder unchanged"
    );
    for name in &text_changes {
        assert!(
            name.starts_with("encoder.layer.5."),
            "{name} changed, but it is below the top layer"
        );
    }

    // Re-evaluation reads the tuned backbones for the fusion model and the recorded frozen
    // ones for the baselines, so it reproduces every method's recalls.
    let evaluate = EvaluateConfig {
        model_dir: model.clone(),
        dataset: None,
        cache_dir: work.join("cache"),
        output_dir: dir.path().join("evaluation"),
        data_dir: None,
        threads: 1,
    };
    let (evaluation, _) = evaluate_model_dir(&evaluate).unwrap();
    for (method, result) in &report.metrics.methods {
        assert_eq!(
            evaluation.methods[method].recalls, result.recalls,
            "{method} evaluated differently"
        );
    }
}

#[test]
fn fine_tune_text_layers_checked_first() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("mit-states");
    mit_states_fixture(&root);
    let work = dir.path().join("run");
    let mut config = fine_tune_config(&root, &work);
    config.fine_tune = Some(FineTuneSpec {
        text_layers: 7,
        ..fine_tune_spec()
    });
    let error = run(&config).unwrap_err().to_string();
    assert!(error.contains("--fine-tune-text-layers is 7"), "{error}");
    assert!(error.contains("pass at most 6"), "{error}");
    let cached: Vec<_> = std::fs::read_dir(work.join("cache"))
        .map(|entries| entries.flatten().map(|entry| entry.file_name()).collect())
        .unwrap_or_default();
    assert!(
        cached
            .iter()
            .all(|name| !name.to_string_lossy().starts_with("trunks-")),
        "trunks were computed before the check: {cached:?}"
    );
}

#[test]
fn resumed_fine_tuning_matches_uninterrupted() {
    // The thread count is process-wide and changes the summation order of the tail's
    // convolutions; the other tests of this binary run with one thread too.
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("mit-states");
    mit_states_fixture(&root);
    let work = dir.path().join("run");
    let config = fine_tune_config(&root, &work);
    let spec = fine_tune_spec();
    let benchmark = Benchmark::build(&config.benchmark).unwrap();
    let (trunks, _) =
        load_or_compute_trunks(&benchmark, &config.features, &spec, &config.cache_dir).unwrap();
    let train = |tails: &Tails, checkpointing: Option<&Checkpointing>| {
        fine_tune_heads(
            &benchmark,
            &trunks,
            tails,
            &spec,
            &config.training,
            Variant::Fusion,
            checkpointing,
        )
        .unwrap()
    };

    let uninterrupted_tails = Tails::load(&config.features, &spec).unwrap();
    let uninterrupted = train(&uninterrupted_tails, None);

    let checkpoint_dir = work.join("checkpoint");
    let interrupted_tails = Tails::load(&config.features, &spec).unwrap();
    let first = train(
        &interrupted_tails,
        Some(&Checkpointing {
            dir: checkpoint_dir.clone(),
            resume: false,
            stop_after_epochs: Some(1),
        }),
    );
    assert_eq!(first.history.len(), 1);
    let resumed_tails = Tails::load(&config.features, &spec).unwrap();
    let resumed = train(
        &resumed_tails,
        Some(&Checkpointing {
            dir: checkpoint_dir,
            resume: true,
            stop_after_epochs: None,
        }),
    );

    assert_eq!(resumed.history.len(), uninterrupted.history.len());
    for (resumed, uninterrupted) in resumed.history.iter().zip(&uninterrupted.history) {
        assert_eq!(resumed.loss, uninterrupted.loss, "epoch {}", resumed.epoch);
        assert_eq!(
            resumed.validation_recall_at_10, uninterrupted.validation_recall_at_10,
            "epoch {}",
            resumed.epoch
        );
    }
    for ((name, resumed), (_, uninterrupted)) in resumed_tails
        .variables()
        .iter()
        .zip(uninterrupted_tails.variables())
    {
        let difference = (resumed - uninterrupted).abs().max().double_value(&[]);
        assert_eq!(difference, 0.0, "{name} differs after resuming");
    }
}
