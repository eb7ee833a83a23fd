//! Outputs: files written atomically, all of a run's files together.
//!
//! Each changed file is staged as a temporary file in its destination's
//! directory (created with mode 0600, so a secret is never readable by others
//! even for an instant), given its owner and mode, written, and fsynced. Only
//! when every file of the run is staged are they renamed into place, and the
//! directories fsynced. If a rename fails part way, the files already renamed
//! are put back as they were, so a run never leaves some outputs new and some
//! old. A file whose content, mode and owner are already right is not touched:
//! its mtime stays, and nothing downstream sees a change.
//!
//! Env outputs are rendered here too: `.env` files quoted so that a POSIX
//! shell sourcing them and dotenv parsers read every value back exactly
//! (and nothing in a value runs), and JSON objects.

pub mod linked;

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// The default mode of every file envrender writes: they hold secrets.
pub const DEFAULT_MODE: u32 = 0o600;

/// Who owns a written file. `None` leaves that id as the process's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The user id, or the process's.
    pub uid: Option<u32>,
    /// The group id, or the process's.
    pub gid: Option<u32>,
}

/// How an env file is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EnvFormat {
    /// `NAME='value'` lines, quoted so dotenv parsers read the value back exactly.
    Dotenv,
    /// One JSON object of names to values.
    Json,
}

/// One file to write. Its contents are secret and never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct FileWrite {
    /// The destination.
    pub path: PathBuf,
    /// The bytes to write: secret.
    pub contents: Vec<u8>,
    /// Permission bits, e.g. `0o640` (default [`DEFAULT_MODE`]).
    pub mode: u32,
    /// Who should own it; `None`: the process's user and group.
    pub owner: Option<Owner>,
    /// What produced it, for messages: a template path or "env file".
    pub origin: String,
    /// A command that must accept the staged file before it goes live:
    /// argv, `{file}` standing for the staged file (see [`Prepared`]).
    pub check: Option<Vec<String>>,
    /// Written with the other linked files of its directory, in one step
    /// (see [`linked`]).
    pub linked: bool,
}

impl fmt::Debug for FileWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileWrite")
            .field("path", &self.path)
            .field("contents", &format_args!("<{} bytes>", self.contents.len()))
            .field("mode", &format_args!("{:04o}", self.mode))
            .field("owner", &self.owner)
            .finish()
    }
}

/// What a commit did (or a preview would do) to one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Nothing was at the destination.
    Created,
    /// New content, or a symlink or special file replaced by a regular
    /// file.
    Updated,
    /// Same content, but another mode or owner: replaced by a new file
    /// that has them, as for new content.
    Attributes,
    /// Content, mode and owner already right: the file is not touched.
    Unchanged,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Created => "created",
            Status::Updated => "updated",
            Status::Attributes => "mode/owner updated",
            Status::Unchanged => "unchanged",
        })
    }
}

/// A failure to write one output, and what became of the others.
#[derive(Debug, thiserror::Error)]
#[error("{path}: cannot {action}: {source}; {outcome}")]
pub struct OutputError {
    /// The destination it concerns.
    pub path: PathBuf,
    /// What could not be done, after "cannot": `set the owner`,
    /// `read the destination`…
    pub action: &'static str,
    /// The operating system's error.
    #[source]
    pub source: std::io::Error,
    /// What became of the run's other outputs.
    pub outcome: &'static str,
}

const NOTHING_CHANGED: &str = "no output was changed";
const RESTORED: &str = "the outputs already replaced were restored";
const NOT_RESTORED: &str = "some outputs already replaced could not be restored (see the log)";

fn err<'p>(
    path: &'p Path,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> OutputError + 'p {
    move |source| OutputError {
        path: path.to_path_buf(),
        action,
        source,
        outcome: NOTHING_CHANGED,
    }
}

/// What is at a destination now.
struct Existing {
    contents: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
    /// The target, when the destination is a symlink.
    link: Option<PathBuf>,
}

