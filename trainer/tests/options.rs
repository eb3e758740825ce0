//! Training options on the real benchmark with synthetic backbone features: soft-triplet
//! loss, Adam and AdamW, TIRG composition, checkpoints and resume, early stopping,
//! reproducibility, two-step queries and the evaluation files.

mod common;

use std::collections::BTreeMap;

use common::{benchmark, settings, synthetic_features};
use densebert4ret_model::join_modifications;
use densebert4ret_trainer::evaluate::{evaluate_benchmark, Method, TrainedSet};
use densebert4ret_trainer::heads::{CompositionKind, Heads};
use densebert4ret_trainer::loss::{soft_triplet_loss, triplet_loss, Loss, Mining};
use densebert4ret_trainer::optim::{Optimizer, OptimizerKind};
use densebert4ret_trainer::report::{
    markdown_report, write_evaluation_files, DataCounts, Metrics, RecordedConfig, TrainingSummary,
    RECALL_PLOT_FILE, TABLES_FILE, TRAINING_CURVES_FILE, TWO_STEP_RECALL_PLOT_FILE,
};
use densebert4ret_trainer::train::{
    generator_lock, train_heads, train_heads_with, Checkpointing, TrainSettings, Variant,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn matrix(rows: &[&[f32]]) -> Tensor {
    let width = rows[0].len() as i64;
    let values: Vec<f32> = rows.iter().flat_map(|row| row.iter().copied()).collect();
    Tensor::from_slice(&values).view([rows.len() as i64, width])
}

fn assert_close(actual: f64, expected: f64, label: &str) {
    assert!(
        (actual - expected).abs() < 1e-5,
        "{label}: {actual} != {expected}"
    );
}

#[test]
fn soft_triplet_matches_hand_computation() {
    // Similarities [[1, 0], [0, 1]] at scale 2: each row is -log(e^2 / (e^2 + e^0)).
    let identity = matrix(&[&[1.0, 0.0], &[0.0, 1.0]]);
    let targets = Tensor::from_slice(&[1i64, 2]);
    let loss = soft_triplet_loss(&identity, &identity, &targets, 2.0).double_value(&[]);
    assert_close(loss, (1.0 + (-2.0f64).exp()).ln(), "two distinct targets");

    // Three rows; row 0 and row 2 share a target, so each drops the other from its softmax.
    let anchors = matrix(&[&[1.0, 0.0], &[0.0, 1.0], &[0.6, 0.8]]);
    let positives = matrix(&[&[0.8, 0.6], &[0.0, 1.0], &[1.0, 0.0]]);
    let targets = Tensor::from_slice(&[7i64, 8, 7]);
    let loss = soft_triplet_loss(&anchors, &positives, &targets, 1.0).double_value(&[]);
    // Row 0: logits [0.8, 0, masked] -> -log(e^0.8 / (e^0.8 + 1)).
    let row0 = -(0.8f64.exp() / (0.8f64.exp() + 1.0)).ln();
    // Row 1: logits [0.6, 1, 0] -> -log(e^1 / (e^0.6 + e^1 + 1)).
    let row1 = -(1f64.exp() / (0.6f64.exp() + 1f64.exp() + 1.0)).ln();
    // Row 2: logits [masked, 0.8, 0.6] -> -log(e^0.6 / (e^0.8 + e^0.6)).
    let row2 = -(0.6f64.exp() / (0.8f64.exp() + 0.6f64.exp())).ln();
    assert_close(loss, (row0 + row1 + row2) / 3.0, "shared target masked");
}

#[test]
fn soft_triplet_all_same_target_is_zero() {
    let anchors = matrix(&[&[1.0, 0.0], &[0.0, 1.0]]);
    let targets = Tensor::from_slice(&[3i64, 3]);
    let loss = soft_triplet_loss(&anchors, &anchors, &targets, 10.0).double_value(&[]);
    assert_close(loss, 0.0, "only the diagonal is left in each softmax");
}

#[test]
fn triplet_matches_hand_computation() {
    // Similarities [[1, 0], [0.6, 0.8]] with margin 0.5: anchor 0 gives max(0, 0.5 - 1 + 0) = 0
    // and anchor 1 gives max(0, 0.5 - 0.8 + 0.6) = 0.3, so the mean over both is 0.15.
    let anchors = matrix(&[&[1.0, 0.0], &[0.6, 0.8]]);
    let positives = matrix(&[&[1.0, 0.0], &[0.0, 1.0]]);
    let targets = Tensor::from_slice(&[1i64, 2]);
    let all = triplet_loss(&anchors, &positives, &targets, 0.5, Mining::All).double_value(&[]);
    assert_close(all, 0.15, "all pairs");
    let hardest =
        triplet_loss(&anchors, &positives, &targets, 0.5, Mining::Hardest).double_value(&[]);
    assert_close(hardest, 0.15, "hardest, one negative per anchor");
}

#[test]
fn adam_and_adamw_first_step() {
    // The first Adam step moves every weight by the learning rate against the gradient's
    // sign. AdamW also shrinks the weight by lr * weight_decay first; Adam adds
    // weight_decay * w to the gradient, which here keeps its sign.
    for (kind, expected) in [
        (OptimizerKind::Adam, [2.0 - 0.1, -1.0 + 0.1]),
        (
            OptimizerKind::AdamW,
            [
                2.0 * (1.0 - 0.1 * 0.5) - 0.1,
                -1.0 * (1.0 - 0.1 * 0.5) + 0.1,
            ],
        ),
    ] {
        let store = VarStore::new(Device::Cpu);
        let weights = store
            .root()
            .var_copy("w", &Tensor::from_slice(&[2.0f32, -1.0]));
        let mut optimizer = Optimizer::new(&store, kind, 0.5);
        let loss = (&weights * Tensor::from_slice(&[3.0f32, -4.0])).sum(Kind::Float);
        optimizer.backward_step(&loss, 0.1);
        let updated = Vec::<f32>::try_from(&weights).unwrap();
        assert_close(updated[0] as f64, expected[0], &format!("{kind} weight 0"));
        assert_close(updated[1] as f64, expected[1], &format!("{kind} weight 1"));
        assert_eq!(optimizer.steps(), 1);
    }
}

#[test]
fn tirg_composition_shapes_and_gradients() {
    let _generator = generator_lock();
    tch::manual_seed(1);
    let config = settings(1).head;
    let heads = Heads::with_composition(CompositionKind::Tirg, 20, 12, &config);
    let names: Vec<String> = heads.store.variables().into_keys().collect();
    assert!(
        names.iter().any(|name| name == "tirg.gate_weight"),
        "{names:?}"
    );
    assert!(
        names.iter().any(|name| name == "tirg.residual_weight"),
        "{names:?}"
    );
    assert!(
        names.iter().any(|name| name.starts_with("projection.")),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|name| name.starts_with("fusion.")),
        "{names:?}"
    );

    let images = Tensor::randn([5, 20], (Kind::Float, Device::Cpu));
    let texts = Tensor::randn([5, 12], (Kind::Float, Device::Cpu));
    let composed = heads.compose_t(&images, &texts, true);
    assert_eq!(composed.size(), vec![5, config.joint_dim]);
    let norms =
        Vec::<f32>::try_from(composed.norm_scalaropt_dim(2, [1i64].as_slice(), false)).unwrap();
    for norm in norms {
        assert!((norm - 1.0).abs() < 1e-5, "row norm {norm}");
    }

    let target = heads.projection.forward_t(&images.flip([0i64]), true);
    (composed * target).sum(Kind::Float).backward();
    for (name, variable) in heads.store.variables() {
        let gradient = variable.grad();
        assert!(gradient.defined(), "{name} has no gradient");
        let magnitude = gradient.abs().sum(Kind::Float).double_value(&[]);
        assert!(magnitude.is_finite(), "{name} gradient is {magnitude}");
        assert!(magnitude > 0.0, "{name} gradient is zero");
    }
}

