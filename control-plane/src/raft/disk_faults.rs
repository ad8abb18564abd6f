//! Disk faults for the fault suite only: a redb `StorageBackend` around
//! redb's `FileBackend` that fails or forgets writes on request.
//!
//! Used only when `berth-control` runs with the hidden `--test-disk-faults`
//! flag; without it the log store opens redb's own file backend, unchanged.
//!
//! The fault in force is the one word in a control file, `disk-fault` in
//! the member's data dir ([`CONTROL_FILE`]), re-read at most every
//! [`RECHECK`] (so a harness waits twice that after writing it):
//!
//! * missing, empty or unknown (a WARN): no fault;
//! * `lose-unsynced`: writes reach the file only at the next `sync_data`;
//!   until then they live in an in-memory overlay that reads consult, so a
//!   kill -9 loses exactly what was not synced, like a power loss (without
//!   the overlay, a killed process's writes stay in the page cache);
//! * `sync-error`: `sync_data` fails with EIO, and what it would have
//!   synced is lost (writes are held in the overlay as above, and dropped);
//! * `enospc`: `write` and `set_len` fail with ENOSPC ("no space left on
//!   device"); writes accepted before still reach the file at a sync.
//!
//! A word acts on the calls made once it is read: writes that went to the
//! file before it are in the page cache and survive a kill -9 as usual.
//! Every call takes one mutex (and the file read every `RECHECK`): a cost
//! only the fault suite pays.
//!
//! Invariants: the overlay is process memory. It is `None` when empty, and
//! then every call goes straight to the file; while it is `Some`, the file
//! is not touched until a successful `sync_data` writes the overlay out and
//! syncs, or the backend is closed or crashed, which discards it. Writes
//! keep going to a non-empty overlay after the word changes, so the file
//! never receives a later write before an earlier one.
//!
//! redb latches any failed write, `set_len` or `sync_data`: every later
//! operation of that `Database` fails with "previous I/O error" until it is
//! closed (`cached_file.rs`, `io_failed`), and openraft stops its core on
//! any storage error. So a member does not recover in-process from these
//! faults: it exits, and recovers on restart once the word is cleared
//! (docs/decisions/065-disk-faults.md).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// The control file's name in the member's data dir.
pub const CONTROL_FILE: &str = "disk-fault";
/// How stale the fault read from the control file may be.
pub const RECHECK: Duration = Duration::from_millis(50);
/// Overlay page size. Any size works; redb writes whole 4 KiB pages.
const PAGE: u64 = 4096;
/// `ENOSPC` ("no space left on device") on Linux and the other Unixes.
pub(crate) const ENOSPC: i32 = 28;
/// `EIO` (an I/O error of the device).
pub(crate) const EIO: i32 = 5;

/// A fault named by the control file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No fault.
    None,
    /// Writes wait in memory until `sync_data`.
    LoseUnsynced,
    /// `sync_data` fails with EIO, losing what it would have synced.
    SyncError,
    /// `write` and `set_len` fail with ENOSPC.
    Enospc,
}

impl Fault {
    /// Parses the control file's content; `None` for an unknown word.
    pub fn parse(text: &str) -> Option<Fault> {
        match text.trim() {
            "" => Some(Fault::None),
            "lose-unsynced" => Some(Fault::LoseUnsynced),
            "sync-error" => Some(Fault::SyncError),
            "enospc" => Some(Fault::Enospc),
            _ => None,
        }
    }

    /// Whether writes wait in the overlay under this fault.
    fn holds_writes(self) -> bool {
        matches!(self, Fault::LoseUnsynced | Fault::SyncError)
    }
}

/// Writes not yet synced, by page, over a file that does not change while
/// they wait.
struct Overlay {
    /// Page number → `PAGE` bytes (zeros past `len`).
    pages: BTreeMap<u64, Vec<u8>>,
    /// The storage's length as redb sees it.
    len: u64,
    /// The file's length when the overlay began.
    file_len: u64,
    /// File bytes at or past this offset read as zeros (a shrink cut them).
    keep: u64,
}

struct State {
    fault: Fault,
    /// When the control file was last read (`None`: never).
    checked: Option<Instant>,
    /// The control file's last content, to log each change once.
    last_text: String,
    overlay: Option<Overlay>,
    /// Tests: the process "died": nothing reaches the file any more.
    crashed: bool,
    /// Tests: the next `sync_data` crashes instead of syncing.
    #[cfg(test)]
    crash_at_sync: bool,
    /// Tests: bytes of overlay the crash discarded.
    #[cfg(test)]
    discarded: u64,
}