/// The largest existing destination read (to compare it, and to put it
/// back if the commit fails), unless the new content is larger still.
const READ_LIMIT: u64 = 256 << 20;

/// What is at `path` now. `want` is the size of the content about to be
/// written. A regular file larger than both `want` and [`READ_LIMIT`] is
/// not read: it is replaced unseen, like a symlink (a sparse file of a
/// terabyte planted by the app would otherwise be allocated for whole).
fn existing(path: &Path, want: usize) -> Result<Option<Existing>, OutputError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(path, "inspect the destination")(e)),
    };
    let other = |meta: &std::fs::Metadata| Existing {
        contents: Vec::new(),
        mode: u32::MAX,
        uid: meta.uid(),
        gid: meta.gid(),
        link: std::fs::read_link(path).ok(),
    };
    if !meta.is_file() {
        if meta.is_dir() {
            return Err(err(path, "replace the destination")(std::io::Error::other(
                "it is a directory",
            )));
        }
        // A symlink or special file is replaced by a regular file, never
        // written through; a link is remembered so it can be put back.
        return Ok(Some(other(&meta)));
    }
    // Read through a descriptor that cannot follow a symlink swapped in
    // since the look above (nor block on a FIFO), and only if it is still
    // the file that was looked at; else the destination is replaced
    // unseen, like a symlink.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => return Ok(Some(other(&meta))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // Swapped for something that cannot be opened (a socket, a file
        // under a lease) since the look: replaced unseen, like a symlink,
        // so the app cannot hold every render back.
        Err(_) => return Ok(Some(other(&meta))),
    };
    let now = file
        .metadata()
        .map_err(err(path, "inspect the destination"))?;
    if !now.is_file()
        || (now.dev(), now.ino()) != (meta.dev(), meta.ino())
        || now.len() > (want as u64).max(READ_LIMIT)
    {
        return Ok(Some(other(&now)));
    }
    let mut contents = Vec::with_capacity(now.len() as usize);
    (&file)
        .take(now.len())
        .read_to_end(&mut contents)
        .map_err(err(path, "read the destination"))?;
    Ok(Some(Existing {
        contents,
        mode: now.permissions().mode() & 0o7777,
        uid: now.uid(),
        gid: now.gid(),
        link: None,
    }))
}

fn owner_matches(owner: Option<Owner>, e: &Existing) -> bool {
    owner.is_none_or(|o| o.uid.is_none_or(|u| u == e.uid) && o.gid.is_none_or(|g| g == e.gid))
}

fn status_against(w: &FileWrite, e: Option<&Existing>) -> Status {
    match e {
        None => Status::Created,
        Some(e) if e.mode == u32::MAX => Status::Updated,
        Some(e) if e.contents != w.contents => Status::Updated,
        Some(e) if e.mode != w.mode || !owner_matches(w.owner, e) => Status::Attributes,
        Some(_) => Status::Unchanged,
    }
}

/// What [`commit`] would do to each file, without doing it.
pub fn preview(writes: &[FileWrite]) -> Result<Vec<Status>, OutputError> {
    writes
        .iter()
        .map(|w| {
            if w.linked {
                return linked::status(w);
            }
            Ok(status_against(
                w,
                existing(&w.path, w.contents.len())?.as_ref(),
            ))
        })
        .collect()
}

fn set_owner(file: &std::fs::File, path: &Path, owner: Option<Owner>) -> Result<(), OutputError> {
    if let Some(o) = owner {
        std::os::unix::fs::fchown(file, o.uid, o.gid).map_err(err(path, "set the owner"))?;
    }
    Ok(())
}

/// A staged file: its temporary path, and how to undo its commit.
struct Staged<'a> {
    write: &'a FileWrite,
    temp: Option<tempfile::TempPath>,
    before: Option<Existing>,
    status: Status,
}

/// Writes every file, all or nothing. Returns each file's status, in order.
/// Check commands are not run: see [`Prepared`].
pub fn commit(writes: &[FileWrite]) -> Result<Vec<Status>, OutputError> {
    Prepared::new(writes)?.finish()
}