#[test]
fn fusion_input_norm_variables() {
    let mut config = settings(1).head;
    let _generator = generator_lock();
    let with_norm = Heads::new(20, 12, &config);
    let names: Vec<String> = with_norm.store.variables().into_keys().collect();
    for expected in [
        "fusion.image_norm.weight",
        "fusion.image_norm.bias",
        "fusion.text_norm.weight",
        "fusion.text_norm.bias",
    ] {
        assert!(
            names.iter().any(|name| name == expected),
            "{expected} missing: {names:?}"
        );
    }

    config.input_norm = densebert4ret_model::InputNorm::None;
    let without_norm = Heads::new(20, 12, &config);
    let names: Vec<String> = without_norm.store.variables().into_keys().collect();
    assert!(
        !names.iter().any(|name| name.contains("_norm")),
        "{names:?}"
    );

    // With LayerNorm, scaling the image features leaves the query unchanged.
    let images = Tensor::randn([3, 20], (Kind::Float, Device::Cpu));
    let texts = Tensor::randn([3, 12], (Kind::Float, Device::Cpu));
    let difference = (with_norm.compose(&images, &texts)
        - with_norm.compose(&(&images * 10.0), &texts))
    .abs()
    .max()
    .double_value(&[]);
    assert!(
        difference < 1e-4,
        "query changed by {difference} under image scaling"
    );
}

