//! GGUF checkpoints (llama.cpp / ggml): the header, metadata and tensor
//! directory of a memory-mapped file, the model config and tokenizer carried
//! in its metadata, and a [`WeightSource`] that hands out its tensors without
//! copying them.
//!
//! Layout (versions 2 and 3, little-endian): `"GGUF"`, `u32` version,
//! `u64` tensor count, `u64` metadata count, the metadata key/value pairs,
//! the tensor infos (name, `u32` n_dims, `u64` dims with `ne[0]` innermost,
//! `u32` ggml type, `u64` offset relative to the data section), then padding
//! to `general.alignment` (default 32) and the tensor data.
//!
//! Parsing never trusts the file: every read is bounds-checked, every count
//! is checked against the bytes left before anything is allocated for it, and
//! every error is one line naming the file and the item at fault.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use fusebox_core::{DType, GgmlType, RopeScaling, RopeStyle, Tensor, Weight};
use memmap2::Mmap;

use crate::config::{Arch, ModelConfig, MoeConfig};
use crate::source::WeightSource;
use crate::tokenizer::Tokenizer;

/// The default `general.alignment`.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are rejected (real files use at most 2).
const MAX_ARRAY_DEPTH: u32 = 8;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The GGUF name of the value's type (`UINT32`, `STRING`, `ARRAY`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "UINT8",
            MetaValue::I8(_) => "INT8",
            MetaValue::U16(_) => "UINT16",
            MetaValue::I16(_) => "INT16",
            MetaValue::U32(_) => "UINT32",
            MetaValue::I32(_) => "INT32",
            MetaValue::F32(_) => "FLOAT32",
            MetaValue::Bool(_) => "BOOL",
            MetaValue::String(_) => "STRING",
            MetaValue::Array(_) => "ARRAY",
            MetaValue::U64(_) => "UINT64",
            MetaValue::I64(_) => "INT64",
            MetaValue::F64(_) => "FLOAT64",
        }
    }

    /// Any integer value, widened.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// A float value (FLOAT32 or FLOAT64).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl fmt::Display for MetaValue {
    /// A short rendering for messages (long strings and arrays are elided).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaValue::String(s) if s.chars().count() > 40 => {
                write!(f, "{:?}...", s.chars().take(40).collect::<String>())
            }
            MetaValue::String(s) => write!(f, "{s:?}"),
            MetaValue::Array(a) => write!(f, "[{} values]", a.len()),
            MetaValue::Bool(b) => write!(f, "{b}"),
            MetaValue::F32(v) => write!(f, "{v}"),
            MetaValue::F64(v) => write!(f, "{v}"),
            other => write!(f, "{}", other.as_i128().unwrap_or_default()),
        }
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml dims, `ne[0]` (the innermost, contiguous one) first.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    /// Bytes of data.
    pub nbytes: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    pub version: u32,
    pub alignment: usize,
    /// Absolute byte offset of the tensor data section.
    pub data_offset: usize,
    pub metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GgufFile({}, v{}, {} metadata keys, {} tensors)",
            self.path.display(),
            self.version,
            self.metadata.len(),
            self.tensors.len()
        )
    }
}

/// A bounds-checked little-endian cursor over the file bytes. `ctx` names the
/// item being read, for the truncation error.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    file: &'a str,
    ctx: String,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn truncated(&self, need: u64) -> anyhow::Error {
        anyhow!(
            "{}: truncated GGUF file: {} needs {need} bytes at byte {} but the file is {} bytes",
            self.file,
            self.ctx,
            self.pos,
            self.buf.len()
        )
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| self.truncated(n as u64))?;
        let s = self.buf.get(self.pos..end).ok_or_else(|| self.truncated(n as u64))?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let b = self.bytes(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A `u64` count of items of at least `min_size` bytes each, checked
    /// against the bytes left so that a corrupt count cannot drive a huge
    /// allocation.
    fn count(&mut self, min_size: usize) -> Result<usize> {
        let n = self.u64()?;
        let need = n.saturating_mul(min_size as u64);
        if need > self.remaining() as u64 {
            bail!(
                "{}: truncated or corrupt GGUF file: {} claims {n} items, more than the {} bytes left can hold",
                self.file,
                self.ctx,
                self.remaining()
            );
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        if n > self.remaining() as u64 {
            return Err(self.truncated(n));
        }
        let b = self.bytes(n as usize)?;
        Ok(match std::str::from_utf8(b) {
            Ok(s) => s.to_string(),
            Err(_) => String::from_utf8_lossy(b).into_owned(),
        })
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>()?[0]),
            1 => MetaValue::I8(i8::from_le_bytes(self.array()?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => bail!("{}: {} has an invalid BOOL byte {b}", self.file, self.ctx),
            },
            8 => MetaValue::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    bail!("{}: {} nests arrays more than {MAX_ARRAY_DEPTH} deep", self.file, self.ctx);
                }
                let elem = self.u32()?;
                let min = min_value_size(elem)
                    .ok_or_else(|| anyhow!("{}: {} is an array of unknown value type {elem}", self.file, self.ctx))?;
                let n = self.count(min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            other => bail!("{}: {} has unknown value type {other}", self.file, self.ctx),
        })
    }
}

