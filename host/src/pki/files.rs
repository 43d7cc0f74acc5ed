//! Files and flag values of `azgate ca`: durations, private directories, key files.

use std::path::Path;
use std::time::Duration;

use super::PkiError;

/// Parses a duration such as `12h`, `90m`, `1h30m`, `45s` or `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?}: use e.g. 12h, 30m, 1h30m, 7d");
    let mut total: u64 = 0;
    let mut number = String::new();
    let mut any = false;
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let value: u64 = number.parse().map_err(|_| bad())?;
        total = value
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        number.clear();
        any = true;
    }
    if !number.is_empty() || !any {
        return Err(bad());
    }
    if total == 0 {
        return Err(format!("duration {text:?} must be longer than zero"));
    }
    Ok(Duration::from_secs(total))
}

/// Creates `dir` (and parents) and makes it owner-only.
pub fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| PkiError::Io(dir.to_owned(), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| PkiError::Io(dir.to_owned(), e))
}

/// Writes `contents` to `path`, mode 0600 when `private` (created so from the start).
pub fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    options.mode(if private { 0o600 } else { 0o644 });
    let mut file = options
        .open(path)
        .map_err(|e| PkiError::Io(path.to_owned(), e))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| PkiError::Io(path.to_owned(), e))
}
