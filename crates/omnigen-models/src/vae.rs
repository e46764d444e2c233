//! The SDXL VAE.
