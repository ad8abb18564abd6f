//! A replica's captured output: stdout and stderr interleaved in
//! `logs/replica.log`, rotated by size into `replica.log.1` (newest) up to
//! `replica.log.N`. The shim writes them (so capture goes on while the agent
//! is down); the agent reads them back for `StreamLogs`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The current log file's name.
pub const LOG_FILE: &str = "replica.log";

/// The path of rotated file `n` (0 is the current file).
pub fn log_path(dir: &Path, n: u32) -> PathBuf {
    if n == 0 {
        dir.join(LOG_FILE)
    } else {
        dir.join(format!("{LOG_FILE}.{n}"))
    }
}

/// Appends to the current file and rotates it once it would pass `max_bytes`.
pub struct RotatingWriter {
    dir: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: File,
    size: u64,
}

impl RotatingWriter {
    /// Opens (or continues) the log in `dir`, keeping `keep` rotated files.
    pub fn open(dir: &Path, max_bytes: u64, keep: u32) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path(dir, 0))?;
        let size = file.metadata()?.len();
        Ok(RotatingWriter {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(1),
            keep,
            file,
            size,
        })
    }

    /// Writes a chunk of output, rotating first when it would not fit.
    pub fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + chunk.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(chunk)?;
        self.size += chunk.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.keep == 0 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        for n in (1..self.keep).rev() {
            let from = log_path(&self.dir, n);
            if from.exists() {
                fs::rename(&from, log_path(&self.dir, n + 1))?;
            }
        }
        fs::rename(log_path(&self.dir, 0), log_path(&self.dir, 1))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path(&self.dir, 0))?;
        self.size = 0;
        Ok(())
    }
}

/// The last `lines` lines of the log, across rotated files, oldest first.
pub fn tail(dir: &Path, lines: usize) -> io::Result<Vec<u8>> {
    if lines == 0 {
        return Ok(Vec::new());
    }
    let mut collected: Vec<u8> = Vec::new();
    let mut n = 0;
    loop {
        let path = log_path(dir, n);
        let mut bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => break,
            Err(e) => return Err(e),
        };
        bytes.extend_from_slice(&collected);
        collected = bytes;
        if count_lines(&collected) > lines {
            break;
        }
        n += 1;
    }
    Ok(last_lines(&collected, lines).to_vec())
}

fn count_lines(bytes: &[u8]) -> usize {
    let newlines = bytes.iter().filter(|b| **b == b'\n').count();
    if bytes.last().is_some_and(|b| *b != b'\n') {
        newlines + 1
    } else {
        newlines
    }
}

fn last_lines(bytes: &[u8], lines: usize) -> &[u8] {
    // Skip a final newline so "a\nb\n" has two lines, not three.
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == lines {
                return &bytes[i + 1..];
            }
        }
    }
    bytes
}

/// Follows the current log file from its end (or from `from` bytes),
/// across rotations: when the file is replaced, the rest of the old one is
/// read and the new one from its start.
pub struct Follower {
    dir: PathBuf,
    file: Option<(File, u64)>,
}

impl Follower {
    /// Starts following at the current end of the log.
    pub fn at_end(dir: &Path) -> Self {
        let file = File::open(log_path(dir, 0)).ok().and_then(|mut f| {
            let ino = f.metadata().ok()?.ino();
            f.seek(SeekFrom::End(0)).ok()?;
            Some((f, ino))
        });
        Follower {
            dir: dir.to_path_buf(),
            file,
        }
    }

    /// Whatever was written since the last call (empty when nothing was).
    pub fn poll(&mut self) -> io::Result<Vec<u8>> {
        // Look for a rotation before reading: whatever reached the old file
        // before the rotation is then read from the old handle first.
        let current = fs::metadata(log_path(&self.dir, 0)).ok().map(|m| m.ino());
        let rotated = match (&self.file, current) {
            (Some((_, ino)), Some(now)) => *ino != now,
            (None, Some(_)) => true,
            _ => false,
        };
        let mut out = Vec::new();
        if let Some((f, _)) = self.file.as_mut() {
            f.read_to_end(&mut out)?;
        }
        if rotated && let Ok(mut f) = File::open(log_path(&self.dir, 0)) {
            let ino = f.metadata()?.ino();
            f.read_to_end(&mut out)?;
            self.file = Some((f, ino));
        }
        Ok(out)
    }
}

/// How often a follower looks for new output.
pub const FOLLOW_POLL: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = RotatingWriter::open(dir.path(), 100, 2).unwrap();
        for i in 0..40 {
            w.write(format!("line {i:04}\n").as_bytes()).unwrap();
        }
        // 10 bytes a line, 10 lines a file: 4 files' worth, 3 kept.
        let current = fs::read_to_string(log_path(dir.path(), 0)).unwrap();
        assert_eq!(current.lines().next(), Some("line 0030"));
        assert!(fs::metadata(log_path(dir.path(), 0)).unwrap().len() <= 100);
        let one = fs::read_to_string(log_path(dir.path(), 1)).unwrap();
        assert_eq!(one.lines().next(), Some("line 0020"));
        assert!(log_path(dir.path(), 2).exists());
        assert!(
            !log_path(dir.path(), 3).exists(),
            "only 2 rotated files are kept"
        );
        // The tail spans rotated files.
        let t = String::from_utf8(tail(dir.path(), 12).unwrap()).unwrap();
        assert_eq!(t.lines().count(), 12);
        assert_eq!(t.lines().next(), Some("line 0028"));
        assert_eq!(t.lines().last(), Some("line 0039"));
        assert_eq!(tail(dir.path(), 0).unwrap(), b"");
    }

    #[test]
    fn reopening_continues_the_file() {
        let dir = tempfile::tempdir().unwrap();
        RotatingWriter::open(dir.path(), 1000, 1)
            .unwrap()
            .write(b"a\n")
            .unwrap();
        RotatingWriter::open(dir.path(), 1000, 1)
            .unwrap()
            .write(b"b\n")
            .unwrap();
        assert_eq!(tail(dir.path(), 10).unwrap(), b"a\nb\n");
        assert_eq!(tail(dir.path(), 1).unwrap(), b"b\n");
    }

    #[test]
    fn follower_sees_new_output_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = RotatingWriter::open(dir.path(), 20, 3).unwrap();
        w.write(b"before\n").unwrap();
        let mut f = Follower::at_end(dir.path());
        assert_eq!(f.poll().unwrap(), b"");
        w.write(b"one\n").unwrap();
        assert_eq!(f.poll().unwrap(), b"one\n");
        w.write(b"two-two-two\n").unwrap(); // rotates
        assert_eq!(f.poll().unwrap(), b"two-two-two\n");
        w.write(b"three\n").unwrap();
        assert_eq!(f.poll().unwrap(), b"three\n");
    }

    #[test]
    fn follower_waits_for_a_log_that_does_not_exist_yet() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Follower::at_end(dir.path());
        assert_eq!(f.poll().unwrap(), b"");
        let mut w = RotatingWriter::open(dir.path(), 100, 1).unwrap();
        w.write(b"hello\n").unwrap();
        assert_eq!(f.poll().unwrap(), b"hello\n");
    }
}
