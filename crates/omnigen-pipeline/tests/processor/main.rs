//! The processor's integration tests, one binary: parity with the official processor and
//! collator, Pillow-exact resizing, typed errors and the prompt grammar (proptest).

mod errors;
mod parity;
mod prompt;
mod resize;
mod support;
