//! Dynamic batching: requests from many gRPC handlers are queued and run by
//! one model worker thread as a single forward pass.
//!
//! The worker blocks for the first request, then takes whatever else is
//! queued. It waits up to `max_wait_ms` for more only while the batch is not
//! full. Requests whose client went away or whose deadline passed are dropped
//! before the forward pass. Composed queries and catalog images share a batch:
//! their images go through the backbone together.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use densebert4ret_model::{pad_batch, DenseBert4Ret, Device, Kind, Tensor, TextTokenizer};
use tokio::sync::oneshot;

use crate::error::EncoderError;
use crate::preprocess::Pixels;
use crate::settings::BatchingSettings;

/// Model input for one request.
pub enum Work {
    /// A composed query: reference image plus tokenised modification text.
    Query { reference: Reference, tokens: Vec<i64> },
    /// A catalog image to embed.
    Image { pixels: Pixels },
}

/// The reference of a composed query.
pub enum Reference {
    /// Preprocessed image that still has to go through the backbone.
    Pixels(Pixels),
    /// Backbone features computed earlier, for example at catalog ingest.
    Features(Vec<f32>),
}

/// Model output for one request.
pub enum Embedded {
    Query { embedding: Vec<f32> },
    Image { embedding: Vec<f32>, features: Vec<f32> },
}

/// Time a request spent inside the batcher.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchTiming {
    /// Time from enqueue to the start of the batch's forward pass.
    pub queue_us: u64,
    /// Duration of the batch's forward pass.
    pub inference_us: u64,
    /// Requests in the batch.
    pub batch_size: u32,
}

type Reply = oneshot::Sender<Result<(Embedded, BatchTiming), EncoderError>>;

struct Job {
    work: Work,
    /// Instant when this entry was queued.
    enqueued: Instant,
    /// Instant after which the client no longer waits for the result.
    deadline: Option<Instant>,
    reply: Reply,
}

/// Facts about the loaded model, read once by the worker at start.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub fingerprint: String,
    pub joint_dim: i64,
    pub image_feature_dim: i64,
    pub text_feature_dim: i64,
    pub image_size: i64,
    pub image_backbone: String,
    pub text_encoder: String,
    pub max_text_tokens: i64,
    pub device: String,
    pub normalization: densebert4ret_model::Normalization,
    /// The model's tokenizer, shared with the preprocessing pool.
    pub tokenizer: Arc<TextTokenizer>,
}

/// Handle to the batching queue; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    sender: Sender<Job>,
    capacity: usize,
    depth: Arc<AtomicUsize>,
}

impl Batcher {
    /// Starts the model worker thread, which loads the model from `model_dir`
    /// onto `device`. Returns once the model is loaded, or the load error.
    pub fn start(
        model_dir: PathBuf,
        device: Device,
        settings: BatchingSettings,
    ) -> anyhow::Result<(Self, LoadedModel, JoinHandle<()>)> {
        let capacity = settings.queue_capacity.max(1);
        let (sender, receiver) = crossbeam_channel::bounded::<Job>(capacity);
        let depth = Arc::new(AtomicUsize::new(0));
        let (loaded_sender, loaded_receiver) = std::sync::mpsc::channel();

        let worker_depth = Arc::clone(&depth);
        let handle = std::thread::Builder::new().name("model-worker".into()).spawn(move || {
            let model = match DenseBert4Ret::load(&model_dir, device) {
                Ok(model) => model,
                Err(error) => {
                    let _ = loaded_sender.send(Err(anyhow::anyhow!(
                        "failed to load the model from {}: {error}",
                        model_dir.display()
                    )));
                    return;
                }
            };
            let _ = loaded_sender.send(Ok(describe(&model)));
            run_worker(model, receiver, settings, worker_depth);
        })?;

        let loaded = loaded_receiver
            .recv()
            .map_err(|_| anyhow::anyhow!("the model worker stopped while loading the model"))??;
        Ok((Self { sender, capacity, depth }, loaded, handle))
    }

    /// Requests waiting for the model.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Queues one request and waits for its result. Fails at once with
    /// `QueueFull` when the queue is at capacity.
    pub async fn submit(
        &self,
        work: Work,
        deadline: Option<Instant>,
    ) -> Result<(Embedded, BatchTiming), EncoderError> {
        let (reply, receiver) = oneshot::channel();
        let job = Job { work, enqueued: Instant::now(), deadline, reply };
        match self.sender.try_send(job) {
            Ok(()) => {
                self.depth.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) => return Err(EncoderError::QueueFull { capacity: self.capacity }),
            Err(TrySendError::Disconnected(_)) => return Err(EncoderError::WorkerStopped),
        }
        receiver.await.map_err(|_| EncoderError::WorkerStopped)?
    }
}

