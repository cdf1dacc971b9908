//! Conversion between the floating-point storage types of a checkpoint (F32, F16, BF16, little
//! endian) and the `f64` values the decompositions work in.

use crate::error::{Error, Result};
use faer::{MatMut, MatRef};
use half::{bf16, f16};
use safetensors::Dtype;
use std::path::Path;

/// The element types a decomposed tensor may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl FloatType {
    /// The float type of a safetensors dtype, if it is one this tool decomposes.
    pub fn from_dtype(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(FloatType::F32),
            Dtype::F16 => Some(FloatType::F16),
            Dtype::BF16 => Some(FloatType::BF16),
            _ => None,
        }
    }

    /// The float type of a tensor, or [`Error::UnsupportedDtype`] naming the file, the tensor and
    /// what was to be done with it (`purpose`: `decomposed`, `expanded`, `evaluated`).
    pub fn of_tensor(
        dtype: Dtype,
        path: &Path,
        tensor: &str,
        purpose: &'static str,
    ) -> Result<Self> {
        Self::from_dtype(dtype).ok_or_else(|| Error::UnsupportedDtype {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            dtype: format!("{dtype:?}"),
            purpose,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::F16 | FloatType::BF16 => 2,
        }
    }

    /// The value of one little-endian element (`b` holds at least [`Self::size`] bytes): the
    /// reference decoder. The bulk decoders ([`Self::decode_slice`], [`Self::decode_f32_into`])
    /// match the type once per call instead of per element and give the same values (tested).
    #[inline]
    fn value(self, b: &[u8]) -> f64 {
        match self {
            FloatType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            FloatType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f64(),
            FloatType::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        }
    }

    /// Writes `v`, rounded to the nearest value of this type, into `out` (at least
    /// [`Self::size`] bytes): the one encoder.
    #[inline]
    fn put(self, v: f64, out: &mut [u8]) {
        match self {
            FloatType::F32 => out[..4].copy_from_slice(&(v as f32).to_le_bytes()),
            FloatType::F16 => out[..2].copy_from_slice(&f16::from_f64(v).to_le_bytes()),
            FloatType::BF16 => out[..2].copy_from_slice(&bf16::from_f64(v).to_le_bytes()),
        }
    }

    /// Decodes little-endian bytes (whose length is a multiple of [`Self::size`]) into `f64`.
    pub fn decode(self, bytes: &[u8]) -> Vec<f64> {
        let mut out = vec![0f64; bytes.len() / self.size()];
        self.decode_slice(bytes, &mut out);
        out
    }

    /// Decodes little-endian bytes into `f32` (exact for F16 and BF16), for the forward pass.
    pub fn decode_f32(self, bytes: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; bytes.len() / self.size()];
        self.decode_f32_into(bytes, &mut out);
        out
    }

    /// Decodes little-endian `bytes` into `out` as `f32` (exactly `out.len()` elements; the same
    /// values as [`Self::value`], exact for every type): the forward pass decodes every weight
    /// this way.
    pub fn decode_f32_into(self, bytes: &[u8], out: &mut [f32]) {
        self.decode_widened(bytes, out, |x| x);
    }

    /// The bulk decoder: every element decoded to `f32` (exact for every type) and widened by
    /// `widen`, with the type matched once rather than per element.
    #[inline]
    fn decode_widened<T>(self, bytes: &[u8], out: &mut [T], widen: impl Fn(f32) -> T) {
        let pairs = out.iter_mut().zip(bytes.chunks_exact(self.size()));
        match self {
            FloatType::F32 => {
                pairs.for_each(|(o, c)| *o = widen(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            }
            FloatType::F16 => {
                pairs.for_each(|(o, c)| *o = widen(f16::from_le_bytes([c[0], c[1]]).to_f32()))
            }
            FloatType::BF16 => {
                pairs.for_each(|(o, c)| *o = widen(bf16::from_le_bytes([c[0], c[1]]).to_f32()))
            }
        }
    }

    /// Encodes values, rounding each to the nearest representable value of this type.
    pub fn encode(self, values: &[f64]) -> Vec<u8> {
        let mut out = vec![0u8; values.len() * self.size()];
        for (&v, o) in values.iter().zip(out.chunks_exact_mut(self.size())) {
            self.put(v, o);
        }
        out
    }

    /// Decodes little-endian `bytes` into `out` (exactly `out.len()` elements): the same values as
    /// [`Self::value`], with the type matched once rather than per element.
    pub fn decode_slice(self, bytes: &[u8], out: &mut [f64]) {
        self.decode_widened(bytes, out, f64::from);
    }

    /// The value at element `index` of little-endian `bytes`.
    #[inline]
    pub fn decode_at(self, bytes: &[u8], index: usize) -> f64 {
        self.value(&bytes[index * self.size()..])
    }

    /// Decodes row-major `bytes` (exactly `out.nrows() * out.ncols()` elements) into `out`, a block
    /// of rows at a time so that both sides are read and written in cache-friendly runs.
    pub fn decode_into(self, bytes: &[u8], mut out: MatMut<'_, f64>) {
        let (rows, cols) = (out.nrows(), out.ncols());
        let size = self.size();
        let mut block = vec![0f64; ROW_BLOCK.min(rows) * cols];
        for r0 in (0..rows).step_by(ROW_BLOCK) {
            let r1 = (r0 + ROW_BLOCK).min(rows);
            let block = &mut block[..(r1 - r0) * cols];
            self.decode_slice(&bytes[r0 * cols * size..r1 * cols * size], block);
            for j in 0..cols {
                for i in r0..r1 {
                    out[(i, j)] = block[(i - r0) * cols + j];
                }
            }
        }
    }

    /// Encodes a matrix in row-major order, rounding each value to this type.
    pub fn encode_rows(self, m: MatRef<'_, f64>) -> Vec<u8> {
        let (rows, cols) = (m.nrows(), m.ncols());
        let size = self.size();
        let mut out = vec![0u8; rows * cols * size];
        for r0 in (0..rows).step_by(ROW_BLOCK) {
            let r1 = (r0 + ROW_BLOCK).min(rows);
            for j in 0..cols {
                for i in r0..r1 {
                    let at = (i * cols + j) * size;
                    self.put(m[(i, j)], &mut out[at..]);
                }
            }
        }
        out
    }
}

/// Rows converted together by [`FloatType::decode_into`] and [`FloatType::encode_rows`].
const ROW_BLOCK: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_representable_values() {
        let values = [0.0, 1.0, -2.5, 0.15625, 1024.0, -0.0078125];
        for t in [FloatType::F32, FloatType::F16, FloatType::BF16] {
            assert_eq!(t.decode(&t.encode(&values)), values, "{t:?}");
        }
    }

    #[test]
    fn matrix_round_trip_matches_the_flat_codecs() {
        let (rows, cols) = (37, 5);
        let values: Vec<f64> = (0..rows * cols)
            .map(|k| (k as f64 * 0.37).sin() * 3.0)
            .collect();
        let m = faer::Mat::from_fn(rows, cols, |i, j| values[i * cols + j]);
        for t in [FloatType::F32, FloatType::F16, FloatType::BF16] {
            let bytes = t.encode_rows(m.as_ref());
            assert_eq!(bytes, t.encode(&values), "{t:?}");
            let mut back = faer::Mat::<f64>::zeros(rows, cols);
            t.decode_into(&bytes, back.as_mut());
            let flat = t.decode(&bytes);
            let mut sliced = vec![0.0; flat.len()];
            t.decode_slice(&bytes, &mut sliced);
            assert_eq!(sliced, flat);
            for i in 0..rows {
                for j in 0..cols {
                    assert_eq!(back[(i, j)], flat[i * cols + j]);
                    assert_eq!(t.decode_at(&bytes, i * cols + j), flat[i * cols + j]);
                }
            }
        }
    }

    #[test]
    fn fast_decoding_agrees_with_the_one_decoder() {
        // Every 16-bit pattern (F16 and BF16: subnormals, infinities and NaNs included), and F32
        // patterns spread over the exponents.
        let halves: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
        let singles: Vec<u8> = (0..=u16::MAX)
            .flat_map(|b| (u32::from(b) * 65_537).to_le_bytes())
            .collect();
        for (t, bytes) in [
            (FloatType::F16, &halves),
            (FloatType::BF16, &halves),
            (FloatType::F32, &singles),
        ] {
            let (fast, wide) = (t.decode_f32(bytes), t.decode(bytes));
            for (i, c) in bytes.chunks_exact(t.size()).enumerate() {
                let want = t.value(c);
                assert!(
                    fast[i].to_bits() == (want as f32).to_bits()
                        || (fast[i].is_nan() && want.is_nan()),
                    "{t:?} element {i}: {} vs {want}",
                    fast[i]
                );
                assert!(
                    wide[i].to_bits() == want.to_bits() || (wide[i].is_nan() && want.is_nan()),
                    "{t:?} element {i}: {} vs {want}",
                    wide[i]
                );
            }
        }
    }

    #[test]
    fn golden_bytes() {
        assert_eq!(FloatType::F32.encode(&[1.0]), vec![0x00, 0x00, 0x80, 0x3f]);
        assert_eq!(FloatType::F16.encode(&[1.0]), vec![0x00, 0x3c]);
        assert_eq!(FloatType::BF16.encode(&[1.0]), vec![0x80, 0x3f]);
        // 1 + 2^-8 + 2^-9 rounds up in bf16 (7 mantissa bits) to 1 + 2^-7.
        let v = 1.0 + 1.0 / 256.0 + 1.0 / 512.0;
        assert_eq!(
            FloatType::BF16.decode(&FloatType::BF16.encode(&[v])),
            vec![1.0 + 1.0 / 128.0]
        );
    }
}
