//! Decoder layers and kv caches held in host memory and streamed to the device one layer ahead
//! of use (`--offload model`, `--offload kv`): for devices with less memory than the model.
//!
//! A layer's host copy is the tensors its loading read, recorded in the dtype and quantization
//! it was built in; streaming it rebuilds the layer with the same [`DecoderLayer::load`] from
//! that copy, so a streamed layer holds the same values, in the same layout, as a resident one
//! and the model computes the same numbers. The copies are shared buffers: a layer's upload
//! reads them in place (no host-side copy on backends that read without writing).
//!
//! While layer `i` runs, a worker thread rebuilds layer `i + 1` (and fetches its cached
//! keys/values), so at most two layers are on the device at once and the host side of the
//! transfer overlaps the compute.

use std::collections::HashMap;
use std::sync::Mutex;

use burn::tensor::backend::Backend;
use burn::tensor::{AllocationProperty, Bytes, DType, Tensor, TensorData};
use omnigen_core::{Error, QuantizedTensor, Result, TransformerConfig};

use super::phi3::{DecoderLayer, KeyValue};
use crate::loader::Loader;
use crate::ops::WeightFormat;
use crate::weights::WeightReader;

/// A tensor kept in host memory: its bytes (shared, so a read is a reference, not a copy).
#[derive(Clone)]
struct HostData {
    bytes: bytes::Bytes,
    shape: Vec<usize>,
    dtype: DType,
}

impl HostData {
    /// Takes `data`'s bytes without copying them.
    fn new(data: TensorData) -> Self {
        let TensorData {
            bytes,
            shape,
            dtype,
        } = data;
        Self {
            bytes: bytes::Bytes::from_owner(HostBytes(bytes)),
            shape: shape.to_vec(),
            dtype,
        }
    }

    /// A `TensorData` reading these bytes in place.
    fn data(&self) -> TensorData {
        TensorData::from_bytes(
            Bytes::from_shared(self.bytes.clone(), AllocationProperty::Other),
            self.shape.clone(),
            self.dtype,
        )
    }

    fn len(&self) -> usize {
        self.bytes.len()
    }
}

/// burn's byte buffer as the owner of a shared [`bytes::Bytes`].
struct HostBytes(Bytes);

impl AsRef<[u8]> for HostBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

enum HostTensor {
    Dense(HostData),
    Quantized(QuantizedTensor),
}

/// One decoder layer's tensors as its loading read them, by full key
/// (`llm.layers.3.self_attn.qkv_proj.weight`), and the layer's key prefix (`llm.layers.3`).
struct HostLayer {
    prefix: String,
    tensors: HashMap<String, HostTensor>,
}

impl HostLayer {
    fn bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| match t {
                HostTensor::Dense(d) => d.len() as u64,
                HostTensor::Quantized(q) => (q.values.len() + 4 * q.scales.len()) as u64,
            })
            .sum()
    }
}

impl WeightReader for HostLayer {
    fn read(&self, key: &str, shape: &[usize], dtype: DType) -> Result<TensorData> {
        match self.tensors.get(key) {
            Some(HostTensor::Dense(d)) if d.shape == shape && d.dtype == dtype => Ok(d.data()),
            _ => Err(Error::invalid_argument(
                "offload",
                format!(
                    "the host copy of the layer has no `{key}` of shape {shape:?} in {dtype:?} \
                     (the layer is rebuilt as it was loaded)"
                ),
            )),
        }
    }

    fn read_quantized(&self, key: &str, _shape: &[usize]) -> Result<Option<QuantizedTensor>> {
        Ok(match self.tensors.get(key) {
            Some(HostTensor::Quantized(q)) => Some(q.clone()),
            _ => None,
        })
    }
}

/// Reads tensors from `base` and keeps what it returned, by key.
struct Recorder<'a> {
    base: &'a dyn WeightReader,
    tensors: Mutex<HashMap<String, HostTensor>>,
}

impl Recorder<'_> {
    fn keep(&self, key: &str, tensor: HostTensor) {
        let mut tensors = self.tensors.lock().unwrap_or_else(|e| e.into_inner());
        tensors.insert(key.to_string(), tensor);
    }
}

impl WeightReader for Recorder<'_> {
    fn read(&self, key: &str, shape: &[usize], dtype: DType) -> Result<TensorData> {
        let host = HostData::new(self.base.read(key, shape, dtype)?);
        let data = host.data();
        self.keep(key, HostTensor::Dense(host));
        Ok(data)
    }

    fn read_quantized(&self, key: &str, shape: &[usize]) -> Result<Option<QuantizedTensor>> {
        let q = self.base.read_quantized(key, shape)?;
        if let Some(q) = &q {
            self.keep(key, HostTensor::Quantized(q.clone()));
        }
        Ok(q)
    }
}

/// The decoder layers in host memory (see the [module docs](self)).
pub struct HostLayers {
    layers: Vec<HostLayer>,
    config: TransformerConfig,
    /// The loader's dtypes: activations and norms, and the linear weights.
    dtype: DType,
    weight_dtype: DType,
    /// The loader's storage order of f32 linear weights (rebuilt layers keep it).
    f32_linear_input_major: bool,
    format: WeightFormat,
}

impl std::fmt::Debug for HostLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostLayers")
            .field("layers", &self.layers.len())
            .field("bytes", &self.bytes())
            .field("dtype", &self.dtype)
            .field("weight_dtype", &self.weight_dtype)
            .finish()
    }
}

