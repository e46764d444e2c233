//! A [`WeightReader`] that merges adapters into the weights it returns.

use std::cell::RefCell;
use std::collections::BTreeSet;

use burn::tensor::{DType, TensorData};
use omnigen_core::{Error, Result};

use super::{LoraAdapter, LoraMergePrecision};
use crate::weights::{read_f32, WeightReader};

/// A [`WeightReader`] that returns `base`'s tensors with LoRA adapters merged into the targeted
/// `<module>.weight` keys, in adapter order; other keys pass through unchanged.
///
/// After the model is built, [`finish`](Self::finish) checks that every adapted module was read,
/// so an adapter made for another model (more layers, other modules) does not go unnoticed.
pub struct LoraMergedReader<'a> {
    base: &'a dyn WeightReader,
    adapters: Vec<LoraAdapter>,
    precision: LoraMergePrecision,
    merged: RefCell<BTreeSet<(usize, String)>>,
}

impl<'a> LoraMergedReader<'a> {
    /// Wraps `base` with `adapters` merged in `precision`.
    pub fn new(
        base: &'a dyn WeightReader,
        adapters: Vec<LoraAdapter>,
        precision: LoraMergePrecision,
    ) -> Self {
        Self {
            base,
            adapters,
            precision,
            merged: RefCell::new(BTreeSet::new()),
        }
    }

    /// The adapters, in merge order.
    pub fn adapters(&self) -> &[LoraAdapter] {
        &self.adapters
    }

    /// Errors if some adapted module was never read (the model has no such layer).
    pub fn finish(&self) -> Result<()> {
        let merged = self.merged.borrow();
        for (i, adapter) in self.adapters.iter().enumerate() {
            for module in adapter.modules() {
                if !merged.contains(&(i, module.to_string())) {
                    return Err(Error::invalid_argument(
                        "lora",
                        format!(
                            "adapter {} adapts `{module}`, which this model does not have (made for another model?)",
                            adapter.dir().display()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl WeightReader for LoraMergedReader<'_> {
    fn read(&self, key: &str, shape: &[usize], dtype: DType) -> Result<TensorData> {
        let Some(module) = key.strip_suffix(".weight") else {
            return self.base.read(key, shape, dtype);
        };
        if !self.adapters.iter().any(|a| a.scaling_of(module).is_some()) {
            return self.base.read(key, shape, dtype);
        }
        let mut w = read_f32(self.base, key, shape)?;
        for (i, adapter) in self.adapters.iter().enumerate() {
            if adapter.merge_into(module, &mut w, shape, self.precision)? {
                self.merged.borrow_mut().insert((i, module.to_string()));
            }
        }
        Ok(TensorData::new(w, shape.to_vec()).convert_dtype(dtype))
    }
}
