//! File helpers for secrets: created with owner-only permissions, never overwritten.

use std::io::Write;
use std::path::Path;

/// Creates `path` with mode 0600 (on Unix) and writes `bytes`. Fails if the file exists, so a
/// generated secret never replaces one an operator put there.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}