struct Inner {
    file: FileBackend,
    control: PathBuf,
    state: Mutex<State>,
}

/// The fault-injecting backend. Clones share the file and the overlay (the
/// tests keep one to look inside).
#[derive(Clone)]
pub struct DiskFaults {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DiskFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskFaults")
            .field("control", &self.inner.control)
            .finish_non_exhaustive()
    }
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(ENOSPC)
}

fn crashed() -> io::Error {
    io::Error::other("simulated crash: this backend no longer reaches the file")
}

impl DiskFaults {
    /// Opens (or creates) the database file at `path`, with faults read
    /// from `control`.
    pub fn open(path: &Path, control: &Path) -> io::Result<Self> {
        // The same options as `redb::Database::create`.
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let file = FileBackend::new(file).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(DiskFaults {
            inner: Arc::new(Inner {
                file,
                control: control.to_path_buf(),
                state: Mutex::new(State {
                    fault: Fault::None,
                    checked: None,
                    last_text: String::new(),
                    overlay: None,
                    crashed: false,
                    #[cfg(test)]
                    crash_at_sync: false,
                    #[cfg(test)]
                    discarded: 0,
                }),
            }),
        })
    }

    /// The state, with the fault re-read from the control file if stale.
    /// The state, for a call that writes: refused after a crash, or while
    /// the disk is full.
    fn growing(&self) -> Result<MutexGuard<'_, State>, io::Error> {
        let s = self.state();
        if s.crashed {
            return Err(crashed());
        }
        if s.fault == Fault::Enospc {
            return Err(enospc());
        }
        Ok(s)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // No critical section leaves the state half-changed on a panic
        // (they only call the file and replace whole fields).
        let mut s = self
            .inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.checked.is_none_or(|at| at.elapsed() >= RECHECK) {
            s.checked = Some(Instant::now());
            let text = match std::fs::read_to_string(&self.inner.control) {
                Ok(text) => text,
                Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
                Err(e) => {
                    tracing::warn!(file = %self.inner.control.display(), error = %e, "cannot read the disk-fault control file; keeping the current fault");
                    return s;
                }
            };
            if text != s.last_text {
                s.fault = match Fault::parse(&text) {
                    Some(f) => {
                        tracing::info!(fault = ?f, file = %self.inner.control.display(), "injected disk fault changed");
                        f
                    }
                    None => {
                        tracing::warn!(word = text.trim(), file = %self.inner.control.display(), "unknown disk fault (expected lose-unsynced, sync-error or enospc); injecting none");
                        Fault::None
                    }
                };
                s.last_text = text;
            }
        }
        s
    }

    /// The fault in force (re-reading the control file if stale).
    pub fn fault(&self) -> Fault {
        self.state().fault
    }

    /// Tests: the process dies now. The overlay is lost and nothing reaches
    /// the file any more; redb can still close (releasing its locks), as
    /// the kernel does for a killed process.
    #[cfg(test)]
    pub fn crash(&self) {
        let mut s = self.state();
        Self::discard(&mut s);
        s.crashed = true;
    }

    /// Tests: the next `sync_data` crashes (see [`Self::crash`]) and fails.
    #[cfg(test)]
    pub fn crash_at_next_sync(&self) {
        self.state().crash_at_sync = true;
    }

    /// Tests: bytes of written data the crash threw away.
    #[cfg(test)]
    pub fn discarded(&self) -> u64 {
        self.state().discarded
    }

    fn discard(s: &mut State) {
        #[cfg(test)]
        {
            let held = s
                .overlay
                .as_ref()
                .map_or(0, |o| o.pages.len() as u64 * PAGE);
            s.discarded += held;
        }
        s.overlay = None;
    }

    /// The overlay, begun if needed.
    fn overlay<'s>(&self, s: &'s mut State) -> io::Result<&'s mut Overlay> {
        if s.overlay.is_none() {
            let len = self.inner.file.len()?;
            s.overlay = Some(Overlay {
                pages: BTreeMap::new(),
                len,
                file_len: len,
                keep: len,
            });
        }
        Ok(s.overlay.as_mut().expect("set just above"))
    }

    /// Reads the file's bytes at `offset` into `out`: zeros past `keep`.
    fn read_file(&self, keep: u64, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let from_file = keep.saturating_sub(offset).min(out.len() as u64) as usize;
        if from_file > 0 {
            self.inner.file.read(offset, &mut out[..from_file])?;
        }
        out[from_file..].fill(0);
        Ok(())
    }

    /// Writes the overlay to the file (without syncing it).
    fn write_out(&self, o: &Overlay) -> io::Result<()> {
        if o.keep < o.file_len {
            self.inner.file.set_len(o.keep)?;
        }
        if o.len != o.keep {
            self.inner.file.set_len(o.len)?;
        }
        for (page, bytes) in &o.pages {
            let start = page * PAGE;
            let end = (start + PAGE).min(o.len);
            if start < end {
                self.inner
                    .file
                    .write(start, &bytes[..(end - start) as usize])?;
            }
        }
        Ok(())
    }
}

