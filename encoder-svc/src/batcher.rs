//! Dynamic batching: requests from many gRPC handlers are queued and run by
//! one or more model worker threads in batched forward passes.
//!
//! Admission is separate from queueing. A request takes one queue slot per
//! item (a query, or one image of EmbedImages) before it is preprocessed,
//! and fails at once with RESOURCE_EXHAUSTED when the slots are taken. The
//! slot is released when a worker takes the item into a batch, so memory is
//! bounded by `queue_capacity` preprocessed items plus the batches in
//! flight.
//!
//! A worker blocks for the first item, then takes whatever else is queued.
//! It waits up to `max_wait_ms` for more only while the batch is not full.
//! Items whose deadline passed or whose client went away are dropped before
//! the forward pass. With `mixed_kinds`, composed queries and catalog images
//! share a forward pass, so their images go through the backbone together.
//! Without it, each kind gets its own pass.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use densebert4ret_model::{pad_batch, DenseBert4Ret, Device, Kind, Tensor, TextTokenizer};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::error::EncoderError;
use crate::metrics;
use crate::preprocess::Pixels;
use crate::settings::BatchingSettings;

/// Model input for one item.
pub enum Work {
    /// A composed query: reference image plus tokenised modification text.
    Query { reference: Reference, tokens: Vec<i64> },
    /// A catalog image to embed.
    Image { pixels: Pixels },
}

impl Work {
    fn is_query(&self) -> bool {
        matches!(self, Self::Query { .. })
    }
}

/// The reference of a composed query.
pub enum Reference {
    /// Preprocessed image that still has to go through the backbone.
    Pixels(Pixels),
    /// Backbone features computed earlier, for example at catalog ingest.
    Features(Vec<f32>),
}

/// Model output for one item.
pub enum Embedded {
    /// Unit-length embedding of a composed query.
    Query { embedding: Vec<f32> },
    /// Unit-length embedding of a catalog image and its backbone features.
    Image { embedding: Vec<f32>, features: Vec<f32> },
}

/// Time an item spent inside the batcher.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchTiming {
    /// Time from enqueue to the start of the batch's forward pass.
    pub queue_us: u64,
    /// Duration of the batch's forward pass.
    pub inference_us: u64,
    /// Items in the batch.
    pub batch_size: u32,
}

/// Numeric precision of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// fp32 everywhere.
    Fp32,
    /// CUDA autocast: convolutions and matrix products in fp16, reductions
    /// and outputs in fp32.
    ///
    /// NOTE: the weights stay fp32 in memory and autocast casts them for
    /// each operator, because the model crate offers no way to convert its
    /// weights to fp16.
    Fp16,
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "fp32" | "float32" => Ok(Self::Fp32),
            "fp16" | "float16" | "half" => Ok(Self::Fp16),
            other => Err(format!("invalid precision {other:?}; use \"fp32\" or \"fp16\"")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Self::Fp32 => "fp32",
            Self::Fp16 => "fp16",
        })
    }
}

/// Device, precision and thread counts of the model workers.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Device every worker loads its model onto.
    pub device: Device,
    /// Precision of the forward pass; [`Precision::Fp16`] needs CUDA.
    pub precision: Precision,
    /// Number of workers, each with its own model instance.
    pub workers: usize,
    /// libtorch intra-op threads of each worker; 0 keeps libtorch's default.
    pub torch_threads: usize,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, precision: Precision::Fp32, workers: 1, torch_threads: 0 }
    }
}

type Reply = oneshot::Sender<Result<(Embedded, BatchTiming), EncoderError>>;

struct Job {
    work: Work,
    /// Queue slot, released when a worker takes the job.
    slot: Slots,
    /// Instant when this entry was queued.
    enqueued: Instant,
    /// Instant after which the client no longer waits for the result.
    deadline: Option<Instant>,
    reply: Reply,
}

/// Facts about the loaded model, read once at start.
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
    /// Device name, for example `cpu` or `cuda:0`.
    pub device: String,
    pub precision: Precision,
    pub workers: usize,
    pub normalization: densebert4ret_model::Normalization,
    /// The model's tokenizer, shared with the preprocessing pool.
    pub tokenizer: Arc<TextTokenizer>,
}

/// Queue slots held by one request; dropping them frees the slots.
pub struct Slots {
    permit: Option<OwnedSemaphorePermit>,
    queue: Arc<QueueState>,
}

impl Slots {
    /// Splits one slot off, for one item of the request.
    pub fn take_one(&mut self) -> Option<Slots> {
        let permit = self.permit.as_mut()?.split(1)?;
        Some(Slots { permit: Some(permit), queue: Arc::clone(&self.queue) })
    }

    /// Number of slots held.
    pub fn len(&self) -> usize {
        self.permit.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Returns true when no slot is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        drop(self.permit.take());
        metrics::set_queue_depth(self.queue.depth());
    }
}

