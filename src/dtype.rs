//! Conversion between the floating-point storage types of a checkpoint (F32, F16, BF16, little
//! endian) and the `f64` values the decompositions work in.

use half::{bf16, f16};
use safetensors::Dtype;

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

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::F16 | FloatType::BF16 => 2,
        }
    }

    /// Decodes little-endian bytes (whose length is a multiple of [`Self::size`]) into `f64`.
    pub fn decode(self, bytes: &[u8]) -> Vec<f64> {
        match self {
            FloatType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            FloatType::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            FloatType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
        }
    }

    /// Encodes values, rounding each to the nearest representable value of this type.
    pub fn encode(self, values: &[f64]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.size());
        match self {
            FloatType::F32 => values
                .iter()
                .for_each(|&v| out.extend_from_slice(&(v as f32).to_le_bytes())),
            FloatType::F16 => values
                .iter()
                .for_each(|&v| out.extend_from_slice(&f16::from_f64(v).to_le_bytes())),
            FloatType::BF16 => values
                .iter()
                .for_each(|&v| out.extend_from_slice(&bf16::from_f64(v).to_le_bytes())),
        }
        out
    }
}

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
