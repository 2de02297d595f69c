//! GGUF reader: header, metadata and tensor directory, with tensor data borrowed from the
//! file's bytes. Every failure names the file and what is wrong (truncated where, bad magic,
//! an unknown value or tensor type, a tensor outside the file).
//!
//! Written here rather than taken from a crate: the format is small, and weave wants precise
//! errors for truncated and corrupt files, which the small GGUF crates available don't give.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a GGUF file (magic {found:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: [u8; 4] },
    #[error("{path}: GGUF version {0} is not supported (2 and 3 are)", .version)]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: truncated: {what} at byte {offset} runs past the end of the file ({len} bytes)")]
    Truncated { path: PathBuf, what: String, offset: usize, len: usize },
    #[error("{path}: corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: metadata key {key} is missing")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key {key} has the wrong type (expected {expected})")]
    KeyType { path: PathBuf, key: String, expected: &'static str },
    #[error("{path}: tensor {name} is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name} has shape {shape:?}, expected {expected:?}")]
    Shape { path: PathBuf, name: String, shape: Vec<u64>, expected: Vec<u64> },
    #[error("{path}: tensor {name} is stored as {ty}, which weave cannot dequantize (supported: {supported})", supported = super::blocks::supported())]
    UnsupportedType { path: PathBuf, name: String, ty: String },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// A ggml tensor storage type, by its number in the file. The types weave reads are named
/// constants (`GgmlType::Q4_K`), each defined beside its layout in [`super::blocks`]; any other
/// number is kept as it is, so that an error can name it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub fn from_u32(t: u32) -> GgmlType {
        GgmlType(t)
    }
    /// The type's ggml number, as a GGUF file stores it.
    pub fn id(self) -> u32 {
        self.0
    }
    /// (elements per block, bytes per block), for the types weave reads.
    pub fn block(self) -> Option<(usize, usize)> {
        super::blocks::of(self).map(|b| b.shape())
    }
    /// ggml's name for the type, for the ones weave does not read too.
    pub fn name(self) -> String {
        if let Some(b) = super::blocks::of(self) {
            return b.name().into();
        }
        let known = [
            (9, "Q8_1"),
            (10, "Q2_K"),
            (11, "Q3_K"),
            (15, "Q8_K"),
            (16, "IQ2_XXS"),
            (17, "IQ2_XS"),
            (18, "IQ3_XXS"),
            (19, "IQ1_S"),
            (20, "IQ4_NL"),
            (21, "IQ3_S"),
            (22, "IQ2_S"),
            (23, "IQ4_XS"),
            (29, "IQ1_M"),
            (34, "TQ1_0"),
            (35, "TQ2_0"),
        ];
        known.iter().find(|k| k.0 == self.0).map_or(format!("ggml type {}", self.0), |k| k.1.to_string())
    }
}

impl std::fmt::Debug for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (innermost) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte range of the data in the file (checked to lie inside it for readable types).
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    pub fn num_elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
}

