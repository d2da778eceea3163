//! Replacing a file atomically: a reader sees the old content or the new
//! one, never a mix, and a crash at any point leaves one of them whole.
//!
//! The new content goes to a temporary file in the same directory
//! (`.<name>.<pid>.<n>.tmp`), which gets its mode (and owner), is written and
//! flushed to disk, and only then takes the file's place; the directory is
//! flushed last so that the swap itself survives a crash. On any error the
//! temporary file is removed and the file at `path` is left as it was.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Replaces the file at `path` (or creates it) with one holding `contents`,
/// with permission bits `mode` (exactly, whatever the umask) and owned by
/// the calling process' user. The directory must exist.
pub fn atomic_replace(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    write_atomically(path, contents, mode, None, Commit::Replace)
}

/// [`atomic_replace`], and the new file gets the owner and group
/// `(uid, gid)`, e.g. those of the file it replaces (changing them needs
/// privileges unless they are the process' own).
pub fn atomic_replace_owned(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: (u32, u32),
) -> io::Result<()> {
    write_atomically(path, contents, mode, Some(owner), Commit::Replace)
}

/// Creates the file at `path` holding `contents`, with permission bits
/// `mode`, as [`atomic_replace`] does, but never replaces an existing one:
/// if something is at `path` already (or appears there meanwhile), it is
/// left alone and the error is [`io::ErrorKind::AlreadyExists`]. The file
/// appears complete or not at all (it is hard-linked into place, so the
/// file system must support hard links).
pub fn atomic_create(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    write_atomically(path, contents, mode, None, Commit::CreateNew)
}

/// How the temporary file takes the place of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// `rename(2)` over whatever is there.
    Replace,
    /// `link(2)`, which fails if something is there, then unlink the temporary.
    CreateNew,
}

fn write_atomically(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
    commit: Commit,
) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let temp = temp_path(dir, path);
    let result = write_temp(&temp, contents, mode, owner).and_then(|()| match commit {
        Commit::Replace => fs::rename(&temp, path),
        Commit::CreateNew => fs::hard_link(&temp, path),
    });
    // After a rename there is nothing left to remove; after a link (or any
    // failure) the temporary file goes.
    if result.is_err() || commit == Commit::CreateNew {
        let _ = fs::remove_file(&temp);
    }
    result?;
    // Make the swap durable; a failure here loses nothing yet.
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// A temporary name next to `path`, unique within this process.
fn temp_path(dir: &Path, path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

fn write_temp(
    temp: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    // Left by a process that had our pid and died mid-write.
    let _ = fs::remove_file(temp);
    // Private from the start; the mode is set once the owner is right.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(temp)?;
    if let Some((uid, gid)) = owner {
        let meta = file.metadata()?;
        if (meta.uid(), meta.gid()) != (uid, gid) {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
    }
    file.set_permissions(Permissions::from_mode(mode & 0o7777))?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn replaces_with_content_and_mode_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("views.json");
        atomic_replace(&path, b"first\n", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first\n");
        assert_eq!(mode(&path), 0o600);

        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        atomic_replace(&path, b"second", 0o640).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(mode(&path), 0o640);
        assert_eq!(names(dir.path()), ["views.json"]);
    }

    #[test]
    fn replacing_a_link_replaces_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        let link = dir.path().join("link");
        fs::write(&target, "old").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        atomic_replace(&link, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert!(!fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(fs::read(&link).unwrap(), b"new");
    }

    #[test]
    fn a_failed_replacement_leaves_the_original_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // A directory that is not empty cannot be renamed over.
        let path = dir.path().join("config");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), "kept").unwrap();
        assert!(atomic_replace(&path, b"new", 0o600).is_err());
        assert_eq!(fs::read_to_string(path.join("inside")).unwrap(), "kept");
        assert_eq!(names(dir.path()), ["config"]);

        // No directory: nothing is created.
        let missing = dir.path().join("missing/file");
        let err = atomic_replace(&missing, b"new", 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(names(dir.path()), ["config"]);
    }

    #[test]
    fn create_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        atomic_create(&path, b"mine\n", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"mine\n");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(fs::metadata(&path).unwrap().nlink(), 1);

        let err = atomic_create(&path, b"theirs\n", 0o644).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"mine\n");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(names(dir.path()), ["private.key"]);
    }

    #[test]
    fn owned_replacement_gets_the_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("causeway.toml");
        fs::write(&path, "old").unwrap();
        let meta = fs::metadata(&path).unwrap();
        // The process' own owner always works; another one needs root.
        let owner = if meta.uid() == 0 {
            (65534, 65534)
        } else {
            (meta.uid(), meta.gid())
        };
        atomic_replace_owned(&path, b"new", 0o2640, owner).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), owner);
        assert_eq!(mode(&path), 0o2640);
        assert_eq!(fs::read(&path).unwrap(), b"new");
    }
}