/// Every file of a commit staged, nothing visible changed yet: the staged
/// files can be checked before [`Prepared::finish`] puts them in place.
/// Dropped, it removes them and changes nothing.
pub struct Prepared<'a> {
    writes: &'a [FileWrite],
    staged: Vec<Staged<'a>>,
    linked: Vec<linked::LinkedDir<'a>>,
}

impl<'a> Prepared<'a> {
    /// Looks at every destination and stages every new file: beside it, or
    /// in a new directory of its linked directory.
    pub fn new(writes: &'a [FileWrite]) -> Result<Self, OutputError> {
        let mut paths = BTreeSet::new();
        for w in writes {
            if !paths.insert(&w.path) {
                return Err(err(&w.path, "write")(std::io::Error::other(
                    "two outputs have this destination",
                )));
            }
        }
        let plain: Vec<&FileWrite> = writes.iter().filter(|w| !w.linked).collect();
        let together: Vec<&FileWrite> = writes.iter().filter(|w| w.linked).collect();
        Ok(Prepared {
            writes,
            staged: prepare(&plain)?,
            linked: linked::prepare(&together)?,
        })
    }

    /// The files that would change, with the path of each one's staged
    /// content.
    pub fn changed(&self) -> Vec<(&'a FileWrite, PathBuf)> {
        let plain = self
            .staged
            .iter()
            .filter_map(|s| Some((s.write, s.temp.as_deref()?.to_path_buf())));
        let linked = self.linked.iter().flat_map(|d| d.changed());
        plain.chain(linked).collect()
    }

    /// Puts the staged files in place, all or nothing: each linked
    /// directory in one step, then each other file; everything put back
    /// on a failure. Returns each file's status, in order.
    pub fn finish(mut self) -> Result<Vec<Status>, OutputError> {
        for i in 0..self.linked.len() {
            if let Err(mut e) = self.linked[i].swap() {
                e.outcome = if i == 0 && !self.linked[i].swapped {
                    NOTHING_CHANGED
                } else {
                    RESTORED
                };
                for d in self.linked[..=i].iter_mut().rev() {
                    if let Err(undo) = d.undo() {
                        tracing::error!(dir = %d.dir.display(), error = %undo, "could not restore a linked directory after a failed commit");
                        e.outcome = NOT_RESTORED;
                    }
                }
                return Err(e);
            }
        }
        let linked_changed = self.linked.iter().any(|d| d.swapped);
        if let Err(mut e) = finish(&mut self.staged) {
            if linked_changed && e.outcome == NOTHING_CHANGED {
                e.outcome = RESTORED;
            }
            for d in self.linked.iter_mut().rev() {
                if let Err(undo) = d.undo() {
                    tracing::error!(dir = %d.dir.display(), error = %undo, "could not restore a linked directory after a failed commit");
                    e.outcome = NOT_RESTORED;
                }
            }
            return Err(e);
        }
        let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
        for d in &mut self.linked {
            if d.swapped {
                dirs.insert(d.dir.clone());
            }
            d.settle();
        }
        dirs.extend(
            self.staged
                .iter()
                .filter(|s| s.status != Status::Unchanged)
                .filter_map(|s| s.write.path.parent())
                .map(Path::to_path_buf),
        );
        for dir in dirs {
            let dir = if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            };
            // The files are in place; a failed directory sync only weakens
            // their durability across a crash, so it is reported, not undone.
            if let Err(e) = std::fs::File::open(&dir).and_then(|d| d.sync_all()) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not sync the directory");
            }
        }
        // Plain files were staged in the order of `writes`; linked ones by
        // directory.
        let mut plain = self.staged.iter().map(|s| s.status);
        let linked: Vec<(&FileWrite, Status)> = self
            .linked
            .iter()
            .flat_map(|d| d.files.iter().copied())
            .collect();
        let status_of = |w: &FileWrite| {
            if w.linked {
                linked
                    .iter()
                    .find(|(f, _)| std::ptr::eq(*f, w))
                    .map_or(Status::Unchanged, |(_, s)| *s)
            } else {
                plain.next().unwrap_or(Status::Unchanged)
            }
        };
        Ok(self.writes.iter().map(status_of).collect())
    }
}

