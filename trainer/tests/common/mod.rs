//! Shared fixtures: a small benchmark over the real Fashion-MNIST files and synthetic
//! backbone features.
//!
//! Image features are one-hot class and colour codes plus noise. Text features are one-hot
//! codes of the attributes a text sets; for a two-step query these are the attributes its
//! steps change, with the values after the last step, as an ideal text encoder would read
//! "in red. in blue". A working composition must combine the reference with the text.

#![allow(dead_code)]

use std::collections::HashMap;

use densebert4ret_datasets::{default_data_dir, BenchmarkItem, Colour, DatasetSpec, FashionClass};
use densebert4ret_model::{HeadConfig, InputNorm};
use densebert4ret_trainer::benchmark::{Benchmark, BenchmarkConfig};
use densebert4ret_trainer::features::Features;
use densebert4ret_trainer::loss::{Loss, Mining};
use densebert4ret_trainer::optim::OptimizerKind;
use densebert4ret_trainer::train::TrainSettings;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

pub const CLASSES: i64 = FashionClass::ALL.len() as i64;
pub const COLOURS: i64 = Colour::ALL.len() as i64;
pub const WIDTH: i64 = CLASSES + COLOURS;

/// A benchmark of 1,200 training images with `two_step` two-step training and test queries.
pub fn benchmark(two_step: usize) -> Benchmark {
    Benchmark::build(&BenchmarkConfig {
        dataset: DatasetSpec::FmnistColours { dir: None },
        data_dir: default_data_dir(),
        train_images: Some(1_200),
        train_queries: 2_000,
        validation_queries: 200,
        validation_images: 0,
        test_queries: Some(300),
        seed: 9,
        two_step_train_queries: two_step,
        two_step_test_queries: two_step,
    })
    .expect("Fashion-MNIST files under DB4R_FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist")
}

/// Class label and colour index of a Fashion-MNIST colours attribute key.
pub fn split_key(key: i64) -> (usize, usize) {
    ((key / COLOURS) as usize, (key % COLOURS) as usize)
}

fn image_codes(items: &[BenchmarkItem]) -> Tensor {
    let mut values = vec![0f32; items.len() * WIDTH as usize];
    for (row, item) in items.iter().enumerate() {
        let (class, colour) = split_key(item.key);
        values[row * WIDTH as usize + class] = 1.0;
        values[row * WIDTH as usize + CLASSES as usize + colour] = 1.0;
    }
    // Noise from a seeded ChaCha generator, not libtorch's process-wide one, which tests
    // running in parallel would share with the trainings of other tests.
    let mut rng = ChaCha8Rng::seed_from_u64(items.len() as u64);
    for value in &mut values {
        *value += rng.gen_range(-0.1f32..0.1);
    }
    Tensor::from_slice(&values).view([items.len() as i64, WIDTH])
}

/// Synthetic features whose rows line up with `benchmark`, two-step texts included.
pub fn synthetic_features(benchmark: &Benchmark) -> Features {
    // A two-step query's kind is the net change of its steps, so it names every attribute
    // the steps set.
    let mut named: HashMap<usize, (Option<usize>, Option<usize>)> = HashMap::new();
    let queries = benchmark
        .train_queries
        .iter()
        .chain(&benchmark.validation_queries)
        .chain(&benchmark.two_step_train_queries)
        .chain(benchmark.test_sets.iter().flat_map(|set| &set.queries));
    for query in queries {
        let (class, colour) = split_key(query.target);
        let class = (query.kind == "class" || query.kind == "both").then_some(class);
        let colour = (query.kind == "colour" || query.kind == "both").then_some(colour);
        named.insert(benchmark.text_row(&query.text).unwrap(), (class, colour));
    }
    let rows = benchmark.texts.len() + benchmark.extra_texts.len();
    let mut text_values = vec![0f32; rows * WIDTH as usize];
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
        texts: Tensor::from_slice(&text_values).view([rows as i64, WIDTH]),
        validation_images: None,
    }
}

/// Small, fast settings for `epochs` epochs.
pub fn settings(epochs: usize) -> TrainSettings {
    TrainSettings {
        epochs,
        batch_size: 128,
        learning_rate: 3e-3,
        warmup_fraction: 0.05,
        final_learning_rate_fraction: 0.01,
        optimizer: OptimizerKind::AdamW,
        weight_decay: 1e-4,
        loss: Loss::Triplet,
        margin: 0.2,
        mining: Mining::All,
        soft_triplet_scale: 10.0,
        patience: 0,
        seed: 17,
        head: HeadConfig {
            weights: "head.safetensors".into(),
            hidden_dim: 64,
            joint_dim: 32,
            dropout: 0.1,
            input_norm: InputNorm::LayerNorm,
        },
    }
}
