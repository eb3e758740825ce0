//! The eight benchmark colours and the deterministic tint of every image.

use std::fmt;
use std::io::Cursor;
use std::str::FromStr;

use image::{ImageFormat, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::{DatasetError, Result};
use crate::idx::{SplitData, IMAGE_SIDE};
use crate::Split;

/// A tint colour of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Colour {
    /// RGB (230, 25, 35).
    Red,
    /// RGB (255, 140, 0).
    Orange,
    /// RGB (250, 225, 30).
    Yellow,
    /// RGB (40, 190, 60).
    Green,
    /// RGB (30, 215, 230).
    Cyan,
    /// RGB (30, 80, 240).
    Blue,
    /// RGB (150, 50, 200).
    Purple,
    /// RGB (255, 255, 255), which leaves the grey levels unchanged.
    White,
}

impl Colour {
    /// All colours in hash order: [`colour_of`] maps a hash value `h` to `ALL[h % 8]`.
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Orange,
        Colour::Yellow,
        Colour::Green,
        Colour::Cyan,
        Colour::Blue,
        Colour::Purple,
        Colour::White,
    ];

    /// Position of the colour in [`Colour::ALL`], 0 to 7.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name used in metadata and query text.
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Orange => "orange",
            Colour::Yellow => "yellow",
            Colour::Green => "green",
            Colour::Cyan => "cyan",
            Colour::Blue => "blue",
            Colour::Purple => "purple",
            Colour::White => "white",
        }
    }

    /// Full-intensity RGB value of the colour.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [230, 25, 35],
            Colour::Orange => [255, 140, 0],
            Colour::Yellow => [250, 225, 30],
            Colour::Green => [40, 190, 60],
            Colour::Cyan => [30, 215, 230],
            Colour::Blue => [30, 80, 240],
            Colour::Purple => [150, 50, 200],
            Colour::White => [255, 255, 255],
        }
    }
}

impl fmt::Display for Colour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Colour {
    type Err = DatasetError;

    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|colour| colour.name() == name)
            .ok_or_else(|| DatasetError::InvalidColour {
                name: name.to_owned(),
                expected: Self::ALL.map(Colour::name).join(", "),
            })
    }
}

impl TryFrom<String> for Colour {
    type Error = DatasetError;

    fn try_from(name: String) -> Result<Self> {
        name.parse()
    }
}

impl From<Colour> for String {
    fn from(colour: Colour) -> Self {
        colour.name().to_owned()
    }
}

/// SplitMix64 finaliser (Steele, Lea and Flood, "Fast splittable pseudorandom
/// number generators", OOPSLA 2014): a fixed bijective mix of 64-bit integers.
fn splitmix64(mut value: u64) -> u64 {
    value = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

/// Colour of image `index` of `split`.
///
/// The colour is `Colour::ALL[splitmix64(split_id << 32 | index) % 8]`, with
/// split id 0 for train and 1 for test. The mapping is part of the benchmark
/// definition, so changing it changes every published figure.
pub fn colour_of(split: Split, index: usize) -> Colour {
    let split_id: u64 = match split {
        Split::Train => 0,
        Split::Test => 1,
    };
    let hash = splitmix64((split_id << 32) | index as u64);
    Colour::ALL[(hash % Colour::ALL.len() as u64) as usize]
}

/// Tints 784 grey levels with `colour`: each channel is `grey * rgb / 255`, rounded down.
pub fn tint(pixels: &[u8], colour: Colour) -> Result<RgbImage> {
    if pixels.len() != IMAGE_SIDE * IMAGE_SIDE {
        return Err(DatasetError::InvalidRequest(format!(
            "a Fashion-MNIST image has {} grey levels, got {}",
            IMAGE_SIDE * IMAGE_SIDE,
            pixels.len()
        )));
    }
    let rgb = colour.rgb();
    let mut raw = Vec::with_capacity(pixels.len() * 3);
    for &grey in pixels {
        for channel in rgb {
            raw.push((u16::from(grey) * u16::from(channel) / 255) as u8);
        }
    }
    let side = IMAGE_SIDE as u32;
    Ok(RgbImage::from_raw(side, side, raw).expect("buffer length is side * side * 3"))
}

/// Image `index` of `data`, tinted with its [`colour_of`] colour.
pub fn tinted_image(data: &SplitData, index: usize) -> Result<RgbImage> {
    tint(data.pixels(index)?, colour_of(data.split(), index))
}

/// Encodes an RGB image as PNG.
pub fn png_bytes(image: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Cursor::new(Vec::new());
    image.write_to(&mut bytes, ImageFormat::Png)?;
    Ok(bytes.into_inner())
}