/// A name read from the file, made safe for a one-line message: control
/// characters escaped and long names cut short.
fn show(name: &str) -> String {
    let mut out: String = name.chars().take(120).flat_map(char::escape_debug).collect();
    if name.chars().count() > 120 {
        out.push_str("...");
    }
    out
}

/// The fewest bytes a value of a GGUF value type takes.
fn min_value_size(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

impl GgufFile {
    /// Map and parse a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
        if len < 8 {
            bail!("{}: not a GGUF file (only {len} bytes)", path.display());
        }
        // SAFETY: the file is opened read-only; fusebox never writes to a
        // checkpoint while it is mapped.
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        Self::parse(path, Arc::new(map))
    }

    fn parse(path: &Path, map: Arc<Mmap>) -> Result<GgufFile> {
        let file = path.display().to_string();
        let buf: &[u8] = &map;
        let mut r = Reader { buf, pos: 0, file: &file, ctx: "the header".into() };
        let magic = r.array::<4>()?;
        if &magic != b"GGUF" {
            bail!("{file}: not a GGUF file (magic \"{}\", expected \"GGUF\")", magic.escape_ascii());
        }
        let version = r.u32()?;
        match version {
            2 | 3 => {}
            1 => {
                bail!("{file}: GGUF version 1 is not supported (fusebox reads versions 2 and 3; re-convert the model)")
            }
            v if matches!(v.swap_bytes(), 1..=3) => {
                bail!("{file}: big-endian GGUF files are not supported (version field {v:#010x})")
            }
            v => bail!("{file}: unsupported GGUF version {v} (fusebox reads versions 2 and 3)"),
        }
        r.ctx = "the tensor count".into();
        // A tensor info takes at least 8 (name) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
        let n_tensors = r.count(24)?;
        r.ctx = "the metadata count".into();
        // A key/value takes at least 8 (key) + 4 (type) + 1 (value) bytes.
        let n_kv = r.count(13)?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            r.ctx = format!("metadata entry #{i}");
            let key = r.string()?;
            r.ctx = format!("metadata key `{}`", show(&key));
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                bail!("{file}: metadata key `{}` appears more than once", show(&key));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_i128() {
                Some(a) if a > 0 && a <= 1 << 30 && (a as usize).is_power_of_two() => a as usize,
                _ => bail!("{file}: metadata key `general.alignment` is {v}, expected a power of two"),
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut index = HashMap::with_capacity(n_tensors);
        let mut rel_offsets = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            r.ctx = format!("tensor info #{i}");
            let name = r.string()?;
            let shown = show(&name);
            r.ctx = format!("tensor info `{shown}`");
            let n_dims = r.u32()?;
            if n_dims > MAX_DIMS {
                bail!("{file}: tensor `{shown}` has {n_dims} dimensions (at most {MAX_DIMS})");
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = r.u64()?;
                let d = usize::try_from(d)
                    .ok()
                    .filter(|&d| d as u64 <= buf.len() as u64 * 8)
                    .ok_or_else(|| anyhow!("{file}: tensor `{shown}` has an impossible dimension {d}"))?;
                dims.push(d);
            }
            let type_id = r.u32()?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| {
                anyhow!(
                    "{file}: tensor `{shown}` has type {} ({type_id}), which fusebox does not support",
                    GgmlType::name_of_id(type_id)
                )
            })?;
            let offset = r.u64()?;
            if index.insert(name.clone(), i).is_some() {
                bail!("{file}: tensor `{shown}` appears more than once");
            }
            rel_offsets.push(offset);
            tensors.push(TensorInfo { name, dims, ty, offset: 0, nbytes: 0 });
        }
        let data_offset = r.pos.div_ceil(alignment) * alignment;

        for (t, &rel) in tensors.iter_mut().zip(&rel_offsets) {
            let shown = show(&t.name);
            let numel = t.dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let numel = numel.ok_or_else(|| anyhow!("{file}: tensor `{shown}` dims {:?} overflow", t.dims))?;
            let ne0 = t.dims.first().copied().unwrap_or(1);
            if ne0 % t.ty.block_size() != 0 {
                bail!(
                    "{file}: tensor `{shown}` has rows of {ne0} elements, not a multiple of {}'s block size {}",
                    t.ty.name(),
                    t.ty.block_size()
                );
            }
            let nbytes = (numel / t.ty.block_size())
                .checked_mul(t.ty.type_size())
                .ok_or_else(|| anyhow!("{file}: tensor `{shown}` size overflows"))?;
            if rel % alignment as u64 != 0 {
                bail!("{file}: tensor `{shown}` data offset {rel} is not a multiple of the alignment {alignment}");
            }
            let start = (data_offset as u64).checked_add(rel);
            let end = start.and_then(|s| s.checked_add(nbytes as u64));
            match (start, end) {
                (Some(s), Some(e)) if e <= buf.len() as u64 => {
                    t.offset = s as usize;
                    t.nbytes = nbytes;
                }
                _ => bail!(
                    "{file}: tensor `{shown}` data [{}, {}) runs past end of file ({} bytes; truncated?)",
                    data_offset as u128 + rel as u128,
                    data_offset as u128 + rel as u128 + nbytes as u128,
                    buf.len()
                ),
            }
        }

        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            alignment,
            data_offset,
            metadata,
            tensors,
            index,
            map: map.clone(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file(&self) -> String {
        self.path.display().to_string()
    }

    // ---- metadata ---------------------------------------------------------

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&MetaValue> {
        self.get(key).ok_or_else(|| anyhow!("{}: required metadata key `{key}` is missing", self.file()))
    }

    fn wrong(&self, key: &str, v: &MetaValue, want: &str) -> anyhow::Error {
        anyhow!("{}: metadata key `{key}` is {} {v}, expected {want}", self.file(), v.type_name())
    }

    fn int_in<T: TryFrom<i128>>(&self, key: &str, v: &MetaValue, want: &str) -> Result<T> {
        v.as_i128().and_then(|i| T::try_from(i).ok()).ok_or_else(|| self.wrong(key, v, want))
    }

    pub fn get_opt_u32(&self, key: &str) -> Result<Option<u32>> {
        self.get(key).map(|v| self.int_in(key, v, "an unsigned 32-bit integer")).transpose()
    }
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.int_in(key, self.require(key)?, "an unsigned 32-bit integer")
    }
    pub fn get_opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key).map(|v| self.int_in(key, v, "an unsigned integer")).transpose()
    }
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.int_in(key, self.require(key)?, "an unsigned integer")
    }
    pub fn get_opt_f32(&self, key: &str) -> Result<Option<f32>> {
        self.get(key).map(|v| v.as_f64().map(|f| f as f32).ok_or_else(|| self.wrong(key, v, "a float"))).transpose()
    }
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.require(key)?;
        v.as_f64().map(|f| f as f32).ok_or_else(|| self.wrong(key, v, "a float"))
    }
    pub fn get_opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| self.wrong(key, v, "a BOOL"))).transpose()
    }
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| self.wrong(key, v, "a BOOL"))
    }
    pub fn get_opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|v| v.as_str().ok_or_else(|| self.wrong(key, v, "a STRING"))).transpose()
    }
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| self.wrong(key, v, "a STRING"))
    }
    pub fn get_opt_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let a = v.as_array().ok_or_else(|| self.wrong(key, v, "an array of STRING"))?;
        a.iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_str().ok_or_else(|| {
                    anyhow!("{}: metadata key `{key}`[{i}] is {}, expected a STRING", self.file(), x.type_name())
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.require(key)?;
        Ok(self.get_opt_str_array(key)?.unwrap_or_default())
    }
    /// An array of integers (of any integer type).
    pub fn get_opt_int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let a = v.as_array().ok_or_else(|| self.wrong(key, v, "an array of integers"))?;
        a.iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_i128().and_then(|n| i64::try_from(n).ok()).ok_or_else(|| {
                    anyhow!("{}: metadata key `{key}`[{i}] is {}, expected an integer", self.file(), x.type_name())
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    // ---- tensors ----------------------------------------------------------

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// Tensor names in file order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn info_or_err(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_info(name).ok_or_else(|| anyhow!("{}: tensor `{name}` not found", self.file()))
    }

    /// A tensor's raw bytes as a zero-copy `U8` view, its type and its ggml dims.
    pub fn tensor_raw(&self, name: &str) -> Result<(Tensor, GgmlType, Vec<usize>)> {
        let t = self.info_or_err(name)?;
        let data = Tensor::from_mmap(self.map.clone(), t.offset, &[t.nbytes], DType::U8)
            .with_context(|| format!("{}: tensor `{name}`", self.file()))?;
        Ok((data, t.ty, t.dims.clone()))
    }

    /// A float (F32/F16/BF16) tensor as a zero-copy view, shaped row-major
    /// (the ggml dims reversed, outermost first).
    pub fn float_tensor(&self, name: &str) -> Result<Tensor> {
        let t = self.info_or_err(name)?;
        let shape: Vec<usize> = t.dims.iter().rev().copied().collect();
        self.float_view(t, &shape)
    }

    /// A float (F32/F16/BF16) tensor as a zero-copy view with the given
    /// row-major shape (whose element count must match).
    fn float_view(&self, t: &TensorInfo, shape: &[usize]) -> Result<Tensor> {
        let dtype = match t.ty {
            GgmlType::F32 => DType::F32,
            GgmlType::F16 => DType::F16,
            GgmlType::BF16 => DType::BF16,
            other => bail!("{}: tensor `{}` is {}, expected F32, F16 or BF16", self.file(), t.name, other.name()),
        };
        Tensor::from_mmap(self.map.clone(), t.offset, shape, dtype)
            .with_context(|| format!("{}: tensor `{}`", self.file(), t.name))
    }
}

// ---- model config ---------------------------------------------------------

/// The `general.architecture` values fusebox reads.
pub const SUPPORTED_ARCHS: &str = "llama, qwen3, qwen3moe";

/// The model config carried in a GGUF file's metadata.
pub fn model_config(g: &GgufFile) -> Result<ModelConfig> {
    let file = g.file();
    let a = g.architecture()?;
    let arch = match a {
        "llama" => Arch::Llama,
        "qwen3" => Arch::Qwen3,
        "qwen3moe" => Arch::Qwen3Moe,
        other => bail!("{file}: unsupported architecture \"{}\" (supported: {SUPPORTED_ARCHS})", show(other)),
    };
    let key = |k: &str| format!("{a}.{k}");
    let usize_of = |k: &str| -> Result<usize> { Ok(g.get_u32(&key(k))? as usize) };
    let opt_usize = |k: &str| -> Result<Option<usize>> { Ok(g.get_opt_u32(&key(k))?.map(|v| v as usize)) };
    let positive = |k: &str, v: usize| -> Result<usize> {
        if v == 0 {
            bail!("{file}: metadata key `{}` must be positive", key(k));
        }
        Ok(v)
    };

    let hidden_size = positive("embedding_length", usize_of("embedding_length")?)?;
    let num_layers = positive("block_count", usize_of("block_count")?)?;
    let num_heads = positive("attention.head_count", usize_of("attention.head_count")?)?;
    let num_kv_heads = positive("attention.head_count_kv", opt_usize("attention.head_count_kv")?.unwrap_or(num_heads))?;
    if num_heads % num_kv_heads != 0 {
        bail!(
            "{file}: `{}` ({num_heads}) is not a multiple of `{}` ({num_kv_heads})",
            key("attention.head_count"),
            key("attention.head_count_kv")
        );
    }
    let head_dim = match opt_usize("attention.key_length")? {
        Some(d) => positive("attention.key_length", d)?,
        None if hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => bail!("{file}: embedding_length {hidden_size} is not divisible by head_count {num_heads}"),
    };
    if let Some(v) = opt_usize("attention.value_length")? {
        if v != head_dim {
            bail!(
                "{file}: `{}` ({v}) differs from the key length ({head_dim}); not supported",
                key("attention.value_length")
            );
        }
    }
    if head_dim % 2 != 0 {
        bail!("{file}: head dim {head_dim} must be even for rotary embeddings");
    }
    if let Some(d) = opt_usize("rope.dimension_count")? {
        if d != head_dim {
            bail!(
                "{file}: `{}` is {d}, but partial rotary embeddings (head dim {head_dim}) are not supported",
                key("rope.dimension_count")
            );
        }
    }
    let intermediate_size = match arch {
        Arch::Qwen3Moe => opt_usize("feed_forward_length")?.unwrap_or(0),
        _ => usize_of("feed_forward_length")?,
    };
    let rms_norm_eps = g.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
    let rope_theta = g.get_opt_f32(&key("rope.freq_base"))?.map(f64::from).unwrap_or(10000.0);
    let max_position_embeddings = opt_usize("context_length")?.unwrap_or(2048);

    // The vocabulary size is the embedding table's row count.
    let emb = g.info_or_err("token_embd.weight")?;
    let vocab_size = match emb.dims.as_slice() {
        [h, v] if *h == hidden_size => *v,
        d => bail!("{file}: tensor `token_embd.weight` has ggml dims {d:?}, expected [{hidden_size}, vocab]"),
    };
    if let Some(v) = opt_usize("vocab_size")? {
        if v != vocab_size {
            bail!("{file}: `{}` is {v} but `token_embd.weight` has {vocab_size} rows", key("vocab_size"));
        }
    }

    let rope_scaling = rope_scaling(g, a, head_dim, rope_theta)?;

    let mut eos_token_ids = vec![];
    for k in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = g.get_opt_u32(k)? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }

    let moe = if arch == Arch::Qwen3Moe {
        let num_experts = positive("expert_count", usize_of("expert_count")?)?;
        let top_k = positive("expert_used_count", usize_of("expert_used_count")?)?;
        if top_k > num_experts {
            bail!("{file}: `{}` ({top_k}) exceeds the number of experts ({num_experts})", key("expert_used_count"));
        }
        let mlp_only_layers = (0..num_layers)
            .filter(|i| {
                !g.contains(&format!("blk.{i}.ffn_gate_exps.weight")) && g.contains(&format!("blk.{i}.ffn_gate.weight"))
            })
            .collect();
        Some(MoeConfig {
            num_experts,
            top_k,
            intermediate_size: usize_of("expert_feed_forward_length")?,
            norm_topk_prob: true,
            decoder_sparse_step: 1,
            mlp_only_layers,
        })
    } else {
        None
    };

    Ok(ModelConfig {
        arch,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        // llama.cpp's converter permutes Llama's q/k rows into its interleaved
        // layout; the interleaved rotation on those rows equals rotate-half on
        // the original ones. Qwen3 weights are not permuted.
        rope_style: if arch == Arch::Llama { RopeStyle::Interleaved } else { RopeStyle::Half },
        max_position_embeddings,
        tie_word_embeddings: !g.contains("output.weight"),
        qk_norm: matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe),
        bos_token_id: g.get_opt_u32("tokenizer.ggml.bos_token_id")?,
        eos_token_ids,
        declared_dtype: None,
        moe,
        quantization: None,
    })
}

