//! Reader for the easy-VQA data shipped in the `easy-vqa` 1.0 Python package
//! (Victor Zhou, github.com/vzhou842/easy-VQA): `<root>/<split>/images/<index>.png`
//! (64x64 RGB, one shape on a plain background) and
//! `<root>/<split>/questions.json`, a list of `[question, answer, image index]`.
//!
//! The package has no attribute labels, so each image's shape and colour are
//! recovered from the answers to its questions, and from the pixels where the
//! questions leave an attribute open.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::attributes::{Shape, ShapeColour};
use crate::benchmark::load_rgb_file;
use crate::error::{DatasetError, Result};
use crate::Split;

/// Environment variable that names the easy-VQA data directory (the one
/// with `train/` and `test/`).
pub const DATA_DIR_ENV: &str = "DB4R_EASY_VQA_DIR";

/// Fix printed when the data directory is missing.
const INSTALL_FIX: &str = "install the data with `pip install easy-vqa==1.0` into the project's Python environment (scripts/setup.sh does) or set DB4R_EASY_VQA_DIR to the package's easy_vqa/data directory";

/// Returns the directory of the easy-VQA data, the first that applies of:
///
/// 1. `DB4R_EASY_VQA_DIR`, when set;
/// 2. `$DB4R_ARTIFACTS/data/easy-vqa`, when it exists (scripts/setup.sh links it there);
/// 3. `lib/python*/site-packages/easy_vqa/data` inside `$DB4R_VENV`, or
///    inside `.venv` of the current directory when that variable is unset.
///
/// When none exists, it returns the path of case 2 (under `artifacts/` when
/// `DB4R_ARTIFACTS` is unset), so that the load error names it.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(DATA_DIR_ENV) {
        return PathBuf::from(dir);
    }
    let artifacts = std::env::var_os("DB4R_ARTIFACTS")
        .map_or_else(|| PathBuf::from("artifacts"), PathBuf::from)
        .join("data")
        .join("easy-vqa");
    if artifacts.is_dir() {
        return artifacts;
    }
    let venv = std::env::var_os("DB4R_VENV").map_or_else(|| PathBuf::from(".venv"), PathBuf::from);
    find_in_venv(&venv).unwrap_or(artifacts)
}

/// `easy_vqa/data` of the first `lib/python*` folder of `venv` that has it.
fn find_in_venv(venv: &Path) -> Option<PathBuf> {
    let mut pythons: Vec<PathBuf> = std::fs::read_dir(venv.join("lib"))
        .ok()?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("python"))
        })
        .collect();
    pythons.sort();
    pythons
        .into_iter()
        .map(|python| python.join("site-packages").join("easy_vqa").join("data"))
        .find(|data| data.is_dir())
}

/// Source of a recovered attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnnotationSource {
    /// Stated or implied by the answers to the image's questions.
    Questions,
    /// Measured from the image pixels, because no question settles it.
    Pixels,
}

impl AnnotationSource {
    /// Lower-case name used in metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            AnnotationSource::Questions => "questions",
            AnnotationSource::Pixels => "pixels",
        }
    }
}

impl fmt::Display for AnnotationSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One easy-VQA image with its recovered attributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EasyVqaImage {
    /// Image index, the file stem of `images/<index>.png`.
    pub index: usize,
    /// Shape drawn in the image.
    pub shape: Shape,
    /// Colour of the shape.
    pub colour: ShapeColour,
    /// Source of `shape`.
    pub shape_from: AnnotationSource,
    /// Source of `colour`.
    pub colour_from: AnnotationSource,
}

/// Facts about one attribute of one image, gathered from its questions.
#[derive(Debug)]
struct Evidence<T> {
    is: BTreeSet<T>,
    is_not: BTreeSet<T>,
}

impl<T> Default for Evidence<T> {
    fn default() -> Self {
        Self {
            is: BTreeSet::new(),
            is_not: BTreeSet::new(),
        }
    }
}

