//! File system helpers for crash-safe writes.

use std::io;
use std::path::Path;

/// Syncs a directory, so that a file created or renamed inside it survives a
/// power loss.
#[cfg(unix)]
pub(crate) fn sync_directory(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Does nothing: only Unix systems can open and sync a directory.
#[cfg(not(unix))]
pub(crate) fn sync_directory(_dir: &Path) -> io::Result<()> {
    Ok(())
}
