//! Image decoding limits and errors.

mod common;

use std::io::Cursor;
use std::time::Instant;

use common::{artifact, init};
use densebert4ret_model::{decode_image, preprocess_image, ModelError, Normalization};

/// Builds a PNG with a valid signature and IHDR chunk declaring `width`x`height` RGB pixels,
/// followed by a tiny image data chunk. Decoding it would need `3 * width * height` bytes.
fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(kind);
        hasher.update(data);
        out.extend_from_slice(&hasher.finalize().to_be_bytes());
    }

    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut header = Vec::new();
    header.extend_from_slice(&width.to_be_bytes());
    header.extend_from_slice(&height.to_be_bytes());
    // Bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace.
    header.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &header);
    // A zlib stream of a few zero bytes, far short of the declared image.
    chunk(
        &mut png,
        b"IDAT",
        &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01],
    );
    chunk(&mut png, b"IEND", &[]);
    png
}

#[test]
fn garbage_bytes_rejected() {
    init();
    let error = decode_image(b"definitely not an image", 1_000_000).expect_err("garbage");
    assert!(matches!(error, ModelError::InvalidImage(_)), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("unrecognised image format"), "{message}");
    assert!(
        message.contains("64, 65, 66"),
        "message should show the leading bytes: {message}"
    );
}

#[test]
fn empty_bytes_rejected() {
    init();
    let error = decode_image(&[], 1_000_000).expect_err("empty");
    assert!(error.to_string().contains("0 bytes"), "{error}");
}

#[test]
fn truncated_png_rejected() {
    init();
    let bytes = std::fs::read(artifact("data/skimage/chelsea.png")).expect("read image");
    let error = decode_image(&bytes[..bytes.len() / 2], 10_000_000).expect_err("truncated");
    assert!(matches!(error, ModelError::InvalidImage(_)), "{error:?}");
    assert!(error.to_string().contains("451x300"), "{error}");
}

#[test]
fn huge_declared_dimensions_rejected_before_decoding() {
    init();
    let bomb = png_declaring(100_000, 100_000);
    assert!(
        bomb.len() < 100,
        "the header-only PNG is {} bytes",
        bomb.len()
    );

    let started = Instant::now();
    let error = decode_image(&bomb, 16_000_000).expect_err("too many pixels");
    let elapsed = started.elapsed();
    match &error {
        ModelError::ImageTooLarge {
            width,
            height,
            pixels,
            max_pixels,
        } => {
            assert_eq!((*width, *height), (100_000, 100_000));
            assert_eq!(*pixels, 10_000_000_000);
            assert_eq!(*max_pixels, 16_000_000);
        }
        other => panic!("expected ImageTooLarge, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains("100000x100000"), "{message}");
    assert!(message.contains("16000000"), "{message}");
    assert!(
        elapsed.as_millis() < 100,
        "rejecting took {elapsed:?}; the pixels must not be decoded"
    );
}

#[test]
fn real_image_over_limit_rejected() {
    init();
    let bytes = std::fs::read(artifact("data/skimage/coffee.png")).expect("read image");
    let error = decode_image(&bytes, 1_000).expect_err("limit");
    let message = error.to_string();
    assert!(message.contains("600x400"), "{message}");
    assert!(message.contains("240000 pixels"), "{message}");
    assert!(message.contains("maximum of 1000"), "{message}");
}

#[test]
fn image_at_limit_accepted() {
    init();
    let bytes = std::fs::read(artifact("data/skimage/coffee.png")).expect("read image");
    let image = decode_image(&bytes, 240_000).expect("exactly at the limit");
    assert_eq!(image.dimensions(), (600, 400));
}

#[test]
fn jpeg_round_trip_preprocesses() {
    init();
    let source = image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, 128])
    });
    let mut jpeg = Vec::new();
    image::DynamicImage::ImageRgb8(source)
        .write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
        .expect("encode JPEG");

    let chw = preprocess_image(&jpeg, 32, Normalization::ImageNet, 1_000_000).expect("preprocess");
    assert_eq!(chw.len(), 3 * 32 * 32);
    assert!(chw.iter().all(|value| value.is_finite()));
    // The blue channel is a constant 128 everywhere, give or take JPEG error.
    let blue = (128.0 / 255.0 - 0.406) / 0.225;
    let plane = 32 * 32;
    let mean_blue: f32 = chw[2 * plane..].iter().sum::<f32>() / plane as f32;
    assert!(
        (mean_blue - blue).abs() < 0.05,
        "mean blue {mean_blue}, expected about {blue}"
    );
}
