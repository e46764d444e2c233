//! The processor's integration tests, one binary: parity with the official processor and
//! collator, Pillow-exact resizing, typed errors, the prompt grammar (proptest) and fuzzing of
//! the whole prompt path (proptest).

mod errors;
mod fuzz;
mod parity;
mod prompt;
mod resize;
mod support;
