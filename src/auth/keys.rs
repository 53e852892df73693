//! The keys in force, from `[[auth.keys]]` and `auth.keys_file`: re-read on SIGHUP and when the
//! file changes, keeping the keys in force when the new file is bad.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::{KeyConfig, KeySet};

/// The key file: `[[keys]]` entries, as in `[[auth.keys]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    /// Required, even when empty: a file of comments only (a script's header, written before
    /// its keys) must not take every key away.
    keys: Vec<KeyConfig>,
}

/// The keys in force: from `[[auth.keys]]` plus `auth.keys_file`, reloadable.
#[derive(Debug)]
pub struct Keys {
    inline: Vec<KeyConfig>,
    file: Option<PathBuf>,
    /// Whether clients present certificates (keys by subject need it).
    mtls: bool,
    current: RwLock<Arc<KeySet>>,
    loaded_at: Mutex<Option<Stamp>>,
    /// The file's stamp at the previous check: a change is applied once it has held still
    /// for a whole check interval, so a file written in pieces is not read half-written.
    last_seen: Mutex<Option<Stamp>>,
    /// The stamp of a file that failed to load: not tried again (and logged again) every
    /// check, only once it changes.
    failed: Mutex<Option<Stamp>>,
}

/// What tells one version of the key file from the next: its modification and change times,
/// length and inode. The length catches an in-place rewrite within one tick of a coarse clock
/// (`cat new > file` is an empty file first); the change time and inode, a file whose
/// modification time is pinned (a Nix store path, a reproducible archive) or swapped in by a
/// rename.
type Stamp = (SystemTime, u64, (i64, i64), u64);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((
        meta.modified().ok()?,
        meta.len(),
        (meta.ctime(), meta.ctime_nsec()),
        meta.ino(),
    ))
}

impl Keys {
    /// Loads the inline keys and the key file; any error is a config error.
    pub fn load(inline: &[KeyConfig], file: Option<&Path>, mtls: bool) -> Result<Keys, String> {
        let keys = Keys {
            inline: inline.to_vec(),
            file: file.map(Path::to_path_buf),
            mtls,
            current: RwLock::default(),
            loaded_at: Mutex::new(None),
            last_seen: Mutex::new(None),
            failed: Mutex::new(None),
        };
        let (set, stamped) = keys.read().map_err(|(e, _)| e)?;
        *keys.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        *keys.loaded_at.lock().unwrap_or_else(|e| e.into_inner()) = stamped;
        Ok(keys)
    }

    /// The keys of the config and the file, with the stamp of the file read. A failure says
    /// which version of the file failed (`None` when it changed while being read, or could
    /// not be read at all, out of file descriptors say: the next check reads it again).
    fn read(&self) -> Result<(KeySet, Option<Stamp>), (String, Option<Stamp>)> {
        let mut all = self.inline.clone();
        let mut stamped = None;
        if let Some(path) = &self.file {
            let before = stamp(path);
            let failed = |e: String| (format!("{}: {e}", path.display()), before);
            let text = std::fs::read_to_string(path).map_err(|e| {
                let version = if held_against(e.kind()) { before } else { None };
                (format!("{}: {e}", path.display()), version)
            })?;
            // A file being written as it was read (an empty one, say, which parses as no keys)
            // must not replace the keys in force.
            if stamp(path) != before {
                return Err((
                    format!("{}: changed while being read", path.display()),
                    None,
                ));
            }
            stamped = before;
            // What `cat new > file` leaves between its truncate and its write; a file meant
            // to hold no keys says so with `keys = []`.
            if text.trim().is_empty() {
                return Err(failed("empty".into()));
            }
            let parsed: KeyFile = toml::from_str(&text).map_err(|e| failed(unquoted(&text, &e)))?;
            // Checked alone first, so that a bad entry is named by the file and its place
            // there; the whole set below finds a key that clashes with an inline one.
            KeySet::new(&parsed.keys, self.mtls).map_err(failed)?;
            all.extend(parsed.keys);
        }
        let set = KeySet::new(&all, self.mtls).map_err(|e| (e, stamped))?;
        Ok((set, stamped))
    }

