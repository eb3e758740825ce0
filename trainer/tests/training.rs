//! Training and evaluation on the real benchmark with synthetic backbone features.
//!
//! Image features are one-hot class and colour codes plus noise, and text
//! features one-hot codes of the attributes a text names. A working fusion
//! MLP must combine the reference with the text, which neither input allows
//! alone for colour-only and class-only queries.

use std::collections::HashMap;

use densebert4ret_datasets::{
    default_data_dir, BenchmarkItem, Colour, DatasetSpec, FashionClass, QueryKind,
};
use densebert4ret_model::{HeadConfig, InputNorm};
use densebert4ret_trainer::benchmark::{Benchmark, BenchmarkConfig};
use densebert4ret_trainer::evaluate::{evaluate_benchmark, Method, TrainedSet};
use densebert4ret_trainer::features::Features;
use densebert4ret_trainer::loss::{Loss, Mining};
use densebert4ret_trainer::optim::OptimizerKind;
use densebert4ret_trainer::train::{
    generator_lock, learning_rate_at, train_heads, TrainSettings, Variant,
};
use tch::{Kind, Tensor};

const CLASSES: i64 = FashionClass::ALL.len() as i64;
const COLOURS: i64 = Colour::ALL.len() as i64;
const WIDTH: i64 = CLASSES + COLOURS;

fn benchmark() -> Benchmark {
    Benchmark::build(&config()).expect(
        "Fashion-MNIST files under DB4R_FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist",
    )
}

fn config() -> BenchmarkConfig {
    BenchmarkConfig {
        dataset: DatasetSpec::FmnistColours { dir: None },
        data_dir: default_data_dir(),
        train_images: Some(1_500),
        train_queries: 3_000,
        validation_queries: 300,
        validation_images: 400,
        test_queries: Some(300),
        seed: 5,
        two_step_train_queries: 0,
        two_step_test_queries: 0,
    }
}

fn image_codes(items: &[BenchmarkItem]) -> Tensor {
    let mut values = vec![0f32; items.len() * WIDTH as usize];
    for (row, item) in items.iter().enumerate() {
        let class = (item.key / COLOURS) as usize;
        let colour = (item.key % COLOURS) as usize;
        values[row * WIDTH as usize + class] = 1.0;
        values[row * WIDTH as usize + CLASSES as usize + colour] = 1.0;
    }
    let clean = Tensor::from_slice(&values).view([items.len() as i64, WIDTH]);
    clean + Tensor::randn([items.len() as i64, WIDTH], (Kind::Float, tch::Device::Cpu)) * 0.05
}

fn synthetic_features(benchmark: &Benchmark) -> Features {
    // The noise comes from libtorch's process-wide generator, which trainings in parallel
    // tests also draw from.
    let _generator = generator_lock();
    tch::manual_seed(3);
    let mut named: HashMap<usize, (Option<usize>, Option<usize>)> = HashMap::new();
    let queries = benchmark
        .train_queries
        .iter()
        .chain(&benchmark.validation_queries)
        .chain(&benchmark.test_sets[0].queries);
    for query in queries {
        let class = (query.kind == "class" || query.kind == "both")
            .then_some((query.target / COLOURS) as usize);
        let colour = (query.kind == "colour" || query.kind == "both")
            .then_some((query.target % COLOURS) as usize);
        named.insert(benchmark.text_row(&query.text).unwrap(), (class, colour));
    }
    let text_count = benchmark.texts.len() + benchmark.extra_texts.len();
    let mut text_values = vec![0f32; text_count * WIDTH as usize];
    for (row, (class, colour)) in named {
        if let Some(class) = class {
            text_values[row * WIDTH as usize + class] = 1.0;
        }
        if let Some(colour) = colour {
            text_values[row * WIDTH as usize + CLASSES as usize + colour] = 1.0;
        }
    }

    Features {
        train_images: image_codes(&benchmark.train_catalog),
        test_images: vec![image_codes(&benchmark.test_catalogs[0])],
        texts: Tensor::from_slice(&text_values).view([text_count as i64, WIDTH]),
        validation_images: benchmark.validation_catalog.as_deref().map(image_codes),
    }
}

