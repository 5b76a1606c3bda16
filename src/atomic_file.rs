//! Whole-file writes that a reader (or a crash) never sees half done, and that a power loss
//! does not undo once they have returned.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path` through a temporary file in the same directory, fsynced and renamed
/// into place, then fsyncs the directory so that the rename itself is on disk; missing parent
/// directories are created.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = directory_of(path);
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("{}: cannot create a temporary file", dir.display()))?;
    tmp.write_all(bytes)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    // tempfile creates files readable by the owner only; logs, reports and data are meant to be
    // read by others (a TensorBoard server, a colleague).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    sync_dir(dir)
}

/// Makes the entries of `dir` durable: a file's own fsync does not cover the directory entry
/// that a create or rename gave it, so without this a crash can bring back the old name.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("{}: cannot fsync", dir.display()))
}

/// The directory `path` is written in: its parent, or `.` for a bare file name.
fn directory_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_bytes_readable_by_others_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/run.json");
        write(&path, b"old").unwrap();
        write(&path, b"{\"status\": \"finished\"}\n").unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"{\"status\": \"finished\"}\n"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644, "{mode:o}");
        }
        let names: Vec<String> = std::fs::read_dir(dir.path().join("nested"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["run.json"]);
    }

    #[test]
    fn a_bare_file_name_is_synced_in_the_current_directory() {
        let dir = directory_of(Path::new("run.json"));
        assert_eq!(dir, Path::new("."));
        sync_dir(dir).unwrap();
        assert_eq!(directory_of(Path::new("refs/main")), Path::new("refs"));
    }

    #[test]
    fn a_directory_that_cannot_be_synced_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        let err = sync_dir(&missing).unwrap_err();
        assert!(
            format!("{err:#}").contains(&format!("{}: cannot fsync", missing.display())),
            "{err:#}"
        );
    }
}
