//! The SDXL VAE: diffusers' `AutoencoderKL`, shaped entirely by `vae/config.json`.
//!
//! OmniGen encodes every input image with it (the transformer sees
//! `(sample - shift) · scaling_factor`) and decodes the final latents with it
//! (`latents / scaling_factor + shift`). Submodule and field names follow diffusers, so checkpoint
//! keys (`encoder.down_blocks.0.resnets.1.conv2.weight`, ...) map with no renaming.
//!
//! ```no_run
//! # use omnigen_models::vae::{AutoencoderKL, LatentChoice};
//! # use omnigen_models::{DefaultBackend as B, default_device};
//! # use burn::tensor::{DType, Tensor};
//! # fn main() -> omnigen_core::Result<()> {
//! let device = default_device();
//! let vae = AutoencoderKL::<B>::from_dir("OmniGen-v1/vae".as_ref(), &device, DType::F32)?;
//! let image = Tensor::<B, 4>::zeros([1, 3, 512, 512], &device); // in [-1, 1]
//! let latents = vae.encode_latents(image, LatentChoice::Mean)?; // [1, 4, 64, 64], scaled
//! let decoded = vae.decode_latents(latents)?; // [1, 3, 512, 512], about [-1, 1]
//! # Ok(()) }
//! ```

mod blocks;
mod decoder;
mod encoder;
mod tiling;

use std::path::Path;

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use omnigen_core::{Error, Result, VaeConfig, WeightSource};

use decoder::Decoder;
use encoder::Encoder;
pub use tiling::TilingConfig;

use crate::loader::Loader;
use crate::ops::{self, cast, KernelBackend};
use crate::weights::WeightReader;

/// File stem of the VAE weights inside a checkpoint's `vae/` folder (see
/// [`ModelFolder::vae_weights`](omnigen_core::ModelFolder::vae_weights)).
pub const WEIGHTS_STEM: &str = omnigen_core::folder::DIFFUSERS_WEIGHTS_STEM;

/// The encoder's posterior: a diagonal Gaussian per latent element.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian<B: Backend> {
    /// Mean, `[B, latent, H/f, W/f]`.
    pub mean: Tensor<B, 4>,
    /// Log-variance, clamped to `[-30, 20]` as diffusers does, same shape as `mean`.
    pub logvar: Tensor<B, 4>,
}

impl<B: Backend> DiagonalGaussian<B> {
    /// Standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Tensor<B, 4> {
        (self.logvar.clone() * 0.5).exp()
    }

    /// `mean + std · noise`, diffusers' `latent_dist.sample()` with its standard normal draw
    /// supplied by the caller (`noise` must have the shape of `mean`).
    pub fn sample(&self, noise: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        if noise.dims() != self.mean.dims() {
            return Err(Error::invalid_argument(
                "noise",
                format!(
                    "shape {:?} differs from the latent shape {:?}",
                    noise.dims(),
                    self.mean.dims()
                ),
            ));
        }
        Ok(self.mean.clone() + self.std() * noise)
    }

    /// The most likely latent: the mean.
    pub fn mode(&self) -> Tensor<B, 4> {
        self.mean.clone()
    }
}

/// Which latent of the posterior an encoded image becomes.
#[derive(Debug, Clone)]
pub enum LatentChoice<B: Backend> {
    /// `mean + std · noise` with this standard normal noise (`[B, latent, H/f, W/f]`): what the
    /// official pipeline does (`latent_dist.sample()`).
    Sample(Tensor<B, 4>),
    /// The mean: deterministic, and within the tiny SDXL posterior std of `Sample`.
    Mean,
}

/// diffusers' `AutoencoderKL` (the SDXL VAE for OmniGen).
#[derive(Module, Debug)]
pub struct AutoencoderKL<B: Backend> {
    encoder: Encoder<B>,
    decoder: Decoder<B>,
    /// 1×1 conv on the moments; absent when `use_quant_conv` is false.
    quant_conv: Option<Conv2d<B>>,
    /// 1×1 conv on the latents before decoding; absent when `use_post_quant_conv` is false.
    post_quant_conv: Option<Conv2d<B>>,
    #[module(skip)]
    config: VaeConfig,
    #[module(skip)]
    tiling: Option<TilingConfig>,
}

