//! Ingest of the tinted Fashion-MNIST test split through the gateway.

use std::path::Path;

use anyhow::Context;
use clap::Args;
use densebert4ret_datasets::{default_data_dir, parse_item_id, png_bytes, tinted_image, CatalogItem, Split, SplitData};
use densebert4ret_proto::v1::UpsertRequest;
use indicatif::{ProgressBar, ProgressStyle};

use crate::client::{connect_gateway, DEFAULT_GATEWAY};

#[derive(Args)]
pub struct IngestArgs {
    #[arg(long, default_value = DEFAULT_GATEWAY)]
    pub gateway: String,
    /// Number of test images to ingest, from index 0.
    #[arg(long, default_value_t = 10_000)]
    pub limit: usize,
    /// Items per Upsert stream; progress advances per stream.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Skip items whose id every replica of the owning shard already
    /// stores, without encoding them, so that an interrupted ingest can be
    /// run again from the start.
    #[arg(long)]
    pub resume: bool,
}

/// Counts of one ingest run.
pub struct IngestSummary {
    pub total: usize,
    pub failed: usize,
}

pub async fn run(args: IngestArgs) -> anyhow::Result<IngestSummary> {
    let data = SplitData::load(&default_data_dir(), Split::Test)
        .context("failed to read Fashion-MNIST; install Debian's dataset-fashion-mnist or set DB4R_FASHION_MNIST_DIR")?;
    let total = args.limit.min(data.len());
    let mut gateway = connect_gateway(&args.gateway).await?;

    let progress = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template("ingest {bar:40} {pos}/{len} images [{elapsed_precise}, {per_sec}, eta {eta}]")
            .context("invalid progress template")?,
    );
    let mut failed = 0usize;
    let mut skipped = 0usize;
    let batch = args.batch.max(1);
    for start in (0..total).step_by(batch) {
        let end = (start + batch).min(total);
        let mut items = Vec::with_capacity(end - start);
        for index in start..end {
            let item = CatalogItem::new(&data, index)?;
            let image = png_bytes(&tinted_image(&data, index)?)?;
            items.push(UpsertRequest {
                id: item.id.clone(),
                image,
                metadata: item.metadata().into_iter().collect(),
                skip_existing: args.resume,
            });
        }

        let response = gateway.upsert(tokio_stream::iter(items)).await?.into_inner();
        for result in response.results.iter().filter(|result| !result.ok) {
            progress.println(format!("failed to ingest {}: {}", result.id, result.error));
        }
        failed += response.failed as usize;
        skipped += response.skipped as usize;
        progress.inc((end - start) as u64);
    }
    progress.finish();
    if args.resume {
        eprintln!("ingested {} of {total} images ({skipped} already stored and skipped, {failed} failed)", total - failed - skipped);
    } else {
        eprintln!("ingested {} of {total} images ({failed} failed)", total - failed);
    }
    Ok(IngestSummary { total, failed })
}

/// Writes the tinted image of a catalog item to `out`.
pub fn export_image(id: &str, out: &Path) -> anyhow::Result<()> {
    let (split, index) = parse_item_id(id)?;
    let data = SplitData::load(&default_data_dir(), split)?;
    let bytes = png_bytes(&tinted_image(&data, index)?)?;
    std::fs::write(out, bytes).with_context(|| format!("failed to write {}", out.display()))?;
    let item = CatalogItem::new(&data, index)?;
    eprintln!("wrote {} ({} {})", out.display(), item.colour.name(), item.class.name());
    Ok(())
}