fn describe(model: &DenseBert4Ret) -> LoadedModel {
    let config = model.config();
    LoadedModel {
        fingerprint: model.fingerprint().to_string(),
        joint_dim: model.joint_dim(),
        image_feature_dim: model.image_feature_dim(),
        text_feature_dim: model.text_feature_dim(),
        image_size: model.image_size(),
        image_backbone: config.image_backbone.architecture.as_str().to_string(),
        text_encoder: format!("bert ({:?} pooling)", config.text_encoder.pooling).to_lowercase(),
        max_text_tokens: config.text_encoder.max_tokens as i64,
        device: format!("{:?}", model.device()).to_lowercase(),
        normalization: model.image_normalization(),
        tokenizer: Arc::clone(model.tokenizer()),
    }
}

fn run_worker(model: DenseBert4Ret, receiver: Receiver<Job>, settings: BatchingSettings, depth: Arc<AtomicUsize>) {
    let max_batch = settings.max_batch_size.max(1);
    let max_wait = Duration::from_millis(settings.max_wait_ms);
    tracing::info!(max_batch, max_wait_ms = settings.max_wait_ms, "model worker started");

    while let Some(batch) = collect_batch(&receiver, max_batch, max_wait) {
        depth.fetch_sub(batch.len(), Ordering::Relaxed);
        let live = drop_stale(batch);
        if !live.is_empty() {
            run_batch(&model, live);
        }
    }
    tracing::info!("model worker stopped: every batcher handle was dropped");
}

/// Blocks for the first job, then fills the batch. Returns `None` once every
/// sender is gone.
fn collect_batch(receiver: &Receiver<Job>, max_batch: usize, max_wait: Duration) -> Option<Vec<Job>> {
    let first = receiver.recv().ok()?;
    let wait_until = Instant::now() + max_wait;
    let mut batch = vec![first];

    while batch.len() < max_batch {
        match receiver.try_recv() {
            Ok(job) => {
                batch.push(job);
                continue;
            }
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {}
        }
        let now = Instant::now();
        if now >= wait_until {
            break;
        }
        match receiver.recv_timeout(wait_until - now) {
            Ok(job) => batch.push(job),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    Some(batch)
}

/// Removes jobs whose client went away or whose deadline has passed.
fn drop_stale(batch: Vec<Job>) -> Vec<Job> {
    let now = Instant::now();
    let mut live = Vec::with_capacity(batch.len());
    for job in batch {
        if job.reply.is_closed() {
            tracing::debug!("dropped a request whose client went away");
            continue;
        }
        if job.deadline.is_some_and(|deadline| deadline <= now) {
            let waited_ms = now.duration_since(job.enqueued).as_millis() as u64;
            tracing::debug!(waited_ms, "dropped a request whose deadline passed");
            let _ = job.reply.send(Err(EncoderError::DeadlineExceeded { waited_ms }));
            continue;
        }
        live.push(job);
    }
    live
}

#[tracing::instrument(skip_all, fields(batch_size = batch.len()))]
fn run_batch(model: &DenseBert4Ret, batch: Vec<Job>) {
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        tch::no_grad(|| forward(model, &batch))
    }));
    let inference_us = started.elapsed().as_micros() as u64;
    let batch_size = batch.len() as u32;

    match outcome {
        Ok(Ok(outputs)) => {
            for (job, embedded) in batch.into_iter().zip(outputs) {
                let timing = BatchTiming {
                    queue_us: started.duration_since(job.enqueued).as_micros() as u64,
                    inference_us,
                    batch_size,
                };
                let _ = job.reply.send(Ok((embedded, timing)));
            }
        }
        Ok(Err(message)) => fail_batch(batch, message),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                .unwrap_or_else(|| "the forward pass panicked".into());
            fail_batch(batch, message)
        }
    }
}

fn fail_batch(batch: Vec<Job>, message: String) {
    tracing::error!(batch_size = batch.len(), error = %message, "forward pass failed");
    for job in batch {
        let _ = job.reply.send(Err(EncoderError::Inference(message.clone())));
    }
}