/// RoPE scaling from `{arch}.rope.scaling.*`, or from a `rope_freqs.weight`
/// tensor (llama.cpp's encoding of Llama 3 scaling as per-frequency divisors).
fn rope_scaling(g: &GgufFile, a: &str, head_dim: usize, theta: f64) -> Result<RopeScaling> {
    let file = g.file();
    let kind = g.get_opt_str(&format!("{a}.rope.scaling.type"))?;
    let factor_key = format!("{a}.rope.scaling.factor");
    let scaling = match kind {
        None | Some("none") => match g.get_opt_f32(&format!("{a}.rope.scale_linear"))? {
            Some(f) if f != 1.0 => RopeScaling::Linear { factor: f.into() },
            _ => RopeScaling::None,
        },
        Some("linear") => {
            let f = g.get_f32(&factor_key)?;
            if f.is_nan() || f <= 0.0 {
                bail!("{file}: metadata key `{factor_key}` is {f}, expected a positive factor");
            }
            RopeScaling::Linear { factor: f.into() }
        }
        Some(other) => {
            bail!(
                "{file}: metadata key `{a}.rope.scaling.type` is \"{}\", which fusebox does not support (none, linear)",
                show(other)
            )
        }
    };
    let Some(info) = g.tensor_info("rope_freqs.weight") else { return Ok(scaling) };
    if scaling != RopeScaling::None {
        bail!("{file}: both `{a}.rope.scaling.type` and a `rope_freqs.weight` tensor are present; not supported");
    }
    if info.ty != GgmlType::F32 || info.dims != [head_dim / 2] {
        bail!(
            "{file}: tensor `rope_freqs.weight` is {} {:?}, expected F32 [{}]",
            info.ty.name(),
            info.dims,
            head_dim / 2
        );
    }
    let factors = g.float_view(info, &[head_dim / 2])?.to_f32_vec()?;
    let original = g.get_opt_u32(&format!("{a}.rope.scaling.original_context_length"))?.unwrap_or(8192);
    llama3_from_factors(&factors, head_dim, theta, original as f64).ok_or_else(|| {
        anyhow!(
            "{file}: tensor `rope_freqs.weight` holds RoPE frequency factors that do not follow the Llama 3 rule; \
             not supported"
        )
    })
}

