//! The file side of watching: template files and `file:` sources, seen
//! through their directories, since editors and Kubernetes replace files
//! rather than write them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::engine::Settings;
use crate::reference::Scheme;
use crate::resolve::FetchResults;

/// What the file watcher looks at: the template files and `file:` sources,
/// by path, and the directories they are in (watched, since editors and
/// Kubernetes replace files rather than write them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WatchedFiles {
    dirs: BTreeSet<PathBuf>,
    files: BTreeSet<PathBuf>,
    /// `file:DIR/` sources: anything in them counts.
    trees: BTreeSet<PathBuf>,
}

impl WatchedFiles {
    /// The files of `settings` (templates), of `cache` (`file:` sources)
    /// and the local values file.
    pub fn new(settings: &Settings, cache: &FetchResults, values: Option<PathBuf>) -> Self {
        let mut w = WatchedFiles::default();
        let mut files: Vec<PathBuf> = settings
            .templates
            .iter()
            .map(|t| t.source.clone())
            .chain(values)
            .collect();
        for source in cache.keys().filter(|s| s.scheme == Scheme::File) {
            if source.is_prefix() {
                let dir = absolute(Path::new(source.path.trim_end_matches('/')));
                w.dirs.insert(dir.clone());
                w.trees.insert(dir);
            } else {
                files.push(PathBuf::from(&source.path));
            }
        }
        for p in files {
            let p = absolute(&p);
            if let Some(dir) = p.parent() {
                w.dirs.insert(dir.to_path_buf());
            }
            w.files.insert(p);
        }
        w
    }

    /// Whether an event on `path` may change an input: the file itself,
    /// anything in a directory source, or a Kubernetes volume's `..data`
    /// swap.
    fn concerns(&self, path: &Path) -> bool {
        self.files.contains(path)
            || path.parent().is_some_and(|d| self.trees.contains(d))
            || path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".."))
    }
}

/// Watches the directories of `watched`; an event that concerns an input
/// calls `changed` (on notify's own thread).
pub fn watch_files(
    watched: &WatchedFiles,
    changed: impl Fn() + Send + 'static,
) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher as _};
    let filter = watched.clone();
    let mut watcher = match notify::recommended_watcher(
        move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if event.kind.is_access() || !event.paths.iter().any(|p| filter.concerns(p)) {
                return;
            }
            tracing::debug!(kind = ?event.kind, paths = ?event.paths, "file event");
            changed();
        },
    ) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch files; template and file: changes need a SIGHUP");
            return None;
        }
    };
    for dir in &watched.dirs {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch this directory");
        }
    }
    Some(watcher)
}

/// `p` from the root, its directory resolved but not the file itself (a
/// template that is a symlink, as in Kubernetes volumes, is watched where
/// the link is), so paths from different spellings compare equal.
fn absolute(p: &Path) -> PathBuf {
    let (dir, name) = match (p.parent(), p.file_name()) {
        (Some(d), Some(n)) if !d.as_os_str().is_empty() => (d, n),
        (_, Some(n)) => (Path::new("."), n),
        _ => return std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()),
    };
    std::fs::canonicalize(dir)
        .map(|d| d.join(name))
        .unwrap_or_else(|_| p.to_path_buf())
}
