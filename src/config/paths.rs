//! The file system paths a config names, each with its key and the access
//! the gateway needs, for the sandbox rules at start and the reload check.

use super::load::resolve;
use super::schema::RawConfig;
use crate::sandbox::{ConfigPath, PathAccess};
use std::path::Path;

/// Lists every path `raw` names, resolved against `base`, the config
/// file's directory.
pub(crate) fn config_paths(raw: &RawConfig, base: &Path) -> Vec<ConfigPath> {
    let mut out = Vec::new();
    let mut add = |key: String, file: &str, access: PathAccess| {
        out.push(ConfigPath {
            key,
            path: resolve(base, file),
            access,
        });
    };
    let g = &raw.gateway;
    add(
        "gateway.certificate".into(),
        &g.certificate,
        PathAccess::ReadFile,
    );
    add(
        "gateway.private_key".into(),
        &g.private_key,
        PathAccess::ReadFile,
    );
    if let Some(file) = &g.reset_key_file {
        add("gateway.reset_key_file".into(), file, PathAccess::ReadFile);
    }
    if let Some(dir) = &g.state_dir {
        add("gateway.state_dir".into(), dir, PathAccess::WriteTree);
    }
    for (i, ca) in raw.device_cas.iter().enumerate() {
        let lists = [
            ("certificates", &ca.certificates),
            ("intermediates", &ca.intermediates),
            ("crl_files", &ca.crl_files),
        ];
        for (field, files) in lists {
            for (j, file) in files.iter().enumerate() {
                add(
                    format!("device_ca[{i}].{field}[{j}]"),
                    file,
                    PathAccess::ReadFile,
                );
            }
        }
    }
    let engines = std::iter::once(("policy", &raw.policy.rego_files, &raw.policy.data_file)).chain(
        raw.policy
            .shadow
            .iter()
            .map(|s| ("policy.shadow", &s.rego_files, &s.data_file)),
    );
    for (prefix, rego_files, data_file) in engines {
        for (j, file) in rego_files.iter().enumerate() {
            add(
                format!("{prefix}.rego_files[{j}]"),
                file,
                PathAccess::ReadFile,
            );
        }
        if let Some(file) = data_file {
            add(format!("{prefix}.data_file"), file, PathAccess::ReadFile);
        }
    }
    if let Some(file) = &raw.admin.token_file {
        add("admin.token_file".into(), file, PathAccess::ReadFile);
    }
    if let Some(socket) = &raw.admin.socket_path {
        add("admin.socket_path".into(), socket, PathAccess::WriteParent);
    }
    for (j, path) in raw.sandbox.extra_read_paths.iter().enumerate() {
        add(
            format!("sandbox.extra_read_paths[{j}]"),
            path,
            PathAccess::ReadTree,
        );
    }
    for (j, path) in raw.sandbox.extra_write_paths.iter().enumerate() {
        add(
            format!("sandbox.extra_write_paths[{j}]"),
            path,
            PathAccess::WriteTree,
        );
    }
    out
}