/// Recover `RopeScaling::Llama3` parameters from llama.cpp's per-frequency
/// divisors (`inv_freq[i] / factors[i]` is the scaled frequency), and check
/// that they reproduce every factor. The rule depends only on the factor and
/// the two wavelength thresholds, so `original` can be any positive value.
fn llama3_from_factors(factors: &[f32], head_dim: usize, theta: f64, original: f64) -> Option<RopeScaling> {
    let base: Vec<f64> = (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect();
    let rf: Vec<f64> = factors.iter().map(|&f| f as f64).collect();
    if rf.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
        return None;
    }
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * a.abs().max(b.abs()).max(1.0);
    if rf.iter().all(|&f| close(f, 1.0)) {
        return Some(RopeScaling::None);
    }
    let factor = rf.iter().cloned().fold(1.0f64, f64::max);
    // x = 1 / wavelength; the rule is s(x) = (x - xl) / (xh - xl), clamped.
    let xs: Vec<f64> = base.iter().map(|f| f / (2.0 * std::f64::consts::PI)).collect();
    let mut mid = vec![];
    let (mut lo_max, mut hi_min) = (0.0f64, f64::INFINITY);
    for (&x, &f) in xs.iter().zip(&rf) {
        if close(f, 1.0) {
            hi_min = hi_min.min(x);
        } else if close(f, factor) {
            lo_max = lo_max.max(x);
        } else {
            // 1/f = (1-s)/factor + s
            let s = (1.0 / f - 1.0 / factor) / (1.0 - 1.0 / factor);
            mid.push((x, s));
        }
    }
    let (xl, xh) = match mid.as_slice() {
        [] => {
            let hi = if hi_min.is_finite() { hi_min } else { lo_max * 2.0 };
            (lo_max + (hi - lo_max) / 3.0, lo_max + 2.0 * (hi - lo_max) / 3.0)
        }
        [(x, s)] => {
            let hi = if hi_min.is_finite() { hi_min } else { x * 2.0 };
            let t = ((x - lo_max) / s.max(1e-12)).min((hi - x) / (1.0 - s).max(1e-12)) * 0.5;
            (x - s * t, x + (1.0 - s) * t)
        }
        [(x0, s0), .., (x1, s1)] => {
            let m = (s1 - s0) / (x1 - x0);
            let xl = x0 - s0 / m;
            (xl, xl + 1.0 / m)
        }
    };
    if !(xl > 0.0 && xh > xl) {
        return None;
    }
    let scaling = RopeScaling::Llama3 {
        factor,
        low_freq_factor: original * xl,
        high_freq_factor: original * xh,
        original_max_position_embeddings: original,
    };
    let got = fusebox_core::rope::inv_freq(head_dim, theta, scaling);
    let ok = got.iter().zip(base.iter().zip(&rf)).all(|(&g, (&b, &f))| (g as f64 - b / f).abs() <= 1e-4 * (b / f));
    ok.then_some(scaling)
}

