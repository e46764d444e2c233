//! Seeded Gaussian noise, drawn on the host so a seed gives the same numbers on every backend.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// A reproducible stream of standard-normal tensors.
#[derive(Debug, Clone)]
pub struct NoiseSource {
    rng: StdRng,
}

impl NoiseSource {
    /// A stream fixed by `seed`.
    pub fn from_seed(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// A stream seeded from the operating system (an unseeded generation).
    pub fn from_entropy() -> Self {
        Self {
            rng: StdRng::from_os_rng(),
        }
    }

    /// Draws a tensor of `shape` with i.i.d. N(0, 1) entries.
    pub fn normal<B: Backend, const D: usize>(
        &mut self,
        shape: [usize; D],
        device: &B::Device,
    ) -> Tensor<B, D> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }
}