    /// The keys in force now.
    pub fn current(&self) -> Arc<KeySet> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the key file; a bad file (an empty one included) keeps the keys in force and
    /// says why.
    pub fn reload(&self) -> Result<usize, String> {
        let (set, stamped) = match self.read() {
            Ok(read) => read,
            Err((e, version)) => {
                *crate::lock(&self.failed) = version;
                return Err(e);
            }
        };
        let count = set.keys.len();
        set.carry_buckets(&self.current());
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        *self.loaded_at.lock().unwrap_or_else(|e| e.into_inner()) = stamped;
        Ok(count)
    }

    /// Whether the key file has held still since the previous call (or check).
    fn held_still(&self) -> bool {
        let Some(path) = &self.file else { return false };
        let now = stamp(path);
        let mut last_seen = crate::lock(&self.last_seen);
        let held = now == *last_seen;
        *last_seen = now;
        held && now.is_some()
    }

    /// Whether the key file changed since it was last read and has not changed since the
    /// previous call: a writer that takes a while (an editor, `cp` of a large file) is not
    /// caught half-way.
    pub fn file_settled(&self) -> bool {
        if !self.held_still() {
            return false;
        }
        let now = crate::lock(&self.last_seen).to_owned();
        now != *crate::lock(&self.loaded_at) && now != *crate::lock(&self.failed)
    }

    /// Whether there is a key file to watch.
    pub fn has_file(&self) -> bool {
        self.file.is_some()
    }
}

/// Whether a failed read of the key file stays failed until the file changes: what the file
/// is (not readable by kafboy, a directory, not UTF-8). Anything else (out of file
/// descriptors, an I/O error) is tried again at the next check: a revocation in the file must
/// not wait for its next edit.
fn held_against(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::{InvalidData, IsADirectory, NotFound, PermissionDenied};
    matches!(
        kind,
        PermissionDenied | IsADirectory | NotFound | InvalidData
    )
}

/// A parse error of the key file without the line it quotes, nor a long value its message
/// quotes: a key written where its digest belongs would go to the log in clear.
fn unquoted(text: &str, error: &toml::de::Error) -> String {
    let message = elided(error.message());
    match error.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let start = before.rfind('\n').map_or(0, |i| i + 1);
            let column = before[start..].chars().count() + 1;
            format!("TOML parse error at line {line}, column {column}: {message}")
        }
        None => format!("TOML parse error: {message}"),
    }
}

/// `message` with every quoted span (in `"` or backticks) of more than 12 characters left
/// out: a mode or a field name is shorter, a key is not.
pub(crate) fn elided(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find(['"', '`']) {
        let quote = rest[open..].chars().next().unwrap_or('"');
        // The closing quote is the first one not escaped. Only `"` spans escape (they are
        // Rust's debug form, where a value quoted inside another comes as `\"`); backtick
        // spans are written raw.
        let inside = &rest[open + 1..];
        let close = inside
            .char_indices()
            .scan(false, |escaped, (i, c)| {
                let close = c == quote && !*escaped;
                *escaped = quote == '"' && c == '\\' && !*escaped;
                Some((i, close))
            })
            .find_map(|(i, close)| close.then_some(i));
        out.push_str(&rest[..=open]);
        let Some(len) = close else {
            // Never closed: whatever follows is left out.
            out.push('…');
            return out;
        };
        let inner = &inside[..len];
        out.push_str(if inner.chars().count() > 12 {
            "…"
        } else {
            inner
        });
        out.push(quote);
        rest = &rest[open + len + 2..];
    }
    out.push_str(rest);
    out
}

/// When the key file is due for a reload, decided on a fixed beat.
#[derive(Default)]
struct Watch {
    /// A SIGHUP came since the last reload.
    asked: bool,
}

impl Watch {
    /// A SIGHUP asks for a reload even of an unchanged file, but not of one being written:
    /// sent mid-rewrite, it would apply a cut-off file that parses (a key without its `rate`,
    /// and the keys after it gone). So it takes no sample of its own: the file must hold
    /// still from one beat to the next, as without a signal.
    fn signalled(&mut self) {
        self.asked = true;
    }

