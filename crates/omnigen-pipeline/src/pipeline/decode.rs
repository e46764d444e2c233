//! From final latents to 8-bit images: VAE decode, then the official pixel conversion.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use image::RgbImage;
use omnigen_core::{Error, Result};
use omnigen_models::ops::KernelBackend;

use super::OmniGenPipeline;

impl<B: KernelBackend> OmniGenPipeline<B> {
    /// Decodes latents to 8-bit images exactly as the official pipeline does:
    /// `((x / 2 + 0.5).clamp(0, 1) * 255)` truncated to `u8`, one image at a time.
    ///
    /// # Shapes
    /// `latents`: `[N, 4, h, w]` (unscaled, as the sampler leaves them); returns `N` images of
    /// `w * 8` by `h * 8` pixels.
    pub fn decode_images(&self, latents: Tensor<B, 4>) -> Result<Vec<RgbImage>> {
        let n = latents.dims()[0];
        (0..n)
            .map(|i| {
                let img = self.vae.decode_latents(latents.clone().narrow(0, i, 1))?; // [1, 3, H, W]
                tensor_to_rgb8(img)
            })
            .collect()
    }
}

/// An image tensor in about [-1, 1] to an 8-bit image, truncating as `torch.to(uint8)` does.
///
/// # Shapes
/// `img`: `[1, 3, H, W]`; returns a `W` by `H` image. Other channel counts are refused.
pub fn tensor_to_rgb8<B: Backend>(img: Tensor<B, 4>) -> Result<RgbImage> {
    let [_, c, h, w] = img.dims();
    if c != 3 {
        return Err(Error::invalid_argument(
            "image",
            format!("expected 3 channels, got {c}"),
        ));
    }
    super::check_finite(&img, "VAE decode", None)?;
    let scaled = ((img * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0).permute([0, 2, 3, 1]); // [1, H, W, 3]
    let values: Vec<f32> = scaled
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| Error::invalid_argument("image", format!("{e:?}")))?;
    let bytes: Vec<u8> = values.into_iter().map(|v| v as u8).collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| Error::invalid_argument("image", "pixel buffer does not match its size"))
}
