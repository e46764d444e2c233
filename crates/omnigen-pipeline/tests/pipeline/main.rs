//! The sampling pipeline's integration tests, one binary (each test binary links burn): end-to-end
//! parity with every recorded official case, and the options beyond parity.

mod options;
mod parity;