impl<T: Copy + Ord + fmt::Display> Evidence<T> {
    /// Returns the value the facts settle, `None` when they leave more than one open.
    fn resolve(&self, all: &[T], path: &Path, index: usize, what: &str) -> Result<Option<T>> {
        let inconsistent = |message: String| DatasetError::InconsistentAnnotation {
            path: path.to_owned(),
            message: format!(
                "image {index}: {message}; the questions file is corrupt, reinstall easy-vqa==1.0"
            ),
        };
        if self.is.len() > 1 {
            let names: Vec<String> = self.is.iter().map(ToString::to_string).collect();
            return Err(inconsistent(format!(
                "answers name several {what}s: {}",
                names.join(", ")
            )));
        }
        if let Some(&value) = self.is.first() {
            if self.is_not.contains(&value) {
                return Err(inconsistent(format!(
                    "answers say the {what} is and is not {value}"
                )));
            }
            return Ok(Some(value));
        }
        let open: Vec<T> = all
            .iter()
            .copied()
            .filter(|value| !self.is_not.contains(value))
            .collect();
        match open.as_slice() {
            [] => Err(inconsistent(format!("answers rule out every {what}"))),
            [value] => Ok(Some(*value)),
            _ => Ok(None),
        }
    }
}

/// Shape and colour facts of every image of a split.
#[derive(Debug, Default)]
struct ImageEvidence {
    shape: Evidence<Shape>,
    colour: Evidence<ShapeColour>,
}

/// A questions.json entry: question, answer, image index.
type QuestionEntry = (String, String, usize);

/// Adds the facts one question and its answer state about the image.
///
/// easy-VQA 1.0 has two kinds of question. An open question ("what color is
/// the triangle?" answered "blue") names the answer's attribute and
/// presupposes every attribute word in the question. A yes/no question names
/// one attribute word ("is there not a red shape?") and, with "not" or "no"
/// reversing it, states whether the image has that value.
fn add_facts(
    evidence: &mut ImageEvidence,
    question: &str,
    answer: &str,
) -> std::result::Result<(), String> {
    let words: Vec<&str> = question.trim_end_matches('?').split_whitespace().collect();
    let shapes: Vec<Shape> = words.iter().filter_map(|word| word.parse().ok()).collect();
    let colours: Vec<ShapeColour> = words.iter().filter_map(|word| word.parse().ok()).collect();

    let yes = match answer {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    };
    let Some(yes) = yes else {
        if let Ok(shape) = answer.parse::<Shape>() {
            evidence.shape.is.insert(shape);
        } else if let Ok(colour) = answer.parse::<ShapeColour>() {
            evidence.colour.is.insert(colour);
        } else {
            return Err(format!(
                "answer {answer:?} is none of yes, no, a shape ({}) or a colour ({})",
                Shape::ALL.map(Shape::name).join(", "),
                ShapeColour::ALL.map(ShapeColour::name).join(", ")
            ));
        }
        evidence.shape.is.extend(shapes);
        evidence.colour.is.extend(colours);
        return Ok(());
    };

    let negated = words.iter().any(|&word| word == "not" || word == "no");
    let holds = yes != negated;
    match (shapes.as_slice(), colours.as_slice()) {
        ([shape], []) if holds => {
            evidence.shape.is.insert(*shape);
        }
        ([shape], []) => {
            evidence.shape.is_not.insert(*shape);
        }
        ([], [colour]) if holds => {
            evidence.colour.is.insert(*colour);
        }
        ([], [colour]) => {
            evidence.colour.is_not.insert(*colour);
        }
        _ => {
            return Err(format!(
                "yes/no question {question:?} names {} shapes and {} colours, expected exactly one attribute word",
                shapes.len(),
                colours.len()
            ))
        }
    }
    Ok(())
}

/// Maximum per-channel difference between a pixel and a palette colour for
/// the pixel to count as that colour; anti-aliased edge pixels fall outside.
const PALETTE_TOLERANCE: u8 = 24;

/// Box fill ratio at or above which a shape is a rectangle. easy-vqa 1.0
/// rectangles measure 0.97 to 1.0.
const RECTANGLE_MIN_FILL: f64 = 0.94;

/// Box fill ratio at or above which a non-rectangle is a circle. easy-vqa 1.0
/// circles measure 0.73 to 0.90 (pi/4 is 0.785) and triangles 0.50 to 0.64.
const CIRCLE_MIN_FILL: f64 = 0.68;

