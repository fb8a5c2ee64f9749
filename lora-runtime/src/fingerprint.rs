//! [`BaseFingerprint`]: what an adapter file records about the base weight of one target, so
//! that an adapter is not silently loaded onto a different base model.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

use crate::error::LayerResult;

/// What an adapter file records about the base weight of one target: its stored shape and dtype
/// and a 64-bit [XXH3](https://xxhash.com) hash of its little-endian bytes in row-major order
/// (in Python: `xxhash.xxh3_64_hexdigest(weight.contiguous().numpy().tobytes())`).
///
/// It detects an adapter loaded onto the wrong base model (a different checkpoint, a different
/// fine-tune); it is not a defence against a forger. Written as metadata
/// `lora.base_fingerprint.<module path>` = `"<dims joined by x> <dtype> xxh3:<16 hex digits>"`,
/// e.g. `"64x32 f32 xxh3:0123456789abcdef"`. Hashing a 4096 x 4096 f32 weight (64 MiB) takes
/// about 15 ms on one core (it runs at memory speed).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use lora_runtime::BaseFingerprint;
/// let w = Tensor::zeros((4, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let fp = BaseFingerprint::of(&w)?;
/// assert_eq!(fp.shape, [4, 3]);
/// assert_eq!(BaseFingerprint::parse(&fp.to_string()), Some(fp));
/// # Ok::<(), lora_runtime::LayerError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseFingerprint {
    /// The weight's shape as stored (`[out, in]`, or `[in, out]` with `fan_in_fan_out`).
    pub shape: Vec<usize>,
    /// The stored type: a float dtype (`f32`, `f16`, `bf16`, `f64`) or, for a tensor of a GGUF
    /// file, its GGML type (`q4_1`, `q8_0`, `q4k`, ...), lowercase.
    pub dtype: String,
    /// XXH3-64 of the weight's little-endian bytes.
    pub hash: u64,
}

impl BaseFingerprint {
    /// The fingerprint of `weight` (copied to the CPU when it lives elsewhere).
    ///
    /// # Errors
    /// A candle error when the tensor cannot be read.
    pub fn of(weight: &Tensor) -> LayerResult<Self> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let cpu = weight.to_device(&Device::Cpu)?.contiguous()?;
        {
            let (storage, layout) = cpu.storage_and_layout();
            // `contiguous()` above makes the layout contiguous, so this always has offsets.
            let Some((start, end)) = layout.contiguous_offsets() else {
                return Err(
                    candle_core::Error::msg("fingerprint: weight is not contiguous").into(),
                );
            };
            match &*storage {
                Storage::Cpu(CpuStorage::F32(v)) => {
                    hash_le(&mut hasher, &v[start..end], |x| x.to_le_bytes())
                }
                Storage::Cpu(CpuStorage::F16(v)) => {
                    hash_le(&mut hasher, &v[start..end], |x| x.to_le_bytes())
                }
                Storage::Cpu(CpuStorage::BF16(v)) => {
                    hash_le(&mut hasher, &v[start..end], |x| x.to_le_bytes())
                }
                Storage::Cpu(CpuStorage::F64(v)) => {
                    hash_le(&mut hasher, &v[start..end], |x| x.to_le_bytes())
                }
                _ => {
                    drop(storage);
                    let values = cpu.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                    hash_le(&mut hasher, &values, |x| x.to_le_bytes());
                }
            }
        }
        Ok(Self {
            shape: weight.dims().to_vec(),
            dtype: weight.dtype().as_str().to_string(),
            hash: hasher.digest(),
        })
    }

    /// The fingerprint of a tensor as a file stores it: its shape, its stored type (see
    /// [`dtype`](Self::dtype)) and the XXH3 of its bytes, for bases whose file bytes are not the
    /// weight in memory (a GGUF tensor dequantized on load).
    pub fn of_stored(shape: &[usize], stored_type: &str, hash: u64) -> Self {
        Self {
            shape: shape.to_vec(),
            dtype: stored_type.to_string(),
            hash,
        }
    }

    /// Parses the metadata form written by [`Display`](std::fmt::Display); `None` when malformed.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        let (dims, dtype, hash) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let shape = dims
            .split('x')
            .map(|d| d.parse::<usize>().ok())
            .collect::<Option<Vec<_>>>()?;
        if !STORED_TYPES.contains(&dtype) {
            return None;
        }
        let dtype = dtype.to_string();
        let hex = hash.strip_prefix("xxh3:").filter(|h| h.len() == 16)?;
        let hash = u64::from_str_radix(hex, 16).ok()?;
        Some(Self { shape, dtype, hash })
    }

    /// Whether `other` (the model's weight) may be the base this fingerprint was taken from:
    /// same shape and, when the dtypes agree, the same hash. A different dtype is a legitimate
    /// cast of the same base (trained in f32, served in bf16) whose bytes differ, so then only
    /// the shape is compared.
    pub fn matches(&self, other: &Self) -> bool {
        self.shape == other.shape && (self.dtype != other.dtype || self.hash == other.hash)
    }
}

