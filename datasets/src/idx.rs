//! Reader for the gzipped IDX files of Fashion-MNIST.
//!
//! The IDX format (LeCun et al., the MNIST database page) starts with a
//! big-endian magic number. Its third byte is the element type (0x08 for
//! unsigned bytes) and its fourth byte the number of dimensions. One
//! big-endian u32 per dimension and the row-major data follow.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use flate2::read::GzDecoder;
use serde::{Deserialize, Serialize};

use crate::error::{DatasetError, Result};
use crate::FashionClass;

/// Directory searched when neither an explicit path nor `DB4R_FASHION_MNIST_DIR` is given.
pub const DEFAULT_DATA_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Environment variable that overrides [`DEFAULT_DATA_DIR`].
pub const DATA_DIR_ENV: &str = "DB4R_FASHION_MNIST_DIR";

/// Side of a Fashion-MNIST image in pixels.
pub const IMAGE_SIDE: usize = 28;

/// Pixels in one Fashion-MNIST image.
pub const IMAGE_PIXELS: usize = IMAGE_SIDE * IMAGE_SIDE;

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// One of the two Fashion-MNIST splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The 60,000 training images.
    Train,
    /// The 10,000 test images.
    Test,
}

impl Split {
    /// Both splits, train first.
    pub const ALL: [Split; 2] = [Split::Train, Split::Test];

    /// Lower-case name used in file names, item ids and metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }

    /// File-name prefix of the split in the Fashion-MNIST release.
    fn file_prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }

    /// Image file of this split inside `dir`.
    pub fn images_path(self, dir: &Path) -> PathBuf {
        dir.join(format!("{}-images-idx3-ubyte.gz", self.file_prefix()))
    }

    /// Label file of this split inside `dir`.
    pub fn labels_path(self, dir: &Path) -> PathBuf {
        dir.join(format!("{}-labels-idx1-ubyte.gz", self.file_prefix()))
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Split {
    type Err = DatasetError;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            _ => Err(DatasetError::InvalidSplit {
                name: name.to_owned(),
            }),
        }
    }
}

/// Images and labels of one split, decoded into memory.
#[derive(Clone)]
pub struct SplitData {
    split: Split,
    pixels: Vec<u8>,
    labels: Vec<FashionClass>,
}

impl fmt::Debug for SplitData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SplitData")
            .field("split", &self.split)
            .field("len", &self.labels.len())
            .finish()
    }
}

impl SplitData {
    /// Reads and validates one split from the directory that contains the `.gz` files.
    pub fn load(dir: &Path, split: Split) -> Result<Self> {
        let images_path = split.images_path(dir);
        let labels_path = split.labels_path(dir);
        let (image_count, pixels) = read_images(&images_path)?;
        let labels = read_labels(&labels_path)?;
        if labels.len() != image_count {
            return Err(DatasetError::CountMismatch {
                split,
                images: image_count,
                labels: labels.len(),
            });
        }
        tracing::debug!(%split, images = image_count, dir = %dir.display(), "loaded Fashion-MNIST split");
        Ok(Self {
            split,
            pixels,
            labels,
        })
    }

    /// Builds a split from raw pixels (row-major 28x28 grey levels per image) and labels.
    pub fn from_parts(split: Split, pixels: Vec<u8>, labels: Vec<FashionClass>) -> Result<Self> {
        let expected = labels.len() * IMAGE_PIXELS;
        if pixels.len() != expected {
            return Err(DatasetError::InvalidRequest(format!(
                "{} labels need {expected} pixel bytes, got {}",
                labels.len(),
                pixels.len()
            )));
        }
        Ok(Self {
            split,
            pixels,
            labels,
        })
    }

