//! File helpers shared by the readers of the published datasets, so that
//! every error names the file, the line or entry, and the fix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::error::{DatasetError, Result};

/// Reads a UTF-8 text file. The error for a missing file carries `fix` as its advice.
pub(crate) fn read_text(path: &Path, fix: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| DatasetError::DatasetFile {
        path: path.to_owned(),
        source,
        fix: fix.to_owned(),
    })
}

/// Parses a JSON file into `T`; `schema` describes the expected content.
pub(crate) fn read_json<T: DeserializeOwned>(
    path: &Path,
    missing_fix: &str,
    schema: &str,
) -> Result<T> {
    let text = read_text(path, missing_fix)?;
    serde_json::from_str(&text).map_err(|error| DatasetError::InvalidJson {
        path: path.to_owned(),
        line: error.line(),
        column: error.column(),
        message: error.to_string(),
        fix: format!("expected {schema}"),
    })
}

/// Entries of a directory sorted by name, with their file names as UTF-8.
pub(crate) fn sorted_entries(dir: &Path, fix: &str) -> Result<Vec<(String, PathBuf)>> {
    let io_error = |source| DatasetError::DatasetFile {
        path: dir.to_owned(),
        source,
        fix: fix.to_owned(),
    };
    let mut entries = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io_error)? {
        let entry = entry.map_err(io_error)?;
        let path = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|name| DatasetError::DatasetFile {
                path: dir.join(&name),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "file name is not UTF-8",
                ),
                fix: "rename the file to a UTF-8 name".to_owned(),
            })?;
        entries.insert(name, path);
    }
    Ok(entries.into_iter().collect())
}

/// Error for a missing folder or file that the layout requires.
pub(crate) fn missing(path: &Path, fix: String) -> DatasetError {
    DatasetError::DatasetFile {
        path: path.to_owned(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
        fix,
    }
}

/// Error for line `line` (one-based) of `path`.
pub(crate) fn malformed(path: &Path, line: usize, message: String, fix: &str) -> DatasetError {
    DatasetError::MalformedLine {
        path: path.to_owned(),
        line,
        message,
        fix: fix.to_owned(),
    }
}

/// Words of a description, split on whitespace.
pub(crate) fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}