impl HostLayers {
    /// Reads every decoder layer (`llm.layers.N`) of `reader` into host memory, as
    /// [`Phi3Model::load`](super::Phi3Model::load) would load them with `loader`'s device and
    /// dtypes. Each layer is built once on the device, to check it and record exactly what
    /// its loading read, then dropped.
    pub(crate) fn read<B: Backend>(loader: &Loader<B>, config: &TransformerConfig) -> Result<Self> {
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        let mut format = WeightFormat::Dense(loader.weight_dtype());
        for i in 0..config.num_hidden_layers {
            let recorder = Recorder {
                base: loader.reader(),
                tensors: Mutex::default(),
            };
            let prefix = loader.key(&format!("layers.{i}"));
            let layer_loader = Loader::<B>::new(&recorder, loader.device(), loader.dtype())
                .with_weight_dtype(loader.weight_dtype())
                .with_f32_linear_input_major(loader.f32_linear_input_major())
                .sub(&prefix);
            format = DecoderLayer::load(&layer_loader, config)?
                .mlp
                .down_proj
                .format();
            let tensors = recorder
                .tensors
                .into_inner()
                .unwrap_or_else(|e| e.into_inner());
            layers.push(HostLayer { prefix, tensors });
        }
        Ok(Self {
            layers,
            config: config.clone(),
            dtype: loader.dtype(),
            weight_dtype: loader.weight_dtype(),
            f32_linear_input_major: loader.f32_linear_input_major(),
            format,
        })
    }

    /// How the layers' linear weights are stored.
    pub fn weight_format(&self) -> WeightFormat {
        self.format
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Host bytes the layers hold.
    pub fn bytes(&self) -> u64 {
        self.layers.iter().map(HostLayer::bytes).sum()
    }

    /// Layer `i` on `device`, rebuilt from its host copy.
    pub fn layer<B: Backend>(&self, i: usize, device: &B::Device) -> Result<DecoderLayer<B>> {
        let host = self.layers.get(i).ok_or_else(|| {
            Error::invalid_argument(
                "layer",
                format!("{i} is past the {} offloaded layers", self.layers.len()),
            )
        })?;
        let loader = Loader::<B>::new(host, device, self.dtype)
            .with_weight_dtype(self.weight_dtype)
            .with_f32_linear_input_major(self.f32_linear_input_major)
            .sub(&host.prefix);
        DecoderLayer::load(&loader, &self.config)
    }
}

/// One layer's cached keys and values in host memory.
#[derive(Clone)]
pub(crate) struct HostKeyValue {
    keys: HostData,
    values: HostData,
}

impl HostKeyValue {
    /// Reads `kv` back from the device.
    pub(crate) fn new<B: Backend>((k, v): KeyValue<B>) -> Self {
        Self {
            keys: HostData::new(k.into_data()),
            values: HostData::new(v.into_data()),
        }
    }

    /// The keys and values on `device`.
    pub(crate) fn upload<B: Backend>(&self, device: &B::Device) -> KeyValue<B> {
        let up = |d: &HostData| Tensor::from_data(d.data(), (device, d.dtype));
        (up(&self.keys), up(&self.values))
    }

    /// Host bytes held.
    pub(crate) fn bytes(&self) -> u64 {
        (self.keys.len() + self.values.len()) as u64
    }
}

/// Where a kv cache keeps its layers' keys and values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KvPlacement {
    /// On the model's device (the default).
    #[default]
    Device,
    /// In host memory, each layer's uploaded one layer ahead of use (the official
    /// `offload_kv_cache`). Each layer's keys and values move to the host as the prefill
    /// produces them, so the device never holds more than two layers' worth.
    Host,
}

/// The cached keys and values of every layer, wherever they are kept.
#[derive(Debug, Clone)]
pub(crate) enum CachedLayers<B: Backend> {
    Device(Vec<KeyValue<B>>),
    Host(Vec<HostKeyValue>),
}

impl std::fmt::Debug for HostKeyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKeyValue")
            .field("shape", &self.keys.shape)
            .field("dtype", &self.keys.dtype)
            .finish()
    }
}

impl<B: Backend> CachedLayers<B> {
    pub(crate) fn len(&self) -> usize {
        match self {
            CachedLayers::Device(l) => l.len(),
            CachedLayers::Host(l) => l.len(),
        }
    }
}

/// What layer `i` runs with when something of it is in host memory: the layer rebuilt on the
/// device (when the layers are offloaded) and its cached keys/values uploaded (when the cache
/// is).
pub(crate) struct Fetched<B: Backend> {
    pub(crate) layer: Option<DecoderLayer<B>>,
    pub(crate) past: Option<KeyValue<B>>,
}

/// Folds `run(state, i, fetched)` over the layers in order, `fetch(i + 1)` running on a worker
/// thread while `run(.., i, ..)` does.
pub(crate) fn stream_layers<B: Backend, S>(
    n: usize,
    init: S,
    fetch: impl Fn(usize) -> Result<Fetched<B>> + Sync,
    mut run: impl FnMut(S, usize, Fetched<B>) -> Result<S>,
) -> Result<S> {
    let fetch = &fetch;
    std::thread::scope(|scope| {
        let join = |handle: std::thread::ScopedJoinHandle<'_, Result<Fetched<B>>>| {
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        };
        let mut state = init;
        let mut pending = (n > 0).then(|| scope.spawn(move || fetch(0)));
        for i in 0..n {
            let Some(handle) = pending.take() else {
                break;
            };
            let fetched = join(handle)?;
            if i + 1 < n {
                pending = Some(scope.spawn(move || fetch(i + 1)));
            }
            state = match run(state, i, fetched) {
                Ok(state) => state,
                Err(e) => {
                    // The prefetched layer is dropped with the error.
                    if let Some(handle) = pending.take() {
                        let _ = join(handle);
                    }
                    return Err(e);
                }
            };
        }
        Ok(state)
    })
}
