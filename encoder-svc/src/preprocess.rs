//! Image decoding and tokenisation on a dedicated thread pool, so neither the
//! async runtime nor the model worker spends time on them.

use std::sync::Arc;
use std::time::Instant;

use std::io::Cursor;

use densebert4ret_model::{decode_image, image_to_chw, ModelError, Normalization, TextTokenizer};
use image::ImageReader;
use tokio::sync::oneshot;

use crate::error::EncoderError;
use crate::settings::LimitSettings;

/// Turns request payloads into model inputs.
pub struct Preprocessor {
    pool: rayon::ThreadPool,
    tokenizer: Arc<TextTokenizer>,
    image_size: u32,
    normalization: Normalization,
    limits: LimitSettings,
}

/// A preprocessed image: CHW floats, normalised for the backbone.
pub type Pixels = Vec<f32>;

impl Preprocessor {
    /// Creates the pool with `threads` threads.
    pub fn new(
        threads: usize,
        tokenizer: Arc<TextTokenizer>,
        image_size: u32,
        normalization: Normalization,
        limits: LimitSettings,
    ) -> anyhow::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|index| format!("preprocess-{index}"))
            .build()?;
        Ok(Self { pool, tokenizer, image_size, normalization, limits })
    }

    /// Validation limits this preprocessor enforces.
    pub fn limits(&self) -> &LimitSettings {
        &self.limits
    }

    /// Decodes, resizes and normalises each image. Each image gets its own
    /// result, so one bad image does not fail the others.
    pub async fn images(&self, images: Vec<Vec<u8>>) -> Result<(Vec<Result<Pixels, EncoderError>>, u64), EncoderError> {
        let started = Instant::now();
        let size = self.image_size;
        let normalization = self.normalization;
        let max_bytes = self.limits.max_image_bytes;
        let max_pixels = self.limits.max_image_pixels;
        let (sender, receiver) = oneshot::channel();

        self.pool.spawn(move || {
            use rayon::prelude::*;
            let results: Vec<_> = images
                .par_iter()
                .map(|bytes| prepare_image(bytes, size, normalization, max_bytes, max_pixels))
                .collect();
            let _ = sender.send(results);
        });

        let results = receiver.await.map_err(|_| EncoderError::Inference("the preprocessing pool stopped".into()))?;
        Ok((results, started.elapsed().as_micros() as u64))
    }

    /// Validates and tokenises the modification texts of one query.
    ///
    /// Several texts are joined in order by
    /// [`densebert4ret_model::join_modifications`], the same composition the
    /// trainer uses for multi-turn queries.
    pub async fn texts(&self, texts: Vec<String>) -> Result<(Vec<i64>, u64), EncoderError> {
        let started = Instant::now();
        if texts.is_empty() {
            return Err(EncoderError::invalid(
                "the query has no modification text; send at least one non-empty text",
            ));
        }
        if texts.len() > self.limits.max_texts {
            return Err(EncoderError::out_of_range(format!(
                "the query has {} modification texts, more than the limit of {}; send fewer texts",
                texts.len(),
                self.limits.max_texts
            )));
        }
        for (index, text) in texts.iter().enumerate() {
            if text.trim().is_empty() {
                return Err(EncoderError::invalid(format!(
                    "modification text {index} is empty; describe the change, for example \"the same shirt in blue\""
                )));
            }
            let chars = text.chars().count();
            if chars > self.limits.max_text_chars {
                return Err(EncoderError::out_of_range(format!(
                    "modification text {index} has {chars} characters, more than the limit of {}; shorten it",
                    self.limits.max_text_chars
                )));
            }
        }

        let joined = densebert4ret_model::join_modifications(&texts);
        let tokenizer = Arc::clone(&self.tokenizer);
        let (sender, receiver) = oneshot::channel();
        self.pool.spawn(move || {
            let _ = sender.send(tokenizer.encode(&joined));
        });
        let ids = receiver
            .await
            .map_err(|_| EncoderError::Inference("the preprocessing pool stopped".into()))?
            .map_err(|error| match error {
                ModelError::TooManyTokens { count, max_tokens } => EncoderError::out_of_range(format!(
                    "the modification text has {count} tokens, more than the limit of {max_tokens}; shorten it, \
                     or set ENCODER__LIMITS__TOKEN_OVERFLOW=truncate to keep the first {max_tokens} tokens"
                )),
                other => EncoderError::invalid(other.to_string()),
            })?;
        Ok((ids, started.elapsed().as_micros() as u64))
    }
}

fn prepare_image(
    bytes: &[u8],
    size: u32,
    normalization: Normalization,
    max_bytes: usize,
    max_pixels: u64,
) -> Result<Pixels, EncoderError> {
    if bytes.is_empty() {
        return Err(EncoderError::invalid(
            "the image is empty (0 bytes); send encoded PNG, JPEG, WebP, BMP or GIF bytes",
        ));
    }
    if bytes.len() > max_bytes {
        return Err(EncoderError::out_of_range(format!(
            "the image has {} bytes, more than the limit of {max_bytes}; downscale or recompress it, \
             or raise ENCODER__LIMITS__MAX_IMAGE_BYTES",
            bytes.len()
        )));
    }
    check_dimensions(bytes, max_pixels)?;
    let image = decode_image(bytes, max_pixels).map_err(|error| match error {
        ModelError::ImageTooLarge { .. } => EncoderError::out_of_range(error.to_string()),
        other => EncoderError::invalid(format!("{other}; send a valid PNG, JPEG, WebP, BMP or GIF file")),
    })?;
    Ok(image_to_chw(&image, size, normalization))
}

/// Reads the width and height from the image header alone and rejects an
/// image with more than `max_pixels` pixels, so a small file that declares a
/// huge image (a decompression bomb) is rejected without decoding it.
fn check_dimensions(bytes: &[u8], max_pixels: u64) -> Result<(), EncoderError> {
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|error| {
        EncoderError::invalid(format!("failed to read the image header: {error}; send a valid PNG, JPEG, WebP, BMP or GIF file"))
    })?;
    if reader.format().is_none() {
        return Err(EncoderError::invalid(format!(
            "unrecognised image format (first bytes {:02x?}); send PNG, JPEG, WebP, BMP or GIF bytes",
            &bytes[..bytes.len().min(8)]
        )));
    }
    let (width, height) = reader.into_dimensions().map_err(|error| {
        EncoderError::invalid(format!("failed to read the image header: {error}; send a valid PNG, JPEG, WebP, BMP or GIF file"))
    })?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(EncoderError::out_of_range(format!(
            "the image is {width}x{height} ({pixels} pixels), more than the limit of {max_pixels} pixels; \
             downscale it before sending, or raise ENCODER__LIMITS__MAX_IMAGE_PIXELS"
        )));
    }
    Ok(())
}