#[test]
fn tirg_and_soft_triplet_train() {
    let benchmark = benchmark(0);
    let features = synthetic_features(&benchmark);
    let settings = TrainSettings {
        loss: Loss::SoftTriplet,
        ..settings(4)
    };
    let tirg = train_heads(&benchmark, &features, &settings, Variant::Tirg).unwrap();
    let first = &tirg.history[0];
    let best = &tirg.history[tirg.best_epoch - 1];
    assert!(
        tirg.history.last().unwrap().loss < first.loss,
        "soft-triplet loss did not decrease: {:?}",
        tirg.history
    );
    assert!(
        best.validation_recall_at_10 > 0.8,
        "TIRG validation R@10 {}",
        best.validation_recall_at_10
    );
}

fn variables(heads: &Heads) -> BTreeMap<String, Vec<f32>> {
    heads
        .store
        .variables()
        .into_iter()
        .map(|(name, tensor)| (name, Vec::<f32>::try_from(tensor.flatten(0, -1)).unwrap()))
        .collect()
}

#[test]
fn resume_matches_uninterrupted_run() {
    let benchmark = benchmark(200);
    let features = synthetic_features(&benchmark);
    let settings = settings(3);
    let dir = tempfile::tempdir().unwrap();

    let uninterrupted = train_heads_with(
        &benchmark,
        &features,
        &settings,
        Variant::Fusion,
        Some(&Checkpointing {
            dir: dir.path().join("uninterrupted"),
            resume: false,
            stop_after_epochs: None,
        }),
    )
    .unwrap();

    let interrupted_dir = dir.path().join("interrupted");
    let interrupted = train_heads_with(
        &benchmark,
        &features,
        &settings,
        Variant::Fusion,
        Some(&Checkpointing {
            dir: interrupted_dir.clone(),
            resume: false,
            stop_after_epochs: Some(1),
        }),
    )
    .unwrap();
    assert_eq!(interrupted.history.len(), 1);
    assert!(interrupted_dir.join("state.json").is_file());
    assert!(interrupted_dir.join("checkpoint.safetensors").is_file());

    let resumed = train_heads_with(
        &benchmark,
        &features,
        &settings,
        Variant::Fusion,
        Some(&Checkpointing {
            dir: interrupted_dir.clone(),
            resume: true,
            stop_after_epochs: None,
        }),
    )
    .unwrap();
    assert_eq!(resumed.history.len(), 3);
    assert_eq!(resumed.best_epoch, uninterrupted.best_epoch);
    for (resumed, uninterrupted) in resumed.history.iter().zip(&uninterrupted.history) {
        assert_eq!(resumed.loss, uninterrupted.loss, "epoch {}", resumed.epoch);
        assert_eq!(
            resumed.validation_recall_at_10, uninterrupted.validation_recall_at_10,
            "epoch {}",
            resumed.epoch
        );
    }
    assert_eq!(variables(&resumed.heads), variables(&uninterrupted.heads));

    // A checkpoint written with other settings is rejected, not silently mixed in.
    let error = train_heads_with(
        &benchmark,
        &features,
        &TrainSettings {
            margin: 0.3,
            ..settings
        },
        Variant::Fusion,
        Some(&Checkpointing {
            dir: interrupted_dir,
            resume: true,
            stop_after_epochs: None,
        }),
    )
    .unwrap_err();
    assert!(error.to_string().contains("other settings"), "{error}");
}

#[test]
fn early_stopping_stops() {
    let benchmark = benchmark(0);
    let features = synthetic_features(&benchmark);
    // A learning rate this small leaves the validation ranking unchanged after the first
    // epoch, so with patience 2 training ends after epoch 3 of 8.
    let settings = TrainSettings {
        learning_rate: 1e-12,
        patience: 2,
        ..settings(8)
    };
    let trained = train_heads(&benchmark, &features, &settings, Variant::Fusion).unwrap();
    assert!(trained.stopped_early);
    assert_eq!(trained.history.len(), 3, "{:?}", trained.history);
    assert_eq!(trained.best_epoch, 1);

    let without_patience = TrainSettings {
        patience: 0,
        epochs: 4,
        ..settings
    };
    let trained = train_heads(&benchmark, &features, &without_patience, Variant::Fusion).unwrap();
    assert!(!trained.stopped_early);
    assert_eq!(trained.history.len(), 4);
}

