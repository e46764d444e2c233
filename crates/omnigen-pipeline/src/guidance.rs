//! Classifier-free guidance: combining the branch velocities into one.
//!
//! Text-to-image runs two branches (conditional, unconditional); prompts with input images run a
//! third, image-conditional one, and the three combine as in InstructPix2Pix (eq. 3):
//! `v = u + g_img·(ic − u) + g·(c − ic)`.

use burn::tensor::{backend::Backend, Tensor};

/// Guidance strengths of one generation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guidance {
    /// Text guidance `g` (official default 3.0).
    pub scale: f32,
    /// Image guidance `g_img` (official default 1.6), used only with the third branch.
    pub image_scale: f32,
}

impl Guidance {
    /// Combines branch velocities, each `[B, C, h, w]`: `[cond, uncond]` or
    /// `[cond, uncond, image_cond]`.
    pub fn combine<B: Backend>(&self, branches: &[Tensor<B, 4>]) -> Tensor<B, 4> {
        match branches {
            [c, u] => u.clone() + (c.clone() - u.clone()) * self.scale,
            [c, u, ic] => {
                u.clone()
                    + (ic.clone() - u.clone()) * self.image_scale
                    + (c.clone() - ic.clone()) * self.scale
            }
            [only] => only.clone(),
            _ => unreachable!("the processor builds one to three guidance branches"),
        }
    }
}