/// Recovers the shape and colour of an easy-VQA image from its pixels.
///
/// The background is the colour of the top-left pixel. The shape colour is the
/// palette colour matched by most other pixels. The shape follows from the
/// fraction of its bounding box that those pixels fill.
pub fn attributes_from_pixels(image: &RgbImage) -> Result<(Shape, ShapeColour)> {
    let background = image.get_pixel(0, 0).0;
    let close = |pixel: [u8; 3], colour: [u8; 3]| {
        pixel
            .iter()
            .zip(colour)
            .all(|(&channel, reference)| channel.abs_diff(reference) <= PALETTE_TOLERANCE)
    };
    let mut counts = [0_usize; ShapeColour::ALL.len()];
    for pixel in image.pixels() {
        if pixel.0 == background {
            continue;
        }
        if let Some(colour) = ShapeColour::ALL
            .iter()
            .find(|colour| close(pixel.0, colour.rgb()))
        {
            counts[colour.index()] += 1;
        }
    }
    let (best, count) = counts
        .iter()
        .copied()
        .enumerate()
        .max_by_key(|&(_, count)| count)
        .unwrap_or((0, 0));
    if count == 0 {
        return Err(DatasetError::InvalidRequest(format!(
            "no pixel of the {}x{} image matches an easy-VQA colour; it is not an easy-VQA image",
            image.width(),
            image.height()
        )));
    }
    let colour = ShapeColour::ALL[best];

    let (mut min_x, mut min_y, mut max_x, mut max_y) = (u32::MAX, u32::MAX, 0, 0);
    let mut filled = 0_usize;
    for (x, y, pixel) in image.enumerate_pixels() {
        if pixel.0 != background && close(pixel.0, colour.rgb()) {
            filled += 1;
            min_x = min_x.min(x);
            min_y = min_y.min(y);
            max_x = max_x.max(x);
            max_y = max_y.max(y);
        }
    }
    let area = f64::from(max_x - min_x + 1) * f64::from(max_y - min_y + 1);
    let fill = filled as f64 / area;
    let shape = if fill >= RECTANGLE_MIN_FILL {
        Shape::Rectangle
    } else if fill >= CIRCLE_MIN_FILL {
        Shape::Circle
    } else {
        Shape::Triangle
    };
    Ok((shape, colour))
}

/// The images of one easy-VQA split with their recovered attributes.
#[derive(Debug, Clone)]
pub struct EasyVqaSplit {
    split: Split,
    dir: PathBuf,
    images: Vec<EasyVqaImage>,
}

impl EasyVqaSplit {
    /// Reads `<root>/<split>/questions.json`, lists `<root>/<split>/images/`
    /// and recovers every image's shape and colour.
    pub fn load(root: &Path, split: Split) -> Result<Self> {
        let dir = root.join(split.as_str());
        let questions_path = dir.join("questions.json");
        let image_count = count_images(&dir.join("images"))?;
        let entries = read_questions(&questions_path)?;

        let mut evidence: Vec<ImageEvidence> =
            (0..image_count).map(|_| ImageEvidence::default()).collect();
        for (position, (question, answer, index)) in entries.iter().enumerate() {
            let facts = evidence.get_mut(*index).ok_or_else(|| DatasetError::InconsistentAnnotation {
                path: questions_path.clone(),
                message: format!(
                    "entry {position} refers to image {index}, but {} has only {image_count} images; the images folder is incomplete, reinstall easy-vqa==1.0",
                    dir.join("images").display()
                ),
            })?;
            add_facts(facts, question, answer).map_err(|message| {
                DatasetError::InconsistentAnnotation {
                    path: questions_path.clone(),
                    message: format!("entry {position} (image {index}): {message}"),
                }
            })?;
        }

        let mut images = Vec::with_capacity(image_count);
        let mut from_pixels = 0_usize;
        for (index, facts) in evidence.iter().enumerate() {
            let shape = facts
                .shape
                .resolve(&Shape::ALL, &questions_path, index, "shape")?;
            let colour =
                facts
                    .colour
                    .resolve(&ShapeColour::ALL, &questions_path, index, "colour")?;
            let source = |known: bool| {
                if known {
                    AnnotationSource::Questions
                } else {
                    AnnotationSource::Pixels
                }
            };
            let (shape_from, colour_from) = (source(shape.is_some()), source(colour.is_some()));
            let (shape, colour) = match (shape, colour) {
                (Some(shape), Some(colour)) => (shape, colour),
                _ => {
                    from_pixels += 1;
                    let pixels = load_rgb_file(&image_path(&dir, index))?;
                    let (measured_shape, measured_colour) = attributes_from_pixels(&pixels)
                        .map_err(|error| DatasetError::InconsistentAnnotation {
                            path: image_path(&dir, index),
                            message: format!("the questions leave the shape or colour open and the pixels do not settle it: {error}"),
                        })?;
                    (
                        shape.unwrap_or(measured_shape),
                        colour.unwrap_or(measured_colour),
                    )
                }
            };
            images.push(EasyVqaImage {
                index,
                shape,
                colour,
                shape_from,
                colour_from,
            });
        }
        tracing::debug!(%split, images = image_count, questions = entries.len(), from_pixels, dir = %dir.display(), "loaded easy-VQA split");
        Ok(Self { split, dir, images })
    }