/// The first phase of a commit: every destination looked at, every new
/// file staged beside it. Nothing visible has changed yet.
fn prepare<'a>(writes: &[&'a FileWrite]) -> Result<Vec<Staged<'a>>, OutputError> {
    // Stage: nothing visible changes yet. On error the temp files are
    // removed as `staged` drops.
    let mut staged = Vec::with_capacity(writes.len());
    for &w in writes {
        let before = existing(&w.path, w.contents.len())?;
        let status = status_against(w, before.as_ref());
        // Same content with another mode or owner is written anew too:
        // fixing the file in place would act on its path after the look
        // at it, and follow whatever the app swapped in meanwhile.
        let temp = match status {
            Status::Created | Status::Updated | Status::Attributes => Some(stage(w)?),
            Status::Unchanged => None,
        };
        staged.push(Staged {
            write: w,
            temp,
            before,
            status,
        });
    }
    Ok(staged)
}

/// The second phase of a commit: the staged files renamed into place,
/// undone on failure.
fn finish(staged: &mut [Staged<'_>]) -> Result<(), OutputError> {
    for i in 0..staged.len() {
        let w = staged[i].write;
        let result = match staged[i].temp.take() {
            Some(temp) => temp
                .persist(&w.path)
                .map_err(|e| err(&w.path, "rename into place")(e.error)),
            None => Ok(()),
        };
        if let Err(mut e) = result {
            e.outcome = if i == 0 { NOTHING_CHANGED } else { RESTORED };
            for done in staged[..i].iter().rev() {
                if let Err(undo) = undo(done) {
                    tracing::error!(path = %done.write.path.display(), error = %undo, "could not restore a file after a failed commit");
                    e.outcome = NOT_RESTORED;
                }
            }
            return Err(e);
        }
    }
    Ok(())
}

fn stage(w: &FileWrite) -> Result<tempfile::TempPath, OutputError> {
    let dir = match w.path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(err(dir, "create the directory"))?;
    let name = w
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Created with mode 0600, then given its owner and final mode before
    // the first byte: the secret is never in a file more open than asked.
    let mut temp = tempfile::Builder::new()
        .prefix(&temp_prefix(&name))
        .suffix(TEMP_SUFFIX)
        .tempfile_in(dir)
        .map_err(err(&w.path, "create a temporary file beside"))?;
    set_owner(temp.as_file(), &w.path, w.owner)?;
    // After chown, which clears set-id bits.
    temp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(w.mode))
        .map_err(err(&w.path, "set the mode"))?;
    temp.write_all(&w.contents).map_err(err(&w.path, "write"))?;
    temp.as_file().sync_all().map_err(err(&w.path, "sync"))?;
    Ok(temp.into_temp_path())
}

const TEMP_SUFFIX: &str = ".envrender-tmp";

/// Staged files of `name` are `.NAME.XXXXXX.envrender-tmp`, beside it.
fn temp_prefix(name: &str) -> String {
    format!(".{name}.")
}

/// Removes the staged files an interrupted earlier run (killed between
/// staging and rename) left beside these destinations. Only names of the
/// staging pattern for these destinations are touched. Returns how many
/// were removed.
pub fn remove_interrupted_writes<'p>(destinations: impl IntoIterator<Item = &'p Path>) -> usize {
    let mut removed = 0;
    for path in destinations {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            continue;
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let prefix = temp_prefix(&name.to_string_lossy());
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let file = entry.file_name();
            let file = file.to_string_lossy();
            let Some(middle) = file
                .strip_prefix(prefix.as_str())
                .and_then(|rest| rest.strip_suffix(TEMP_SUFFIX))
            else {
                continue;
            };
            // tempfile's random part: letters and digits, no dots.
            if middle.is_empty() || !middle.chars().all(|c| c.is_ascii_alphanumeric()) {
                continue;
            }
            let stale = entry.path();
            match std::fs::remove_file(&stale) {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(path = %stale.display(), "removed a temporary file left by an interrupted write");
                }
                Err(e) => {
                    tracing::warn!(path = %stale.display(), error = %e, "cannot remove a temporary file left by an interrupted write");
                }
            }
        }
    }
    removed
}

