//! Shaped, typed storage.
//!
//! A [`Tensor`] owns its storage on one device. On the host the bytes are
//! either owned (always 8-byte aligned) or a window into a memory-mapped
//! checkpoint file, so weights are never copied at load time. Backends get at
//! the bytes through [`Storage`]; model code only sees shapes and dtypes.

use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use memmap2::Mmap;

use crate::dtype::{bf16_to_f32, f16_to_f32, DType};

/// Host bytes with 8-byte alignment, so they can be viewed as any element type.
#[derive(Clone)]
pub struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    pub fn zeroed(len: usize) -> Self {
        AlignedBytes { words: vec![0u64; len.div_ceil(8)], len }
    }
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut a = Self::zeroed(bytes.len());
        a.bytes_mut().copy_from_slice(bytes);
        a
    }
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }
}

/// Where a tensor's bytes live.
#[derive(Clone)]
pub enum Storage {
    /// Owned host memory.
    Host(AlignedBytes),
    /// A read-only window `[offset, offset+len)` of a memory-mapped file.
    Mapped { map: Arc<Mmap>, offset: usize, len: usize },
    /// GPU memory. Cloning the tensor shares the buffer (the clone is a
    /// second handle, not a copy).
    Device(DeviceBuf),
}

/// A device allocation, freed when the last handle is dropped.
#[derive(Clone)]
pub struct DeviceBuf {
    /// The device address of the first byte.
    pub ptr: u64,
    /// Size in bytes.
    pub len: usize,
    /// The owner of the allocation (the backend's buffer type).
    pub owner: Arc<dyn std::any::Any + Send + Sync>,
}

/// An n-dimensional, row-major, contiguous tensor.
#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = match self.storage {
            Storage::Host(_) => "host",
            Storage::Mapped { .. } => "mapped",
            Storage::Device(_) => "device",
        };
        write!(f, "Tensor({:?}, {}, {place})", self.shape, self.dtype)
    }
}

