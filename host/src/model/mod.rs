//! The model: GGUF files, the Llama-family architecture and its pass (`llama`, over the
//! backends' `LayerOps`), named shapes (`profiles`) and dummy weights, tokenizer and chat
//! template.

pub mod chat;
pub mod config;
pub mod dummy;
pub mod gguf;
pub mod gguf_writer;
pub mod llama;
pub mod profiles;
pub mod quant;
pub mod quantize;
pub mod spm;
pub mod synth;
pub mod tokenizer;
pub mod weights;