// ---- weights --------------------------------------------------------------

/// A [`WeightSource`] over a GGUF file: Hugging Face module paths map onto
/// llama.cpp tensor names, and every tensor is a zero-copy view.
pub struct GgufSource<'a> {
    pub file: &'a GgufFile,
}

impl<'a> GgufSource<'a> {
    pub fn new(file: &'a GgufFile) -> GgufSource<'a> {
        GgufSource { file }
    }

    pub fn file(&self) -> &'a GgufFile {
        self.file
    }
}

/// The GGUF tensor name (with `.weight`) of a Hugging Face module path.
pub fn gguf_name(module: &str) -> Option<String> {
    let module = module.strip_suffix(".weight").unwrap_or(module);
    let top = match module {
        "model.embed_tokens" => Some("token_embd"),
        "lm_head" => Some("output"),
        "model.norm" => Some("output_norm"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(format!("{t}.weight"));
    }
    let rest = module.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let name = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "mlp.gate" => "ffn_gate_inp",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}.weight"))
}

/// The GGUF name of one projection of an MoE block's stacked experts.
pub fn gguf_experts_name(mlp: &str, proj: &str) -> Option<String> {
    let layer: usize = mlp.strip_prefix("model.layers.")?.strip_suffix(".mlp")?.parse().ok()?;
    let p = match proj {
        "gate_proj" => "gate",
        "up_proj" => "up",
        "down_proj" => "down",
        _ => return None,
    };
    Some(format!("blk.{layer}.ffn_{p}_exps.weight"))
}

