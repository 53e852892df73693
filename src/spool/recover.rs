//! Opening a spool directory: its lock, the checkpoint file, and recovery of the segments.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::SpoolError;
use super::segment::{self, crc32c};

/// The checkpoint file: the seq of the first record not yet acknowledged.
pub(super) const CHECKPOINT: &str = "checkpoint";
const CHECKPOINT_TMP: &str = "checkpoint.tmp";
/// Left by the writer's disk probe.
pub(super) const PROBE: &str = "probe.tmp";
const LOCK: &str = "lock";
/// `ENOLCK` on Linux: no locks available (a file system that cannot lock).
const ENOLCK: i32 = 37;

/// What recovery found in a spool directory.
#[derive(Debug)]
pub(super) struct Found {
    /// Seq of the first record not yet acknowledged.
    pub checkpoint: u64,
    /// Seq for the next record appended.
    pub next_seq: u64,
    /// Number of the next segment to create.
    pub next_segment: u64,
    /// Segments kept, and their lengths.
    pub sealed: BTreeMap<u64, u64>,
    /// Segment and offset of the first unacknowledged record.
    pub start: Option<(u64, u64)>,
    /// Records not acknowledged.
    pub pending: u64,
    /// Unix ms of the first unacknowledged record (0 for none).
    pub oldest_ms: u64,
    /// Bytes of the segments kept.
    pub bytes: u64,
}

/// The highest record or segment number a spool may hold.
const NUMBERS_END: u64 = 1 << 62;

/// Recovers `dir`: cuts torn or corrupt tails, deletes empty and fully acknowledged segments,
/// and finds where sending resumes.
pub(super) fn recover(dir: &Path) -> io::Result<Found> {
    for leftover in [CHECKPOINT_TMP, PROBE] {
        remove_if_exists(&dir.join(leftover))?;
    }
    let stored = read_checkpoint(dir)?;
    let ids = segment_ids(dir)?;
    if stored.is_none() && !ids.is_empty() {
        tracing::warn!(
            dir = %dir.display(),
            "spool: no valid checkpoint; every record on disk is sent again"
        );
    }
    let checkpoint = stored.unwrap_or(0);
    // Numbers count records and segments from 0: no spool comes near 2^62 of either. Numbers
    // past it are files kafboy did not write, and the next number would wrap around.
    let past = |n: u64| n > NUMBERS_END;
    let foreign = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a {what} number past 2^62 in {}: not a spool kafboy wrote",
                dir.display()
            ),
        )
    };
    if past(checkpoint) || ids.last().copied().is_some_and(past) {
        return Err(foreign("checkpoint or segment"));
    }
    let mut last_seq: Option<u64> = None;
    let mut sealed = BTreeMap::new();
    let mut start = None;
    let mut pending = 0u64;
    let mut oldest_ms = 0u64;
    let mut bytes = 0u64;
    let mut changed = false;
    for &id in &ids {
        let path = dir.join(segment::segment_name(id));
        let mut first_pending: Option<(u64, u64)> = None;
        let mut pending_here = 0u64;
        let repaired = segment::repair(&path, |entry, offset, _| {
            if let Some(last) = last_seq
                && entry.seq <= last
            {
                return Err(format!("seq {} does not follow {last}", entry.seq));
            }
            last_seq = Some(entry.seq);
            if entry.seq >= checkpoint {
                pending_here += 1;
                first_pending.get_or_insert((offset, entry.appended_ms));
            }
            Ok(())
        })?;
        changed |= repaired.cut > 0;
        if pending_here == 0 {
            // Empty, or every record acknowledged.
            remove_if_exists(&path)?;
            changed = true;
            continue;
        }
        if let Some((offset, appended_ms)) = first_pending
            && start.is_none()
        {
            start = Some((id, offset));
            oldest_ms = appended_ms;
        }
        pending += pending_here;
        bytes += repaired.valid_len;
        sealed.insert(id, repaired.valid_len);
    }
    if changed {
        sync_dir(dir)?;
    }
    let next_seq = last_seq.map_or(0, |s| s.saturating_add(1)).max(checkpoint);
    if past(next_seq) {
        return Err(foreign("record"));
    }
    Ok(Found {
        checkpoint,
        next_seq,
        next_segment: ids.last().map_or(1, |last| last + 1),
        sealed,
        start,
        pending,
        oldest_ms,
        bytes,
    })
}

/// Segment numbers in `dir`, in order.
fn segment_ids(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(segment::parse_segment_name)
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

fn checkpoint_line(next: u64) -> String {
    let body = format!("next={next}");
    format!(
        "kafboy-spool-checkpoint {body} crc={:08x}\n",
        crc32c(body.as_bytes())
    )
}

/// The stored checkpoint; `None` when there is none or it does not check out (logged).
pub(super) fn read_checkpoint(dir: &Path) -> io::Result<Option<u64>> {
    let path = dir.join(CHECKPOINT);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == ErrorKind::InvalidData => String::new(),
        Err(e) => return Err(e),
    };
    let parsed = text
        .strip_prefix("kafboy-spool-checkpoint next=")
        .and_then(|rest| rest.trim_end().split_once(" crc="))
        .and_then(|(next, crc)| {
            let n = next.parse::<u64>().ok()?;
            let crc = u32::from_str_radix(crc, 16).ok()?;
            (checkpoint_line(n) == text && crc32c(format!("next={n}").as_bytes()) == crc)
                .then_some(n)
        });
    if parsed.is_none() {
        tracing::warn!(path = %path.display(), "spool: checkpoint file unreadable; ignored");
    }
    Ok(parsed)
}

