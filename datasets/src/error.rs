//! Errors raised while reading Fashion-MNIST and building the benchmark.

use std::path::PathBuf;

use crate::Split;

/// Error type of the datasets crate.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A dataset file could not be opened or decompressed.
    #[error("failed to read {path}: {source}; set DB4R_FASHION_MNIST_DIR or pass the directory that contains the Fashion-MNIST .gz files")]
    Io {
        /// File that failed.
        path: PathBuf,
        /// Underlying I/O or gzip error.
        #[source]
        source: std::io::Error,
    },

    /// The file does not start with the IDX magic number expected for its kind.
    #[error(
        "{path} is not an IDX {kind} file: magic number 0x{found:08x}, expected 0x{expected:08x}"
    )]
    InvalidMagic {
        /// File that failed.
        path: PathBuf,
        /// "images" or "labels".
        kind: &'static str,
        /// Magic number read from the file.
        found: u32,
        /// Magic number of that kind of IDX file.
        expected: u32,
    },

    /// The header is shorter than the IDX format requires.
    #[error(
        "{path} is truncated: its IDX header needs {expected} bytes but the file has {actual}"
    )]
    TruncatedHeader {
        /// File that failed.
        path: PathBuf,
        /// Header length in bytes.
        expected: usize,
        /// Decompressed file length in bytes.
        actual: usize,
    },

    /// The payload length does not match the dimensions in the header.
    #[error("{path} declares {expected} data bytes in its header but contains {actual}; the file is truncated or corrupt, download it again")]
    SizeMismatch {
        /// File that failed.
        path: PathBuf,
        /// Bytes implied by the header dimensions.
        expected: usize,
        /// Bytes present after the header.
        actual: usize,
    },

    /// The image dimensions are not the 28 x 28 pixels of Fashion-MNIST.
    #[error("{path} holds {rows}x{cols} images; Fashion-MNIST images are 28x28")]
    InvalidImageSize {
        /// File that failed.
        path: PathBuf,
        /// Rows per image in the header.
        rows: u32,
        /// Columns per image in the header.
        cols: u32,
    },

    /// The image and label files of one split disagree on the number of items.
    #[error("the {split} split has {images} images but {labels} labels; the two files come from different releases")]
    CountMismatch {
        /// Split that failed.
        split: Split,
        /// Number of images.
        images: usize,
        /// Number of labels.
        labels: usize,
    },

    /// A label is outside the ten Fashion-MNIST classes.
    #[error(
        "label {label} at index {index} of {path} is out of range; Fashion-MNIST labels are 0 to 9"
    )]
    LabelOutOfRange {
        /// File that failed.
        path: PathBuf,
        /// Position of the label.
        index: usize,
        /// Label value found.
        label: u8,
    },

    /// An image index is past the end of its split.
    #[error("index {index} is out of range for the {split} split of {len} images")]
    IndexOutOfRange {
        /// Split that was indexed.
        split: Split,
        /// Index requested.
        index: usize,
        /// Number of images in the split.
        len: usize,
    },

    /// A catalog item id does not have the form `fmnist-<split>-<index>`.
    #[error("invalid item id {id:?}: expected fmnist-train-<index> or fmnist-test-<index>, for example fmnist-test-00042")]
    InvalidItemId {
        /// Id that failed to parse.
        id: String,
    },

    /// An easy-VQA catalog item id does not have the form `evqa-<split>-<index>`.
    #[error("invalid easy-VQA item id {id:?}: expected evqa-train-<index> or evqa-test-<index>, for example evqa-test-00042")]
    InvalidEasyVqaItemId {
        /// Id that failed to parse.
        id: String,
    },

    /// A split name other than "train" or "test".
    #[error("invalid split {name:?}: expected \"train\" or \"test\"")]
    InvalidSplit {
        /// Name that failed to parse.
        name: String,
    },

    /// A class name that is not one of the ten Fashion-MNIST classes.
    #[error("invalid class {name:?}: expected one of {expected}")]
    InvalidClass {
        /// Name that failed to parse.
        name: String,
        /// Comma-separated list of valid names.
        expected: String,
    },

    /// A shape name that is not one of the three easy-VQA shapes.
    #[error("invalid shape {name:?}: expected one of {expected}")]
    InvalidShape {
        /// Name that failed to parse.
        name: String,
        /// Comma-separated list of valid names.
        expected: String,
    },

    /// A colour name that is not one of the benchmark colours.
    #[error("invalid colour {name:?}: expected one of {expected}")]
    InvalidColour {
        /// Name that failed to parse.
        name: String,
        /// Comma-separated list of valid names.
        expected: String,
    },

    /// A requested subset or query set cannot be built from the given pool.
    #[error("invalid benchmark request: {0}")]
    InvalidRequest(String),

    /// A file or folder a dataset reader needs does not exist or cannot be read.
    #[error("failed to read {path}: {source}; {fix}")]
    DatasetFile {
        /// File or folder that failed.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
        /// Advice for the user, for example the layout the reader expects.
        fix: String,
    },

    /// A line of a dataset file does not have the published layout.
    #[error("{path}:{line}: {message}; {fix}")]
    MalformedLine {
        /// File that failed.
        path: PathBuf,
        /// One-based line number.
        line: usize,
        /// Description of the problem.
        message: String,
        /// Advice for the user.
        fix: String,
    },

    /// A JSON file of a dataset does not parse or does not have the published schema.
    #[error("{path}: invalid JSON at line {line}, column {column}: {message}; {fix}")]
    InvalidJson {
        /// File that failed.
        path: PathBuf,
        /// One-based line of the error, 0 when unknown.
        line: usize,
        /// One-based column of the error, 0 when unknown.
        column: usize,
        /// Parser message.
        message: String,
        /// Advice for the user.
        fix: String,
    },

    /// A category name that the dataset does not define.
    #[error("unknown {dataset} category {name:?}: expected one of {expected}")]
    UnknownCategory {
        /// Dataset the category was requested from.
        dataset: &'static str,
        /// Name that failed to parse.
        name: String,
        /// Comma-separated list of valid names.
        expected: String,
    },

    /// A dataset name given to `--dataset` that this crate does not define.
    #[error("invalid dataset {spec:?}: expected fmnist-colours[:DIR], easyvqa-shapes[:DIR], fashion200k:DIR, mit-states:DIR or fashioniq:DIR")]
    InvalidDatasetSpec {
        /// Text that failed to parse.
        spec: String,
    },

    /// An image file could not be decoded.
    #[error(
        "failed to decode image {path}: {source}; the file is corrupt or not an image, replace it"
    )]
    ImageDecode {
        /// File that failed.
        path: PathBuf,
        /// Decoder error.
        #[source]
        source: image::ImageError,
    },

    /// Facts about one image contradict each other, for example two easy-VQA
    /// answers that name different colours.
    #[error("{path}: {message}")]
    InconsistentAnnotation {
        /// File whose annotations disagree.
        path: PathBuf,
        /// Description of the disagreeing facts.
        message: String,
    },

    /// PNG encoding failed.
    #[error("failed to encode PNG: {0}")]
    Png(#[from] image::ImageError),
}

/// Result alias of the datasets crate.
pub type Result<T, E = DatasetError> = std::result::Result<T, E>;
