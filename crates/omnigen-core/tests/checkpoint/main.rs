//! omnigen-core's integration tests, one binary: configs and safetensors weights of the committed
//! checkpoints, and property-based fuzzing of both parsers.

mod configs;
mod fuzz;
mod weights;