impl Overlay {
    /// The page's bytes, loaded from the file on first touch.
    fn page(&mut self, faults: &DiskFaults, page: u64) -> io::Result<&mut Vec<u8>> {
        if !self.pages.contains_key(&page) {
            let mut bytes = vec![0; PAGE as usize];
            faults.read_file(self.keep, page * PAGE, &mut bytes)?;
            self.pages.insert(page, bytes);
        }
        Ok(self.pages.get_mut(&page).expect("inserted just above"))
    }
}

/// The pieces of `[offset, offset + len)` within each page: (page, offset
/// in the page, offset in the buffer, length).
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    let end = offset + len as u64;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let page = at / PAGE;
        let within = at % PAGE;
        let n = (PAGE - within).min(end - at);
        let piece = (page, within as usize, (at - offset) as usize, n as usize);
        at += n;
        Some(piece)
    })
}

impl StorageBackend for DiskFaults {
    fn len(&self) -> Result<u64, io::Error> {
        let s = self.state();
        match &s.overlay {
            Some(o) => Ok(o.len),
            None => self.inner.file.len(),
        }
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let s = self.state();
        let Some(o) = &s.overlay else {
            return self.inner.file.read(offset, out);
        };
        if offset + out.len() as u64 > o.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the storage",
            ));
        }
        for (page, within, at, n) in pieces(offset, out.len()) {
            let dst = &mut out[at..at + n];
            match o.pages.get(&page) {
                Some(bytes) => dst.copy_from_slice(&bytes[within..within + n]),
                None => self.read_file(o.keep, offset + at as u64, dst)?,
            }
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut s = self.growing()?;
        if s.overlay.is_none() && !s.fault.holds_writes() {
            return self.inner.file.set_len(len);
        }
        let o = self.overlay(&mut s)?;
        if len < o.len {
            // New bytes past a shrink must read as zeros if it grows again.
            o.pages.retain(|page, _| page * PAGE < len);
            if let Some(bytes) = o.pages.get_mut(&(len / PAGE)) {
                bytes[(len % PAGE) as usize..].fill(0);
            }
            o.keep = o.keep.min(len);
        }
        o.len = len;
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut s = self.state();
        if s.crashed {
            return Err(crashed());
        }
        #[cfg(test)]
        if s.crash_at_sync {
            Self::discard(&mut s);
            s.crashed = true;
            return Err(crashed());
        }
        if s.fault == Fault::SyncError {
            // What this sync would have made durable is lost; redb fails
            // from now on, so nothing reads the overlay again.
            Self::discard(&mut s);
            return Err(io::Error::from_raw_os_error(EIO));
        }
        if let Some(o) = &s.overlay {
            self.write_out(o)?;
        }
        self.inner.file.sync_data()?;
        s.overlay = None;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut s = self.growing()?;
        if s.overlay.is_none() && !s.fault.holds_writes() {
            return self.inner.file.write(offset, data);
        }
        let o = self.overlay(&mut s)?;
        for (page, within, at, n) in pieces(offset, data.len()) {
            o.page(self, page)?[within..within + n].copy_from_slice(&data[at..at + n]);
        }
        o.len = o.len.max(offset + data.len() as u64);
        Ok(())
    }

    fn close(&self) -> Result<(), io::Error> {
        // Unsynced writes die with the process; the locks go with the file.
        Self::discard(&mut self.state());
        self.inner.file.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.file.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.file.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.file.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.file.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.file.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.file.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests;