/// Feeds the little-endian bytes of `values` to `hasher`: on little-endian machines the memory
/// itself, elsewhere through a small buffer (never a copy of the whole tensor).
fn hash_le<T: bytemuck::Pod, const N: usize>(
    hasher: &mut xxhash_rust::xxh3::Xxh3,
    values: &[T],
    le: impl Fn(&T) -> [u8; N],
) {
    if cfg!(target_endian = "little") {
        hasher.update(bytemuck::cast_slice(values));
        return;
    }
    let mut buf = [0u8; 1 << 16];
    for chunk in values.chunks(buf.len() / N.max(1)) {
        let n = chunk.len() * N;
        for (dst, x) in buf[..n].chunks_exact_mut(N).zip(chunk) {
            dst.copy_from_slice(&le(x));
        }
        hasher.update(&buf[..n]);
    }
}

/// The stored types a fingerprint may name: candle's float dtypes and GGML's types.
const STORED_TYPES: &[&str] = &[
    "f32", "f16", "bf16", "f64", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1", "q2k", "q3k",
    "q4k", "q5k", "q6k", "q8k",
];

impl std::fmt::Display for BaseFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(usize::to_string).collect();
        write!(
            f,
            "{} {} xxh3:{:016x}",
            dims.join("x"),
            self.dtype,
            self.hash
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_parsing_refuses_malformed_text() {
        for bad in [
            "",
            "6x5 f32",
            "6x5 f32 xxh3:0123",
            "6xx5 f32 xxh3:0123456789abcdef",
            "6x5 u8 xxh3:0123456789abcdef",
            "6x5 f32 sha:0123456789abcdef",
            "6x5 f32 xxh3:0123456789abcdeg",
            "6x5 f32 xxh3:0123456789abcdef extra",
        ] {
            assert_eq!(BaseFingerprint::parse(bad), None, "{bad}");
        }
        let fp = BaseFingerprint {
            shape: vec![6, 5],
            dtype: "bf16".into(),
            hash: 0xabc,
        };
        assert_eq!(fp.to_string(), "6x5 bf16 xxh3:0000000000000abc");
        assert_eq!(BaseFingerprint::parse(&fp.to_string()), Some(fp));
    }

    /// The cost of a fingerprint of a 4096 x 4096 f32 weight (run with `--ignored --nocapture`
    /// in release mode).
    #[test]
    #[ignore]
    fn fingerprint_cost() {
        let w = Tensor::randn(0f32, 1.0, (4096, 4096), &Device::Cpu).unwrap();
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let fp = BaseFingerprint::of(&w).unwrap();
            println!("fingerprint of 4096x4096 f32: {:?} ({fp})", t.elapsed());
        }
    }
}
