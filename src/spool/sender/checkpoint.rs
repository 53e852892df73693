//! Advancing the checkpoint over the acknowledged prefix and deleting the segments it covers.

use std::io;
use std::sync::atomic::Ordering;

use super::Sender;
use crate::spool::recover::{remove_if_exists, sync_dir, write_checkpoint};
use crate::spool::segment::segment_name;
use crate::spool::{SenderFile, lock};

impl Sender {
    /// Writes the checkpoint if it moved and deletes the segments it covers.
    pub(super) async fn checkpoint(&mut self) {
        let acked = self.acked;
        let mut deletable = Vec::new();
        while let Some(f) = self.finished.front() {
            if f.last_seq.is_some_and(|s| s >= acked) {
                break;
            }
            if let Some(f) = self.finished.pop_front() {
                deletable.push(f);
            }
        }
        // A step that failed after its writes (the directory's fsync) is tried again even when
        // nothing moved since: on a drained spool nothing else would, and the fault would stay.
        let resync = self.inner.sender_faulty(SenderFile::Checkpoint);
        if acked == self.written && deletable.is_empty() && !resync {
            return;
        }
        let (inner, write) = (self.inner.clone(), acked != self.written);
        let ids: Vec<u64> = deletable.iter().map(|f| f.segment).collect();
        let done = tokio::task::spawn_blocking(move || {
            let _gate = lock(&inner.fs_gate);
            let mut done = FileWork {
                wrote: false,
                deleted: 0,
                error: None,
            };
            if inner.dead.load(Ordering::Acquire) {
                return done;
            }
            // Segments whose every record was acknowledged go even when the checkpoint cannot
            // be written: a stale checkpoint only sends later records again, and on a full disk
            // their space is what lets the next checkpoint be written at all.
            if write {
                match write_checkpoint(&inner.dir, acked) {
                    Ok(()) => done.wrote = true,
                    Err(e) => done.error = Some(e),
                }
            }
            for id in &ids {
                if let Err(e) = remove_if_exists(&inner.dir.join(segment_name(*id))) {
                    done.error = Some(e);
                    return done;
                }
                done.deleted += 1;
            }
            if (done.deleted > 0 || resync)
                && let Err(e) = sync_dir(&inner.dir)
            {
                done.error = Some(e);
            }
            done
        })
        .await
        .unwrap_or_else(|e| FileWork {
            wrote: false,
            deleted: 0,
            error: Some(io::Error::other(e.to_string())),
        });
        if done.wrote {
            self.written = acked;
            self.inner.checkpoint.store(acked, Ordering::Release);
        }
        for f in deletable.iter().take(done.deleted) {
            lock(&self.inner.sealed).remove(&f.segment);
            self.inner.release(f.size);
        }
        for f in deletable.into_iter().skip(done.deleted).rev() {
            self.finished.push_front(f);
        }
        match done.error {
            Some(error) => self.inner.sender_error(SenderFile::Checkpoint, &error),
            None => self.inner.sender_ok(SenderFile::Checkpoint),
        }
    }
}

/// What a checkpoint step got done on disk.
struct FileWork {
    wrote: bool,
    deleted: usize,
    error: Option<io::Error>,
}
