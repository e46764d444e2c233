//! omnigen-core's integration tests, one binary: configs and safetensors weights of the committed
//! checkpoints.

mod configs;
mod weights;