#[test]
fn same_seed_gives_identical_metrics() {
    let benchmark = benchmark(200);
    let features = synthetic_features(&benchmark);
    let run = |seed: u64| {
        let settings = TrainSettings {
            seed,
            ..settings(2)
        };
        let fusion = train_heads(&benchmark, &features, &settings, Variant::Fusion).unwrap();
        let text_only = train_heads(&benchmark, &features, &settings, Variant::TextOnly).unwrap();
        let tirg = train_heads(&benchmark, &features, &settings, Variant::Tirg).unwrap();
        let set = TrainedSet {
            fusion: &fusion.heads,
            text_only: &text_only.heads,
            tirg: Some(&tirg.heads),
            fusion_features: None,
        };
        let evaluation = evaluate_benchmark(&benchmark, &features, &set).unwrap();
        let (single, two_step) = (evaluation.single_step, evaluation.two_step);
        // Epoch records without their wall times.
        let curve: Vec<(f64, f64)> = fusion
            .history
            .iter()
            .map(|record| (record.loss, record.validation_recall_at_10))
            .collect();
        (single, two_step, curve)
    };
    let first = run(5);
    let second = run(5);
    assert_eq!(first.0, second.0);
    assert_eq!(first.1, second.1);
    assert_eq!(first.2, second.2);
    let other = run(6);
    assert_ne!(first.2, other.2, "a different seed trained identically");
}

#[test]
fn two_step_queries_join_texts_in_order() {
    let benchmark = benchmark(300);
    assert_eq!(benchmark.two_step_train_queries.len(), 300);
    let two_step_test = benchmark.two_step_set().unwrap();
    assert_eq!(two_step_test.queries.len(), 300);
    for query in benchmark
        .two_step_train_queries
        .iter()
        .chain(&two_step_test.queries)
    {
        assert_eq!(query.texts.len(), 2, "{query:?}");
        assert_eq!(query.text, join_modifications(&query.texts));
        let row = benchmark.text_row(&query.text).unwrap();
        assert!(row < benchmark.texts.len() + benchmark.extra_texts.len());
    }
    // Single-step texts keep their rows, so the image feature cache key is unchanged.
    for (row, text) in benchmark.texts.iter().enumerate() {
        assert_eq!(benchmark.text_row(text).unwrap(), row);
    }
    assert!(!benchmark.extra_texts.is_empty());
}

fn decode_png(path: &std::path::Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|error| panic!("{} does not decode: {error}", path.display()))
        .to_rgb8()
}

/// Fraction of pixels that are neither white nor near-white.
fn ink_fraction(image: &image::RgbImage) -> f64 {
    let inked = image
        .pixels()
        .filter(|pixel| pixel.0.iter().any(|&channel| channel < 200))
        .count();
    inked as f64 / (image.width() * image.height()) as f64
}

