//! The file system access the gateway needs, derived from a config
//! generation, and the check a reload runs against the rules in force.

use std::path::{Component, Path, PathBuf};

/// The access the gateway needs to a path that the config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathAccess {
    /// A file the gateway reads. Its directory is allowed whole, so files
    /// replaced by rename or symlink swap stay readable.
    ReadFile,
    /// A file or directory tree the gateway reads (`sandbox.extra_read_paths`).
    ReadTree,
    /// A directory tree the gateway reads and writes (`gateway.state_dir`,
    /// `sandbox.extra_write_paths`).
    WriteTree,
    /// A file the gateway creates and removes, such as the admin socket: its
    /// directory is read-write.
    WriteParent,
}

/// A path named by a config key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigPath {
    /// Dotted key path, as in config errors.
    pub key: String,
    /// Absolute path, resolved against the config file's directory.
    pub path: PathBuf,
    pub access: PathAccess,
}

/// Files outside the config that name resolution, user and group lookups
/// and randomness read. Files missing on a host are left out.
const SYSTEM_READ_FILES: &[&str] = &[
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/passwd",
    "/etc/group",
    "/dev/urandom",
    "/dev/random",
];

/// Files outside the config that the gateway writes.
const SYSTEM_WRITE_FILES: &[&str] = &["/dev/null"];

/// The directories and files the sandbox allows, as canonical paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathRules {
    /// Read-only: files and directory trees.
    pub read: Vec<PathBuf>,
    /// Read-write: files and directory trees.
    pub write: Vec<PathBuf>,
}

impl PathRules {
    /// Derives the rules for the paths a config names, the config file's
    /// directory and the system files in [`SYSTEM_READ_FILES`].
    /// `proc_whole` adds /proc read-only, which the admin API's group check
    /// reads peers' /proc/PID/status from; otherwise only this process's
    /// own /proc/PID is allowed.
    pub fn derive(config_file: &Path, paths: &[ConfigPath], proc_whole: bool) -> PathRules {
        let mut rules = PathRules::default();
        rules.add_read_file_dir(config_file);
        for entry in paths {
            match entry.access {
                PathAccess::ReadFile => rules.add_read_file_dir(&entry.path),
                PathAccess::ReadTree => push_existing(&mut rules.read, &entry.path),
                PathAccess::WriteTree => push_existing(&mut rules.write, &entry.path),
                PathAccess::WriteParent => {
                    if let Some(parent) = entry.path.parent() {
                        push_existing(&mut rules.write, parent);
                    }
                }
            }
        }
        for file in SYSTEM_READ_FILES {
            rules.add_system_file(Path::new(file), false);
        }
        for file in SYSTEM_WRITE_FILES {
            rules.add_system_file(Path::new(file), true);
        }
        if proc_whole {
            push_existing(&mut rules.read, Path::new("/proc"));
        } else {
            // /proc/self resolves to /proc/PID, which also contains the
            // thread entries that /proc/thread-self points to.
            push_existing(&mut rules.read, Path::new("/proc/self"));
        }
        rules.read.sort();
        rules.read.dedup();
        rules.write.sort();
        rules.write.dedup();
        rules
    }

    /// Allows the directory of a file the gateway reads, and for every
    /// symlink on the way to it, the symlink's directory and its target's
    /// directory, so that a swapped symlink (`certs/current -> certs/v2`)
    /// still leads to an allowed directory.
    ///
    /// NOTE: symlinks inside a symlink's target are not followed further.
    fn add_read_file_dir(&mut self, file: &Path) {
        let file = absolute(file);
        if let Some(dir) = canonical_parent(&file) {
            self.read.push(dir);
        }
        let mut prefix = PathBuf::new();
        for component in file.components() {
            prefix.push(component);
            let is_symlink = std::fs::symlink_metadata(&prefix)
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false);
            if !is_symlink {
                continue;
            }
            if let Some(dir) = prefix.parent().and_then(|p| std::fs::canonicalize(p).ok()) {
                self.read.push(dir);
            }
            if let Some(dir) = std::fs::canonicalize(&prefix)
                .ok()
                .and_then(|t| t.parent().map(Path::to_path_buf))
            {
                self.read.push(dir);
            }
        }
    }

    /// Allows a system file itself and, when it is a symlink, the directory
    /// of its target, where tools such as resolvconf replace the file.
    fn add_system_file(&mut self, file: &Path, write: bool) {
        let Ok(target) = std::fs::canonicalize(file) else {
            return;
        };
        let list = if write {
            &mut self.write
        } else {
            &mut self.read
        };
        let is_symlink = std::fs::symlink_metadata(file)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false);
        if is_symlink {
            if let Some(dir) = target.parent() {
                list.push(dir.to_path_buf());
            }
        }
        list.push(target);
    }

    /// Returns whether the rules allow `entry`'s access to its path.
    pub fn allows(&self, entry: &ConfigPath) -> bool {
        let beneath = |list: &[PathBuf], path: &Path| list.iter().any(|r| path.starts_with(r));
        match entry.access {
            PathAccess::ReadFile | PathAccess::ReadTree => {
                let path = canonical_or_lexical(&entry.path);
                beneath(&self.read, &path) || beneath(&self.write, &path)
            }
            PathAccess::WriteTree => beneath(&self.write, &canonical_or_lexical(&entry.path)),
            PathAccess::WriteParent => match entry.path.parent() {
                Some(parent) => beneath(&self.write, &canonical_or_lexical(parent)),
                None => false,
            },
        }
    }

    /// Checks every path of a new config against the rules in force and
    /// returns one `(key, message)` per path outside them.
    pub fn violations(&self, paths: &[ConfigPath]) -> Vec<(String, String)> {
        paths
            .iter()
            .filter(|entry| !self.allows(entry))
            .map(|entry| {
                let access = match entry.access {
                    PathAccess::ReadFile | PathAccess::ReadTree => "read",
                    PathAccess::WriteTree | PathAccess::WriteParent => "write",
                };
                (
                    entry.key.clone(),
                    format!(
                        "{} is outside the directories the sandbox allowed the gateway to {access} \
                         when it started, so this reload is rejected; restart the gateway \
                         (it derives the sandbox from the config at start), or move the file \
                         into an allowed directory and reload",
                        entry.path.display()
                    ),
                )
            })
            .collect()
    }
}