fn numel_of(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// A zero-filled host tensor.
    pub fn zeros(shape: &[usize], dtype: DType) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Storage::Host(AlignedBytes::zeroed(numel_of(shape) * dtype.size())),
        }
    }

    /// A host tensor from raw little-endian bytes.
    pub fn from_bytes(shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Tensor> {
        ensure!(
            bytes.len() == numel_of(shape) * dtype.size(),
            "tensor of shape {shape:?} and dtype {dtype} needs {} bytes, got {}",
            numel_of(shape) * dtype.size(),
            bytes.len()
        );
        Ok(Tensor { shape: shape.to_vec(), dtype, storage: Storage::Host(AlignedBytes::from_slice(bytes)) })
    }

    pub fn from_f32(shape: &[usize], data: &[f32]) -> Result<Tensor> {
        Self::from_bytes(shape, DType::F32, bytemuck::cast_slice(data))
    }

    pub fn from_i32(shape: &[usize], data: &[i32]) -> Result<Tensor> {
        Self::from_bytes(shape, DType::I32, bytemuck::cast_slice(data))
    }

    /// A view into a memory-mapped file. If the window is not aligned to the
    /// element size, the bytes are copied into owned, aligned memory instead.
    pub fn from_mmap(map: Arc<Mmap>, offset: usize, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let len = numel_of(shape) * dtype.size();
        ensure!(offset + len <= map.len(), "tensor data [{offset}, {}) lies past the end of the file", offset + len);
        let aligned = (map.as_ptr() as usize + offset).is_multiple_of(dtype.size().max(4));
        let storage = if aligned {
            Storage::Mapped { map, offset, len }
        } else {
            Storage::Host(AlignedBytes::from_slice(&map[offset..offset + len]))
        };
        Ok(Tensor { shape: shape.to_vec(), dtype, storage })
    }

    /// A tensor in device memory (used by device backends).
    pub fn from_device(shape: &[usize], dtype: DType, buf: DeviceBuf) -> Result<Tensor> {
        ensure!(
            buf.len >= numel_of(shape) * dtype.size(),
            "device buffer of {} bytes is too small for {shape:?} {dtype}",
            buf.len
        );
        Ok(Tensor { shape: shape.to_vec(), dtype, storage: Storage::Device(buf) })
    }

    /// The device address of a device tensor.
    pub fn device_ptr(&self) -> Result<u64> {
        match &self.storage {
            Storage::Device(b) => Ok(b.ptr),
            _ => bail!("tensor {:?} {} is in host memory, expected it on the GPU", self.shape, self.dtype),
        }
    }

    /// True when the bytes live in device memory.
    pub fn is_device(&self) -> bool {
        matches!(self.storage, Storage::Device(_))
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        numel_of(&self.shape)
    }
    pub fn size_bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    /// The size of the last dimension (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
    /// Number of rows when viewed as `[numel / last_dim, last_dim]`.
    pub fn rows(&self) -> usize {
        self.numel() / self.last_dim().max(1)
    }

    /// Change the shape without touching the data (same element count).
    pub fn reshape(&mut self, shape: &[usize]) -> Result<()> {
        ensure!(
            numel_of(shape) == self.numel(),
            "cannot reshape {:?} ({} elements) to {shape:?}",
            self.shape,
            self.numel()
        );
        self.shape.clear();
        self.shape.extend_from_slice(shape);
        Ok(())
    }

    /// Host bytes, or an error for device storage.
    pub fn host_bytes(&self) -> Result<&[u8]> {
        match &self.storage {
            Storage::Host(b) => Ok(b.bytes()),
            Storage::Mapped { map, offset, len } => Ok(&map[*offset..*offset + *len]),
            Storage::Device(_) => {
                bail!("tensor {:?} {} is in GPU memory; read it through the backend", self.shape, self.dtype)
            }
        }
    }

    /// Mutable host bytes; mapped (read-only) tensors are refused.
    pub fn host_bytes_mut(&mut self) -> Result<&mut [u8]> {
        match &mut self.storage {
            Storage::Host(b) => Ok(b.bytes_mut()),
            Storage::Mapped { .. } => bail!("tensor {:?} is a read-only file mapping", self.shape),
            Storage::Device(_) => {
                bail!("tensor {:?} {} is in GPU memory; write it through the backend", self.shape, self.dtype)
            }
        }
    }

    fn check(&self, want: DType) -> Result<()> {
        ensure!(self.dtype == want, "expected a {want} tensor, got {} of shape {:?}", self.dtype, self.shape);
        Ok(())
    }

    pub fn as_f32(&self) -> Result<&[f32]> {
        self.check(DType::F32)?;
        Ok(bytemuck::cast_slice(self.host_bytes()?))
    }
    pub fn as_f32_mut(&mut self) -> Result<&mut [f32]> {
        self.check(DType::F32)?;
        Ok(bytemuck::cast_slice_mut(self.host_bytes_mut()?))
    }
    pub fn as_i32(&self) -> Result<&[i32]> {
        self.check(DType::I32)?;
        Ok(bytemuck::cast_slice(self.host_bytes()?))
    }
    pub fn as_i32_mut(&mut self) -> Result<&mut [i32]> {
        self.check(DType::I32)?;
        Ok(bytemuck::cast_slice_mut(self.host_bytes_mut()?))
    }
    /// Raw 16-bit words of an F16 or BF16 tensor.
    pub fn as_u16(&self) -> Result<&[u16]> {
        ensure!(matches!(self.dtype, DType::F16 | DType::BF16), "expected a 16-bit float tensor, got {}", self.dtype);
        Ok(bytemuck::cast_slice(self.host_bytes()?))
    }

    /// Raw 16-bit words of an F16 or BF16 tensor, writable.
    pub fn as_u16_mut(&mut self) -> Result<&mut [u16]> {
        ensure!(matches!(self.dtype, DType::F16 | DType::BF16), "expected a 16-bit float tensor, got {}", self.dtype);
        Ok(bytemuck::cast_slice_mut(self.host_bytes_mut()?))
    }

    /// Copy a host float tensor out as f32 values.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(match self.dtype {
            DType::F32 => self.as_f32()?.to_vec(),
            DType::BF16 => self.as_u16()?.iter().map(|&b| bf16_to_f32(b)).collect(),
            DType::F16 => self.as_u16()?.iter().map(|&b| f16_to_f32(b)).collect(),
            d => bail!("cannot read a {d} tensor as f32"),
        })
    }

    /// A host f32 copy of a float tensor (weights that ops want in f32).
    pub fn to_f32(&self) -> Result<Tensor> {
        Tensor::from_f32(&self.shape, &self.to_f32_vec()?)
    }
}
