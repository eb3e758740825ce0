//! Loads benchmarks through the common interface and prints their sizes and
//! the time spent loading them and decoding every test catalog image.
//!
//! Usage: `cargo run --release -p densebert4ret-datasets --example load_benchmark -- SPEC...`
//! where SPEC is a `--dataset` value such as `easyvqa-shapes` or `fashion200k:/data/f200k`.
//! Without SPEC it loads `fmnist-colours` and `easyvqa-shapes`.

use std::time::Instant;

use densebert4ret_datasets::{DatasetSpec, LoadOptions, RetrievalBenchmark};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut specs: Vec<String> = std::env::args().skip(1).collect();
    if specs.is_empty() {
        specs = vec!["fmnist-colours".to_owned(), "easyvqa-shapes".to_owned()];
    }
    let options = LoadOptions {
        two_step_test_queries: 500,
        two_step_train_fraction: 0.25,
        ..LoadOptions::default()
    };
    for text in specs {
        let spec: DatasetSpec = text.parse()?;
        let started = Instant::now();
        let benchmark = RetrievalBenchmark::load(&spec, &options)?;
        let load_seconds = started.elapsed().as_secs_f64();
        println!(
            "{spec}: loaded in {load_seconds:.2} s, {} train items, {} train queries, protocol R@{:?}",
            benchmark.train.catalog.len(),
            benchmark.train.queries.len(),
            benchmark.protocol.recall_at
        );

        for set in &benchmark.test {
            let started = Instant::now();
            let mut pixels = 0_u64;
            for item in &set.catalog {
                let image = benchmark.load_image(item)?;
                pixels += u64::from(image.width()) * u64::from(image.height());
            }
            let decode_seconds = started.elapsed().as_secs_f64();
            let relevant: usize = set
                .queries
                .iter()
                .map(|query| query.relevant_ids.len())
                .sum();
            println!(
                "  {}: {} items, {} queries, {:.1} relevant per query, decoded {} images ({pixels} pixels) in {decode_seconds:.2} s",
                set.name,
                set.catalog.len(),
                set.queries.len(),
                relevant as f64 / set.queries.len().max(1) as f64,
                set.catalog.len()
            );
        }
    }
    Ok(())
}
