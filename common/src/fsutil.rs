//! File replacement: write a temporary file, rename it over the target. A
//! crash leaves the old or the new file, never a torn one. `write_atomic`
//! also fsyncs (file, then directory), so the new file survives a power
//! loss; `replace_atomic` does not, for files that describe processes,
//! which a power loss ends anyway.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Atomically replaces `path` with `bytes`, durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace(path, bytes, true)
}

/// Atomically and durably replaces `path` with `bytes`, readable by its
/// owner only (mode 0600 from creation, so the secret is never readable by
/// others, not even between the write and a `chmod`).
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_with_mode(path, bytes, true, 0o600)
}

/// Atomically replaces `path` with `bytes`, without waiting for the disk.
pub fn replace_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace(path, bytes, false)
}

fn replace(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    replace_with_mode(path, bytes, durable, 0o644)
}

fn replace_with_mode(path: &Path, bytes: &[u8], durable: bool, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    {
        let _ = fs::remove_file(&tmp);
        let mut f = File::options()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
    }
    fs::rename(&tmp, path)?;
    if durable {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Raises this process's soft limit on open files to its hard limit: a
/// leader talks to every agent and a bench hosts thousands of them, past
/// the usual soft limit of 1,024. Returns the limit now in force.
pub fn raise_open_files_limit() -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    Ok(hard.max(soft))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_file() {
        let dir = std::env::temp_dir().join(format!("berth-fsutil-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        replace_atomic(&p, b"three").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"three");
        assert!(!dir.join(".x.bin.tmp").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
