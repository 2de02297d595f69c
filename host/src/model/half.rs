//! 16-bit float weight matrices (GGUF's F16 and BF16) as the CPU kernels read them
//! (`backends::cpu::hmatmul`): the tensor's own bits, rows stacked.

/// Which 16-bit format the weights are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HKind {
    F16,
    Bf16,
}

impl HKind {
    /// The kind of a GGUF type, if it is a 16-bit float.
    pub fn of(ty: crate::model::gguf::GgmlType) -> Option<HKind> {
        use crate::model::gguf::GgmlType;
        match ty {
            GgmlType::F16 => Some(HKind::F16),
            GgmlType::BF16 => Some(HKind::Bf16),
            _ => None,
        }
    }

    #[inline(always)]
    pub fn widen(self, bits: u16) -> f32 {
        match self {
            HKind::F16 => weave_kernels_gpu::elem::f16_bits_to_f32(bits),
            HKind::Bf16 => f32::from_bits((bits as u32) << 16),
        }
    }
}

/// A row-major `[rows][cols]` matrix of 16-bit floats.
#[derive(Debug, Clone)]
pub struct HMatrix {
    pub kind: HKind,
    pub rows: usize,
    pub cols: usize,
    pub bits: Vec<u16>,
}

impl HMatrix {
    /// An empty matrix of `cols` columns, to stack tensors into.
    pub fn new(kind: HKind, cols: usize) -> HMatrix {
        HMatrix { kind, rows: 0, cols, bits: Vec::new() }
    }

    /// Appends `rows` rows from a GGUF tensor's bytes; `None` if the type or size is wrong.
    pub fn push_ggml(&mut self, ty: crate::model::gguf::GgmlType, rows: usize, data: &[u8]) -> Option<()> {
        if HKind::of(ty) != Some(self.kind) || data.len() != rows * self.cols * 2 {
            return None;
        }
        self.bits.extend(data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])));
        self.rows += rows;
        Some(())
    }

    pub fn size_bytes(&self) -> usize {
        2 * self.bits.len()
    }

    /// Row `r` in f32.
    pub fn row(&self, r: usize, out: &mut [f32]) {
        for (o, &b) in out.iter_mut().zip(&self.bits[r * self.cols..(r + 1) * self.cols]) {
            *o = self.kind.widen(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::GgmlType;

    #[test]
    fn rows_read_back_widened() {
        let vals = [1.5f32, -2.0, 0.25, 3.0];
        let bf: Vec<u8> = vals.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect();
        let mut m = HMatrix::new(HKind::Bf16, 2);
        m.push_ggml(GgmlType::BF16, 2, &bf).unwrap();
        let mut row = [0f32; 2];
        m.row(1, &mut row);
        assert_eq!(row, [0.25, 3.0]);
        let f: Vec<u8> = vals.iter().flat_map(|&v| weave_kernels_gpu::elem::f32_to_f16_bits(v).to_le_bytes()).collect();
        let mut m = HMatrix::new(HKind::F16, 4);
        m.push_ggml(GgmlType::F16, 1, &f).unwrap();
        let mut row = [0f32; 4];
        m.row(0, &mut row);
        assert_eq!(row, vals);
        assert!(m.push_ggml(GgmlType::F16, 1, &[0; 7]).is_none(), "wrong size");
        assert!(m.push_ggml(GgmlType::BF16, 1, &[0; 8]).is_none(), "wrong kind");
        assert_eq!((m.rows, m.size_bytes()), (1, 8));
    }
}
