//! Hugging Face safetensors checkpoints: one file, or many with
//! `model.safetensors.index.json`, memory-mapped and never copied.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use fusebox_core::{DType, Tensor, Weight};

use crate::config::QuantConfig;
use crate::source::WeightSource;
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensorError};
use safetensors::SafeTensors;

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte offset of the data from the start of the file.
    offset: usize,
}

/// The tensors of a checkpoint, by name, across all its files.
pub struct Checkpoint {
    files: Vec<(PathBuf, Arc<Mmap>)>,
    entries: HashMap<String, Entry>,
    /// `__metadata__` of the first file (e.g. `{"format": "mlx"}`).
    pub metadata: BTreeMap<String, String>,
}

fn map_dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I32 => DType::I32,
        Dtype::U32 => DType::U32,
        Dtype::U8 => DType::U8,
        _ => return None,
    })
}

fn describe(e: &SafeTensorError) -> String {
    match e {
        SafeTensorError::MetadataIncompleteBuffer => {
            "the tensor data does not match the header's offsets (truncated or corrupt file)".into()
        }
        SafeTensorError::HeaderTooSmall | SafeTensorError::InvalidHeaderLength => {
            "the header is missing or cut short (truncated file?)".into()
        }
        SafeTensorError::InvalidOffset(name) => format!("tensor {name} has invalid data offsets"),
        other => format!("{other}"),
    }
}

impl Checkpoint {
    /// Open every safetensors file of a model directory.
    pub fn open_dir(dir: &Path) -> Result<Checkpoint> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let v = crate::config::read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{}: field `weight_map` is missing", index.display()))?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("cannot read directory {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            v.sort();
            // `model*.safetensors` are the weights; other files (e.g. saved
            // activations) are ignored when those exist
            let is_model = |p: &PathBuf| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("model"));
            if v.iter().any(is_model) {
                v.retain(is_model);
            }
            v
        };
        if files.is_empty() {
            bail!("{}: no *.safetensors files found", dir.display());
        }
        Self::open_files(&files)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Checkpoint> {
        let mut ck = Checkpoint { files: vec![], entries: HashMap::new(), metadata: BTreeMap::new() };
        for (fi, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: the file is opened read-only; fusebox never writes to a
            // checkpoint while it is mapped.
            let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
                .with_context(|| format!("cannot map {}", path.display()))?;
            let (n, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| anyhow!("{}: not a valid safetensors file: {}", path.display(), describe(&e)))?;
            if fi == 0 {
                if let Some(m) = meta.metadata() {
                    ck.metadata = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                }
            }
            for (name, info) in meta.tensors() {
                ck.entries.insert(
                    name,
                    Entry {
                        file: fi,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        offset: 8 + n + info.data_offsets.0,
                    },
                );
            }
            ck.files.push((path.clone(), Arc::new(map)));
        }
        Ok(ck)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The file a tensor lives in (for error messages).
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.entries.get(name).map(|e| self.files[e.file].0.as_path())
    }

    pub fn where_(&self) -> String {
        match self.files.as_slice() {
            [(p, _)] => p.display().to_string(),
            fs => format!("{} ({} files)", fs[0].0.parent().unwrap_or(Path::new(".")).display(), fs.len()),
        }
    }

    /// A tensor by name, as a zero-copy view of the mapped file.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| anyhow!("{}: tensor `{name}` not found", self.where_()))?;
        let path = &self.files[e.file].0;
        let dtype = map_dtype(e.dtype).ok_or_else(|| {
            anyhow!("{}: tensor `{name}` has dtype {}, which fusebox does not support", path.display(), e.dtype)
        })?;
        Tensor::from_mmap(self.files[e.file].1.clone(), e.offset, &e.shape, dtype)
            .with_context(|| format!("{}: tensor `{name}`", path.display()))
    }

    /// A tensor that must have `shape` and one of the float dtypes.
    pub fn get_float(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(name)?;
        let path = self.file_of(name).map(|p| p.display().to_string()).unwrap_or_default();
        if t.shape() != shape {
            bail!("{path}: tensor `{name}` has shape {:?}, expected {shape:?}", t.shape());
        }
        if !t.dtype().is_float() {
            bail!("{path}: tensor `{name}` has dtype {}, expected F32, F16 or BF16", t.dtype());
        }
        Ok(t)
    }
}

