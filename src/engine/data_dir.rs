//! The data directory's layout with several workers (`--data-dir` with `--workers` above 1,
//! SPEC §13, §14): which directory holds each worker's log, and the marker that says how many
//! workers wrote them and with which epoch.
//!
//! Owns: `WorkersDir` (the opened layout: the marker read or written, the lock of the whole
//! directory) and the check a single worker makes on a directory (`check_single`).
//! Does not: read or write logs (each worker's `FileEngine` does, in `worker-<i>/`), or decide
//! homes (`bus::home`).
//!
//! # Layout
//!
//! ```text
//! DIR/LOCK          held by the process (as with one worker: one server per directory)
//! DIR/WORKERS       "workers N" and "epoch E": written once, when the directory is new
//! DIR/worker-0/     worker 0's log: LOCK and segments, exactly the single-worker layout
//! ...
//! DIR/worker-<N-1>/
//! ```
//!
//! A stream lives in its home worker's log, and its home is `hash % N`: the number of workers
//! is part of the data. A start with another N would look for streams in the wrong logs, so it
//! is refused in one line that names the N the directory was written with. The same goes for a
//! directory of one worker (segments directly in DIR, no marker) started with N above 1, and a
//! directory of N workers started with one. docs/operations.md ("Data directory with workers").
//!
//! Every worker's log carries the process's one epoch (a `since` is judged the same wherever
//! it lands): the marker holds it, a fresh worker log takes it, and a worker log with another
//! epoch is refused (`OpenError::Epoch`, from `FileEngine::open_worker`).

use super::file::{lock, OpenError};
use super::journal;
use super::Epoch;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The marker's file name.
pub const MARKER: &str = "WORKERS";

/// A data directory laid out for `workers` workers, locked for this process.
#[derive(Debug)]
pub struct WorkersDir {
    dir: PathBuf,
    workers: usize,
    epoch: Epoch,
    /// Held for the process's life: no other server (of any number of workers) uses DIR.
    _lock: File,
}

impl WorkersDir {
    /// Opens `dir` for `workers` workers (above 1): creates it and its marker when new, or
    /// checks that the marker says the same number of workers.
    ///
    /// # Errors
    /// `OpenError::Workers` when another number of workers wrote it (1: segments directly in
    /// `dir`), `Locked` when another server holds it, `Access` or `Corrupt` (an unreadable
    /// marker) otherwise.
    pub fn open(dir: &Path, workers: usize) -> Result<WorkersDir, OpenError> {
        fs::create_dir_all(dir).map_err(|source| access(dir, source))?;
        let lock = lock(dir)?;
        let marker = dir.join(MARKER);
        let epoch = match read_marker(&marker)? {
            Some((written, epoch)) if written == workers => epoch,
            Some((written, _)) => {
                return Err(OpenError::Workers {
                    dir: dir.to_path_buf(),
                    written,
                    asked: workers,
                })
            }
            None if has_segments(dir)? => {
                return Err(OpenError::Workers {
                    dir: dir.to_path_buf(),
                    written: 1,
                    asked: workers,
                })
            }
            None => {
                let epoch = Epoch::random();
                write_marker(dir, workers, epoch)?;
                epoch
            }
        };
        Ok(WorkersDir {
            dir: dir.to_path_buf(),
            workers,
            epoch,
            _lock: lock,
        })
    }

    /// The epoch every worker's log has (or takes, when fresh).
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Worker `index`'s directory (its `FileEngine` creates it).
    pub fn worker(&self, index: usize) -> PathBuf {
        debug_assert!(index < self.workers);
        self.dir.join(format!("worker-{index}"))
    }
}

/// Refuses a directory written by several workers to a server of one (`--workers 1` keeps
/// the single-worker layout: segments directly in `dir`).
///
/// # Errors
/// `OpenError::Workers` naming the number the marker holds, or `Access`/`Corrupt` when the
/// marker cannot be read.
pub fn check_single(dir: &Path) -> Result<(), OpenError> {
    match read_marker(&dir.join(MARKER))? {
        Some((written, _)) if written != 1 => Err(OpenError::Workers {
            dir: dir.to_path_buf(),
            written,
            asked: 1,
        }),
        _ => Ok(()),
    }
}

