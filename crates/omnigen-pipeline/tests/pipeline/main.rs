//! The sampling pipeline's integration tests, one binary (each test binary links burn): end-to-end
//! parity with every recorded official case, the schedulers against diffusers', and the options
//! beyond parity.

mod options;
mod parity;
mod schedulers;
