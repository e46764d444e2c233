//! The OmniGen transformer.
