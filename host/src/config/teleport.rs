//! Teleport role and lock files as `tctl` writes them: YAML documents (`tctl get roles`) or
//! JSON (`tctl get roles --format=json`: an array, or one object), each checked by the filter's
//! own rules so an error names the file and a file loads exactly as the same roles inline.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, error};

/// The documents of a `tctl` YAML or JSON file: `---`-separated documents, a JSON array's
/// elements, or one object.
fn read_documents(path: &Path, field: &str) -> Result<Vec<serde_json::Value>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| error(field, e.to_string()))?;
    let mut values = Vec::new();
    // JSON is YAML, so one parser reads both.
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_json::Value =
            serde_json::Value::deserialize(document).map_err(|e| error(field, e.to_string()))?;
        match value {
            serde_json::Value::Null => {}
            serde_json::Value::Array(list) => values.extend(list),
            other => values.push(other),
        }
    }
    Ok(values)
}

/// Reads Teleport locks as `tctl get locks` writes them from a file, or from every `*.yaml`,
/// `*.yml` and `*.json` file of a directory (in name order), validated by the filter's rules
/// ([`azgate_filter::lock::LockSet::parse`]) so errors name the file.
pub fn read_lock_source(path: &Path) -> Result<Vec<serde_json::Value>, ConfigError> {
    let field = format!("filter.lock_files: {}", path.display());
    let files = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| error(&field, e.to_string()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
            })
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut locks = Vec::new();
    for file in files {
        let field = format!("filter.lock_files: {}", file.display());
        let values = read_documents(&file, &field)?;
        azgate_filter::lock::LockSet::parse(values.clone())
            .map_err(|(at, message)| error(&field, format!("{at}: {message}")))?;
        locks.extend(values);
    }
    Ok(locks)
}

/// Reads a Teleport role file as `tctl` writes it: YAML (`tctl get roles`, documents separated
/// by `---`) or JSON (`tctl get roles --format=json`: an array, or one object). Each role is
/// validated by the filter's own rules ([`azgate_filter::config::parse_roles`]: kind, versions
/// v3–v8, identities and templates), so errors name this file.
pub fn read_role_file(path: &Path) -> Result<Vec<serde_json::Value>, ConfigError> {
    let field = format!("filter.role_files: {}", path.display());
    let roles = read_documents(path, &field)?;
    azgate_filter::config::parse_roles(roles.clone()).map_err(|e| error(&field, e.to_string()))?;
    Ok(roles)
}
