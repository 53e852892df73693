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
    #[serde(default)]
    keys: Vec<KeyConfig>,
}

/// The keys in force: from `[[auth.keys]]` plus `auth.keys_file`, reloadable.
#[derive(Debug)]
pub struct Keys {
    inline: Vec<KeyConfig>,
    file: Option<PathBuf>,
    current: RwLock<Arc<KeySet>>,
    loaded_at: Mutex<Option<SystemTime>>,
}

impl Keys {
    /// Loads the inline keys and the key file; any error is a config error.
    pub fn load(inline: &[KeyConfig], file: Option<&Path>) -> Result<Keys, String> {
        let keys = Keys {
            inline: inline.to_vec(),
            file: file.map(Path::to_path_buf),
            current: RwLock::default(),
            loaded_at: Mutex::new(None),
        };
        let (set, mtime) = keys.read()?;
        *keys.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        *keys.loaded_at.lock().unwrap_or_else(|e| e.into_inner()) = mtime;
        Ok(keys)
    }

    fn read(&self) -> Result<(KeySet, Option<SystemTime>), String> {
        let mut all = self.inline.clone();
        let mut mtime = None;
        if let Some(path) = &self.file {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            let parsed: KeyFile =
                toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            all.extend(parsed.keys);
        }
        Ok((KeySet::new(&all)?, mtime))
    }

    /// The keys in force now.
    pub fn current(&self) -> Arc<KeySet> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the key file; a bad file keeps the keys in force and says why.
    pub fn reload(&self) -> Result<usize, String> {
        let (set, mtime) = self.read()?;
        let count = set.keys.len();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        *self.loaded_at.lock().unwrap_or_else(|e| e.into_inner()) = mtime;
        Ok(count)
    }

    /// Whether the key file changed since it was last read.
    pub fn file_changed(&self) -> bool {
        let Some(path) = &self.file else { return false };
        let now = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        now.is_some() && now != *self.loaded_at.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Re-reads the key file on SIGHUP and when it changes (checked every 2 s), for as long as the
/// keys are in use.
pub fn spawn_watch(keys: &Arc<Keys>) {
    let weak = Arc::downgrade(keys);
    tokio::spawn(async move {
        let mut hangups = crate::shutdown::hangups();
        loop {
            let signalled = tokio::select! {
                () = hangups.next() => true,
                () = tokio::time::sleep(Duration::from_secs(2)) => false,
            };
            let Some(keys) = weak.upgrade() else { return };
            if !signalled && !keys.file_changed() {
                continue;
            }
            match keys.reload() {
                Ok(count) => tracing::info!(keys = count, "API keys reloaded"),
                Err(error) => {
                    tracing::error!(%error, "API keys not reloaded; the previous keys stay in force")
                }
            }
        }
    });
}