impl GgufSource<'_> {
    fn weight(&self, what: &str, name: &str, experts: Option<usize>, rows: usize, cols: usize) -> Result<Weight> {
        let g = self.file;
        let t = g.tensor_info(name).ok_or_else(|| anyhow!("{}: tensor `{name}` (for {what}) not found", g.file()))?;
        let want: Vec<usize> = match experts {
            None => vec![cols, rows],
            Some(e) => vec![cols, rows, e],
        };
        if t.dims != want {
            bail!(
                "{}: tensor `{name}` (for {what}) has ggml dims {:?}, expected {want:?} ({}rows {rows} x cols {cols})",
                g.file(),
                t.dims,
                experts.map(|e| format!("experts {e} x ")).unwrap_or_default()
            );
        }
        let shape: Vec<usize> = match experts {
            None => vec![rows, cols],
            Some(e) => vec![e, rows, cols],
        };
        match t.ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => Ok(Weight::Dense(g.float_view(t, &shape)?)),
            ty => {
                let (data, _, _) = g.tensor_raw(name)?;
                Weight::gguf(data, ty, experts.unwrap_or(1), rows, cols)
                    .with_context(|| format!("{}: tensor `{name}`", g.file()))
            }
        }
    }
}

impl WeightSource for GgufSource<'_> {
    fn linear(&self, module: &str, rows: usize, cols: usize) -> Result<Weight> {
        let name = gguf_name(module)
            .ok_or_else(|| anyhow!("{}: no GGUF tensor name for module `{module}`", self.file.file()))?;
        self.weight(module, &name, None, rows, cols)
    }

    fn norm(&self, module: &str, n: usize) -> Result<Tensor> {
        let g = self.file;
        let name =
            gguf_name(module).ok_or_else(|| anyhow!("{}: no GGUF tensor name for module `{module}`", g.file()))?;
        let t =
            g.tensor_info(&name).ok_or_else(|| anyhow!("{}: tensor `{name}` (for {module}) not found", g.file()))?;
        if t.dims != [n] {
            bail!("{}: tensor `{name}` (for {module}) has ggml dims {:?}, expected [{n}]", g.file(), t.dims);
        }
        let v = g.float_view(t, &[n])?;
        if v.dtype() == DType::F32 {
            Ok(v)
        } else {
            v.to_f32().with_context(|| format!("{}: tensor `{name}`", g.file()))
        }
    }

    fn experts(&self, mlp: &str, proj: &str, experts: usize, rows: usize, cols: usize) -> Result<Weight> {
        let name = gguf_experts_name(mlp, proj)
            .ok_or_else(|| anyhow!("{}: no GGUF tensor name for the experts of `{mlp}` `{proj}`", self.file.file()))?;
        self.weight(&format!("{mlp}.experts.*.{proj}"), &name, Some(experts), rows, cols)
    }

    fn has(&self, module: &str) -> bool {
        gguf_name(module).is_some_and(|n| self.file.contains(&n))
    }
}