fn settings(epochs: usize) -> TrainSettings {
    TrainSettings {
        epochs,
        batch_size: 128,
        learning_rate: 3e-3,
        warmup_fraction: 0.05,
        final_learning_rate_fraction: 0.01,
        optimizer: OptimizerKind::AdamW,
        weight_decay: 0.0,
        loss: Loss::Triplet,
        margin: 0.2,
        mining: Mining::All,
        soft_triplet_scale: 10.0,
        patience: 0,
        seed: 11,
        head: HeadConfig {
            weights: "head.safetensors".into(),
            hidden_dim: 64,
            joint_dim: 32,
            dropout: 0.0,
            input_norm: InputNorm::LayerNorm,
        },
    }
}

#[test]
fn fusion_learns_to_compose() {
    let benchmark = benchmark();
    let features = synthetic_features(&benchmark);
    let fusion = train_heads(&benchmark, &features, &settings(10), Variant::Fusion).unwrap();
    let text_only = train_heads(&benchmark, &features, &settings(10), Variant::TextOnly).unwrap();

    assert_eq!(fusion.history.len(), 10);
    let first = &fusion.history[0];
    let best = &fusion.history[fusion.best_epoch - 1];
    assert!(best.validation_recall_at_10 >= first.validation_recall_at_10);
    assert!(
        best.validation_recall_at_10 > 0.9,
        "fusion validation R@10 {}",
        best.validation_recall_at_10
    );
    assert!(
        fusion.history.last().unwrap().loss < first.loss,
        "loss did not decrease: {:?}",
        fusion.history
    );

    let trained = TrainedSet {
        fusion: &fusion.heads,
        text_only: &text_only.heads,
        tirg: None,
        fusion_features: None,
    };
    let results = evaluate_benchmark(&benchmark, &features, &trained)
        .unwrap()
        .single_step;
    let recall = |method: Method| {
        results
            .iter()
            .find(|result| result.method == method)
            .unwrap()
            .recalls
            .at(10)
            .unwrap()
    };
    assert_eq!(results.len(), 4);
    assert!(
        recall(Method::Fusion) > 0.9,
        "fusion test R@10 {}",
        recall(Method::Fusion)
    );
    assert!(
        recall(Method::Fusion) > recall(Method::TextOnly),
        "fusion does not beat text only"
    );
    assert!(
        recall(Method::Fusion) > recall(Method::ImageOnly),
        "fusion does not beat image only"
    );

    // A text that names both attributes determines the target on its own.
    let text_only_result = results
        .iter()
        .find(|result| result.method == Method::TextOnly)
        .unwrap();
    let both = text_only_result.per_kind[QueryKind::Both.as_str()]
        .at(10)
        .unwrap();
    let colour = text_only_result.per_kind[QueryKind::Colour.as_str()]
        .at(10)
        .unwrap();
    assert!(
        both > colour,
        "text only: both-kind R@10 {both} not above colour-kind {colour}"
    );
}

#[test]
fn training_is_reproducible() {
    let benchmark = benchmark();
    let features = synthetic_features(&benchmark);
    let first = train_heads(&benchmark, &features, &settings(1), Variant::Fusion).unwrap();
    let second = train_heads(&benchmark, &features, &settings(1), Variant::Fusion).unwrap();
    assert_eq!(first.history[0].loss, second.history[0].loss);
    assert_eq!(
        first.history[0].validation_recall_at_10,
        second.history[0].validation_recall_at_10
    );
}

#[test]
fn invalid_settings_are_rejected() {
    let benchmark = benchmark();
    let features = synthetic_features(&benchmark);
    let error = train_heads(&benchmark, &features, &settings(0), Variant::Fusion).unwrap_err();
    assert!(error.to_string().contains("--epochs is 0"), "{error}");
    let error = train_heads(
        &benchmark,
        &features,
        &TrainSettings {
            batch_size: 1,
            ..settings(1)
        },
        Variant::Fusion,
    )
    .unwrap_err();
    assert!(error.to_string().contains("--batch-size is 1"), "{error}");
    let error = train_heads(
        &benchmark,
        &features,
        &TrainSettings {
            margin: 0.0,
            ..settings(1)
        },
        Variant::Fusion,
    )
    .unwrap_err();
    assert!(error.to_string().contains("--margin is 0"), "{error}");
}