/// Puts a committed file back the way it was before the run.
fn undo(s: &Staged<'_>) -> Result<(), OutputError> {
    let path = &s.write.path;
    match (&s.before, s.status) {
        (_, Status::Unchanged) => Ok(()),
        (None, _) => std::fs::remove_file(path).map_err(err(path, "remove")),
        (
            Some(Existing {
                link: Some(target), ..
            }),
            _,
        ) => {
            std::fs::remove_file(path).map_err(err(path, "remove"))?;
            std::os::unix::fs::symlink(target, path).map_err(err(path, "restore the symlink"))
        }
        (Some(before), _) if before.mode == u32::MAX => Ok(()),
        (Some(before), _) => {
            let restore = FileWrite {
                path: path.clone(),
                contents: before.contents.clone(),
                mode: before.mode,
                owner: Some(Owner {
                    uid: Some(before.uid),
                    gid: Some(before.gid),
                }),
                origin: s.write.origin.clone(),
                check: None,
                linked: false,
            };
            let temp = stage(&restore)?;
            temp.persist(path)
                .map_err(|e| err(path, "restore")(e.error))
        }
    }
}

/// Renders environment variables as a file.
pub fn env_file(vars: &[(String, String)], format: EnvFormat) -> Vec<u8> {
    match format {
        EnvFormat::Json => {
            let map: serde_json::Map<String, serde_json::Value> = vars
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            let mut out = serde_json::to_vec_pretty(&map).expect("a map of strings encodes");
            out.push(b'\n');
            out
        }
        EnvFormat::Dotenv => {
            let mut out = String::new();
            for (k, v) in vars {
                out.push_str(k);
                out.push('=');
                out.push_str(&dotenv_quote(v));
                out.push('\n');
            }
            out.into_bytes()
        }
    }
}

