use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use densebert4ret_common::{init_tracing, load_settings, shutdown_signal};
use densebert4ret_model::{TextTokenizer, TokenOverflow};
use densebert4ret_proto::v1::encoder_server::EncoderServer;
use encoder_svc::batcher::{Reference, Work};
use encoder_svc::preprocess::Preprocessor;
use encoder_svc::{parse_device, Batcher, EncoderService, EncoderSettings};
use tonic::transport::Server;

/// Serves the DenseBert4Ret encoder over gRPC.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; `ENCODER__*` environment variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing("encoder-svc");
    let args = Args::parse();
    let settings: EncoderSettings = load_settings(args.config.as_deref(), "ENCODER")?;

    if settings.torch_threads > 0 {
        tch::set_num_threads(settings.torch_threads as i32);
    }
    let device = parse_device(&settings.device)?;
    let (batcher, model, _worker) = Batcher::start(settings.model_dir.clone(), device, settings.batching.clone())?;
    tracing::info!(
        model_dir = %settings.model_dir.display(),
        fingerprint = %model.fingerprint,
        backbone = %model.image_backbone,
        dimension = model.joint_dim,
        device = %model.device,
        "model loaded"
    );

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
    let preprocessor = Arc::new(Preprocessor::new(
        threads,
        tokenizer,
        model.image_size as u32,
        model.normalization,
        settings.limits.clone(),
    )?);

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
    let service = EncoderService::new(batcher, preprocessor, model, settings.batching.max_batch_size);

    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("failed to listen on {}; set listen to a free address", settings.listen))?;
    let address = listener.local_addr()?;
    health_reporter.set_serving::<EncoderServer<EncoderService>>().await;
    tracing::info!(%address, "encoder-svc serving");

    Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            EncoderServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown_signal())
        .await?;
    tracing::info!("encoder-svc stopped");
    Ok(())
}

/// Runs one mixed batch (a composed query and a catalog image), so the first
/// client request does not pay for lazy initialisation. The health service
/// reports SERVING only afterwards.
async fn warm_up(batcher: &Batcher, preprocessor: &Preprocessor, model: &encoder_svc::LoadedModel) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let pixel_count = (3 * model.image_size * model.image_size) as usize;
    let (tokens, _) = preprocessor.texts(vec!["the same item in blue".into()]).await?;

    let query = batcher.submit(Work::Query { reference: Reference::Pixels(vec![0.0; pixel_count]), tokens }, None);
    let image = batcher.submit(Work::Image { pixels: vec![0.0; pixel_count] }, None);
    let (query, image) = tokio::join!(query, image);
    query?;
    image?;
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "warm-up batch finished");
    Ok(())
}
