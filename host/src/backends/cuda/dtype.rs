//! Device buffers hold the kernels' storage types bit for bit.

use weave_kernels_gpu::Elem;

/// Device buffers hold the kernels' storage types bit for bit: f32 as is, f16 and bf16 as u16.
pub trait DevElem: Elem {
    type Bits: bytemuck::Pod + Default + Send;
    fn to_bits(v: &[Self]) -> Vec<Self::Bits>;
    fn from_bits(v: &[Self::Bits]) -> Vec<Self>;
}

impl DevElem for weave_kernels_gpu::F16 {
    type Bits = u16;
    fn to_bits(v: &[Self]) -> Vec<u16> {
        v.iter().map(|x| x.0).collect()
    }
    fn from_bits(v: &[u16]) -> Vec<Self> {
        v.iter().map(|&b| weave_kernels_gpu::F16(b)).collect()
    }
}

impl DevElem for weave_kernels_gpu::Bf16 {
    type Bits = u16;
    fn to_bits(v: &[Self]) -> Vec<u16> {
        v.iter().map(|x| x.0).collect()
    }
    fn from_bits(v: &[u16]) -> Vec<Self> {
        v.iter().map(|&b| weave_kernels_gpu::Bf16(b)).collect()
    }
}

impl DevElem for f32 {
    type Bits = f32;
    fn to_bits(v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
    fn from_bits(v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
}