struct QueueState {
    slots: Arc<Semaphore>,
    capacity: usize,
}

impl QueueState {
    fn depth(&self) -> usize {
        self.capacity.saturating_sub(self.slots.available_permits())
    }
}

/// Handle to the batching queue; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    sender: Sender<Job>,
    queue: Arc<QueueState>,
}

impl Batcher {
    /// Starts `options.workers` model worker threads, each loading the model
    /// from `model_dir` and running one warm-up batch. Returns once every
    /// worker is ready, or the first load error.
    pub fn start(
        model_dir: PathBuf,
        options: WorkerOptions,
        settings: BatchingSettings,
    ) -> anyhow::Result<(Self, LoadedModel, Vec<JoinHandle<()>>)> {
        if options.precision == Precision::Fp16 && options.device == Device::Cpu {
            anyhow::bail!("precision fp16 needs a CUDA device, but device is cpu; set precision = \"fp32\" or a CUDA device");
        }
        let capacity = settings.queue_capacity.max(1);
        // The queue itself is unbounded: admission through `slots` bounds it.
        let (sender, receiver) = crossbeam_channel::unbounded::<Job>();
        let queue = Arc::new(QueueState { slots: Arc::new(Semaphore::new(capacity)), capacity });
        let (loaded_sender, loaded_receiver) = std::sync::mpsc::channel();

        let workers = options.workers.max(1);
        let mut handles = Vec::with_capacity(workers);
        for index in 0..workers {
            let receiver = receiver.clone();
            let loaded_sender = loaded_sender.clone();
            let model_dir = model_dir.clone();
            let options = options.clone();
            let settings = settings.clone();
            let handle = std::thread::Builder::new().name(format!("model-worker-{index}")).spawn(move || {
                if options.torch_threads > 0 {
                    // With OpenMP, libtorch's intra-op thread count is per calling thread.
                    tch::set_num_threads(options.torch_threads as i32);
                }
                let model = match load_and_warm_up(&model_dir, &options) {
                    Ok(model) => model,
                    Err(error) => {
                        let _ = loaded_sender.send(Err(error));
                        return;
                    }
                };
                let _ = loaded_sender.send(Ok(describe(&model, &options)));
                run_worker(index, model, options.precision, receiver, settings);
            })?;
            handles.push(handle);
        }
        drop(loaded_sender);

        let mut loaded = None;
        for _ in 0..workers {
            let model = loaded_receiver
                .recv()
                .map_err(|_| anyhow::anyhow!("a model worker stopped while loading the model"))??;
            loaded.get_or_insert(model);
        }
        let loaded = loaded.ok_or_else(|| anyhow::anyhow!("no model worker started"))?;
        metrics::set_queue_depth(0);
        Ok((Self { sender, queue }, loaded, handles))
    }

    /// Items admitted and not yet taken into a batch.
    pub fn queue_depth(&self) -> usize {
        self.queue.depth()
    }

    /// Capacity of the queue, in items.
    pub fn queue_capacity(&self) -> usize {
        self.queue.capacity
    }

    /// Takes `items` queue slots, or fails at once with
    /// [`EncoderError::QueueFull`] when fewer are free.
    pub fn admit(&self, items: usize) -> Result<Slots, EncoderError> {
        let capacity = self.queue.capacity;
        if items > capacity {
            return Err(EncoderError::out_of_range(format!(
                "the request has {items} items but the encoder queue has {capacity} slots; split it into requests of at most {capacity} images"
            )));
        }
        let full = || EncoderError::QueueFull { capacity, queued: self.queue.depth(), requested: items };
        let permits = u32::try_from(items).map_err(|_| full())?;
        let permit = Arc::clone(&self.queue.slots).try_acquire_many_owned(permits).map_err(|_| full())?;
        metrics::set_queue_depth(self.queue.depth());
        Ok(Slots { permit: Some(permit), queue: Arc::clone(&self.queue) })
    }

    /// Queues one item and waits for its result. `slot` is the queue slot
    /// [`Batcher::admit`] returned for it.
    pub async fn submit(
        &self,
        work: Work,
        slot: Slots,
        deadline: Option<Instant>,
    ) -> Result<(Embedded, BatchTiming), EncoderError> {
        let (reply, receiver) = oneshot::channel();
        let job = Job { work, slot, enqueued: Instant::now(), deadline, reply };
        self.sender.send(job).map_err(|_| EncoderError::WorkerStopped)?;
        receiver.await.map_err(|_| EncoderError::WorkerStopped)?
    }
}