// ---- tokenizer ------------------------------------------------------------

const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` values fusebox reads.
pub const SUPPORTED_PRE: &str =
    "default, gpt2, llama-bpe, llama3, smollm, starcoder, refact, command-r, codeshell, qwen2, stablelm2";

/// The split regexes (each applied in turn, matches isolated) for a
/// `tokenizer.ggml.pre` value, and whether BPE merges are skipped for words
/// that are whole vocabulary entries (llama.cpp does so for Llama 3).
fn pre_regexes(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    Some(match pre {
        // llama.cpp's "default" regex set is meant for BPE vocabularies without a
        // known pre-tokenizer; the GPT-2 rule is what such vocabularies were trained with.
        "default" | "gpt2" | "mpt" | "olmo" | "jais" => (vec![GPT2_REGEX], false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" => (vec![r"\p{N}", GPT2_REGEX], false),
        "qwen2" | "stablelm2" => (vec![QWEN2_REGEX], false),
        "llama-bpe" | "llama3" | "llama-v3" => (vec![LLAMA3_REGEX], true),
        _ => return None,
    })
}

/// Whether the Hugging Face tokenizer for this pre-tokenizer normalizes its
/// input to NFC first (Qwen2/3 do; llama.cpp skips it, which only differs on
/// input that is not already NFC).
fn normalize_nfc(pre: &str) -> bool {
    pre == "qwen2"
}

/// The tokenizer carried in the metadata (`tokenizer.ggml.model == "gpt2"`,
/// byte-level BPE).
pub fn tokenizer(g: &GgufFile) -> Result<Tokenizer> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

    let file = g.file();
    let model = g.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!(
            "{file}: tokenizer model \"{}\" (`tokenizer.ggml.model`) is not supported \
             (fusebox reads \"gpt2\", byte-level BPE)",
            show(model)
        );
    }
    let pre = g.get_opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let (regexes, ignore_merges) = pre_regexes(pre).ok_or_else(|| {
        anyhow!(
            "{file}: pre-tokenizer \"{}\" (`tokenizer.ggml.pre`) is not supported (supported: {SUPPORTED_PRE})",
            show(pre)
        )
    })?;

    let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        bail!("{file}: metadata key `tokenizer.ggml.tokens` is empty");
    }
    let types = g.get_opt_int_array("tokenizer.ggml.token_type")?;
    if let Some(t) = &types {
        if t.len() != tokens.len() {
            bail!(
                "{file}: `tokenizer.ggml.token_type` has {} entries but `tokenizer.ggml.tokens` has {}",
                t.len(),
                tokens.len()
            );
        }
    }
    let mut vocab = Vocab::default();
    for (id, tok) in tokens.iter().enumerate() {
        // Keep the first id of a duplicated token string.
        vocab.entry(tok.to_string()).or_insert(id as u32);
    }
    let merges_src = g.get_opt_str_array("tokenizer.ggml.merges")?.unwrap_or_default();
    let mut merges = Vec::with_capacity(merges_src.len());
    for (i, m) in merges_src.iter().enumerate() {
        // Split at the first space after the first character (as llama.cpp does).
        let first = m.chars().next().map_or(0, char::len_utf8);
        let split = m.get(first..).and_then(|r| r.find(' ')).map(|p| p + first);
        let Some(p) = split else {
            bail!("{file}: `tokenizer.ggml.merges`[{i}] {m:?} is not two tokens separated by a space");
        };
        let (a, b) = (&m[..p], &m[p + 1..]);
        for part in [a, b] {
            if !vocab.contains_key(part) {
                bail!("{file}: `tokenizer.ggml.merges`[{i}] {m:?} refers to {part:?}, which is not in the vocabulary");
            }
        }
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| anyhow!("{file}: cannot build the BPE tokenizer from the metadata: {e}"))?;

    let mut tk = tokenizers::Tokenizer::new(bpe);
    let mut pres: Vec<PreTokenizerWrapper> = vec![];
    for re in &regexes {
        let split = Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| anyhow!("{file}: pre-tokenizer \"{pre}\": bad regex: {e}"))?;
        pres.push(split.into());
    }
    pres.push(ByteLevel::new(false, false, false).into());
    tk.with_pre_tokenizer(Some(Sequence::new(pres)));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    if normalize_nfc(pre) {
        tk.with_normalizer(Some(tokenizers::normalizers::unicode::NFC));
    }

    // Control (3) tokens are special; user-defined (4) ones are matched in text verbatim.
    if let Some(types) = &types {
        let mut added = vec![];
        for (tok, &ty) in tokens.iter().zip(types) {
            if tok.is_empty() {
                continue;
            }
            match ty {
                3 => added.push(AddedToken::from(*tok, true)),
                4 => added.push(AddedToken::from(*tok, false).normalized(false)),
                _ => {}
            }
        }
        tk.add_special_tokens(&added.iter().filter(|t| t.special).cloned().collect::<Vec<_>>());
        tk.add_tokens(&added.iter().filter(|t| !t.special).cloned().collect::<Vec<_>>());
    }

    let token_of = |key: &str| -> Result<Option<(String, u32)>> {
        let Some(id) = g.get_opt_u32(key)? else { return Ok(None) };
        let t = tokens
            .get(id as usize)
            .ok_or_else(|| anyhow!("{file}: `{key}` is {id}, outside the vocabulary of {} tokens", tokens.len()))?;
        if t.is_empty() || t.contains([' ', ':']) || t.starts_with('$') {
            bail!("{file}: `{key}` token {t:?} cannot be added automatically (it contains a space or a colon)");
        }
        Ok(Some((t.to_string(), id)))
    };
    let add_bos = g.get_opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = g.get_opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let bos = if add_bos { token_of("tokenizer.ggml.bos_token_id")? } else { None };
    let eos = if add_eos { token_of("tokenizer.ggml.eos_token_id")? } else { None };
    if bos.is_some() || eos.is_some() {
        let (mut single, mut pair) = (String::new(), String::new());
        let mut special = vec![];
        if let Some((t, id)) = &bos {
            single.push_str(&format!("{t}:0 "));
            special.push((t.clone(), *id));
        }
        single.push_str("$A:0");
        pair.push_str(&single);
        if let Some((t, id)) = &eos {
            single.push_str(&format!(" {t}:0"));
            pair.push_str(&format!(" {t}:0"));
            if !special.iter().any(|(s, _)| s == t) {
                special.push((t.clone(), *id));
            }
        }
        pair.push(' ');
        if let Some((t, _)) = &bos {
            pair.push_str(&format!("{t}:1 "));
        }
        pair.push_str("$B:1");
        if let Some((t, _)) = &eos {
            pair.push_str(&format!(" {t}:1"));
        }
        let post = TemplateProcessing::builder()
            .try_single(single)
            .and_then(|b| b.try_pair(pair))
            .map_err(|e| anyhow!("{file}: cannot build the BOS/EOS template: {e}"))?
            .special_tokens(special)
            .build()
            .map_err(|e| anyhow!("{file}: cannot build the BOS/EOS template: {e}"))?;
        tk.with_post_processor(Some(post));
    }
    Ok(Tokenizer::from_inner(tk))
}

/// `tokenizer.chat_template`, if the file carries one.
pub fn chat_template(g: &GgufFile) -> Option<String> {
    g.get("tokenizer.chat_template").and_then(MetaValue::as_str).map(str::to_string)
}
