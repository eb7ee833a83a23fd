//! Linked directories: outputs that change together, for a reader, in one
//! step.
//!
//! A certificate and its key renamed into place one after the other can be
//! read half-changed: the new certificate with the old key. The files of a
//! linked directory (`render.linked_dirs`) are laid out as the kubelet lays
//! out a ConfigMap volume:
//!
//! ```text
//! /etc/tls/..envrender-AbC123/tls.crt   the files of one render
//! /etc/tls/..envrender-AbC123/tls.key
//! /etc/tls/..data -> ..envrender-AbC123
//! /etc/tls/tls.crt -> ..data/tls.crt
//! /etc/tls/tls.key -> ..data/tls.key
//! ```
//!
//! A render writes every file of the directory into a new `..envrender-*`
//! directory, then replaces `..data` with one rename: a reader that opens
//! `tls.crt` and `tls.key` sees both old or both new. The old directory is
//! removed once everything is in place. Watchers of `..data` swaps (Envoy
//! SDS, Go certificate reloaders, the kubelet's own consumers) see one
//! change.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use super::{Existing, FileWrite, OutputError, Status, err, existing, set_owner, status_against};

/// The link every file of a linked directory goes through.
pub const DATA: &str = "..data";

/// The prefix of the directories holding the files of one render.
const PREFIX: &str = "..envrender-";

/// One linked directory of a commit: its files staged in a new directory,
/// and what `..data` pointed to before.
pub(super) struct LinkedDir<'a> {
    pub dir: PathBuf,
    /// The outputs in it, with their status.
    pub files: Vec<(&'a FileWrite, Status)>,
    /// The new directory, staged; `None` when nothing changed.
    pub staged: Option<tempfile::TempDir>,
    /// Where `..data` pointed before, if anywhere.
    pub before: Option<OsString>,
    /// The visible names that are not yet links through `..data`.
    pub unlinked: Vec<OsString>,
    /// Set once `..data` points to the new directory.
    pub swapped: bool,
}

/// The name of `w` in its directory.
fn name(w: &FileWrite) -> OsString {
    w.path.file_name().map(OsString::from).unwrap_or_default()
}

/// `dir`, or `.` for an empty one.
fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Whether `path` is the link `..data/NAME` a linked file is seen through.
fn is_data_link(path: &Path, name: &OsString) -> bool {
    std::fs::read_link(path).is_ok_and(|t| t == Path::new(DATA).join(name))
}

/// What is in place for a linked output: the file behind `..data` when its
/// name is already a link through it.
fn current(w: &FileWrite) -> Result<Option<Existing>, OutputError> {
    let dir = dir_of(&w.path);
    let name = name(w);
    if !is_data_link(&w.path, &name) {
        return existing(&w.path, w.contents.len());
    }
    existing(&dir.join(DATA).join(&name), w.contents.len())
}

/// The status of a linked output: as for any file, except that a name not
/// yet seen through `..data` is updated (made a link) even when its content
/// is the same.
pub(super) fn status(w: &FileWrite) -> Result<Status, OutputError> {
    let before = current(w)?;
    let status = status_against(w, before.as_ref());
    if status == Status::Unchanged && !is_data_link(&w.path, &name(w)) {
        return Ok(Status::Updated);
    }
    Ok(status)
}

/// Groups the linked outputs by directory and stages a new directory for
/// each one where anything changed. Nothing visible changes.
pub(super) fn prepare<'a>(writes: &[&'a FileWrite]) -> Result<Vec<LinkedDir<'a>>, OutputError> {
    let mut dirs: Vec<LinkedDir<'a>> = Vec::new();
    for &w in writes {
        let dir = dir_of(&w.path);
        let status = status(w)?;
        match dirs.iter_mut().find(|d| d.dir == dir) {
            Some(d) => d.files.push((w, status)),
            None => dirs.push(LinkedDir {
                dir,
                files: vec![(w, status)],
                staged: None,
                before: None,
                unlinked: Vec::new(),
                swapped: false,
            }),
        }
    }
    for d in &mut dirs {
        if d.files.iter().all(|(_, s)| *s == Status::Unchanged) {
            continue;
        }
        std::fs::create_dir_all(&d.dir).map_err(err(&d.dir, "create the directory"))?;
        remove_stale(&d.dir);
        d.before = std::fs::read_link(d.dir.join(DATA))
            .ok()
            .map(PathBuf::into_os_string);
        let staged = tempfile::Builder::new()
            .prefix(PREFIX)
            .tempdir_in(&d.dir)
            .map_err(err(&d.dir, "create a directory in"))?;
        std::fs::set_permissions(staged.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(err(staged.path(), "set the mode"))?;
        for (w, _) in &d.files {
            write_file(w, &staged.path().join(name(w)))?;
            if !is_data_link(&w.path, &name(w)) {
                d.unlinked.push(name(w));
            }
        }
        d.staged = Some(staged);
    }
    Ok(dirs)
}

