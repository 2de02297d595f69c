//! A GGUF writer: metadata and tensors in version 3's layout, the inverse of [`super::gguf`].
//! weave does not convert models; this writes the small synthetic files its tests and
//! fixtures need ([`super::synth`]), which llama.cpp then reads as the oracle.

/// A metadata value, as GGUF types it.
#[derive(Debug, Clone, PartialEq)]
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
    F32Array(Vec<f32>),
}

/// A GGUF file being put together: keys and tensors in the order added.
#[derive(Debug, Default)]
pub struct GgufWriter {
    meta: Vec<(String, Meta)>,
    /// Name, dimensions (ggml order: the row length first), ggml type, bytes.
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

/// Tensor data starts on multiples of this (GGUF's default `general.alignment`).
const ALIGN: usize = 32;

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    pub fn meta(&mut self, key: &str, v: Meta) -> &mut Self {
        self.meta.push((key.into(), v));
        self
    }

    /// An F32 tensor of shape `dims` (ggml order: `[in, out]` for a row-major `[out][in]`).
    pub fn tensor_f32(&mut self, name: &str, dims: &[u64], data: &[f32]) -> &mut Self {
        assert_eq!(dims.iter().product::<u64>() as usize, data.len(), "tensor {name}: shape {dims:?}");
        self.tensor_raw(name, dims, 0, data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    /// A tensor of ggml type `ty` given as its stored bytes.
    pub fn tensor_raw(&mut self, name: &str, dims: &[u64], ty: u32, bytes: Vec<u8>) -> &mut Self {
        self.tensors.push((name.into(), dims.to_vec(), ty, bytes));
        self
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.meta.len() as u64).to_le_bytes());
        for (k, v) in &self.meta {
            string(&mut b, k);
            value(&mut b, v);
        }
        let mut offset = 0usize;
        for (name, dims, ty, bytes) in &self.tensors {
            string(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend((offset as u64).to_le_bytes());
            offset = (offset + bytes.len()).next_multiple_of(ALIGN);
        }
        for (_, _, _, bytes) in &self.tensors {
            b.resize(b.len().next_multiple_of(ALIGN), 0);
            b.extend(bytes);
        }
        b
    }
}

fn string(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn value(b: &mut Vec<u8>, v: &Meta) {
    match v {
        Meta::U32(x) => {
            b.extend(4u32.to_le_bytes());
            b.extend(x.to_le_bytes());
        }
        Meta::F32(x) => {
            b.extend(6u32.to_le_bytes());
            b.extend(x.to_le_bytes());
        }
        Meta::Bool(x) => {
            b.extend(7u32.to_le_bytes());
            b.push(u8::from(*x));
        }
        Meta::Str(s) => {
            b.extend(8u32.to_le_bytes());
            string(b, s);
        }
        Meta::StrArray(items) => {
            array_head(b, 8, items.len());
            for s in items {
                string(b, s);
            }
        }
        Meta::I32Array(items) => {
            array_head(b, 5, items.len());
            b.extend(items.iter().flat_map(|x| x.to_le_bytes()));
        }
        Meta::F32Array(items) => {
            array_head(b, 6, items.len());
            b.extend(items.iter().flat_map(|x| x.to_le_bytes()));
        }
    }
}

/// An array value's type (9), its items' type and their count.
fn array_head(b: &mut Vec<u8>, item_type: u32, n: usize) {
    b.extend(9u32.to_le_bytes());
    b.extend(item_type.to_le_bytes());
    b.extend((n as u64).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::{Gguf, Value};
    use std::path::Path;

    /// What the writer writes, the reader reads back: every value type, and tensors whose
    /// data sit on aligned offsets whatever their sizes.
    #[test]
    fn the_reader_reads_what_the_writer_wrote() {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", Meta::Str("llama".into()))
            .meta("a.u", Meta::U32(7))
            .meta("a.f", Meta::F32(0.5))
            .meta("a.b", Meta::Bool(true))
            .meta("a.s", Meta::StrArray(vec!["x".into(), "yz".into()]))
            .meta("a.i", Meta::I32Array(vec![-1, 3]))
            .meta("a.g", Meta::F32Array(vec![0.25, -2.0]))
            .tensor_f32("odd", &[3], &[1.0, 2.0, 3.0])
            .tensor_f32("m", &[2, 2], &[4.0, 5.0, 6.0, 7.0]);
        let g = Gguf::parse(Path::new("w.gguf"), w.to_bytes()).unwrap();
        assert_eq!(g.get_u64("a.u").unwrap(), 7);
        assert_eq!(g.get_f64("a.f").unwrap(), 0.5);
        assert_eq!(g.get("a.b").unwrap(), &Value::Bool(true));
        assert_eq!(g.get_str_array("a.s").unwrap(), ["x", "yz"]);
        assert_eq!(g.get("a.i").unwrap(), &Value::Array(vec![Value::I64(-1), Value::I64(3)]));
        assert_eq!(g.get("a.g").unwrap(), &Value::Array(vec![Value::F64(0.25), Value::F64(-2.0)]));
        assert_eq!(g.tensor_f32("odd", Some(&[3])).unwrap(), [1.0, 2.0, 3.0]);
        assert_eq!(g.tensor_f32("m", Some(&[2, 2])).unwrap(), [4.0, 5.0, 6.0, 7.0]);
        assert_eq!(g.tensor("m").unwrap().start % ALIGN, 0);
    }
}
