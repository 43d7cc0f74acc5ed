//! Where the filter's machine code comes from.
//!
//! `azgate serve` has a short-lived child (`azgate compile-filter`) compile the module into the
//! compiled-code cache and then loads the code from there. glibc keeps what Cranelift freed in
//! its arenas: the gateway that compiled the azgate filter itself held ~37 MB more for the rest
//! of its life (`make bench`: 56 MB after one request against 19 MB from cached code). A
//! gateway that never compiles never holds it.
//!
//! The cache is `filter.cache_dir` when configured, else a private directory (mode 0700, a
//! random name under the temp directory; wasmtime runs native code from the cache, so nobody
//! else may write to it) that is removed as soon as the plugin has loaded. With `filter.cache_dir`, a
//! marker named by the module's SHA-256 records that it was compiled there, so a start from a
//! warm cache does not pay for a child; a marker the cache has outlived (wasmtime's cleanup
//! removed the code) costs only the in-process compile it replaces.
//!
//! If the child cannot run or fails, the gateway compiles in-process, as it always could, and
//! says so in its log.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Who compiles the filter.
#[derive(Clone, Debug)]
pub enum Compiler {
    /// This process (tests and embedders of the library).
    InProcess,
    /// `<program> compile-filter --cache-dir <dir> --wasm -` (the `azgate` binary itself).
    ChildProcess(PathBuf),
}

/// The compiled-code cache the plugin loads from, and the private directory (if one was made)
/// to remove once it has.
pub(crate) struct CodeCache {
    pub(crate) dir: Option<PathBuf>,
    pub(crate) private: Option<PrivateDir>,
    pub(crate) source: CodeSource,
}

/// Where the code the plugin loads was compiled (for the start-up log line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CodeSource {
    /// Found in `filter.cache_dir` by its marker: nothing compiled at this start.
    Marked,
    /// Compiled by the child into the cache.
    ChildProcess,
    /// Left to this process (the in-process compiler, or the child failed).
    InProcess,
}

impl CodeSource {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Marked => "compiled-code cache",
            Self::ChildProcess => "child process",
            Self::InProcess => "this process",
        }
    }
}

/// How long the child may take: Cranelift needs about a second for the filter on two cores.
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);
/// The end of a failed child's standard error that the log line quotes.
const STDERR_TAIL: usize = 2048;

/// Makes sure the filter's code is in a cache before the plugin loads (see the module doc).
pub(crate) async fn prepare(
    compiler: &Compiler,
    configured: Option<&Path>,
    wasm: &[u8],
) -> CodeCache {
    let Compiler::ChildProcess(program) = compiler else {
        return CodeCache {
            dir: configured.map(Path::to_path_buf),
            private: None,
            source: CodeSource::InProcess,
        };
    };
    let (dir, private, marker) = match configured {
        Some(dir) => {
            let marker = dir.join(marker_name(wasm));
            if marker.exists() {
                return CodeCache {
                    dir: Some(dir.to_path_buf()),
                    private: None,
                    source: CodeSource::Marked,
                };
            }
            (dir.to_path_buf(), None, Some(marker))
        }
        None => match PrivateDir::create() {
            Ok(private) => (private.path.clone(), Some(private), None),
            Err(error) => {
                tracing::warn!(%error, "no private directory for compiled code; compiling the filter in this process");
                return CodeCache {
                    dir: None,
                    private: None,
                    source: CodeSource::InProcess,
                };
            }
        },
    };
    let source = match compile_in_child(program, &dir, wasm).await {
        Ok(()) => {
            if let Some(marker) = marker
                && let Err(error) = std::fs::write(&marker, b"")
            {
                tracing::debug!(%error, marker = %marker.display(), "compiled-code marker not written");
            }
            CodeSource::ChildProcess
        }
        Err(reason) => {
            tracing::warn!(%reason, "compiling the filter in a child process failed; compiling it in this process");
            CodeSource::InProcess
        }
    };
    CodeCache {
        dir: Some(dir),
        private,
        source,
    }
}

/// `azgate-compiled-<sha256 of the module>-<azgate version>`: the module compiled into this
/// cache by this version's compiler settings.
fn marker_name(wasm: &[u8]) -> String {
    let digest = Sha256::digest(wasm);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("azgate-compiled-{hex}-{}", env!("CARGO_PKG_VERSION"))
}