    /// Split these images belong to.
    pub fn split(&self) -> Split {
        self.split
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Returns true when the split contains no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Returns all labels in file order.
    pub fn labels(&self) -> &[FashionClass] {
        &self.labels
    }

    /// Class of image `index`.
    pub fn class(&self, index: usize) -> Result<FashionClass> {
        self.check_index(index)?;
        Ok(self.labels[index])
    }

    /// Grey levels of image `index`, 784 bytes in row-major order, 0 is background.
    pub fn pixels(&self, index: usize) -> Result<&[u8]> {
        self.check_index(index)?;
        let start = index * IMAGE_PIXELS;
        Ok(&self.pixels[start..start + IMAGE_PIXELS])
    }

    /// Returns an error naming the split when `index` is past its end.
    pub fn check_index(&self, index: usize) -> Result<()> {
        if index >= self.len() {
            return Err(DatasetError::IndexOutOfRange {
                split: self.split,
                index,
                len: self.len(),
            });
        }
        Ok(())
    }
}

/// Both Fashion-MNIST splits.
#[derive(Debug, Clone)]
pub struct FashionMnist {
    /// The 60,000 training images.
    pub train: SplitData,
    /// The 10,000 test images.
    pub test: SplitData,
}

impl FashionMnist {
    /// Reads both splits from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        Ok(Self {
            train: SplitData::load(dir, Split::Train)?,
            test: SplitData::load(dir, Split::Test)?,
        })
    }

    /// Reads both splits from [`default_data_dir`].
    pub fn load_default() -> Result<Self> {
        Self::load(&default_data_dir())
    }

    /// Data of one split.
    pub fn split(&self, split: Split) -> &SplitData {
        match split {
            Split::Train => &self.train,
            Split::Test => &self.test,
        }
    }
}

/// Directory of the Fashion-MNIST files: `DB4R_FASHION_MNIST_DIR` when set, else [`DEFAULT_DATA_DIR`].
pub fn default_data_dir() -> PathBuf {
    std::env::var_os(DATA_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
}

fn read_gz(path: &Path) -> Result<Vec<u8>> {
    let io_error = |source| DatasetError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    let mut bytes = Vec::new();
    GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    Ok(bytes)
}

/// Parses the magic number and dimensions, returning them with the header length.
fn parse_header(
    path: &Path,
    bytes: &[u8],
    kind: &'static str,
    magic: u32,
) -> Result<(Vec<u32>, usize)> {
    let truncated = |expected: usize| DatasetError::TruncatedHeader {
        path: path.to_owned(),
        expected,
        actual: bytes.len(),
    };
    let read_u32 = |offset: usize| {
        u32::from_be_bytes([
            bytes[offset],
            bytes[offset + 1],
            bytes[offset + 2],
            bytes[offset + 3],
        ])
    };
    if bytes.len() < 4 {
        return Err(truncated(4));
    }
    let found = read_u32(0);
    if found != magic {
        return Err(DatasetError::InvalidMagic {
            path: path.to_owned(),
            kind,
            found,
            expected: magic,
        });
    }
    let dims = (magic & 0xff) as usize;
    let header_len = 4 + 4 * dims;
    if bytes.len() < header_len {
        return Err(truncated(header_len));
    }
    let shape = (0..dims).map(|dim| read_u32(4 + 4 * dim)).collect();
    Ok((shape, header_len))
}

fn check_payload(path: &Path, shape: &[u32], payload: usize) -> Result<()> {
    let expected = shape.iter().map(|&dim| dim as usize).product::<usize>();
    if payload != expected {
        return Err(DatasetError::SizeMismatch {
            path: path.to_owned(),
            expected,
            actual: payload,
        });
    }
    Ok(())
}

/// Reads an image file, returning the image count and the concatenated pixels.
fn read_images(path: &Path) -> Result<(usize, Vec<u8>)> {
    let mut bytes = read_gz(path)?;
    let (shape, header_len) = parse_header(path, &bytes, "images", IMAGES_MAGIC)?;
    let (rows, cols) = (shape[1], shape[2]);
    if rows as usize != IMAGE_SIDE || cols as usize != IMAGE_SIDE {
        return Err(DatasetError::InvalidImageSize {
            path: path.to_owned(),
            rows,
            cols,
        });
    }
    check_payload(path, &shape, bytes.len() - header_len)?;
    bytes.drain(..header_len);
    Ok((shape[0] as usize, bytes))
}

fn read_labels(path: &Path) -> Result<Vec<FashionClass>> {
    let bytes = read_gz(path)?;
    let (shape, header_len) = parse_header(path, &bytes, "labels", LABELS_MAGIC)?;
    check_payload(path, &shape, bytes.len() - header_len)?;
    bytes[header_len..]
        .iter()
        .enumerate()
        .map(|(index, &label)| {
            FashionClass::from_label(label).ok_or(DatasetError::LabelOutOfRange {
                path: path.to_owned(),
                index,
                label,
            })
        })
        .collect()
}