fn load_and_warm_up(model_dir: &std::path::Path, options: &WorkerOptions) -> anyhow::Result<DenseBert4Ret> {
    let model = DenseBert4Ret::load(model_dir, options.device)
        .map_err(|error| anyhow::anyhow!("failed to load the model from {}: {error}", model_dir.display()))?;
    let started = Instant::now();
    let pixel_count = (3 * model.image_size() * model.image_size()) as usize;
    let tokens = model
        .tokenizer()
        .encode("the same item in blue")
        .map_err(|error| anyhow::anyhow!("warm-up tokenisation failed: {error}"))?;
    let works = [
        Work::Query { reference: Reference::Pixels(vec![0.0; pixel_count]), tokens },
        Work::Image { pixels: vec![0.0; pixel_count] },
    ];
    let refs: Vec<&Work> = works.iter().collect();
    run_forward(&model, options.precision, &refs).map_err(|error| anyhow::anyhow!("warm-up batch failed: {error}"))?;
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "model worker warm-up batch finished");
    Ok(model)
}

fn describe(model: &DenseBert4Ret, options: &WorkerOptions) -> LoadedModel {
    let config = model.config();
    let device = match model.device() {
        Device::Cuda(index) => format!("cuda:{index}"),
        other => format!("{other:?}").to_lowercase(),
    };
    LoadedModel {
        fingerprint: model.fingerprint().to_string(),
        joint_dim: model.joint_dim(),
        image_feature_dim: model.image_feature_dim(),
        text_feature_dim: model.text_feature_dim(),
        image_size: model.image_size(),
        image_backbone: config.image_backbone.architecture.as_str().to_string(),
        text_encoder: format!("bert ({:?} pooling)", config.text_encoder.pooling).to_lowercase(),
        max_text_tokens: config.text_encoder.max_tokens as i64,
        device,
        precision: options.precision,
        workers: options.workers.max(1),
        normalization: model.image_normalization(),
        tokenizer: Arc::clone(model.tokenizer()),
    }
}

fn run_worker(index: usize, model: DenseBert4Ret, precision: Precision, receiver: Receiver<Job>, settings: BatchingSettings) {
    let max_batch = settings.max_batch_size.max(1);
    let max_wait = Duration::from_millis(settings.max_wait_ms);
    tracing::info!(
        worker = index,
        max_batch,
        max_wait_ms = settings.max_wait_ms,
        mixed_kinds = settings.mixed_kinds,
        torch_threads = tch::get_num_threads(),
        "model worker started"
    );

    while let Some(batch) = collect_batch(&receiver, max_batch, max_wait) {
        let live = drop_stale(batch);
        if live.is_empty() {
            continue;
        }
        if settings.mixed_kinds {
            run_batch(index, &model, precision, live);
        } else {
            let (queries, images): (Vec<Job>, Vec<Job>) = live.into_iter().partition(|job| job.work.is_query());
            for part in [queries, images] {
                if !part.is_empty() {
                    run_batch(index, &model, precision, part);
                }
            }
        }
    }
    tracing::info!(worker = index, "model worker stopped: every batcher handle was dropped");
}

/// Blocks for the first job, then fills the batch. Returns `None` once every
/// sender is gone. The queue slots of the collected jobs are released here.
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
    // Taken into a batch: the slots go back to new requests.
    for job in &mut batch {
        drop(job.slot.permit.take());
    }
    metrics::set_queue_depth(batch[0].slot.queue.depth());
    Some(batch)
}

/// Removes jobs whose deadline has passed or whose client went away, and
/// counts them in [`metrics::DROPPED_TOTAL`].
fn drop_stale(batch: Vec<Job>) -> Vec<Job> {
    let now = Instant::now();
    let mut live = Vec::with_capacity(batch.len());
    let (mut expired, mut cancelled) = (0, 0);
    for job in batch {
        if job.deadline.is_some_and(|deadline| deadline <= now) {
            let waited_ms = now.duration_since(job.enqueued).as_millis() as u64;
            tracing::debug!(waited_ms, "dropped a request whose deadline passed in the queue");
            expired += 1;
            let _ = job.reply.send(Err(EncoderError::DeadlineExceeded { waited_ms, stage: "queue" }));
            continue;
        }
        if job.reply.is_closed() {
            tracing::debug!("dropped a request whose client went away");
            cancelled += 1;
            continue;
        }
        live.push(job);
    }
    if expired > 0 {
        metrics::record_dropped("deadline", expired);
    }
    if cancelled > 0 {
        metrics::record_dropped("cancelled", cancelled);
    }
    live
}

