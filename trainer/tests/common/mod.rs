//! Shared fixtures: a small benchmark over the real Fashion-MNIST files and synthetic
//! backbone features.
//!
//! Image features are one-hot class and colour codes plus noise. Text features are one-hot
//! codes of the attributes a text sets; for a two-step query these are the attributes its
//! steps change, with the values after the last step, as an ideal text encoder would read
//! "in red. in blue". A working composition must combine the reference with the text.

#![allow(dead_code)]

use std::collections::HashMap;

use densebert4ret_datasets::{colour_of, default_data_dir, Colour, FashionClass, SplitData};
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
        data_dir: default_data_dir(),
        train_images: 1_200,
        train_queries: 2_000,
        validation_queries: 200,
        test_queries: 300,
        seed: 9,
        two_step_train_queries: two_step,
        two_step_test_queries: two_step,
    })
    .expect("Fashion-MNIST files under DB4R_FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist")
}

fn image_codes(data: &SplitData, indices: &[usize]) -> Tensor {
    let mut values = vec![0f32; indices.len() * WIDTH as usize];
    for (row, &index) in indices.iter().enumerate() {
        let class = data.class(index).unwrap().label() as usize;
        let colour = colour_of(data.split(), index).index();
        values[row * WIDTH as usize + class] = 1.0;
        values[row * WIDTH as usize + CLASSES as usize + colour] = 1.0;
    }
    // Noise from a seeded ChaCha generator, not libtorch's process-wide one, which tests
    // running in parallel would share with the trainings of other tests.
    let mut rng = ChaCha8Rng::seed_from_u64(indices.len() as u64);
    for value in &mut values {
        *value += rng.gen_range(-0.1f32..0.1);
    }
    Tensor::from_slice(&values).view([indices.len() as i64, WIDTH])
}

/// Synthetic features whose rows line up with `benchmark`, two-step texts included.
pub fn synthetic_features(benchmark: &Benchmark) -> Features {
    let test_indices: Vec<usize> = (0..benchmark.data.test.len()).collect();

    let mut named: HashMap<usize, (Option<FashionClass>, Option<Colour>)> = HashMap::new();
    let queries = benchmark
        .train_queries
        .iter()
        .chain(&benchmark.validation_queries)
        .chain(&benchmark.test_queries)
        .chain(&benchmark.two_step_train_queries)
        .chain(&benchmark.two_step_test_queries);
    for query in queries {
        let kinds = if query.step_kinds.is_empty() {
            vec![query.kind]
        } else {
            query.step_kinds.clone()
        };
        let class = kinds
            .iter()
            .any(|kind| kind.changes_class())
            .then_some(query.target_class);
        let colour = kinds
            .iter()
            .any(|kind| kind.changes_colour())
            .then_some(query.target_colour);
        named.insert(benchmark.text_row(&query.text).unwrap(), (class, colour));
    }
    let rows = benchmark.texts.len() + benchmark.two_step_texts.len();
    let mut text_values = vec![0f32; rows * WIDTH as usize];
    for (row, (class, colour)) in named {
        if let Some(class) = class {
            text_values[row * WIDTH as usize + class.label() as usize] = 1.0;
        }
        if let Some(colour) = colour {
            text_values[row * WIDTH as usize + CLASSES as usize + colour.index()] = 1.0;
        }
    }

    Features {
        train_images: image_codes(&benchmark.data.train, &benchmark.train_pool),
        test_images: image_codes(&benchmark.data.test, &test_indices),
        texts: Tensor::from_slice(&text_values).view([rows as i64, WIDTH]),
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