fn push_existing(list: &mut Vec<PathBuf>, path: &Path) {
    if let Ok(canonical) = std::fs::canonicalize(path) {
        list.push(canonical);
    }
}

/// Makes `path` absolute against the working directory.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Returns the canonical directory that contains `file`: the resolved
/// target's directory when the file exists, otherwise its canonical parent.
fn canonical_parent(file: &Path) -> Option<PathBuf> {
    match std::fs::canonicalize(file) {
        Ok(target) => target.parent().map(Path::to_path_buf),
        Err(_) => file.parent().and_then(|p| std::fs::canonicalize(p).ok()),
    }
}

/// Resolves the longest existing prefix of `path` and appends the rest, so
/// a path that does not exist yet is compared by where it would be created.
fn canonical_or_lexical(path: &Path) -> PathBuf {
    let path = absolute(path);
    if let Ok(canonical) = std::fs::canonicalize(&path) {
        return canonical;
    }
    let mut existing = path.clone();
    let mut rest = Vec::new();
    while let Some(name) = existing.file_name().map(|n| n.to_os_string()) {
        rest.push(name);
        existing.pop();
        if let Ok(canonical) = std::fs::canonicalize(&existing) {
            let mut out = canonical;
            for name in rest.iter().rev() {
                out.push(name);
            }
            return normalize(&out);
        }
    }
    normalize(&path)
}

/// Removes `.` and `..` components lexically.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn entry(key: &str, path: PathBuf, access: PathAccess) -> ConfigPath {
        ConfigPath {
            key: key.into(),
            path,
            access,
        }
    }

    #[test]
    fn file_directory_allowed() {
        let dir = tempfile::tempdir().expect("dir");
        let config = dir.path().join("ztgate.toml");
        std::fs::write(&config, "").expect("config");
        let pki = tempfile::tempdir().expect("pki");
        let cert = pki.path().join("gateway.pem");
        std::fs::write(&cert, "").expect("cert");
        let paths = [entry("gateway.certificate", cert, PathAccess::ReadFile)];
        let rules = PathRules::derive(&config, &paths, false);
        let sibling = entry(
            "gateway.private_key",
            pki.path().join("new.key"),
            PathAccess::ReadFile,
        );
        assert!(rules.allows(&sibling));
        let outside = tempfile::tempdir().expect("outside");
        let elsewhere = entry(
            "gateway.private_key",
            outside.path().join("gateway.key"),
            PathAccess::ReadFile,
        );
        assert!(!rules.allows(&elsewhere));
        let found = rules.violations(&[elsewhere]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "gateway.private_key");
        assert!(found[0].1.contains("restart the gateway"), "{}", found[0].1);
    }

    #[test]
    fn symlink_swap_stays_allowed() {
        let dir = tempfile::tempdir().expect("dir");
        let certs = dir.path().join("certs");
        std::fs::create_dir_all(certs.join("v1")).expect("v1");
        std::fs::create_dir_all(certs.join("v2")).expect("v2");
        symlink("v1", certs.join("current")).expect("symlink");
        let config = dir.path().join("etc/ztgate.toml");
        std::fs::create_dir_all(dir.path().join("etc")).expect("etc");
        let cert = certs.join("current/gateway.pem");
        let rules = PathRules::derive(
            &config,
            &[entry(
                "gateway.certificate",
                cert.clone(),
                PathAccess::ReadFile,
            )],
            false,
        );
        std::fs::remove_file(certs.join("current")).expect("unlink");
        symlink("v2", certs.join("current")).expect("swap");
        assert!(rules.allows(&entry("gateway.certificate", cert, PathAccess::ReadFile)));
    }

    #[test]
    fn write_parent_needs_write_rule() {
        let dir = tempfile::tempdir().expect("dir");
        let config = dir.path().join("ztgate.toml");
        let run = tempfile::tempdir().expect("run");
        let socket = entry(
            "admin.socket_path",
            run.path().join("admin.sock"),
            PathAccess::WriteParent,
        );
        let rules = PathRules::derive(&config, std::slice::from_ref(&socket), false);
        assert!(rules.allows(&socket));
        let state = entry(
            "gateway.state_dir",
            run.path().join("state/not-yet"),
            PathAccess::WriteTree,
        );
        assert!(rules.allows(&state), "a new directory under a write rule");
        let read_only = entry(
            "gateway.state_dir",
            dir.path().join("state"),
            PathAccess::WriteTree,
        );
        assert!(!rules.allows(&read_only));
    }

    #[test]
    fn parent_components_normalized() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("a/../b/c");
        let expected = std::fs::canonicalize(dir.path()).expect("dir").join("b/c");
        assert_eq!(canonical_or_lexical(&path), expected);
    }
}