fn access(path: &Path, source: io::Error) -> OpenError {
    OpenError::Access {
        path: path.to_path_buf(),
        source,
    }
}

/// The marker's (workers, epoch), or None when there is none.
fn read_marker(path: &Path) -> Result<Option<(usize, Epoch)>, OpenError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(access(path, e)),
    };
    parse_marker(&text)
        .map(Some)
        .ok_or_else(|| OpenError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            problem: "not a workers marker (expected \"workers N\" and \"epoch E\" lines)",
        })
}

/// Parses the marker's two lines (`marker_text` writes them).
fn parse_marker(text: &str) -> Option<(usize, Epoch)> {
    let mut workers = None;
    let mut epoch = None;
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("workers", n)) => workers = n.trim().parse::<usize>().ok().filter(|&n| n > 0),
            Some(("epoch", e)) => epoch = Epoch::parse(e.trim()),
            _ => {}
        }
    }
    workers.zip(epoch)
}

fn marker_text(workers: usize, epoch: Epoch) -> String {
    format!("workers {workers}\nepoch {epoch}\n")
}

/// Writes the marker so that it is whole or absent after a crash: a temporary file, synced,
/// renamed over, and the directory synced.
fn write_marker(dir: &Path, workers: usize, epoch: Epoch) -> Result<(), OpenError> {
    let tmp = dir.join(format!("{MARKER}.tmp"));
    let path = dir.join(MARKER);
    let write = || -> io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(marker_text(workers, epoch).as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|source| access(&path, source))
}

/// Whether `dir` holds segments of its own (a single worker's log).
fn has_segments(dir: &Path) -> Result<bool, OpenError> {
    for entry in fs::read_dir(dir).map_err(|source| access(dir, source))? {
        let entry = entry.map_err(|source| access(dir, source))?;
        if entry
            .file_name()
            .to_str()
            .and_then(journal::segment_id)
            .is_some()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "wsrelay-data-dir-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_marker_round_trips_and_rejects_junk() {
        let epoch = Epoch(0x0123_4567_89ab_cdef);
        assert_eq!(parse_marker(&marker_text(3, epoch)), Some((3, epoch)));
        assert_eq!(parse_marker("workers 3\n"), None);
        assert_eq!(parse_marker("workers 0\nepoch 0123456789abcdef\n"), None);
        assert_eq!(parse_marker("hello"), None);
    }

    #[test]
    fn a_new_directory_gets_a_marker_and_keeps_its_epoch() {
        let dir = temp_dir("new");
        let first = WorkersDir::open(&dir, 2).unwrap();
        let epoch = first.epoch();
        assert_eq!(first.worker(1), dir.join("worker-1"));
        // One server per directory.
        assert!(matches!(
            WorkersDir::open(&dir, 2),
            Err(OpenError::Locked { .. })
        ));
        drop(first);
        let again = WorkersDir::open(&dir, 2).unwrap();
        assert_eq!(again.epoch(), epoch);
        drop(again);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_number_of_workers_is_refused_naming_the_written_one() {
        let dir = temp_dir("other-n");
        drop(WorkersDir::open(&dir, 2).unwrap());
        let err = WorkersDir::open(&dir, 3).unwrap_err();
        assert!(
            matches!(
                err,
                OpenError::Workers {
                    written: 2,
                    asked: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("--workers 2"), "{err}");
        let err = check_single(&dir).unwrap_err();
        assert!(err.to_string().contains("--workers 2"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_single_worker_directory_is_refused_to_several_workers() {
        let dir = temp_dir("single");
        fs::create_dir_all(&dir).unwrap();
        fs::write(journal::segment_path(&dir, 1), b"segment").unwrap();
        check_single(&dir).unwrap();
        let err = WorkersDir::open(&dir, 2).unwrap_err();
        assert!(
            matches!(err, OpenError::Workers { written: 1, .. }),
            "{err}"
        );
        assert!(!dir.join(MARKER).exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
