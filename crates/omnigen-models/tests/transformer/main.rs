//! The transformer's integration tests, one binary (each test binary links burn): parity with
//! the official forward, the KV cache, every recorded pipeline case, both checkpoint layouts,
//! dtypes, parameter counts, LoRA merges and offload.

mod cases;
mod device_ops;
mod dtype;
mod kv_cache;
mod layouts;
mod lora;
mod offload;
mod params;
mod parity;
mod support;
