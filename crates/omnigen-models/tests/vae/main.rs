//! The VAE's integration tests, one binary (each test binary links burn): parity with diffusers'
//! `AutoencoderKL`, tiling, typed errors and parameter counts.

mod errors;
mod params;
mod parity;
mod support;
mod tiling;