/// Runs the child with the module on its standard input; `Err` says why it did not succeed.
async fn compile_in_child(program: &Path, dir: &Path, wasm: &[u8]) -> Result<(), String> {
    let mut child = tokio::process::Command::new(program)
        .arg("compile-filter")
        .arg("--cache-dir")
        .arg(dir)
        .args(["--wasm", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{}: {e}", program.display()))?;
    let (Some(mut stdin), Some(mut stderr)) = (child.stdin.take(), child.stderr.take()) else {
        return Err("the child's standard input or error was not piped".into());
    };
    let run = async {
        // Written and closed before waiting, so the child sees the end of the module.
        let written = stdin.write_all(wasm).await;
        drop(stdin);
        let mut said = Vec::new();
        let _ = stderr.read_to_end(&mut said).await;
        let status = child.wait().await.map_err(|e| e.to_string())?;
        if status.success() {
            return Ok(());
        }
        let tail = &said[said.len().saturating_sub(STDERR_TAIL)..];
        Err(format!(
            "{status}{}: {}",
            written
                .err()
                .map_or(String::new(), |e| format!(" (module not sent: {e})")),
            String::from_utf8_lossy(tail).trim()
        ))
    };
    tokio::time::timeout(CHILD_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {CHILD_TIMEOUT:?}")))
}

/// A directory only this user can use, removed on drop.
pub(crate) struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    fn create() -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt as _;
        let mut last = None;
        // `create` (not `create_all`) fails on anything already there, a planted symlink too.
        for _ in 0..8 {
            let path = std::env::temp_dir().join(format!(
                "azgate-serve-code-{}-{:016x}",
                std::process::id(),
                fastrand::u64(..)
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(Self { path }),
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                    last = Some(error)
                }
                Err(error) => return Err(error),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no free directory name")))
    }

    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_names_the_module_bytes_and_the_version() {
        let a = marker_name(b"\0asm one");
        assert_ne!(a, marker_name(b"\0asm two"));
        assert_eq!(a, marker_name(b"\0asm one"));
        assert!(a.ends_with(env!("CARGO_PKG_VERSION")));
        assert_eq!(
            a.len(),
            "azgate-compiled-".len() + 64 + 1 + env!("CARGO_PKG_VERSION").len()
        );
    }

    #[test]
    fn a_private_directory_is_the_users_alone_and_goes_away_on_drop() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = PrivateDir::create().unwrap();
        let path = dir.path().to_path_buf();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::write(path.join("modules"), b"x").unwrap();
        drop(dir);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_failing_child_leaves_the_cache_to_the_in_process_compile() {
        let cache = prepare(&Compiler::ChildProcess("/bin/false".into()), None, b"\0asm").await;
        assert_eq!(cache.source, CodeSource::InProcess);
        // The private directory is there for the in-process compile to fill.
        let dir = cache.dir.clone().unwrap();
        assert!(dir.is_dir());
        assert_eq!(
            cache.private.as_ref().map(|p| p.path().to_path_buf()),
            Some(dir)
        );
        let missing = compile_in_child(Path::new("/nonexistent/azgate"), Path::new("/tmp"), b"")
            .await
            .unwrap_err();
        assert!(missing.contains("/nonexistent/azgate"), "{missing}");
        let failed = compile_in_child(Path::new("/bin/false"), Path::new("/tmp"), b"")
            .await
            .unwrap_err();
        assert!(failed.contains("exit status: 1"), "{failed}");
    }

    #[tokio::test]
    async fn a_marked_module_in_the_configured_cache_needs_no_child() {
        let dir = std::env::temp_dir().join(format!("azgate-marker-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Compiler::ChildProcess("/bin/true".into());
        let first = prepare(&child, Some(&dir), b"\0asm one").await;
        assert_eq!(first.source, CodeSource::ChildProcess);
        assert!(first.private.is_none(), "a configured cache is not removed");
        assert!(dir.join(marker_name(b"\0asm one")).exists());
        // The same bytes again: marked. Other bytes: the child again.
        let again = prepare(&child, Some(&dir), b"\0asm one").await;
        assert_eq!(again.source, CodeSource::Marked);
        assert_eq!(again.dir.as_deref(), Some(dir.as_path()));
        let other = prepare(&child, Some(&dir), b"\0asm two").await;
        assert_eq!(other.source, CodeSource::ChildProcess);
        // A failed child writes no marker.
        let failing = Compiler::ChildProcess("/bin/false".into());
        let failed = prepare(&failing, Some(&dir), b"\0asm three").await;
        assert_eq!(failed.source, CodeSource::InProcess);
        assert!(!dir.join(marker_name(b"\0asm three")).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