/// Replaces the checkpoint atomically: temp file, fsync, rename, fsync of the directory.
pub(super) fn write_checkpoint(dir: &Path, next: u64) -> io::Result<()> {
    let tmp = dir.join(CHECKPOINT_TMP);
    let mut f = File::create(&tmp)?;
    f.write_all(checkpoint_line(next).as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(CHECKPOINT))?;
    sync_dir(dir)
}

/// fsyncs a directory, so created, renamed and deleted names in it are durable.
/// Creates `dir` and the directories above it that are missing, each made durable in its
/// parent: without that, a power loss just after the first 202s could take a new spool
/// directory with its records.
pub(super) fn create_dir(dir: &Path) -> io::Result<()> {
    let created: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    std::fs::create_dir_all(dir)?;
    for made in created.iter().rev() {
        match made.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent)?,
            _ => sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

pub(super) fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Directories open in this process.
static OPEN: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// One process, one opener per spool directory: an exclusive lock on the `lock` file (which also
/// holds the owner's pid, for people) and a set of directories open in this process. The lock is
/// the kernel's, so it goes with its process however that ends, and two processes starting at
/// once cannot both get it, as they could a pid file that is read, checked and replaced (two
/// containers sharing a volume, each running kafboy as pid 1, would both have taken it).
#[derive(Debug)]
pub(super) struct DirLock {
    dir: PathBuf,
    /// Held open: closing it releases the lock.
    _file: File,
}

impl DirLock {
    pub(super) fn acquire(dir: &Path) -> Result<DirLock, SpoolError> {
        let disk = |e: io::Error| SpoolError::Disk(format!("lock {}: {e}", dir.display()));
        let dir = dir.canonicalize().map_err(disk)?;
        let mut open = super::lock(&OPEN);
        if open.contains(&dir) {
            return Err(SpoolError::Open(format!(
                "{} is already open in this process",
                dir.display()
            )));
        }
        let path = dir.join(LOCK);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(disk)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let owner = fs::read_to_string(&path).unwrap_or_default();
                return Err(SpoolError::Open(format!(
                    "{} is in use by another process (pid {})",
                    dir.display(),
                    owner.trim()
                )));
            }
            // A file system without locks (NFS without lockd, say): run unlocked, as one must
            // there, and say so.
            Err(TryLockError::Error(e))
                if e.kind() == ErrorKind::Unsupported || e.raw_os_error() == Some(ENOLCK) =>
            {
                tracing::warn!(dir = %dir.display(), error = %e,
                    "spool: the file system cannot lock; make sure no other process opens this spool");
            }
            Err(TryLockError::Error(e)) => return Err(disk(e)),
        }
        file.set_len(0).map_err(disk)?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(disk)?;
        open.insert(dir.clone());
        Ok(DirLock { dir, _file: file })
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // The file stays (closing it is the unlock): removing it could let a process that had
        // just opened it lock a file that no one else can find any more.
        super::lock(&OPEN).remove(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trips_and_rejects_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_checkpoint(dir.path()).unwrap(), None);
        write_checkpoint(dir.path(), 12345).unwrap();
        assert_eq!(read_checkpoint(dir.path()).unwrap(), Some(12345));
        let path = dir.path().join(CHECKPOINT);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("12345", "12346")).unwrap();
        assert_eq!(read_checkpoint(dir.path()).unwrap(), None);
        fs::write(&path, b"\xff\xfe").unwrap();
        assert_eq!(read_checkpoint(dir.path()).unwrap(), None);
    }

    #[test]
    fn numbers_near_the_end_of_their_range_are_refused_not_wrapped() {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), u64::MAX).unwrap();
        let err = recover(dir.path()).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("past 2^62"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(segment::segment_name(u64::MAX)), b"").unwrap();
        let err = recover(dir.path()).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("past 2^62"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), 7).unwrap();
        assert_eq!(recover(dir.path()).unwrap().next_seq, 7);
    }

    #[test]
    fn a_directory_opens_once_and_a_lock_held_elsewhere_is_respected() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        assert!(matches!(
            DirLock::acquire(dir.path()),
            Err(SpoolError::Open(e)) if e.contains("in this process")
        ));
        drop(first);
        // A lock file left behind by a process that is gone does not stand in the way.
        fs::write(dir.path().join(LOCK), format!("{}\n", u32::MAX - 1)).unwrap();
        let again = DirLock::acquire(dir.path()).unwrap();
        let pid = fs::read_to_string(dir.path().join(LOCK)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        drop(again);
        // Another holder of the lock (a second open file, as another process has), whatever
        // pid the file names: the same one as ours, even.
        let other = File::open(dir.path().join(LOCK)).unwrap();
        other.lock().unwrap();
        match DirLock::acquire(dir.path()) {
            Err(SpoolError::Open(e)) => assert!(e.contains("another process"), "{e}"),
            other => panic!("{other:?}"),
        }
        other.unlock().unwrap();
        DirLock::acquire(dir.path()).unwrap();
    }
}