#[test]
fn evaluation_files_parse_and_decode() {
    let benchmark = benchmark(150);
    let features = synthetic_features(&benchmark);
    let settings = settings(2);
    let fusion = train_heads(&benchmark, &features, &settings, Variant::Fusion).unwrap();
    let text_only = train_heads(&benchmark, &features, &settings, Variant::TextOnly).unwrap();
    let tirg = train_heads(&benchmark, &features, &settings, Variant::Tirg).unwrap();
    let set = TrainedSet {
        fusion: &fusion.heads,
        text_only: &text_only.heads,
        tirg: Some(&tirg.heads),
        fusion_features: None,
    };
    let evaluation = evaluate_benchmark(&benchmark, &features, &set).unwrap();
    let (single, two_step) = (evaluation.single_step, evaluation.two_step);
    assert_eq!(single.len(), Method::ALL.len());
    assert_eq!(two_step.len(), Method::ALL.len());
    for result in single.iter().chain(&two_step) {
        assert_eq!(result.recall_curve.len(), 50);
        assert!(
            result
                .recall_curve
                .windows(2)
                .all(|pair| pair[0] <= pair[1]),
            "{:?} curve is not monotonic",
            result.method
        );
        assert_eq!(Some(result.recall_curve[9]), result.recalls.at(10));
    }

    let summary = |trained: &densebert4ret_trainer::train::TrainedHeads| TrainingSummary {
        best_epoch: trained.best_epoch,
        stopped_early: trained.stopped_early,
        history: trained.history.clone(),
    };
    let by_key = |results: &[densebert4ret_trainer::evaluate::MethodResult]| {
        results
            .iter()
            .map(|result| (result.method.key().to_owned(), result.clone()))
            .collect()
    };
    let metrics = Metrics {
        seed: settings.seed,
        methods: by_key(&single),
        two_step_methods: by_key(&two_step),
        per_set_methods: BTreeMap::new(),
        training: BTreeMap::from([
            ("fusion".to_owned(), summary(&fusion)),
            ("text_only".to_owned(), summary(&text_only)),
            ("tirg".to_owned(), summary(&tirg)),
        ]),
        timings_seconds: BTreeMap::new(),
        feature_cache: "synthetic".to_owned(),
        counts: DataCounts {
            train_images: benchmark.train_catalog.len(),
            train_queries: benchmark.train_queries.len(),
            two_step_train_queries: benchmark.two_step_train_queries.len(),
            validation_queries: benchmark.validation_queries.len(),
            validation_images: 0,
            test_queries: benchmark.test_query_count(),
            two_step_test_queries: benchmark.two_step_test_query_count(),
            catalog_images: benchmark.catalog_image_count(),
            texts: benchmark.texts.len() + benchmark.extra_texts.len(),
        },
        config: RecordedConfig {
            benchmark: densebert4ret_trainer::benchmark::BenchmarkConfig {
                dataset: densebert4ret_datasets::DatasetSpec::FmnistColours { dir: None },
                data_dir: densebert4ret_datasets::default_data_dir(),
                train_images: Some(1_200),
                train_queries: 2_000,
                validation_queries: 200,
                validation_images: 0,
                test_queries: Some(300),
                seed: 9,
                two_step_train_queries: 150,
                two_step_test_queries: 150,
            },
            features: densebert4ret_trainer::features::FeatureSpec {
                architecture: densebert4ret_model::ImageArchitecture::EfficientNetLite0,
                image_weights: "synthetic".into(),
                text_dir: "synthetic".into(),
                image_size: 28,
                max_tokens: 32,
                pooling: densebert4ret_model::Pooling::Mean,
            },
            training: settings.clone(),
            threads: 1,
            train_threads: 1,
            quick: true,
            train_tirg: true,
            fine_tune: None,
        },
    };
    let tables = markdown_report(&single, &two_step);
    let dir = tempfile::tempdir().unwrap();
    write_evaluation_files(dir.path(), &metrics, &tables).unwrap();

    let markdown = std::fs::read_to_string(dir.path().join(TABLES_FILE)).unwrap();
    assert!(markdown.contains("| Two-step queries |"), "{markdown}");
    for method in Method::ALL {
        assert!(
            markdown.contains(method.title()),
            "{} missing:\n{markdown}",
            method.title()
        );
    }
    let json = serde_json::to_string(&metrics).unwrap();
    let parsed: Metrics = serde_json::from_str(&json).unwrap();
    assert_eq!(
        parsed.methods.keys().collect::<Vec<_>>(),
        metrics.methods.keys().collect::<Vec<_>>()
    );
    assert_eq!(parsed.two_step_methods.len(), Method::ALL.len());
    assert_eq!(parsed.training["tirg"].history.len(), 2);

    for file in [
        RECALL_PLOT_FILE,
        TWO_STEP_RECALL_PLOT_FILE,
        TRAINING_CURVES_FILE,
    ] {
        let image = decode_png(&dir.path().join(file));
        assert!(
            image.width() >= 800 && image.height() >= 400,
            "{file} is {}x{}",
            image.width(),
            image.height()
        );
        let ink = ink_fraction(&image);
        assert!(ink > 0.01, "{file} is almost blank: {ink}");
        assert!(ink < 0.9, "{file} is almost filled: {ink}");
    }
}

#[test]
fn evaluate_rejects_bad_inputs() {
    use densebert4ret_trainer::offline::{evaluate_model_dir, EvaluateConfig};

    let dir = tempfile::tempdir().unwrap();
    let config = EvaluateConfig {
        model_dir: dir.path().join("missing-model"),
        dataset: None,
        cache_dir: dir.path().join("cache"),
        output_dir: dir.path().join("evaluation"),
        data_dir: None,
        threads: 1,
    };
    let error = evaluate_model_dir(&config).unwrap_err().to_string();
    assert!(error.contains("metrics.json"), "{error}");
    assert!(
        !config.output_dir.exists(),
        "output written for a failed evaluation"
    );
}