/// Runs one mixed batch: every raw image (query references and catalog
/// images) through the backbone at once, then the text encoder and fusion
/// for the queries and the projection head for the catalog images.
fn forward(model: &DenseBert4Ret, batch: &[Job]) -> Result<Vec<Embedded>, String> {
    let device = model.device();
    let size = model.image_size();
    let feature_dim = model.image_feature_dim();

    // Backbone over every job that carries pixels.
    let mut pixel_rows: Vec<usize> = vec![usize::MAX; batch.len()];
    let mut pixels: Vec<f32> = Vec::new();
    let mut pixel_count = 0usize;
    for (index, job) in batch.iter().enumerate() {
        let job_pixels = match &job.work {
            Work::Query { reference: Reference::Pixels(pixels), .. } => Some(pixels),
            Work::Image { pixels } => Some(pixels),
            Work::Query { reference: Reference::Features(_), .. } => None,
        };
        if let Some(job_pixels) = job_pixels {
            pixel_rows[index] = pixel_count;
            pixel_count += 1;
            pixels.extend_from_slice(job_pixels);
        }
    }
    let image_features = if pixel_count > 0 {
        let images = Tensor::from_slice(&pixels)
            .view([pixel_count as i64, 3, size, size])
            .to_device(device);
        Some(model.f_image_features(&images).map_err(|error| error.to_string())?.to_kind(Kind::Float))
    } else {
        None
    };

    // Composed queries.
    let query_indices: Vec<usize> =
        (0..batch.len()).filter(|&index| matches!(batch[index].work, Work::Query { .. })).collect();
    let mut query_embeddings = Vec::new();
    if !query_indices.is_empty() {
        let mut reference_rows = Vec::with_capacity(query_indices.len());
        let mut tokens = Vec::with_capacity(query_indices.len());
        for &index in &query_indices {
            let Work::Query { reference, tokens: query_tokens } = &batch[index].work else {
                continue;
            };
            let row = match reference {
                Reference::Pixels(_) => image_features
                    .as_ref()
                    .ok_or("backbone features are missing for a pixel reference")?
                    .get(pixel_rows[index] as i64),
                Reference::Features(features) => Tensor::from_slice(features).to_device(device),
            };
            reference_rows.push(row.view([1, feature_dim]));
            tokens.push(query_tokens.clone());
        }
        let references = Tensor::cat(&reference_rows, 0);
        let (input_ids, attention_mask) = pad_batch(&tokens, model.tokenizer().pad_id());
        let text = model
            .f_text_features(&input_ids.to_device(device), &attention_mask.to_device(device))
            .map_err(|error| error.to_string())?;
        let composed = model.f_compose(&references, &text).map_err(|error| error.to_string())?;
        query_embeddings = rows(&composed)?;
    }

    // Catalog images.
    let image_indices: Vec<usize> =
        (0..batch.len()).filter(|&index| matches!(batch[index].work, Work::Image { .. })).collect();
    let mut image_embeddings = Vec::new();
    let mut image_feature_rows = Vec::new();
    if !image_indices.is_empty() {
        let features = image_features.as_ref().ok_or("backbone features are missing for catalog images")?;
        let selected: Vec<i64> = image_indices.iter().map(|&index| pixel_rows[index] as i64).collect();
        let selected = features.index_select(0, &Tensor::from_slice(&selected).to_device(device));
        image_embeddings = rows(&model.f_project_images(&selected).map_err(|error| error.to_string())?)?;
        image_feature_rows = rows(&selected)?;
    }

    let mut queries = query_embeddings.into_iter();
    let mut images = image_embeddings.into_iter().zip(image_feature_rows);
    let mut outputs = Vec::with_capacity(batch.len());
    for job in batch {
        let embedded = match job.work {
            Work::Query { .. } => Embedded::Query { embedding: queries.next().ok_or("missing query output")? },
            Work::Image { .. } => {
                let (embedding, features) = images.next().ok_or("missing image output")?;
                Embedded::Image { embedding, features }
            }
        };
        outputs.push(embedded);
    }
    Ok(outputs)
}

/// Copies a 2-D tensor to the CPU as one `Vec<f32>` per row.
fn rows(tensor: &Tensor) -> Result<Vec<Vec<f32>>, String> {
    let tensor = tensor.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let width = tensor.size().get(1).copied().ok_or("expected a 2-D tensor")? as usize;
    let flat = Vec::<f32>::try_from(tensor.view(-1)).map_err(|error| error.to_string())?;
    Ok(flat.chunks(width.max(1)).map(|row| row.to_vec()).collect())
}
