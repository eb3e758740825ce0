//! Fixture writers shared by the reader tests.

#![allow(dead_code)]

use std::path::Path;

use image::{Rgb, RgbImage};

/// Writes `text` to `path`, creating parent folders.
pub fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Builds a `side` x `side` image filled with `rgb`.
pub fn solid(side: u32, rgb: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(side, side, Rgb(rgb))
}

/// Saves `image` at `path` in the format its extension names, creating parent folders.
pub fn save(path: &Path, image: &RgbImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image.save(path).unwrap();
}