fn run_batch(worker: usize, model: &DenseBert4Ret, precision: Precision, batch: Vec<Job>) {
    let queries = batch.iter().filter(|job| job.work.is_query()).count();
    let images = batch.len() - queries;
    let span = tracing::info_span!("batch", worker, size = batch.len(), queries, images, inference_us = tracing::field::Empty);
    let _entered = span.enter();

    let started = Instant::now();
    let works: Vec<&Work> = batch.iter().map(|job| &job.work).collect();
    let outcome = run_forward(model, precision, &works);
    let inference = started.elapsed();
    let inference_us = inference.as_micros() as u64;
    span.record("inference_us", inference_us);
    let batch_size = batch.len() as u32;

    match outcome {
        Ok(outputs) => {
            metrics::record_batch(queries, images, inference);
            for (job, embedded) in batch.into_iter().zip(outputs) {
                let queued = started.duration_since(job.enqueued);
                metrics::record_stage("queue", queued);
                metrics::record_stage("inference", inference);
                let timing = BatchTiming { queue_us: queued.as_micros() as u64, inference_us, batch_size };
                let _ = job.reply.send(Ok((embedded, timing)));
            }
        }
        Err(message) => {
            tracing::error!(batch_size, error = %message, "forward pass failed");
            for job in batch {
                let _ = job.reply.send(Err(EncoderError::Inference(message.clone())));
            }
        }
    }
}

/// Runs one forward pass over `works` without gradients, under CUDA autocast for
/// [`Precision::Fp16`], and turns a libtorch panic into an error message.
pub fn run_forward(model: &DenseBert4Ret, precision: Precision, works: &[&Work]) -> Result<Vec<Embedded>, String> {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tch::no_grad(|| tch::autocast(precision == Precision::Fp16, || forward(model, works)))
    }));
    match outcome {
        Ok(result) => result,
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
            .unwrap_or_else(|| "the forward pass panicked".into())),
    }
}

/// Runs one batch: every raw image (query references and catalog images)
/// through the backbone at once, then the text encoder and fusion for the
/// queries and the projection head for the catalog images. Texts are padded
/// to the longest one in the batch.
fn forward(model: &DenseBert4Ret, batch: &[&Work]) -> Result<Vec<Embedded>, String> {
    let device = model.device();
    let size = model.image_size();
    let feature_dim = model.image_feature_dim();

    // Backbone over every item that carries pixels.
    let mut pixel_rows: Vec<usize> = vec![usize::MAX; batch.len()];
    let mut pixels: Vec<f32> = Vec::new();
    let mut pixel_count = 0usize;
    for (index, work) in batch.iter().enumerate() {
        let item_pixels = match work {
            Work::Query { reference: Reference::Pixels(pixels), .. } => Some(pixels),
            Work::Image { pixels } => Some(pixels),
            Work::Query { reference: Reference::Features(_), .. } => None,
        };
        if let Some(item_pixels) = item_pixels {
            pixel_rows[index] = pixel_count;
            pixel_count += 1;
            pixels.extend_from_slice(item_pixels);
        }
    }
    let image_features = if pixel_count > 0 {
        let images = Tensor::from_slice(&pixels).view([pixel_count as i64, 3, size, size]).to_device(device);
        Some(model.f_image_features(&images).map_err(|error| error.to_string())?.to_kind(Kind::Float))
    } else {
        None
    };

    // Composed queries.
    let query_indices: Vec<usize> = (0..batch.len()).filter(|&index| batch[index].is_query()).collect();
    let mut query_embeddings = Vec::new();
    if !query_indices.is_empty() {
        let mut reference_rows = Vec::with_capacity(query_indices.len());
        let mut tokens = Vec::with_capacity(query_indices.len());
        for &index in &query_indices {
            let Work::Query { reference, tokens: query_tokens } = batch[index] else {
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
    let image_indices: Vec<usize> = (0..batch.len()).filter(|&index| !batch[index].is_query()).collect();
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
    for work in batch {
        let embedded = if work.is_query() {
            Embedded::Query { embedding: queries.next().ok_or("missing query output")? }
        } else {
            let (embedding, features) = images.next().ok_or("missing image output")?;
            Embedded::Image { embedding, features }
        };
        outputs.push(embedded);
    }
    Ok(outputs)
}

/// Copies a 2-D tensor to the CPU as one fp32 `Vec<f32>` per row.
fn rows(tensor: &Tensor) -> Result<Vec<Vec<f32>>, String> {
    let tensor = tensor.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let width = tensor.size().get(1).copied().ok_or("expected a 2-D tensor")? as usize;
    let flat = Vec::<f32>::try_from(tensor.view(-1)).map_err(|error| error.to_string())?;
    Ok(flat.chunks(width.max(1)).map(|row| row.to_vec()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_parses_names() {
        assert_eq!("fp32".parse::<Precision>(), Ok(Precision::Fp32));
        assert_eq!("FP16".parse::<Precision>(), Ok(Precision::Fp16));
        assert_eq!("half".parse::<Precision>(), Ok(Precision::Fp16));
        assert!("bf16".parse::<Precision>().is_err());
    }
}