#[test]
fn learning_rate_warms_up_then_decays() {
    let schedule = settings(1);
    let total = 100;
    // 5 warm-up steps reach the peak of 3e-3 at step 4.
    assert!((learning_rate_at(&schedule, 0, total) - 0.6e-3).abs() < 1e-12);
    assert!((learning_rate_at(&schedule, 4, total) - 3e-3).abs() < 1e-12);
    assert!((learning_rate_at(&schedule, 5, total) - 3e-3).abs() < 1e-12);
    let end = learning_rate_at(&schedule, total - 1, total);
    assert!(end < 3e-3 * 0.02, "final learning rate {end}");
    assert!(
        end >= 3e-3 * 0.01,
        "final learning rate {end} below the floor"
    );
    let rates: Vec<f64> = (5..total)
        .map(|step| learning_rate_at(&schedule, step, total))
        .collect();
    assert!(
        rates.windows(2).all(|pair| pair[1] <= pair[0]),
        "decay is not monotonic"
    );
}

#[test]
fn benchmark_resolves_rows() {
    let benchmark = benchmark();
    assert_eq!(benchmark.train_catalog.len(), 1_500);
    assert_eq!(benchmark.train_queries.len(), 3_000);
    assert_eq!(benchmark.validation_queries.len(), 300);
    assert_eq!(benchmark.test_query_count(), 300);
    let train_pool = &benchmark.fashion_mnist.as_ref().unwrap().train_pool;
    assert_eq!(train_pool.len(), 1_500);
    for query in &benchmark.train_queries {
        let index = train_pool[query.reference];
        assert_eq!(
            benchmark.train_catalog[query.reference].id,
            format!("fmnist-train-{index:05}")
        );
        assert_eq!(
            benchmark.texts[benchmark.text_row(&query.text).unwrap()],
            query.text
        );
    }
    assert!(benchmark.text_row("not a benchmark text").is_err());
}

#[test]
fn validation_searches_unseen_train_images() {
    let benchmark = benchmark();
    let validation = benchmark
        .validation_catalog
        .as_ref()
        .expect("a validation catalog when validation_images is set");
    assert_eq!(validation.len(), 400);
    let training: std::collections::HashSet<&str> = benchmark
        .train_catalog
        .iter()
        .map(|item| item.id.as_str())
        .collect();
    for item in validation {
        assert!(item.id.starts_with("fmnist-train-"), "{}", item.id);
        assert!(
            !training.contains(item.id.as_str()),
            "{} is also a training image",
            item.id
        );
    }
    assert_eq!(benchmark.validation_queries.len(), 300);
    for query in &benchmark.validation_queries {
        assert!(query.reference < validation.len());
        assert!(
            validation
                .iter()
                .enumerate()
                .any(|(row, item)| item.key == query.target && row != query.reference),
            "no validation image is relevant to {:?}",
            query.text
        );
        assert!(
            benchmark.extra_texts.contains(&query.text),
            "validation text {:?} is not among the texts cached apart",
            query.text
        );
    }
    // Validation has phrasings of its own: no validation text is a training or test text.
    let other_texts: std::collections::HashSet<&str> = benchmark
        .train_queries
        .iter()
        .chain(&benchmark.test_sets[0].queries)
        .map(|query| query.text.as_str())
        .collect();
    for query in &benchmark.validation_queries {
        assert!(
            !other_texts.contains(query.text.as_str()),
            "validation text {:?} also phrases a training or test query",
            query.text
        );
    }

    // The same seed draws the same validation images; the old scheme has none.
    let again = self::benchmark();
    assert_eq!(again.validation_catalog.as_ref(), Some(validation));
    let held_out = Benchmark::build(&BenchmarkConfig {
        validation_images: 0,
        ..config()
    })
    .unwrap();
    assert!(held_out.validation_catalog.is_none());
    assert_eq!(held_out.validation_queries.len(), 300);
}

#[test]
fn features_without_validation_rows_rejected() {
    let benchmark = benchmark();
    let mut features = synthetic_features(&benchmark);
    features.validation_images = None;
    let error = train_heads(&benchmark, &features, &settings(1), Variant::Fusion)
        .unwrap_err()
        .to_string();
    assert!(error.contains("400 validation images"), "{error}");
    assert!(error.contains("load_or_compute"), "{error}");
}

#[test]
fn too_many_validation_images_name_the_option() {
    let error = Benchmark::build(&BenchmarkConfig {
        validation_images: 60_000,
        ..config()
    })
    .unwrap_err()
    .to_string();
    assert!(error.contains("--validation-images is 60000"), "{error}");
    assert!(error.contains("58500"), "{error}");
}
