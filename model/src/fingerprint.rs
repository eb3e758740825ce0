//! Content fingerprint of a model directory.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::ModelError;

/// Number of hexadecimal digits of the SHA-256 digest kept in a fingerprint.
pub const FINGERPRINT_LEN: usize = 16;

/// Computes the first 16 hex digits of a SHA-256 over every regular file under `dir`.
///
/// Files are visited in byte order of their `/`-separated relative paths. Each file contributes
/// its relative path, a zero byte, its length as 8 little-endian bytes and its contents, so
/// renaming, moving or editing any file changes the fingerprint. Symbolic links are followed.
pub fn fingerprint_dir(dir: &Path) -> Result<String, ModelError> {
    let mut files = Vec::new();
    collect_files(dir, dir, &mut files)?;
    files.sort_by(|a, b| a.0.cmp(&b.0));

    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    for (relative, path) in &files {
        let mut file =
            File::open(path).map_err(|error| ModelError::io("failed to open", path, error))?;
        let length = file
            .metadata()
            .map_err(|error| ModelError::io("failed to read metadata of", path, error))?
            .len();
        hasher.update(relative.as_bytes());
        hasher.update([0u8]);
        hasher.update(length.to_le_bytes());

        let mut hashed = 0u64;
        loop {
            let read = file
                .read(&mut buffer)
                .map_err(|error| ModelError::io("failed to read", path, error))?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
            hashed += read as u64;
        }
        if hashed != length {
            return Err(ModelError::io(
                "file changed while fingerprinting",
                path,
                std::io::Error::other(format!("expected {length} bytes, read {hashed}")),
            ));
        }
    }

    let digest = hex::encode(hasher.finalize());
    Ok(digest[..FINGERPRINT_LEN].to_owned())
}

fn collect_files(
    root: &Path,
    dir: &Path,
    files: &mut Vec<(String, PathBuf)>,
) -> Result<(), ModelError> {
    let entries =
        std::fs::read_dir(dir).map_err(|error| ModelError::io("failed to list", dir, error))?;
    for entry in entries {
        let entry = entry.map_err(|error| ModelError::io("failed to list", dir, error))?;
        let path = entry.path();
        let metadata = std::fs::metadata(&path)
            .map_err(|error| ModelError::io("failed to read metadata of", &path, error))?;
        if metadata.is_dir() {
            collect_files(root, &path, files)?;
        } else if metadata.is_file() {
            files.push((relative_name(root, &path)?, path));
        }
    }
    Ok(())
}

fn relative_name(root: &Path, path: &Path) -> Result<String, ModelError> {
    let relative = path.strip_prefix(root).unwrap_or(path);
    let mut parts = Vec::new();
    for component in relative.components() {
        let part = component.as_os_str().to_str().ok_or_else(|| {
            ModelError::io(
                "failed to fingerprint",
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "file name is not valid UTF-8",
                ),
            )
        })?;
        parts.push(part);
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_tracks_names_and_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("a.txt"), b"alpha").expect("write");
        std::fs::write(dir.path().join("sub/b.txt"), b"beta").expect("write");

        let first = fingerprint_dir(dir.path()).expect("fingerprint");
        assert_eq!(first.len(), FINGERPRINT_LEN);
        assert!(first.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(fingerprint_dir(dir.path()).expect("fingerprint"), first);

        std::fs::write(dir.path().join("sub/b.txt"), b"betA").expect("write");
        let edited = fingerprint_dir(dir.path()).expect("fingerprint");
        assert_ne!(edited, first);

        std::fs::rename(dir.path().join("sub/b.txt"), dir.path().join("sub/c.txt"))
            .expect("rename");
        let renamed = fingerprint_dir(dir.path()).expect("fingerprint");
        assert_ne!(renamed, edited);
    }

    #[test]
    fn content_moving_between_files_changes_fingerprint() {
        let first_dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(first_dir.path().join("a"), b"xy").expect("write");
        std::fs::write(first_dir.path().join("b"), b"").expect("write");
        let second_dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(second_dir.path().join("a"), b"x").expect("write");
        std::fs::write(second_dir.path().join("b"), b"y").expect("write");
        assert_ne!(
            fingerprint_dir(first_dir.path()).expect("fingerprint"),
            fingerprint_dir(second_dir.path()).expect("fingerprint")
        );
    }

    #[test]
    fn missing_directory_names_path() {
        let error = fingerprint_dir(Path::new("/nonexistent/model")).expect_err("missing");
        assert!(error.to_string().contains("/nonexistent/model"), "{error}");
    }
}
