//! `densebert4ret`: run a local cluster, ingest the Fashion-MNIST catalog and
//! send composed queries to a gateway.

mod client;
mod cluster;
mod ingest;
mod search;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "densebert4ret", version, about = "Composed image retrieval: local cluster and client")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start encoder-svc, the index shards and the gateway on loopback, ingest
    /// the Fashion-MNIST test images, and keep serving until Ctrl-C.
    Cluster(cluster::ClusterArgs),
    /// Ingest Fashion-MNIST test images (tinted) into a running gateway.
    Ingest(ingest::IngestArgs),
    /// Send a composed query (reference image or catalog id, plus text) and
    /// print the ranked results.
    Search(search::SearchArgs),
    /// Write the image of a Fashion-MNIST catalog item to a PNG file, for use
    /// as a query image.
    ExportImage {
        /// Catalog id, for example fmnist-test-00042.
        #[arg(long)]
        id: String,
        /// Output PNG path.
        #[arg(long)]
        out: PathBuf,
    },
    /// Delete catalog items by id.
    Delete {
        /// Ids to delete.
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long, default_value = client::DEFAULT_GATEWAY)]
        gateway: String,
    },
    /// Print cluster statistics.
    Stats {
        #[arg(long, default_value = client::DEFAULT_GATEWAY)]
        gateway: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    densebert4ret_common::init_tracing("densebert4ret");
    match Cli::parse().command {
        Command::Cluster(args) => cluster::run(args).await,
        Command::Ingest(args) => ingest::run(args).await.map(|_| ()),
        Command::Search(args) => search::run(args).await,
        Command::ExportImage { id, out } => ingest::export_image(&id, &out),
        Command::Delete { ids, gateway } => search::delete(&gateway, ids).await,
        Command::Stats { gateway } => search::stats(&gateway).await,
    }
}
