use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use densebert4ret_common::{init_tracing, load_settings, shutdown_signal};
use densebert4ret_model::{TextTokenizer, TokenOverflow};
use densebert4ret_proto::v1::encoder_server::EncoderServer;
use encoder_svc::preprocess::Preprocessor;
use encoder_svc::{parse_device, Batcher, EncoderService, EncoderSettings, Precision, WorkerOptions};
use tonic::transport::Server;

/// Serves the DenseBert4Ret encoder over gRPC.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; `ENCODER__*` environment variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing("encoder-svc");
    let args = Args::parse();
    let settings: EncoderSettings = load_settings(args.config.as_deref(), "ENCODER")?;
    settings.validate().map_err(|message| anyhow::anyhow!("invalid encoder settings: {message}"))?;

    if !settings.metrics_listen.is_empty() {
        let address = settings.metrics_listen.parse().with_context(|| {
            format!("invalid metrics_listen {:?}; use host:port, for example 127.0.0.1:9102", settings.metrics_listen)
        })?;
        encoder_svc::metrics::install(address)?;
        tracing::info!(%address, "metrics endpoint serving /metrics");
    }

    let precision: Precision = settings.precision.parse().map_err(|message: String| anyhow::anyhow!(message))?;
    let options = WorkerOptions {
        device: parse_device(&settings.device)?,
        precision,
        workers: settings.workers,
        torch_threads: settings.torch_threads,
    };
    let (batcher, model, _workers) = Batcher::start(settings.model_dir.clone(), options, settings.batching.clone())?;
    tracing::info!(
        model_dir = %settings.model_dir.display(),
        fingerprint = %model.fingerprint,
        backbone = %model.image_backbone,
        dimension = model.joint_dim,
        device = %model.device,
        precision = %model.precision,
        workers = model.workers,
        "model loaded"
    );

    let preprocessor = Arc::new(build_preprocessor(&settings, &model)?);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_not_serving::<EncoderServer<EncoderService>>().await;

    warm_up(&batcher, &preprocessor, &model).await?;

    // Both reflection versions: grpcurl releases before 1.9 only speak v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(densebert4ret_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let max_message_bytes = settings.limits.max_message_bytes;
    let service = EncoderService::new(batcher, preprocessor, model, settings.batching.max_batch_size);

    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("failed to listen on {}; set listen to a free address", settings.listen))?;
    let address = listener.local_addr()?;
    health_reporter.set_serving::<EncoderServer<EncoderService>>().await;
    tracing::info!(%address, "encoder-svc serving");

    Server::builder()
        .layer(encoder_svc::service::MessageLimitLayer::new(max_message_bytes))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            EncoderServer::new(service)
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(usize::MAX),
        )
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown_signal())
        .await?;
    tracing::info!("encoder-svc stopped");
    Ok(())
}

fn build_preprocessor(settings: &EncoderSettings, model: &encoder_svc::LoadedModel) -> anyhow::Result<Preprocessor> {
    let tokenizer = match settings.limits.token_overflow.as_deref() {
        None => Arc::clone(&model.tokenizer),
        Some(policy) => {
            let overflow = match policy {
                "reject" => TokenOverflow::Reject,
                "truncate" => TokenOverflow::Truncate,
                other => anyhow::bail!("invalid limits.token_overflow {other:?}; use \"reject\" or \"truncate\""),
            };
            let path = model.tokenizer.path().to_path_buf();
            let tokenizer = TextTokenizer::from_file(&path, model.max_text_tokens as usize, overflow)
                .with_context(|| format!("failed to load the tokenizer {}", path.display()))?;
            Arc::new(tokenizer)
        }
    };
    let threads = match settings.preprocess_threads {
        0 => std::thread::available_parallelism().map(usize::from).unwrap_or(2),
        threads => threads,
    };
    Preprocessor::new(threads, tokenizer, model.image_size as u32, model.normalization, settings.limits.clone())
}

/// Runs one query and one catalog image through the whole path (preprocessing
/// pool, queue, worker), so the first client request does not pay for lazy
/// initialisation. The health service reports SERVING only afterwards.
async fn warm_up(batcher: &Batcher, preprocessor: &Preprocessor, model: &encoder_svc::LoadedModel) -> anyhow::Result<()> {
    use encoder_svc::batcher::{Reference, Work};

    let started = std::time::Instant::now();
    let pixel_count = (3 * model.image_size * model.image_size) as usize;
    let (tokens, _) = preprocessor.texts(vec!["the same item in blue".into()]).await?;

    let mut slots = batcher.admit(2)?;
    let query_slot = slots.take_one().context("warm-up: no queue slot")?;
    let image_slot = slots.take_one().context("warm-up: no queue slot")?;
    let query = batcher.submit(Work::Query { reference: Reference::Pixels(vec![0.0; pixel_count]), tokens }, query_slot, None);
    let image = batcher.submit(Work::Image { pixels: vec![0.0; pixel_count] }, image_slot, None);
    let (query, image) = tokio::join!(query, image);
    query?;
    image?;
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "warm-up batch finished");
    Ok(())
}