/// A parsed GGUF file held in memory.
#[derive(Debug)]
pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    bytes: Vec<u8>,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(|| GgufError::Truncated {
            path: self.path.into(),
            what: what.into(),
            offset: self.pos,
            len: self.b.len(),
        })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        if n > self.b.len() as u64 {
            return Err(self.corrupt(format!("{what} claims a length of {n} bytes at byte {}", self.pos - 8)));
        }
        let s = self.take(n as usize, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.corrupt(format!("{what} is not UTF-8")))
    }
    fn corrupt(&self, what: String) -> GgufError {
        GgufError::Corrupt { path: self.path.into(), what }
    }
    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value, GgufError> {
        let what = format!("value of {key}");
        Ok(match ty {
            0 => Value::U64(self.take(1, &what)?[0] as u64),
            1 => Value::I64(self.take(1, &what)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.take(2, &what)?.try_into().expect("2")) as u64),
            3 => Value::I64(i16::from_le_bytes(self.take(2, &what)?.try_into().expect("2")) as i64),
            4 => Value::U64(self.u32(&what)? as u64),
            5 => Value::I64(self.u32(&what)? as i32 as i64),
            6 => Value::F64(f32::from_bits(self.u32(&what)?) as f64),
            7 => Value::Bool(self.take(1, &what)?[0] != 0),
            8 => Value::Str(self.string(&what)?),
            9 if depth < 4 => {
                let ity = self.u32(&what)?;
                let n = self.u64(&what)?;
                if n > (self.b.len() - self.pos) as u64 {
                    return Err(self.corrupt(format!("array {key} claims {n} items, more than the file holds")));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ity, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(&what)?),
            11 => Value::I64(self.u64(&what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(&what)?)),
            other => return Err(self.corrupt(format!("metadata key {key} has unknown value type {other}"))),
        })
    }
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf, GgufError> {
        let bytes = std::fs::read(path).map_err(|source| GgufError::Io { path: path.into(), source })?;
        Self::parse(path, bytes)
    }

    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Gguf, GgufError> {
        let mut c = Cursor { b: &bytes, pos: 0, path };
        let magic: [u8; 4] = c.take(4, "magic")?.try_into().expect("4");
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic { path: path.into(), found: magic });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version { path: path.into(), version });
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        if n_tensors > 1 << 24 || n_kv > 1 << 24 {
            return Err(c.corrupt(format!("implausible counts: {n_tensors} tensors, {n_kv} metadata keys")));
        }
        let mut metadata = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("type of {key}"))?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor name #{i}"))?;
            let nd = c.u32(&format!("dimensions of {name}"))?;
            if nd == 0 || nd > 4 {
                return Err(c.corrupt(format!("tensor {name} has {nd} dimensions")));
            }
            let dims = (0..nd).map(|_| c.u64(&format!("shape of {name}"))).collect::<Result<Vec<_>, _>>()?;
            let ty = GgmlType::from_u32(c.u32(&format!("type of {name}"))?);
            let off = c.u64(&format!("offset of {name}"))?;
            raw.push((name, dims, ty, off));
        }
        let align = metadata.get("general.alignment").and_then(Value::as_u64).unwrap_or(32) as usize;
        if align == 0 || !align.is_power_of_two() {
            return Err(c.corrupt(format!("general.alignment is {align}")));
        }
        let data_start = c.pos.div_ceil(align) * align;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ty, off) in raw {
            let n: u64 = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| c.corrupt(format!("tensor {name} shape overflows")))?;
            let len = match ty.block() {
                Some((be, bb)) => {
                    // Blocks run along rows: a row that is not whole blocks has no layout.
                    if !dims[0].is_multiple_of(be as u64) {
                        return Err(c.corrupt(format!(
                            "tensor {name} ({}) has rows of {} elements, not a multiple of its block size {be}",
                            ty.name(),
                            dims[0]
                        )));
                    }
                    (n / be as u64) as usize * bb
                }
                None => 0,
            };
            let start = data_start
                .checked_add(off as usize)
                .ok_or_else(|| c.corrupt(format!("tensor {name} offset overflows")))?;
            if ty.block().is_some() && start.checked_add(len).is_none_or(|e| e > bytes.len()) {
                return Err(GgufError::Truncated {
                    path: path.into(),
                    what: format!("data of tensor {name} ({len} bytes)"),
                    offset: start,
                    len: bytes.len(),
                });
            }
            tensors.push(TensorInfo { name, dims, ty, start, len });
        }
        Ok(Gguf { path: path.into(), version, metadata, tensors, bytes })
    }

    pub fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey { path: self.path.clone(), key: key.into() })
    }
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)?.as_u64().ok_or_else(|| self.key_type(key, "integer"))
    }
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.get(key)?.as_f64().ok_or_else(|| self.key_type(key, "number"))
    }
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)?.as_str().ok_or_else(|| self.key_type(key, "string"))
    }
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        match self.get(key)? {
            Value::Array(a) => {
                a.iter().map(|v| v.as_str().ok_or_else(|| self.key_type(key, "array of strings"))).collect()
            }
            _ => Err(self.key_type(key, "array of strings")),
        }
    }
    pub fn get_u64_array(&self, key: &str) -> Result<Vec<u64>, GgufError> {
        match self.get(key)? {
            Value::Array(a) => {
                a.iter().map(|v| v.as_u64().ok_or_else(|| self.key_type(key, "array of integers"))).collect()
            }
            _ => Err(self.key_type(key, "array of integers")),
        }
    }
    fn key_type(&self, key: &str, expected: &'static str) -> GgufError {
        GgufError::KeyType { path: self.path.clone(), key: key.into(), expected }
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| GgufError::MissingTensor { path: self.path.clone(), name: name.into() })
    }

    /// The tensor's raw bytes as stored (range checked at open).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.bytes[t.start..t.start + t.len]
    }

    /// The tensor dequantized to f32, checked against `expected` (ggml order) if given.
    pub fn tensor_f32(&self, name: &str, expected: Option<&[u64]>) -> Result<Vec<f32>, GgufError> {
        let t = self.tensor(name)?;
        if let Some(e) = expected {
            if t.dims != e {
                return Err(GgufError::Shape {
                    path: self.path.clone(),
                    name: name.into(),
                    shape: t.dims.clone(),
                    expected: e.to_vec(),
                });
            }
        }
        let data = &self.bytes[t.start..t.start + t.len];
        let mut out = vec![0f32; t.num_elements()];
        super::blocks::dequantize(t.ty, data, &mut out).map_err(|ty| GgufError::UnsupportedType {
            path: self.path.clone(),
            name: name.into(),
            ty,
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny GGUF file: two metadata keys and one F32 tensor.
    pub(crate) fn tiny() -> Vec<u8> {
        let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        tiny_with(0, &[2, 3], &data)
    }

    /// [`tiny`] with its one tensor `w` of ggml type `ty`, shape `dims` and bytes `data`.
    fn tiny_with(ty: u32, dims: &[u64], data: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend((x.len() as u64).to_le_bytes());
            b.extend(x.as_bytes());
        };
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "x.list");
        b.extend(9u32.to_le_bytes());
        b.extend(4u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(7u32.to_le_bytes());
        b.extend(9u32.to_le_bytes());
        s(&mut b, "w");
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend(data);
        b
    }

    /// K-quant blocks run along rows: a tensor whose element count is whole super-blocks but
    /// whose rows are not has no layout, and is refused by name; a type weave does not read
    /// is named, with what it does read.
    #[test]
    fn quant_rows_must_be_whole_blocks_and_types_are_named() {
        let g = Gguf::parse(Path::new("k.gguf"), tiny_with(12, &[256, 2], &[0; 288])).unwrap();
        assert_eq!(g.tensor("w").unwrap().ty, GgmlType::Q4_K);
        assert_eq!(g.tensor_f32("w", None).unwrap(), vec![0.0; 512]);
        let e = Gguf::parse(Path::new("k.gguf"), tiny_with(12, &[128, 4], &[0; 288])).unwrap_err().to_string();
        assert_eq!(
            e,
            "k.gguf: corrupt: tensor w (Q4_K) has rows of 128 elements, not a multiple of its block size 256"
        );
        let g = Gguf::parse(Path::new("k.gguf"), tiny_with(23, &[256, 1], &[0; 136])).unwrap();
        let e = g.tensor_f32("w", None).unwrap_err().to_string();
        assert!(e.starts_with("k.gguf: tensor w is stored as IQ4_XS, which weave cannot dequantize"), "{e}");
        assert!(e.contains("Q4_K, Q5_K, Q6_K"), "{e}");
    }

    #[test]
    fn type_numbers_round_trip() {
        for t in (0..40).map(GgmlType::from_u32) {
            assert_eq!(GgmlType::from_u32(t.id()), t);
        }
    }

    #[test]
    fn parses_a_small_file() {
        let g = Gguf::parse(Path::new("t.gguf"), tiny()).unwrap();
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get_u64_array("x.list").unwrap(), vec![7, 9]);
        assert_eq!(g.tensor_f32("w", Some(&[2, 3])).unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let e = g.tensor_f32("w", Some(&[3, 2])).unwrap_err().to_string();
        assert_eq!(e, "t.gguf: tensor w has shape [2, 3], expected [3, 2]");
        assert_eq!(
            g.get_u64("general.architecture").unwrap_err().to_string(),
            "t.gguf: metadata key general.architecture has the wrong type (expected integer)"
        );
        assert_eq!(g.tensor("nope").unwrap_err().to_string(), "t.gguf: tensor nope is missing");
    }

    #[test]
    fn truncation_and_corruption_are_named() {
        let full = tiny();
        for cut in [3, 10, 30, 60, full.len() - 1] {
            let e = Gguf::parse(Path::new("m.gguf"), full[..cut].to_vec()).unwrap_err().to_string();
            assert!(e.starts_with("m.gguf: "), "{e}");
            assert!(e.contains("truncated"), "cut at {cut}: {e}");
        }
        let mut bad = full.clone();
        bad[0] = b'X';
        assert!(Gguf::parse(Path::new("m.gguf"), bad).unwrap_err().to_string().contains("not a GGUF file"));
        let mut bad = full.clone();
        bad[4] = 9;
        assert!(Gguf::parse(Path::new("m.gguf"), bad).unwrap_err().to_string().contains("version 9 is not supported"));
        let mut bad = full;
        bad[24 + 8 + 20] = 42; // the first key's value type
        let e = Gguf::parse(Path::new("m.gguf"), bad).unwrap_err().to_string();
        assert!(e.contains("unknown value type 42"), "{e}");
    }
}