    /// Split these images belong to.
    pub fn split(&self) -> Split {
        self.split
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Returns true when the split contains no image.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Returns all images in index order.
    pub fn images(&self) -> &[EasyVqaImage] {
        &self.images
    }

    /// Image `index`, or an error naming the split when it is past the end.
    pub fn image(&self, index: usize) -> Result<&EasyVqaImage> {
        self.images.get(index).ok_or(DatasetError::IndexOutOfRange {
            split: self.split,
            index,
            len: self.images.len(),
        })
    }

    /// Path of the PNG of image `index`.
    pub fn image_path(&self, index: usize) -> PathBuf {
        image_path(&self.dir, index)
    }
}

fn image_path(split_dir: &Path, index: usize) -> PathBuf {
    split_dir.join("images").join(format!("{index}.png"))
}

/// Number of images in `images/`, which must be `0.png` to `<n-1>.png` without gaps.
fn count_images(images_dir: &Path) -> Result<usize> {
    let entries = std::fs::read_dir(images_dir).map_err(|source| DatasetError::DatasetFile {
        path: images_dir.to_owned(),
        source,
        fix: INSTALL_FIX.to_owned(),
    })?;
    let mut indices = BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(|source| DatasetError::DatasetFile {
            path: images_dir.to_owned(),
            source,
            fix: "check the folder's permissions".to_owned(),
        })?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|name| name.strip_suffix(".png")) else {
            continue;
        };
        if let Ok(index) = stem.parse::<usize>() {
            indices.insert(index);
        }
    }
    let count = indices.len();
    if let Some(missing) = (0..count).find(|index| !indices.contains(index)) {
        return Err(DatasetError::DatasetFile {
            path: image_path(images_dir.parent().unwrap_or(images_dir), missing),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
            fix: format!(
                "easy-VQA images are numbered 0 to {} without gaps; reinstall easy-vqa==1.0",
                count - 1
            ),
        });
    }
    Ok(count)
}

fn read_questions(path: &Path) -> Result<Vec<QuestionEntry>> {
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError::DatasetFile {
        path: path.to_owned(),
        source,
        fix: INSTALL_FIX.to_owned(),
    })?;
    serde_json::from_str(&text).map_err(|error| DatasetError::InvalidJson {
        path: path.to_owned(),
        line: error.line(),
        column: error.column(),
        message: error.to_string(),
        fix: "expected a list of [question, answer, image index] as in easy-vqa 1.0; reinstall the package".to_owned(),
    })
}

/// Both easy-VQA splits.
#[derive(Debug, Clone)]
pub struct EasyVqa {
    /// The 4,000 training images of easy-vqa 1.0.
    pub train: EasyVqaSplit,
    /// The 1,000 test images of easy-vqa 1.0.
    pub test: EasyVqaSplit,
}

impl EasyVqa {
    /// Reads both splits from `root`, the directory with `train/` and `test/`.
    pub fn load(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(DatasetError::DatasetFile {
                path: root.to_owned(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
                fix: INSTALL_FIX.to_owned(),
            });
        }
        Ok(Self {
            train: EasyVqaSplit::load(root, Split::Train)?,
            test: EasyVqaSplit::load(root, Split::Test)?,
        })
    }

    /// Reads both splits from [`default_data_dir`].
    pub fn load_default() -> Result<Self> {
        Self::load(&default_data_dir())
    }

    /// Data of one split.
    pub fn split(&self, split: Split) -> &EasyVqaSplit {
        match split {
            Split::Train => &self.train,
            Split::Test => &self.test,
        }
    }
}
