//! MLX/Hugging Face model directories: config.json and one or many
//! safetensors files. MLX reads safetensors lazily (a tensor's bytes are
//! read when it is evaluated), so a stage reads only its own layers.
use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::mlx::io::load_safetensors;
use crate::mlx::Array;

/// The config and the (lazy) tensors of the model in `dir`.
pub fn open_dir(dir: &Path) -> Result<(Value, HashMap<String, Array>)> {
    let config_path = dir.join("config.json");
    let text = fs::read_to_string(&config_path)
        .map_err(|e| Error::NotFound(format!("cannot read {}: {e}", config_path.display())))?;
    let config: Value = serde_json::from_str(&text)
        .map_err(|e| Error::invalid_model(&config_path, format!("invalid JSON: {e}")))?;
    if !config.is_object() {
        return Err(Error::invalid_model(
            &config_path,
            "config.json is not a JSON object",
        ));
    }
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    // With an index, exactly the files it names (others may be leftovers).
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let idx: Value = serde_json::from_str(&fs::read_to_string(&index)?)
            .map_err(|e| Error::invalid_model(&index, format!("invalid JSON: {e}")))?;
        let map = idx
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::invalid_model(&index, "no weight_map"))?;
        let mut named: Vec<PathBuf> = map
            .values()
            .filter_map(Value::as_str)
            .map(|f| dir.join(f))
            .collect();
        named.sort();
        named.dedup();
        if let Some(m) = named.iter().find(|f| !f.is_file()) {
            return Err(Error::invalid_model(
                dir,
                format!("the index names {} which is missing", m.display()),
            ));
        }
        files = named;
    }
    if files.is_empty() {
        return Err(Error::invalid_model(dir, "no *.safetensors weight files"));
    }
    let mut tensors = HashMap::new();
    for f in &files {
        check_safetensors(f)?;
        let (t, _) = load_safetensors(f).map_err(|e| Error::invalid_model(f, e.to_string()))?;
        tensors.extend(t);
    }
    Ok((config, tensors))
}

/// Checks a safetensors file against its header before MLX reads it, so a
/// truncated or corrupt file is a clear error rather than a failure deep in
/// evaluation.
fn check_safetensors(path: &Path) -> Result<()> {
    let bad = |msg: String| Error::invalid_model(path, msg);
    let mut f = fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad("file is shorter than a safetensors header".into()))?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > 100 << 20 {
        return Err(bad(format!(
            "header of {n} bytes does not fit in a file of {len} bytes (truncated?)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let header: Map<String, Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("unreadable safetensors header: {e}")))?;
    let mut end = 0u64;
    for (name, info) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let offs = info.get("data_offsets").and_then(Value::as_array);
        let e = offs.and_then(|o| o.get(1)).and_then(Value::as_u64);
        end = end.max(e.ok_or_else(|| bad(format!("tensor {name} has no data_offsets")))?);
    }
    let need = 8 + n + end;
    if len < need {
        return Err(bad(format!(
            "file is truncated: {len} bytes, but its header describes {need}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_safetensors_are_rejected_with_the_numbers() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("w.safetensors");
        let a = Array::from_slice(&[1.0f32; 64], &[8, 8]).unwrap();
        crate::mlx::io::save_safetensors(&f, &[("a", &a)]).unwrap();
        check_safetensors(&f).unwrap();
        let bytes = fs::read(&f).unwrap();
        fs::write(&f, &bytes[..bytes.len() - 10]).unwrap();
        let err = check_safetensors(&f).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        fs::write(&f, &bytes[..4]).unwrap();
        assert!(check_safetensors(&f).is_err());
    }
}