impl<B: KernelBackend> AutoencoderKL<B> {
    /// Builds the VAE described by `config` from `reader` (diffusers key names), in `dtype`.
    ///
    /// The official pipeline runs the VAE in F32 (the SDXL VAE overflows in F16); parity is
    /// tested in F32 only.
    pub fn load(
        reader: &dyn WeightReader,
        config: &VaeConfig,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        check_config(config)?;
        crate::ops::check_dtype::<B>(device, "dtype", dtype)?;
        let ld = Loader::<B>::new(reader, device, dtype).with_kernel_layout();
        let moments = 2 * config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(ld.sub("quant_conv").conv2d(moments, moments, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            let c = config.latent_channels;
            Some(ld.sub("post_quant_conv").conv2d(c, c, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::load(&ld.sub("encoder"), config)?,
            decoder: Decoder::load(&ld.sub("decoder"), config)?,
            quant_conv,
            post_quant_conv,
            config: config.clone(),
            tiling: None,
        })
    }

    /// Loads a checkpoint's `vae/` folder: `config.json` and `diffusion_pytorch_model.safetensors`
    /// (or its sharded index).
    pub fn from_dir(vae_dir: &Path, device: &B::Device, dtype: DType) -> Result<Self> {
        let config = VaeConfig::from_file(vae_dir.join("config.json"))?;
        let weights = WeightSource::open_in_dir(vae_dir, WEIGHTS_STEM)?;
        let vae = Self::load(&weights, &config, device, dtype)?;
        let unread = weights.unread_keys();
        if !unread.is_empty() {
            tracing::warn!(
                count = unread.len(),
                tensors = %unread.join(", "),
                "the VAE checkpoint holds tensors the model does not use"
            );
        }
        Ok(vae)
    }

    /// The configuration the module was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Pixels per latent along each side (8 for SDXL).
    pub fn downsample_factor(&self) -> usize {
        self.config.downsample_factor()
    }

    /// The current tiling, if any.
    pub fn tiling(&self) -> Option<TilingConfig> {
        self.tiling
    }

    /// Turns tiling on (`Some`) or off (`None`); refuses tile geometries that do not line up.
    pub fn set_tiling(&mut self, tiling: Option<TilingConfig>) -> Result<()> {
        if let Some(t) = &tiling {
            t.plans(self.downsample_factor())?;
        }
        self.tiling = tiling;
        Ok(())
    }

    /// Builder form of [`set_tiling`](Self::set_tiling).
    pub fn with_tiling(mut self, tiling: Option<TilingConfig>) -> Result<Self> {
        self.set_tiling(tiling)?;
        Ok(self)
    }

    /// The dtype the VAE computes in (its weights'); [`encode`](Self::encode) and
    /// [`decode`](Self::decode) take and return f32 whatever it is.
    pub fn dtype(&self) -> DType {
        self.decoder.conv_in.weight.val().dtype()
    }

    /// Encodes images `[B, in_channels, H, W]` in `[-1, 1]` (sides multiples of the downsample
    /// factor) into the posterior over latents `[B, latent, H/f, W/f]`. Tiled when tiling is on
    /// and a side exceeds the tile.
    pub fn encode(&self, image: Tensor<B, 4>) -> Result<DiagonalGaussian<B>> {
        let [_, _, h, w] = image.dims();
        check_input(
            "image",
            image.dims(),
            self.config.in_channels,
            self.downsample_factor(),
        )?;
        let dtype = self.dtype();
        let encode_tile = |x: Tensor<B, 4>| {
            let moments = self.encoder.forward(cast(x, dtype)); // [B, 2*latent, h, w]
            let moments = match &self.quant_conv {
                Some(conv) => ops::conv1x1(conv, moments),
                None => moments,
            };
            cast(moments, DType::F32)
        };
        let moments = match self.plans()? {
            Some((plan, _)) if h > plan.tile || w > plan.tile => {
                tiling::tiled(image, plan, encode_tile)
            }
            _ => encode_tile(image),
        }; // [B, 2*latent, H/f, W/f]
        let lc = self.config.latent_channels;
        let mean = moments.clone().narrow(1, 0, lc); // [B, latent, H/f, W/f]
        let logvar = moments.narrow(1, lc, lc).clamp(-30.0, 20.0); // [B, latent, H/f, W/f]
        Ok(DiagonalGaussian { mean, logvar })
    }

    /// Encodes images into the latents the transformer is fed: `(z - shift) · scaling_factor`,
    /// with `z` chosen from the posterior by `choice` (the official pipeline samples).
    pub fn encode_latents(
        &self,
        image: Tensor<B, 4>,
        choice: LatentChoice<B>,
    ) -> Result<Tensor<B, 4>> {
        let dist = self.encode(image)?;
        let z = match choice {
            LatentChoice::Sample(noise) => dist.sample(noise)?,
            LatentChoice::Mean => dist.mode(),
        };
        let z = match self.config.shift_factor {
            Some(shift) => z - shift,
            None => z,
        };
        Ok(z * self.config.scaling_factor)
    }

    /// Decodes raw (unscaled) latents `[B, latent, h, w]` into images `[B, out_channels, h·f, w·f]`
    /// in about `[-1, 1]`. Tiled when tiling is on and a side exceeds the latent tile.
    pub fn decode(&self, z: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        let [_, _, h, w] = z.dims();
        check_input("latents", z.dims(), self.config.latent_channels, 1)?;
        let dtype = self.dtype();
        let decode_tile = |z: Tensor<B, 4>| {
            let z = cast(z, dtype);
            let z = match &self.post_quant_conv {
                Some(conv) => ops::conv1x1(conv, z),
                None => z,
            }; // [B, latent, h, w]
            cast(self.decoder.forward(z), DType::F32) // [B, out, h*f, w*f]
        };
        Ok(match self.plans()? {
            Some((_, plan)) if h > plan.tile || w > plan.tile => {
                tiling::tiled(z, plan, decode_tile)
            }
            _ => decode_tile(z),
        })
    }

    /// Decodes the latents the transformer produced: `latents / scaling_factor + shift`, then
    /// [`decode`](Self::decode), as the official pipeline does.
    pub fn decode_latents(&self, latents: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        let z = latents / self.config.scaling_factor;
        let z = match self.config.shift_factor {
            Some(shift) => z + shift,
            None => z,
        };
        self.decode(z)
    }

    fn plans(&self) -> Result<Option<(tiling::TilePlan, tiling::TilePlan)>> {
        self.tiling
            .map(|t| t.plans(self.downsample_factor()))
            .transpose()
    }
}

/// Catches configurations that would otherwise panic while building (a `VaeConfig` built by hand
/// skips the checks of `VaeConfig::from_file`).
/// `dims` `[B, C, H, W]` must have `channels` channels and positive sides that are multiples of
/// `multiple`; errors name the argument `name`.
fn check_input(
    name: &'static str,
    dims: [usize; 4],
    channels: usize,
    multiple: usize,
) -> Result<()> {
    let [b, c, h, w] = dims;
    if c != channels {
        return Err(Error::invalid_argument(
            name,
            format!("has {c} channels, the VAE expects {channels}"),
        ));
    }
    if b == 0 || h == 0 || w == 0 || h % multiple != 0 || w % multiple != 0 {
        let sides = if multiple == 1 {
            "must be non-empty".to_string()
        } else {
            format!("height and width must be positive multiples of {multiple}")
        };
        return Err(Error::invalid_argument(
            name,
            format!("shape [{b}, {c}, {h}, {w}]: {sides}"),
        ));
    }
    Ok(())
}

fn check_config(config: &VaeConfig) -> Result<()> {
    // A config built in code skips `from_file`'s validation; the error names the whole config,
    // the reason the field at fault.
    config
        .validate()
        .map_err(|e| Error::invalid_argument("config", e.to_string()))
}