/// Quotes a value for a `.env` file, so that the file reads back exactly
/// both when sourced by a POSIX shell (`. ./app.env`, where nothing in a
/// value may run or expand) and in dotenv parsers.
///
/// - Most values: in single quotes, `'value'`, where neither the shell nor
///   any common dotenv parser expands or unescapes anything, newlines
///   included.
/// - A value with a single quote but nothing a double quote would expand
///   (`$`, `` ` ``, `\`, `"`): in double quotes, `"it's"`, which every
///   common parser also reads literally.
/// - Otherwise the shell's own form: single-quoted runs, with each `'`
///   written `\'` and each `\` written `\\` between them
///   (`'it'\''s $HOME'`). dotenvy reads it as the shell does; parsers
///   that know no concatenation (python-dotenv) do not.
///
/// A backslash never ends a single-quoted run: dotenvy's line reader would
/// take `\'` as an escaped quote and read on into the next line.
pub fn dotenv_quote(v: &str) -> String {
    if !v.contains('\'') && !v.ends_with('\\') {
        return format!("'{v}'");
    }
    if !v.contains(['$', '`', '\\', '"']) {
        return format!("\"{v}\"");
    }
    let mut out = String::with_capacity(v.len() + 8);
    let mut quoted = false;
    for c in v.chars() {
        match c {
            '\'' | '\\' => {
                if quoted {
                    out.push('\'');
                    quoted = false;
                }
                out.push('\\');
                out.push(c);
            }
            c => {
                if !quoted {
                    out.push('\'');
                    quoted = true;
                }
                out.push(c);
            }
        }
    }
    if quoted {
        out.push('\'');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn write(path: &Path, contents: &str) -> FileWrite {
        FileWrite {
            path: path.to_path_buf(),
            contents: contents.as_bytes().to_vec(),
            mode: 0o600,
            owner: None,
            origin: "test".into(),
            check: None,
            linked: false,
        }
    }

    /// A linked directory's first commit turns its files into links
    /// through `..data`; undone (another output failed), the files are as
    /// they were, and nothing of the commit is left behind.
    #[test]
    fn a_linked_directory_commit_is_undone_whole() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        std::fs::create_dir(&tls).unwrap();
        std::fs::write(tls.join("a"), "old-a").unwrap();
        let mut a = write(&tls.join("a"), "new-a");
        a.linked = true;
        let mut b = write(&tls.join("b"), "new-b");
        b.linked = true;
        let plain = write(&dir.path().join("p"), "new-p");
        let writes = [a, b, plain];
        let prepared = Prepared::new(&writes).unwrap();
        // The plain file's staged copy disappears: its rename fails after
        // the linked directory was swapped.
        std::fs::remove_file(prepared.staged[0].temp.as_deref().unwrap()).unwrap();
        let e = prepared.finish().unwrap_err();
        assert_eq!(e.outcome, RESTORED);
        assert!(std::fs::symlink_metadata(tls.join("a")).unwrap().is_file());
        assert_eq!(std::fs::read_to_string(tls.join("a")).unwrap(), "old-a");
        let left: Vec<String> = std::fs::read_dir(&tls)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["a"]);
        // Committed, then committed again with the same content: the second
        // time nothing changes.
        let writes = &writes[..2];
        assert_eq!(commit(writes).unwrap(), [Status::Updated, Status::Created]);
        assert_eq!(
            std::fs::read_link(tls.join("a")).unwrap(),
            Path::new("..data/a")
        );
        assert_eq!(std::fs::read_to_string(tls.join("b")).unwrap(), "new-b");
        assert_eq!(
            commit(writes).unwrap(),
            [Status::Unchanged, Status::Unchanged]
        );
        let data = std::fs::read_link(tls.join("..data")).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&tls)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["..data", data.to_str().unwrap(), "a", "b"]);
    }

    /// `..data` pointed elsewhere (by whoever can write the directory) is
    /// never read through, and the next commit puts it back, though the
    /// files there are the same.
    #[test]
    fn a_data_link_pointed_elsewhere_is_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let mut a = write(&tls.join("a"), "new-a");
        a.linked = true;
        let writes = [a];
        assert_eq!(commit(&writes).unwrap(), [Status::Created]);
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("a"), "new-a").unwrap();
        std::fs::set_permissions(elsewhere.join("a"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        std::fs::remove_file(tls.join("..data")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, tls.join("..data")).unwrap();
        assert_eq!(commit(&writes).unwrap(), [Status::Updated]);
        let data = std::fs::read_link(tls.join("..data")).unwrap();
        assert!(
            data.to_string_lossy().starts_with("..envrender-"),
            "{data:?}"
        );
        assert_eq!(std::fs::read_to_string(tls.join("a")).unwrap(), "new-a");
    }

    /// A `..data` pointed at a name of ours that is a symlink to elsewhere
    /// is not ours either: never read through, put back.
    #[test]
    fn a_data_link_through_a_lookalike_symlink_is_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let mut a = write(&tls.join("a"), "new-a");
        a.linked = true;
        let writes = [a];
        assert_eq!(commit(&writes).unwrap(), [Status::Created]);
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("a"), "new-a").unwrap();
        std::fs::set_permissions(elsewhere.join("a"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        std::os::unix::fs::symlink(&elsewhere, tls.join("..envrender-lookalike")).unwrap();
        std::fs::remove_file(tls.join("..data")).unwrap();
        std::os::unix::fs::symlink("..envrender-lookalike", tls.join("..data")).unwrap();
        assert_eq!(commit(&writes).unwrap(), [Status::Updated]);
        let data = std::fs::read_link(tls.join("..data")).unwrap();
        assert_ne!(data, Path::new("..envrender-lookalike"));
        assert_eq!(std::fs::read_to_string(tls.join("a")).unwrap(), "new-a");
        // What the lookalike pointed at is left alone.
        assert_eq!(
            std::fs::read_to_string(elsewhere.join("a")).unwrap(),
            "new-a"
        );
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_with_mode_and_parent_directories() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/app.conf");
        let mut w = write(&p, "x=1\n");
        w.mode = 0o640;
        assert_eq!(commit(&[w]).unwrap(), [Status::Created]);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "x=1\n");
        assert_eq!(mode(&p), 0o640);
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn only_staged_files_of_the_given_destinations_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            ".a.conf.AbC123.envrender-tmp",
            ".a.conf.envrender-tmp",
            ".a.conf.x.y.envrender-tmp",
            ".b.conf.XyZ789.envrender-tmp",
            "a.conf",
        ];
        for n in names {
            std::fs::write(dir.path().join(n), "x").unwrap();
        }
        let dest = dir.path().join("a.conf");
        assert_eq!(remove_interrupted_writes([dest.as_path()]), 1);
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, names[1..].to_vec());
        // A destination whose directory does not exist yet.
        assert_eq!(
            remove_interrupted_writes([dir.path().join("new/x").as_path()]),
            0
        );
    }

    #[test]
    fn unchanged_content_is_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        commit(&[write(&p, "same")]).unwrap();
        let ino = std::fs::metadata(&p).unwrap().ino();
        assert_eq!(preview(&[write(&p, "same")]).unwrap(), [Status::Unchanged]);
        assert_eq!(commit(&[write(&p, "same")]).unwrap(), [Status::Unchanged]);
        assert_eq!(std::fs::metadata(&p).unwrap().ino(), ino);
        // Same content, new mode: replaced by a file that has it.
        let mut w = write(&p, "same");
        w.mode = 0o644;
        assert_eq!(commit(&[w]).unwrap(), [Status::Attributes]);
        assert_eq!(mode(&p), 0o644);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "same");
        let ino = std::fs::metadata(&p).unwrap().ino();
        assert_eq!(commit(&[write(&p, "new")]).unwrap(), [Status::Updated]);
        assert_ne!(std::fs::metadata(&p).unwrap().ino(), ino);
        assert_eq!(mode(&p), 0o600);
    }

    /// The app swaps the destination for a symlink to a root-only file
    /// between the look at the destination (same content, another mode) and
    /// the commit: the file it points at must keep its mode and owner.
    #[test]
    fn a_destination_swapped_for_a_symlink_after_the_check_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("shadow");
        std::fs::write(&target, "same").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let p = dir.path().join("app.conf");
        std::fs::write(&p, "same").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut w = write(&p, "same");
        w.mode = 0o644;
        w.owner = Some(Owner {
            uid: Some(65534),
            gid: Some(65534),
        });
        let writes = [w];
        let prepared = Prepared::new(&writes).unwrap();
        assert_eq!(prepared.staged[0].status, Status::Attributes);
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&target, &p).unwrap();
        assert_eq!(prepared.finish().unwrap(), [Status::Attributes]);
        let t = std::fs::metadata(&target).unwrap();
        assert_eq!((mode(&target), t.uid(), t.gid()), (0o600, 0, 0));
        let out = std::fs::symlink_metadata(&p).unwrap();
        assert!(out.is_file());
        assert_eq!((mode(&p), out.uid()), (0o644, 65534));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "same");
    }

    #[test]
    fn a_failed_stage_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, "old").unwrap();
        // The second destination's parent is a file: staging it fails.
        std::fs::write(dir.path().join("blocker"), "").unwrap();
        let bad = dir.path().join("blocker/f");
        let e = commit(&[write(&good, "new"), write(&bad, "x")]).unwrap_err();
        assert!(e.path.starts_with(dir.path().join("blocker")), "{e}");
        assert_eq!(std::fs::read_to_string(&good).unwrap(), "old");
        // No file can be created in /proc, even by root: staging fails
        // after the first file was staged.
        let e = commit(&[
            write(&good, "new"),
            write(Path::new("/proc/envrender-test"), "x"),
        ])
        .unwrap_err();
        assert_eq!(e.action, "create a temporary file beside");
        assert_eq!(std::fs::read_to_string(&good).unwrap(), "old");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "temporary files left: {names:?}");
    }

    #[test]
    fn a_failed_rename_puts_earlier_files_back() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("first");
        let created = dir.path().join("created");
        std::fs::write(&first, "old").unwrap();
        std::fs::set_permissions(&first, std::fs::Permissions::from_mode(0o640)).unwrap();
        // A rename cannot be made to fail on cue between staging and commit,
        // so drive the two phases by hand: commit two of three files, then
        // undo them as `commit` does when the third rename fails.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let last = sub.join("last");
        let writes = [
            write(&first, "new"),
            write(&created, "c"),
            write(&last, "l"),
        ];
        let before: Vec<_> = writes
            .iter()
            .map(|w| existing(&w.path, w.contents.len()).unwrap())
            .collect();
        let mut staged = Vec::new();
        for (w, b) in writes.iter().zip(before) {
            let status = status_against(w, b.as_ref());
            staged.push(Staged {
                write: w,
                temp: Some(stage(w).unwrap()),
                before: b,
                status,
            });
        }
        for s in &mut staged[..2] {
            s.temp.take().unwrap().persist(&s.write.path).unwrap();
        }
        assert_eq!(std::fs::read_to_string(&first).unwrap(), "new");
        for s in staged[..2].iter().rev() {
            undo(s).unwrap();
        }
        assert_eq!(std::fs::read_to_string(&first).unwrap(), "old");
        assert_eq!(mode(&first), 0o640);
        assert!(!created.exists());
    }

    #[test]
    fn an_undone_symlink_is_a_symlink_again() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let w = write(&link, "new");
        let before = existing(&link, 0).unwrap();
        let status = status_against(&w, before.as_ref());
        let mut staged = Staged {
            write: &w,
            temp: Some(stage(&w).unwrap()),
            before,
            status,
        };
        staged.temp.take().unwrap().persist(&link).unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
        undo(&staged).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), target);
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "keep");
    }

    #[test]
    fn symlinks_are_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(commit(&[write(&link, "new")]).unwrap(), [Status::Updated]);
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
    }

    #[test]
    fn a_huge_sparse_destination_is_replaced_unread() {
        // A terabyte of holes planted where an output goes: allocating for
        // it whole aborted the process.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        assert_eq!(commit(&[write(&path, "new")]).unwrap(), [Status::Updated]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
    }

    #[test]
    fn dotenv_values_read_back_exactly() {
        let tricky = [
            "plain",
            "",
            "with space",
            "it's",
            "a\"b",
            "$HOME and ${HOME}",
            "multi\nline\nvalue",
            "back\\slash",
            "it's $HOME\\n \"quoted\"\nnext",
            "#not a comment",
            "trailing space ",
            "=equals=",
        ];
        let vars: Vec<(String, String)> = tricky
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("V{i}"), v.to_string()))
            .collect();
        let text = env_file(&vars, EnvFormat::Dotenv);
        let parsed: Vec<(String, String)> = dotenvy::from_read_iter(&text[..])
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(parsed, vars);
    }

    #[test]
    fn json_env_file() {
        let vars = vec![
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "x\"y".to_string()),
        ];
        let v: serde_json::Value =
            serde_json::from_slice(&env_file(&vars, EnvFormat::Json)).unwrap();
        assert_eq!(v, serde_json::json!({"A": "1", "B": "x\"y"}));
    }

    #[test]
    fn debug_hides_contents() {
        let w = write(Path::new("/x"), "CANARY");
        assert!(!format!("{w:?}").contains("CANARY"));
    }
}
