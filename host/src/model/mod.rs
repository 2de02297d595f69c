//! The model: GGUF files, the Llama-family architecture and its pass (`llama`, over the
//! backends' `LayerOps`), named shapes (`profiles`) and dummy weights, tokenizer and chat
//! template; the ggml storage types, a file each (`blocks`); the weights as stored (`weights`,
//! the packed and 16-bit matrices in `packed` and `half`), which the backends read but do not define.

pub mod blocks;
pub mod chat;
pub mod config;
pub mod dummy;
pub mod gguf;
pub mod gguf_writer;
pub mod half;
pub mod llama;
pub mod packed;
pub mod profiles;
pub mod spm;
pub mod synth;
pub mod tokenizer;
pub mod weights;
