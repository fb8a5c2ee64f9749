//! The GGUF container as this crate rewrites it: the header read in its stored order (the
//! metadata section kept byte for byte, the tensor names in order), GGML type names and ids, and
//! a writer that lays tensors out at the file's alignment.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use candle_core::quantized::GgmlDType;

use crate::error::{ModelError, Result};

/// The alignment of tensor data when the file does not set `general.alignment`.
pub(crate) const DEFAULT_ALIGNMENT: u64 = 32;

/// The parts of a GGUF header kept as stored.
pub(crate) struct RawHeader {
    /// The number of metadata entries.
    pub(crate) kv_count: u64,
    /// Every metadata entry (key, type, value), byte for byte.
    pub(crate) kv_bytes: Vec<u8>,
    /// The tensor names in the order the file lists them.
    pub(crate) tensor_order: Vec<String>,
}

/// Nested arrays deeper than this are refused (candle's reader refuses them too).
const MAX_DEPTH: usize = 64;

struct Cursor<'a, R> {
    r: &'a mut R,
    path: &'a Path,
}

impl<R: Read + Seek> Cursor<'_, R> {
    fn bad(&self, reason: impl Into<String>) -> ModelError {
        ModelError::Unsupported {
            path: self.path.to_path_buf(),
            field: "header".into(),
            reason: reason.into(),
        }
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|e| self.bad(format!("truncated header: {e}")))?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        let n = i64::try_from(n).map_err(|_| self.bad("a length does not fit in the file"))?;
        self.r
            .seek(SeekFrom::Current(n))
            .map_err(|e| self.bad(format!("truncated header: {e}")))?;
        Ok(())
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        if len > 1 << 30 {
            return Err(self.bad(format!("a string of {len} bytes")));
        }
        let mut v = vec![0u8; len as usize];
        self.r
            .read_exact(&mut v)
            .map_err(|e| self.bad(format!("truncated header: {e}")))?;
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    /// Skips one value of GGUF value type `ty`.
    fn skip_value(&mut self, ty: u32, depth: usize) -> Result<()> {
        match ty {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => {
                let len = self.u64()?;
                self.skip(len)
            }
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.bad("arrays nested too deeply"));
                }
                let elem = self.u32()?;
                let n = self.u64()?;
                match elem {
                    0 | 1 | 7 => self.skip(n),
                    2 | 3 => self.skip(n.saturating_mul(2)),
                    4..=6 => self.skip(n.saturating_mul(4)),
                    10..=12 => self.skip(n.saturating_mul(8)),
                    _ => (0..n).try_for_each(|_| self.skip_value(elem, depth + 1)),
                }
            }
            other => Err(self.bad(format!("unknown metadata value type {other}"))),
        }
    }
}

/// Reads the header of the GGUF file `path` keeping its order (versions 2 and 3).
///
/// # Errors
/// [`ModelError::Unsupported`] naming the file's header: not GGUF, version 1, truncated.
pub(crate) fn read_raw_header(file: &mut File, path: &Path) -> Result<RawHeader> {
    file.seek(SeekFrom::Start(0))
        .map_err(|e| ModelError::io(path, e))?;
    let mut reader = BufReader::new(&mut *file);
    let mut c = Cursor {
        r: &mut reader,
        path,
    };
    if &c.bytes::<4>()? != b"GGUF" {
        return Err(c.bad("no `GGUF` magic"));
    }
    let version = c.u32()?;
    if !matches!(version, 2 | 3) {
        return Err(c.bad(format!(
            "GGUF version {version}: only versions 2 and 3 can be rewritten"
        )));
    }
    let tensor_count = c.u64()?;
    let kv_count = c.u64()?;
    let kv_start = c.r.stream_position().map_err(|e| ModelError::io(path, e))?;
    for _ in 0..kv_count {
        let _key = c.string()?;
        let ty = c.u32()?;
        c.skip_value(ty, 0)?;
    }
    let kv_end = c.r.stream_position().map_err(|e| ModelError::io(path, e))?;
    let mut tensor_order = Vec::new();
    for _ in 0..tensor_count {
        let name = c.string()?;
        let dims = c.u32()?;
        c.skip(u64::from(dims) * 8 + 4 + 8)?;
        tensor_order.push(name);
    }
    let mut kv_bytes = vec![0u8; (kv_end - kv_start) as usize];
    reader
        .seek(SeekFrom::Start(kv_start))
        .and_then(|_| reader.read_exact(&mut kv_bytes))
        .map_err(|e| ModelError::io(path, e))?;
    Ok(RawHeader {
        kv_count,
        kv_bytes,
        tensor_order,
    })
}

/// llama.cpp's name of a GGML type: `f32`, `q4_1`, `q4_k`, ...
pub fn type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q2K => "q2_k",
        GgmlDType::Q3K => "q3_k",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q5K => "q5_k",
        GgmlDType::Q6K => "q6_k",
        GgmlDType::Q8K => "q8_k",
    }
}

/// The id GGUF stores for a GGML type (`ggml_type` in `ggml.h`).
fn type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// The bytes of `elems` values stored as `t` (`elems` a multiple of its block size).
pub(crate) fn data_size(t: GgmlDType, elems: usize) -> u64 {
    (elems / t.block_size().max(1) * t.type_size()) as u64
}

/// A tensor of a file being written: name, candle-order dims, type.
pub(crate) struct TensorEntry {
    pub(crate) name: String,
    pub(crate) dims: Vec<usize>,
    pub(crate) dtype: GgmlDType,
}

impl TensorEntry {
    pub(crate) fn size(&self) -> u64 {
        data_size(self.dtype, self.dims.iter().product())
    }
}

fn padding(len: u64, alignment: u64) -> u64 {
    len.div_ceil(alignment) * alignment - len
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends a string metadata entry to a metadata section.
pub(crate) fn put_kv_string(out: &mut Vec<u8>, key: &str, value: &str) {
    put_string(out, key);
    out.extend_from_slice(&8u32.to_le_bytes());
    put_string(out, value);
}

/// Appends an f32 metadata entry to a metadata section.
pub(crate) fn put_kv_f32(out: &mut Vec<u8>, key: &str, value: f32) {
    put_string(out, key);
    out.extend_from_slice(&6u32.to_le_bytes());
    out.extend_from_slice(&value.to_le_bytes());
}

/// Writes a GGUF v3 header (the metadata section as given, then `tensors` with data offsets at
/// `alignment`) and the padding up to the data section.
pub(crate) fn write_header(
    w: &mut impl Write,
    kv_count: u64,
    kv_bytes: &[u8],
    tensors: &[TensorEntry],
    alignment: u64,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(kv_bytes.len() + 64 * tensors.len() + 24);
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&kv_count.to_le_bytes());
    head.extend_from_slice(kv_bytes);
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut head, &t.name);
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            head.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        head.extend_from_slice(&type_id(t.dtype).to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset += t.size() + padding(t.size(), alignment);
    }
    let pad = padding(head.len() as u64, alignment);
    head.resize(head.len() + pad as usize, 0);
    w.write_all(&head)
}

/// Writes one tensor's data and the padding after it.
pub(crate) fn write_data(w: &mut impl Write, data: &[u8], alignment: u64) -> std::io::Result<()> {
    w.write_all(data)?;
    let pad = padding(data.len() as u64, alignment);
    w.write_all(&vec![0u8; pad as usize])
}