    /// At a beat: whether to reload now.
    fn beat(&mut self, keys: &Keys) -> bool {
        let due = if self.asked {
            keys.held_still()
        } else {
            keys.file_settled()
        };
        if due {
            self.asked = false;
        }
        due
    }
}

/// Re-reads the key file when it has changed and then held still for one check (checked every
/// 2 s), and on SIGHUP once it holds still, for as long as the keys are in use. Without a key
/// file there is nothing to watch.
pub fn spawn_watch(keys: &Arc<Keys>) {
    if !keys.has_file() {
        return;
    }
    let weak = Arc::downgrade(keys);
    tokio::spawn(async move {
        let mut hangups = crate::shutdown::hangups();
        let mut watch = Watch::default();
        // A fixed beat: signals in quick succession must not keep pushing the next check away.
        let mut beat = tokio::time::interval(Duration::from_secs(2));
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        beat.tick().await;
        loop {
            let signalled = tokio::select! {
                () = hangups.next() => true,
                _ = beat.tick() => false,
            };
            let Some(keys) = weak.upgrade() else { return };
            if signalled {
                watch.signalled();
                continue;
            }
            // Off the async workers: a file on a mount that hangs would hold one, and with a
            // single worker every request and the shutdown's signal with it.
            let checked = tokio::task::spawn_blocking(move || {
                let reloaded = watch.beat(&keys).then(|| keys.reload());
                (watch, reloaded)
            });
            let Ok((checked, reloaded)) = checked.await else {
                return;
            };
            watch = checked;
            match reloaded {
                None => {}
                Some(Ok(count)) => tracing::info!(keys = count, "API keys reloaded"),
                Some(Err(error)) => {
                    tracing::error!(%error, "API keys not reloaded; the previous keys stay in force")
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys loaded from a file holding key `a`, the file's path, and its directory (dropped,
    /// it removes them).
    fn loaded_a() -> (tempfile::TempDir, std::path::PathBuf, Keys) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, entry("a")).unwrap();
        let keys = Keys::load(&[], Some(&path), false).unwrap();
        (dir, path, keys)
    }

    fn entry(name: &str) -> String {
        let digest = if name == "a" { "ab" } else { "cd" }.repeat(32);
        format!("[[keys]]\nname = \"{name}\"\nsha256 = \"{digest}\"\ntopics = [\"t\"]\n")
    }

    #[test]
    fn a_rewrite_within_one_clock_tick_is_still_seen() {
        let (_dir, path, keys) = loaded_a();
        let when = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert!(!keys.file_settled());
        // Rewritten in place, and the clock did not move on (coarse timestamps).
        std::fs::write(&path, entry("a") + &entry("b")).unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(when).unwrap();
        assert!(
            !keys.file_settled(),
            "changed since the last check: not yet"
        );
        assert!(keys.file_settled(), "held still for one check");
        assert_eq!(keys.reload().unwrap(), 2);
        assert!(!keys.file_settled());
        // Truncated on the way to new contents: the keys in force stay.
        std::fs::write(&path, "").unwrap();
        assert!(keys.reload().unwrap_err().contains("empty"));
        std::fs::write(&path, " \n").unwrap();
        assert!(keys.reload().unwrap_err().contains("empty"));
        assert_eq!(keys.current().keys.len(), 2);
        std::fs::write(&path, "keys = []\n").unwrap();
        assert_eq!(keys.reload().unwrap(), 0, "no keys, said on purpose");
    }

    #[test]
    fn a_file_written_in_pieces_is_applied_once_it_holds_still() {
        let (_dir, path, keys) = loaded_a();
        assert!(!keys.file_settled());
        // The first piece of a new file: a key whose topics line has not been written yet.
        std::fs::write(
            &path,
            "[[keys]]\nname = \"b\"\nsha256 = \"".to_string() + &"cd".repeat(32) + "\"\n",
        )
        .unwrap();
        assert!(
            !keys.file_settled(),
            "still being written, as far as anyone knows"
        );
        std::fs::write(&path, entry("b")).unwrap();
        assert!(!keys.file_settled(), "changed again");
        assert!(keys.file_settled());
        assert_eq!(keys.reload().unwrap(), 1);
        assert!(keys.current().find(b"x").is_none());
    }

    #[test]
    fn a_sighup_waits_for_the_file_to_hold_still_for_a_beat() {
        let (_dir, path, keys) = loaded_a();
        let mut watch = Watch::default();
        assert!(!watch.beat(&keys), "unchanged, not asked");
        // Asked with no change: the next beat reloads.
        watch.signalled();
        assert!(watch.beat(&keys));
        assert!(!watch.beat(&keys), "done");
        // A piece of a new file lands just before a SIGHUP (sent for the TLS certificate,
        // say) and the beat right after it.
        std::fs::write(&path, entry("a") + "[[keys]]\nname = \"b\"\n").unwrap();
        watch.signalled();
        assert!(!watch.beat(&keys), "it changed since the last beat");
        assert!(watch.beat(&keys), "held still for a beat");
    }

    #[test]
    fn a_read_that_failed_for_want_of_resources_is_tried_again() {
        // Out of file descriptors (EMFILE, ENFILE), an I/O error (EIO): tried again at the
        // next check.
        for errno in [24, 23, 5] {
            let kind = std::io::Error::from_raw_os_error(errno).kind();
            assert!(!held_against(kind), "{errno}: {kind:?}");
        }
        // What the file is: tried again once it changes.
        let (_dir, path, keys) = loaded_a();
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(!keys.file_settled());
        assert!(keys.file_settled());
        assert!(keys.reload().is_err());
        assert!(!keys.file_settled(), "a directory stays one");
        assert_eq!(keys.current().keys.len(), 1, "the keys in force stay");
    }

    #[test]
    fn a_parse_error_names_the_line_without_quoting_it() {
        let (_dir, path, keys) = loaded_a();
        // A key pasted where its digest belongs, with the quote left open.
        let pasted = entry("b").replace(&"cd".repeat(32), "kb_secret\nmodes = [");
        std::fs::write(&path, pasted).unwrap();
        let e = keys.reload().unwrap_err();
        assert!(!e.contains("kb_secret"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        // Nor a value its message quotes, where a key went in place of a number.
        let pasted = entry("b") + "rate = \"kb_0123456789abcdef\"\n";
        std::fs::write(&path, pasted).unwrap();
        let e = keys.reload().unwrap_err();
        assert!(!e.contains("kb_0123456789"), "{e}");
        assert!(e.contains("line 5"), "{e}");
        // Columns count characters.
        std::fs::write(&path, "[[keys]]\nname = \"é\" x\n").unwrap();
        let e = keys.reload().unwrap_err();
        assert!(e.contains("line 2, column 12"), "{e}");
    }

    #[test]
    fn keys_by_certificate_need_mtls_in_the_file_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(
            &path,
            "[[keys]]\nname = \"p\"\nclient_cert_subject = \"CN=p\"\ntopics = [\"t\"]\n",
        )
        .unwrap();
        let e = Keys::load(&[], Some(&path), false).unwrap_err();
        assert!(e.contains("needs server.tls.client_ca"), "{e}");
        assert!(Keys::load(&[], Some(&path), true).is_ok());
    }

    #[test]
    fn a_bad_entry_is_named_by_the_file_and_its_place_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let bad = "[[keys]]\nname = \"bad\"\nsha256 = \"zz\"\ntopics = [\"t\"]\n";
        std::fs::write(&path, entry("b") + bad).unwrap();
        let inline: Vec<KeyConfig> = toml::from_str::<KeyFile>(&entry("a")).unwrap().keys;
        let e = Keys::load(&inline, Some(&path), false).unwrap_err();
        let want = format!("{}: keys[1] (bad)", path.display());
        assert!(e.starts_with(&want), "{e}");
        // A clash between an inline key and one of the file names both.
        std::fs::write(&path, entry("a").replace("name = \"a\"", "name = \"c\"")).unwrap();
        let e = Keys::load(&inline, Some(&path), false).unwrap_err();
        assert!(
            e.contains("key c has the same") && e.contains("as key a"),
            "{e}"
        );
    }
}