/// Weights from a safetensors checkpoint: Hugging Face dense tensors, or MLX
/// affine-quantized ones (`X.weight` packed `U32` plus `X.scales` and
/// `X.biases`) when the config has a `quantization` block.
pub struct SafetensorsSource<'a> {
    pub ck: &'a Checkpoint,
    pub quant: Option<&'a QuantConfig>,
}

impl SafetensorsSource<'_> {
    fn file(&self, name: &str) -> String {
        self.ck.file_of(name).map(|p| p.display().to_string()).unwrap_or_else(|| self.ck.where_())
    }

    /// A linear weight stored under `module` with logical `[.., rows, cols]`.
    fn weight(&self, module: &str, qkey: &str, shape: &[usize]) -> Result<Weight> {
        let wname = format!("{module}.weight");
        let sname = format!("{module}.scales");
        if !self.ck.contains(&sname) {
            return Weight::dense(self.ck.get_float(&wname, shape)?);
        }
        let file = self.file(&sname);
        let (bits, group) = match self.quant {
            None => bail!("{file}: `{sname}` is present but config.json has no `quantization` block"),
            Some(q) => q.for_module(qkey).ok_or_else(|| {
                anyhow!("{file}: `{sname}` is present but config.json marks `{qkey}` as not quantized")
            })?,
        };
        let q = self.ck.get(&wname)?;
        let w = Weight::affine(q, self.ck.get(&sname)?, self.ck.get(&format!("{module}.biases"))?, bits, group)
            .map_err(|e| anyhow!("{file}: `{module}` ({bits}-bit, group {group}): {e}"))?;
        let (e, r, c) = w.dims();
        let got: Vec<usize> = if shape.len() == 3 { vec![e, r, c] } else { vec![r, c] };
        if got != shape || (shape.len() == 2 && e != 1) {
            bail!("{file}: `{module}` is a quantized weight of logical shape {got:?}, expected {shape:?}");
        }
        Ok(w)
    }
}

impl WeightSource for SafetensorsSource<'_> {
    fn linear(&self, module: &str, rows: usize, cols: usize) -> Result<Weight> {
        self.weight(module, module, &[rows, cols])
    }

    fn norm(&self, module: &str, n: usize) -> Result<Tensor> {
        self.ck.get_float(&format!("{module}.weight"), &[n])?.to_f32()
    }

    fn experts(&self, mlp: &str, proj: &str, experts: usize, rows: usize, cols: usize) -> Result<Weight> {
        // MLX: stacked under switch_mlp
        let switch = format!("{mlp}.switch_mlp.{proj}");
        if self.ck.contains(&format!("{switch}.weight")) {
            return self.weight(&switch, &switch, &[experts, rows, cols]);
        }
        // Hugging Face: one tensor per expert, stacked here into one buffer
        let first = format!("{mlp}.experts.0.{proj}.weight");
        if !self.ck.contains(&first) {
            bail!("{}: no experts for `{mlp}.{proj}` (looked for `{switch}.weight` and `{first}`)", self.ck.where_());
        }
        let dtype = self.ck.get(&first)?.dtype();
        let mut stacked = Tensor::zeros(&[experts, rows, cols], dtype);
        let per = rows * cols * dtype.size();
        let dst = stacked.host_bytes_mut()?;
        for i in 0..experts {
            let name = format!("{mlp}.experts.{i}.{proj}.weight");
            let t = self.ck.get_float(&name, &[rows, cols])?;
            if t.dtype() != dtype {
                bail!("{}: `{name}` is {} but expert 0 is {dtype}", self.file(&name), t.dtype());
            }
            dst[i * per..(i + 1) * per].copy_from_slice(t.host_bytes()?);
        }
        Weight::dense(stacked)
    }

    fn has(&self, module: &str) -> bool {
        self.ck.contains(&format!("{module}.weight"))
    }
}
