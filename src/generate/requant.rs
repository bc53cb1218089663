//! GGUF weights in the formats candle multiplies fastest on the CPU.
//!
//! candle 0.10 has AVX2 dot products for Q4_0, Q8_0 and the k-quants, but
//! runs Q4_1, Q5_0 and Q5_1 through its generic scalar code. Both default
//! generators are mostly made of those (SmolLM2: 210 Q4_1 tensors; Qwen2.5:
//! 133 Q5_0), so on the CPU kefu decodes from a copy whose slow tensors are
//! re-quantised to Q8_0. Q8_0 keeps 8 bits per weight with a scale per 32, so
//! the 4- and 5-bit values are kept almost exactly (|error| <= 1/254 of the
//! block's largest weight); the file grows by about half.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

/// Tensor types candle runs without SIMD on the CPU.
pub const SLOW_ON_CPU: [GgmlDType; 3] = [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1];

/// What a conversion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    pub path: PathBuf,
    /// Tensors re-quantised to Q8_0.
    pub requantised: usize,
    pub tensors: usize,
}

fn read(path: &Path) -> Result<(gguf_file::Content, BufReader<File>), String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader)
        .map_err(|e| format!("{} is not a readable GGUF file: {e}", path.display()))?;
    Ok((content, reader))
}

/// How many of the GGUF's tensors candle runs without SIMD on the CPU.
pub fn slow_tensors(path: &Path) -> Result<usize, String> {
    let (content, _) = read(path)?;
    Ok(content
        .tensor_infos
        .values()
        .filter(|t| SLOW_ON_CPU.contains(&t.ggml_dtype))
        .count())
}

/// Writes `src` to `dst` with every [`SLOW_ON_CPU`] tensor re-quantised to
/// Q8_0 and everything else (metadata, tokenizer, chat template, other
/// tensors) as it was. `dst` appears whole or not at all.
pub fn to_q8_0(src: &Path, dst: &Path) -> Result<Converted, String> {
    let (content, mut reader) = read(src)?;
    let source = gguf_file::Value::String(signature(src)?);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    // The source's order, so the copy is laid out like it (and deterministic).
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let cpu = Device::Cpu;
    let mut tensors: Vec<(&str, QTensor)> = Vec::with_capacity(names.len());
    let mut requantised = 0;
    for name in names {
        let t = content
            .tensor(&mut reader, name, &cpu)
            .map_err(|e| format!("{}: tensor {name}: {e}", src.display()))?;
        let t = if SLOW_ON_CPU.contains(&t.dtype()) {
            requantised += 1;
            let values = t
                .dequantize(&cpu)
                .map_err(|e| format!("{}: tensor {name}: {e}", src.display()))?;
            QTensor::quantize(&values, GgmlDType::Q8_0)
                .map_err(|e| format!("{}: tensor {name}: {e}", src.display()))?
        } else {
            t
        };
        tensors.push((name.as_str(), t));
    }
    // candle writes tensor data aligned to 32 bytes; a different alignment
    // in the source's metadata would no longer be true.
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.alignment")
        .filter(|(k, _)| k.as_str() != SOURCE_KEY)
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.push((SOURCE_KEY, &source));
    metadata.sort_by_key(|(k, _)| *k);
    // Several kefu processes (tests, a server and a bench) may convert the
    // same file at once: each writes its own partial file, the renames are
    // atomic and the results identical.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dst.with_extension(format!("{}-{n}.partial", std::process::id()));
    let written = (|| -> Result<(), String> {
        let file =
            File::create(&tmp).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        let mut w = BufWriter::new(file);
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        gguf_file::write(&mut w, &metadata, &refs)
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        w.into_inner()
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?
            .sync_all()
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, dst).map_err(|e| format!("cannot write {}: {e}", dst.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    Ok(Converted {
        path: dst.to_path_buf(),
        requantised,
        tensors: tensors.len(),
    })
}

/// The GGUF the CPU should load for `model`: `model` itself when none of its
/// tensors is slow on the CPU, otherwise a Q8_0 copy in `cache` (made on
/// first use, reused while `model`'s name, size and modification time are
/// those it was made from). The copy sits in a
/// directory of its own, as mistral.rs wants of a GGUF.
pub fn for_cpu(model: &Path, cache: &Path) -> Result<Option<Converted>, String> {
    let slow = slow_tensors(model)?;
    if slow == 0 {
        return Ok(None);
    }
    let stem = model
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| format!("{} has no file name", model.display()))?;
    let dir = cache.join(format!("{stem}.cpu-q8_0"));
    let dst = dir.join(format!("{stem}.cpu-q8_0.gguf"));
    if let Ok((content, _)) = read(&dst) {
        let made_from = content
            .metadata
            .get(SOURCE_KEY)
            .and_then(|v| v.to_string().ok());
        if made_from == Some(&signature(model)?) {
            return Ok(Some(Converted {
                path: dst,
                requantised: slow,
                tensors: content.tensor_infos.len(),
            }));
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    to_q8_0(model, &dst).map(Some)
}

/// Metadata key of the copy that names the file it was made from.
const SOURCE_KEY: &str = "kefu.cpu_copy.source";

/// The source file's name, size and modification time: a copy is reused
/// only while they are unchanged.
fn signature(path: &Path) -> Result<String, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    Ok(format!("{name} {} bytes, modified {modified}", meta.len()))
}

/// Counts of each tensor type in a GGUF, for logs and tests.
pub fn tensor_types(path: &Path) -> Result<HashMap<GgmlDType, usize>, String> {
    let (content, _) = read(path)?;
    let mut counts = HashMap::new();
    for t in content.tensor_infos.values() {
        *counts.entry(t.ggml_dtype).or_default() += 1;
    }
    Ok(counts)
}
