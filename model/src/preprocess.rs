//! Image decoding and normalisation, independent of libtorch so it can run on any thread.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Per-channel ImageNet mean of 0..1 pixels, as torchvision's pretrained models use.
const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Per-channel ImageNet standard deviation of 0..1 pixels.
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Pixel normalisation applied before the image backbone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// `(pixel - 127) / 128` on 0..=255 pixels, as EfficientNet-Lite was trained.
    EfficientNetLite,
    /// `(pixel / 255 - mean) / std` with the ImageNet statistics, as torchvision models expect.
    ImageNet,
}

impl Normalization {
    fn apply(self, channel: usize, pixel: u8) -> f32 {
        let value = f32::from(pixel);
        match self {
            Self::EfficientNetLite => (value - 127.0) / 128.0,
            Self::ImageNet => (value / 255.0 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel],
        }
    }
}

/// Decodes PNG, JPEG, WebP, BMP or GIF bytes into an RGB image.
///
/// The dimensions are read from the header and checked against `max_pixels` before any pixel
/// data is decoded, so a small file that declares a huge image costs no memory. The EXIF
/// orientation, when present, is applied. Animated images yield their first frame.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ModelError> {
    if bytes.is_empty() {
        return Err(ModelError::InvalidImage(
            "the image is empty (0 bytes)".to_owned(),
        ));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|error| {
            ModelError::InvalidImage(format!("failed to read the image header: {error}"))
        })?;
    if reader.format().is_none() {
        return Err(ModelError::InvalidImage(format!(
            "unrecognised image format (first bytes {:02x?}); expected PNG, JPEG, WebP, BMP or GIF",
            &bytes[..bytes.len().min(8)]
        )));
    }
    let mut decoder = reader.into_decoder().map_err(|error| {
        ModelError::InvalidImage(format!("failed to read the image header: {error}"))
    })?;

    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(ModelError::ImageTooLarge {
            width,
            height,
            pixels,
            max_pixels,
        });
    }
    if pixels == 0 {
        return Err(ModelError::InvalidImage(format!(
            "the image is {width}x{height}, which has no pixels"
        )));
    }

    let orientation = decoder.orientation().map_err(|error| {
        ModelError::InvalidImage(format!("failed to read the image orientation: {error}"))
    })?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|error| {
        ModelError::InvalidImage(format!(
            "failed to decode the {width}x{height} image: {error}"
        ))
    })?;
    image.apply_orientation(orientation);
    Ok(image.into_rgb8())
}

/// Resizes an image to `size`x`size` with a bilinear (triangle) filter, ignoring the aspect
/// ratio, and returns the normalised pixels in CHW order (`3 * size * size` values).
pub fn image_to_chw(image: &RgbImage, size: u32, normalization: Normalization) -> Vec<f32> {
    let resized;
    let source = if image.dimensions() == (size, size) {
        image
    } else {
        resized = image::imageops::resize(image, size, size, FilterType::Triangle);
        &resized
    };

    let plane = (size as usize) * (size as usize);
    let mut chw = vec![0.0f32; 3 * plane];
    for (index, pixel) in source.pixels().enumerate() {
        for channel in 0..3 {
            chw[channel * plane + index] = normalization.apply(channel, pixel[channel]);
        }
    }
    chw
}

/// Decodes image bytes and returns the model input in CHW order; see [`decode_image`] and
/// [`image_to_chw`].
pub fn preprocess_image(
    bytes: &[u8],
    size: u32,
    normalization: Normalization,
    max_pixels: u64,
) -> Result<Vec<f32>, ModelError> {
    let image = decode_image(bytes, max_pixels)?;
    Ok(image_to_chw(&image, size, normalization))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_values() {
        assert_eq!(Normalization::EfficientNetLite.apply(0, 127), 0.0);
        assert_eq!(Normalization::EfficientNetLite.apply(1, 255), 1.0);
        assert_eq!(Normalization::EfficientNetLite.apply(2, 0), -127.0 / 128.0);
        let red = Normalization::ImageNet.apply(0, 255);
        assert!((red - (1.0 - 0.485) / 0.229).abs() < 1e-6, "{red}");
    }

    #[test]
    fn chw_layout_separates_channels() {
        let image = RgbImage::from_fn(4, 4, |x, _| image::Rgb([x as u8, 100, 200]));
        let chw = image_to_chw(&image, 4, Normalization::EfficientNetLite);
        assert_eq!(chw.len(), 3 * 16);
        assert_eq!(chw[3], (3.0 - 127.0) / 128.0);
        assert!(chw[16..32]
            .iter()
            .all(|&value| value == (100.0 - 127.0) / 128.0));
        assert!(chw[32..]
            .iter()
            .all(|&value| value == (200.0 - 127.0) / 128.0));
    }

    #[test]
    fn resize_to_square() {
        let image = RgbImage::from_pixel(30, 10, image::Rgb([255, 0, 0]));
        let chw = image_to_chw(&image, 8, Normalization::ImageNet);
        assert_eq!(chw.len(), 3 * 64);
        let red = (1.0 - 0.485) / 0.229;
        assert!(chw[..64].iter().all(|&value| (value - red).abs() < 1e-5));
    }
}
