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
//! directory, then replaces `..data` with one rename: a reader that
//! resolves `..data` once (as watchers of `..data` swaps do: Envoy SDS, Go
//! certificate reloaders, the kubelet's own consumers) sees both files old
//! or both new, and sees one change. The old directory is removed once
//! everything is in place.
//!
//! The new directory is written through a handle opened on it, never
//! through its path: a neighbour who can write the output directory and
//! swaps the new directory for a link cannot make envrender write the files,
//! or change a mode, anywhere else; the swap is refused if the directory is
//! no longer the one written.

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use super::{FileWrite, OutputError, Status, err, existing, set_owner, status_against};

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
    /// The new directory, opened (its device and inode are checked
    /// before the swap).
    handle: Option<std::fs::File>,
    /// The visible names that are not yet links through `..data`.
    pub unlinked: Vec<OsString>,
    /// Of `unlinked`, those that existed: kept aside under another name
    /// until the commit is settled, to be put back if it is undone.
    aside: Vec<OsString>,
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

/// Whether `..data` in `dir` points to a directory of ours, by name, in
/// `dir`, and that name is a directory, not a symlink to elsewhere: only
/// then is anything read through it.
fn data_is_ours(dir: &Path) -> bool {
    std::fs::read_link(dir.join(DATA)).is_ok_and(|t| {
        t.to_str()
            .is_some_and(|t| t.starts_with(PREFIX) && !t.contains('/'))
            && std::fs::symlink_metadata(dir.join(&t)).is_ok_and(|m| m.is_dir())
    })
}

/// The status of a linked output: as for any file, compared with the file
/// behind `..data`, except that a name not yet seen through `..data`, or a
/// `..data` pointed anywhere but to a directory of ours (never read
/// through), is updated even when its content is the same.
pub(super) fn status(w: &FileWrite) -> Result<Status, OutputError> {
    let dir = dir_of(&w.path);
    let name = name(w);
    if !is_data_link(&w.path, &name) || !data_is_ours(&dir) {
        return Ok(match std::fs::symlink_metadata(&w.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Status::Created,
            _ => Status::Updated,
        });
    }
    let before = existing(&dir.join(DATA).join(&name), w.contents.len())?;
    Ok(status_against(w, before.as_ref()))
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
                handle: None,
                unlinked: Vec::new(),
                aside: Vec::new(),
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
        let handle = open_dir(staged.path())?;
        handle
            .set_permissions(std::fs::Permissions::from_mode(0o755))
            .map_err(err(staged.path(), "set the mode"))?;
        for (w, _) in &d.files {
            write_file(w, &handle, &name(w))?;
            if !is_data_link(&w.path, &name(w)) {
                d.unlinked.push(name(w));
            }
        }
        handle.sync_all().map_err(err(staged.path(), "sync"))?;
        d.handle = Some(handle);
        d.staged = Some(staged);
    }
    Ok(dirs)
}

/// Opens a directory as a handle, not following a link.
fn open_dir(path: &Path) -> Result<std::fs::File, OutputError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(err(path, "open the directory"))
}

/// Writes one file of a new directory, through its handle: owner and mode
/// before the first byte, then synced.
fn write_file(w: &FileWrite, dir: &std::fs::File, name: &OsString) -> Result<(), OutputError> {
    use nix::fcntl::OFlag;
    use std::io::Write as _;
    let fd = nix::fcntl::openat(
        dir,
        Path::new(name),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| err(&w.path, "write")(std::io::Error::from(e)))?;
    let mut file = std::fs::File::from(fd);
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
    /// through it (what was at a name is kept aside until
    /// [`LinkedDir::settle`]).
    pub fn swap(&mut self) -> Result<(), OutputError> {
        let (Some(staged), Some(handle)) = (&self.staged, &self.handle) else {
            return Ok(());
        };
        let path = staged.path();
        let opened = handle.metadata().map_err(err(path, "inspect"))?;
        let now = std::fs::symlink_metadata(path).map_err(err(path, "inspect"))?;
        if !now.is_dir() || (now.dev(), now.ino()) != (opened.dev(), opened.ino()) {
            return Err(err(path, "swap the link")(std::io::Error::other(
                "the new directory was replaced while it was written",
            )));
        }
        for name in &self.unlinked {
            let path = self.dir.join(name);
            if std::fs::symlink_metadata(&path).is_ok() {
                let aside = self.dir.join(aside_name(name));
                let _ = std::fs::remove_file(&aside);
                std::fs::hard_link(&path, &aside).map_err(err(&path, "keep aside"))?;
                self.aside.push(name.clone());
            }
        }
        let new = path.file_name().map(PathBuf::from).unwrap_or_default();
        let data = self.dir.join(DATA);
        relink(&data, &new).map_err(err(&data, "swap the link"))?;
        self.swapped = true;
        for name in &self.unlinked {
            let path = self.dir.join(name);
            relink(&path, &Path::new(DATA).join(name)).map_err(err(&path, "link"))?;
        }
        Ok(())
    }

    /// Puts back what was at each name and where `..data` pointed. When
    /// that fails, the new directory is kept: `..data` may still point to
    /// it.
    pub fn undo(&mut self) -> Result<(), OutputError> {
        if !self.swapped {
            self.drop_asides();
            return Ok(());
        }
        let result = self.restore();
        if result.is_err()
            && let Some(staged) = self.staged.take()
        {
            let _ = staged.keep();
        }
        result
    }

    fn restore(&mut self) -> Result<(), OutputError> {
        for name in &self.unlinked {
            let path = self.dir.join(name);
            if self.aside.contains(name) {
                std::fs::rename(self.dir.join(aside_name(name)), &path)
                    .map_err(err(&path, "put back"))?;
            } else if is_data_link(&path, name) {
                std::fs::remove_file(&path).map_err(err(&path, "remove"))?;
            }
        }
        self.aside.clear();
        let data = self.dir.join(DATA);
        match &self.before {
            Some(before) => {
                relink(&data, Path::new(before)).map_err(err(&data, "restore the link"))
            }
            None => std::fs::remove_file(&data).map_err(err(&data, "remove")),
        }
    }

    fn drop_asides(&mut self) {
        for name in self.aside.drain(..) {
            let _ = std::fs::remove_file(self.dir.join(aside_name(&name)));
        }
    }

    /// Once every output is in place: the new directory kept, the one
    /// `..data` pointed to before and what was kept aside removed.
    pub fn settle(&mut self) {
        if let Some(staged) = self.staged.take() {
            let _ = staged.keep();
        }
        self.drop_asides();
        if let Some(before) = self.before.take() {
            remove_data_dir(&self.dir, &before);
        }
    }
}

/// Where what was at `name` is kept while a commit may be undone.
fn aside_name(name: &OsString) -> String {
    format!(".{}.envrender-before", name.to_string_lossy())
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
/// that `..data` does not point to, and the links and names it kept aside.
pub fn remove_stale(dir: &Path) {
    let current = std::fs::read_link(dir.join(DATA)).ok();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let text = name.to_string_lossy();
        if text.starts_with('.')
            && (text.ends_with(".envrender-before") || text.ends_with(".envrender-link"))
        {
            let _ = std::fs::remove_file(entry.path());
        } else if current.as_deref() != Some(Path::new(&name)) {
            remove_data_dir(dir, &name);
        }
    }
}
