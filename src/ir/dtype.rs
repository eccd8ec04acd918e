//! Element types: ONNX `TensorProto.DataType` codes, byte sizes, and safetensors names.

use std::fmt;

/// A tensor element type. Codes are ONNX's `TensorProto.DataType` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DataType {
    F32,
    U8,
    I8,
    U16,
    I16,
    I32,
    I64,
    String,
    Bool,
    F16,
    F64,
    U32,
    U64,
    Complex64,
    Complex128,
    BF16,
    F8E4M3FN,
    F8E4M3FNUZ,
    F8E5M2,
    F8E5M2FNUZ,
    U4,
    I4,
    F4E2M1,
    F8E8M0,
}

impl DataType {
    const ALL: [DataType; 24] = [
        DataType::F32,
        DataType::U8,
        DataType::I8,
        DataType::U16,
        DataType::I16,
        DataType::I32,
        DataType::I64,
        DataType::String,
        DataType::Bool,
        DataType::F16,
        DataType::F64,
        DataType::U32,
        DataType::U64,
        DataType::Complex64,
        DataType::Complex128,
        DataType::BF16,
        DataType::F8E4M3FN,
        DataType::F8E4M3FNUZ,
        DataType::F8E5M2,
        DataType::F8E5M2FNUZ,
        DataType::U4,
        DataType::I4,
        DataType::F4E2M1,
        DataType::F8E8M0,
    ];

    /// The ONNX code (1 = FLOAT, ..., 24 = FLOAT8E8M0).
    pub fn onnx_code(self) -> i32 {
        Self::ALL.iter().position(|d| *d == self).unwrap_or(0) as i32 + 1
    }

    pub fn from_onnx_code(code: i32) -> Option<DataType> {
        if code < 1 {
            return None;
        }
        Self::ALL.get(code as usize - 1).copied()
    }

    /// Bits per element; `None` for strings (variable length).
    pub fn bits(self) -> Option<u64> {
        use DataType::*;
        Some(match self {
            U4 | I4 | F4E2M1 => 4,
            U8 | I8 | Bool | F8E4M3FN | F8E4M3FNUZ | F8E5M2 | F8E5M2FNUZ | F8E8M0 => 8,
            U16 | I16 | F16 | BF16 => 16,
            F32 | I32 | U32 => 32,
            F64 | I64 | U64 | Complex64 => 64,
            Complex128 => 128,
            String => return None,
        })
    }

    /// Bytes needed for `numel` elements in ONNX raw-data layout (4-bit types pack two per byte).
    pub fn storage_bytes(self, numel: u64) -> Option<u64> {
        let bits = self.bits()?;
        numel.checked_mul(bits).map(|b| b.div_ceil(8))
    }

    pub fn is_float(self) -> bool {
        use DataType::*;
        matches!(
            self,
            F32 | F16 | BF16 | F64 | F8E4M3FN | F8E4M3FNUZ | F8E5M2 | F8E5M2FNUZ | F4E2M1 | F8E8M0
        )
    }

    pub fn is_integer(self) -> bool {
        use DataType::*;
        matches!(self, U8 | I8 | U16 | I16 | I32 | I64 | U32 | U64 | U4 | I4)
    }

    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<DataType> {
        use safetensors::Dtype as S;
        Some(match dtype {
            S::F32 => DataType::F32,
            S::F16 => DataType::F16,
            S::BF16 => DataType::BF16,
            S::F64 => DataType::F64,
            S::U8 => DataType::U8,
            S::I8 => DataType::I8,
            S::U16 => DataType::U16,
            S::I16 => DataType::I16,
            S::I32 => DataType::I32,
            S::U32 => DataType::U32,
            S::I64 => DataType::I64,
            S::U64 => DataType::U64,
            S::BOOL => DataType::Bool,
            S::F8_E4M3 => DataType::F8E4M3FN,
            S::F8_E5M2 => DataType::F8E5M2,
            _ => return None,
        })
    }

    pub fn to_safetensors(self) -> Option<safetensors::Dtype> {
        use safetensors::Dtype as S;
        Some(match self {
            DataType::F32 => S::F32,
            DataType::F16 => S::F16,
            DataType::BF16 => S::BF16,
            DataType::F64 => S::F64,
            DataType::U8 => S::U8,
            DataType::I8 => S::I8,
            DataType::U16 => S::U16,
            DataType::I16 => S::I16,
            DataType::I32 => S::I32,
            DataType::U32 => S::U32,
            DataType::I64 => S::I64,
            DataType::U64 => S::U64,
            DataType::Bool => S::BOOL,
            DataType::F8E4M3FN => S::F8_E4M3,
            DataType::F8E5M2 => S::F8_E5M2,
            _ => return None,
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use DataType::*;
        let name = match self {
            F32 => "f32",
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            I32 => "i32",
            I64 => "i64",
            String => "string",
            Bool => "bool",
            F16 => "f16",
            F64 => "f64",
            U32 => "u32",
            U64 => "u64",
            Complex64 => "complex64",
            Complex128 => "complex128",
            BF16 => "bf16",
            F8E4M3FN => "f8e4m3fn",
            F8E4M3FNUZ => "f8e4m3fnuz",
            F8E5M2 => "f8e5m2",
            F8E5M2FNUZ => "f8e5m2fnuz",
            U4 => "u4",
            I4 => "i4",
            F4E2M1 => "f4e2m1",
            F8E8M0 => "f8e8m0",
        };
        f.write_str(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onnx_codes_match_the_spec() {
        assert_eq!(DataType::F32.onnx_code(), 1);
        assert_eq!(DataType::I64.onnx_code(), 7);
        assert_eq!(DataType::F16.onnx_code(), 10);
        assert_eq!(DataType::BF16.onnx_code(), 16);
        assert_eq!(DataType::F8E4M3FN.onnx_code(), 17);
        assert_eq!(DataType::I4.onnx_code(), 22);
        assert_eq!(DataType::F8E8M0.onnx_code(), 24);
        for code in 1..=24 {
            assert_eq!(DataType::from_onnx_code(code).unwrap().onnx_code(), code);
        }
        assert_eq!(DataType::from_onnx_code(0), None);
        assert_eq!(DataType::from_onnx_code(99), None);
    }

    #[test]
    fn storage_sizes() {
        assert_eq!(DataType::F32.storage_bytes(3), Some(12));
        assert_eq!(DataType::I4.storage_bytes(3), Some(2));
        assert_eq!(DataType::String.storage_bytes(3), None);
        assert_eq!(DataType::F64.storage_bytes(u64::MAX), None);
    }
}