/// Writes one file of a new directory: owner and mode before the first
/// byte, then synced.
fn write_file(w: &FileWrite, path: &Path) -> Result<(), OutputError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(err(&w.path, "write"))?;
    set_owner(&file, &w.path, w.owner)?;
    file.set_permissions(std::fs::Permissions::from_mode(w.mode))
        .map_err(err(&w.path, "set the mode"))?;
    file.write_all(&w.contents).map_err(err(&w.path, "write"))?;
    file.sync_all().map_err(err(&w.path, "sync"))
}

/// Points `link` at `target` in one step: a new link beside it, renamed
/// over it.
fn relink(link: &Path, target: &Path) -> std::io::Result<()> {
    let dir = dir_of(link);
    let tmp = dir.join(format!(
        ".{}.envrender-link",
        link.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

impl<'a> LinkedDir<'a> {
    /// The staged path of each file that changes, for its check.
    pub fn changed(&self) -> impl Iterator<Item = (&'a FileWrite, PathBuf)> + '_ {
        let staged = self.staged.as_ref().map(|s| s.path().to_path_buf());
        self.files.iter().filter_map(move |(w, status)| {
            let staged = staged.as_ref()?;
            (*status != Status::Unchanged).then(|| (*w, staged.join(name(w))))
        })
    }

    /// Swaps `..data` to the new directory, then makes each name a link
    /// through it.
    pub fn swap(&mut self) -> Result<(), OutputError> {
        let Some(staged) = &self.staged else {
            return Ok(());
        };
        let new = staged
            .path()
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_default();
        let data = self.dir.join(DATA);
        relink(&data, &new).map_err(err(&data, "swap the link"))?;
        self.swapped = true;
        for name in &self.unlinked {
            let path = self.dir.join(name);
            relink(&path, &Path::new(DATA).join(name)).map_err(err(&path, "link"))?;
        }
        Ok(())
    }

    /// Puts `..data` back where it pointed (the names made links stay:
    /// they read through it).
    pub fn undo(&self) -> Result<(), OutputError> {
        if !self.swapped {
            return Ok(());
        }
        let data = self.dir.join(DATA);
        match &self.before {
            Some(before) => {
                relink(&data, Path::new(before)).map_err(err(&data, "restore the link"))
            }
            None => std::fs::remove_file(&data).map_err(err(&data, "remove")),
        }
    }

    /// Once every output is in place: the new directory kept, the one
    /// `..data` pointed to before removed.
    pub fn settle(&mut self) {
        if let Some(staged) = self.staged.take() {
            let _ = staged.keep();
        }
        if let Some(before) = self.before.take() {
            remove_data_dir(&self.dir, &before);
        }
    }
}

/// Removes a directory of an earlier render: only a directory of ours
/// (`..envrender-*`) directly in `dir`, never through a link.
fn remove_data_dir(dir: &Path, name: &OsString) {
    let Some(text) = name.to_str() else { return };
    if !text.starts_with(PREFIX) || text.contains('/') {
        return;
    }
    let path = dir.join(name);
    let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
    if is_dir && let Err(e) = std::fs::remove_dir_all(&path) {
        tracing::warn!(dir = %path.display(), error = %e, "cannot remove the files of an earlier render");
    }
}

/// Removes what an interrupted render left in `dir`: directories of ours
/// that `..data` does not point to.
fn remove_stale(dir: &Path) {
    let current = std::fs::read_link(dir.join(DATA)).ok();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if current.as_deref() != Some(Path::new(&name)) {
            remove_data_dir(dir, &name);
        }
    }
}
