//! # omnigen-core
//!
//! The parts of omnigen-rs that know nothing about tensors' mathematics: the [`Error`] type,
//! configurations read from a checkpoint's `config.json` files ([`TransformerConfig`],
//! [`VaeConfig`]) and memory-mapped safetensors loading ([`WeightSource`]) with the mapping
//! between the official and diffusers key layouts ([`TransformerWeights`]); where each piece of a
//! checkpoint lives in a model folder, for either layout ([`ModelFolder`]).
#![deny(missing_docs)]

pub mod config;
pub mod error;
pub mod files;
pub mod folder;
pub mod host_memory;
pub mod layout;
pub mod quant;
pub mod quantize;
pub mod weights;
pub mod writer;

pub use config::{RopeScaling, TransformerConfig, VaeConfig};
pub use error::{Error, Result};
pub use files::{open_regular, MAX_IMAGE_FILE_BYTES};
pub use folder::{FolderLayout, ModelFolder};
pub use host_memory::tune_host_allocator;
pub use layout::{CheckpointLayout, TransformerWeights};
pub use quant::{QuantScheme, QuantizedTensor};
pub use quantize::{quantize_folder, QuantizeOptions, QuantizeReport};
pub use weights::{WeightFiles, WeightSource};
