//! The ownership and mode check of secret files: private keys, the admin
//! token file and the stateless reset key file.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Rejects a secret file that is not owned by the effective user the
/// process runs as, or that group or others may read or write. Root gets
/// no exception: a gateway running as root accepts only root-owned files,
/// because the owner of a key file can replace the key. The message names
/// the file, the owner or mode found, and the commands that fix it.
pub(crate) fn check_secret_file(path: &Path) -> Result<(), String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let euid = nix::unistd::geteuid();
    let egid = nix::unistd::getegid();
    let fix = format!(
        "chown {}:{} {file}; chmod 0600 {file}",
        user_name(euid.as_raw()),
        group_name(egid.as_raw()),
        file = path.display()
    );
    if meta.uid() != euid.as_raw() {
        return Err(format!(
            "{} is owned by {} (uid {}), not by {} (uid {}) that the process runs as; run `{fix}`",
            path.display(),
            user_name(meta.uid()),
            meta.uid(),
            user_name(euid.as_raw()),
            euid.as_raw()
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is readable by group or others (mode {mode:04o}); run `{fix}`",
            path.display()
        ));
    }
    Ok(())
}

/// Returns the user's name, or the uid as text when the user database has none.
fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => user.name,
        _ => uid.to_string(),
    }
}

/// Returns the group's name, or the gid as text when the group database has none.
fn group_name(gid: u32) -> String {
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
        Ok(Some(group)) => group.name,
        _ => gid.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn secret(mode: u32) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("secret.key");
        std::fs::write(&path, "not a real key").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        (dir, path)
    }

    #[test]
    fn owner_only_file_accepted() {
        let (_dir, path) = secret(0o600);
        assert_eq!(check_secret_file(&path), Ok(()));
        let (_dir, path) = secret(0o400);
        assert_eq!(check_secret_file(&path), Ok(()));
    }

    #[test]
    fn group_readable_rejected() {
        let (_dir, path) = secret(0o640);
        let message = check_secret_file(&path).expect_err("mode 0640");
        assert!(message.contains("mode 0640"), "{message}");
        assert!(
            message.contains(&format!("chmod 0600 {}", path.display())),
            "{message}"
        );
        assert!(message.contains("chown "), "{message}");
    }

    #[test]
    fn foreign_owner_rejected() {
        let (_dir, path) = secret(0o600);
        let euid = nix::unistd::geteuid();
        // Only root can give the file away; as another user the case cannot be made.
        if !euid.is_root() {
            eprintln!("skipped: needs root to chown the file to another user");
            return;
        }
        nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
        let message = check_secret_file(&path).expect_err("owned by uid 65534");
        assert!(message.contains("(uid 65534)"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("chmod 0600"), "{message}");
    }

    #[test]
    fn missing_file_named() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("absent.key");
        let message = check_secret_file(&path).expect_err("missing");
        assert!(message.contains("absent.key"), "{message}");
    }
}
