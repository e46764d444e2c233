//! The kernel dispatch layer: every op of the models that has more than one implementation.
//!
//! Model code (`transformer/`, `vae/`) calls these functions and nothing backend-specific; each
//! function picks an implementation from the capabilities its backend declares through
//! [`KernelBackend`], in this module only:
//!
//! | op | host kernel ([`KernelBackend::HOST_KERNELS`], f32) | otherwise |
//! |---|---|---|
//! | [`linear`], [`linear_chunks`], [`linear_heads`] | bf16 / int8 / fp8 weights ([`KernelBackend::MIXED_PRECISION_LINEAR`]): the tile unit's `tdpbf16ps` on CPUs with AMX (`amx.rs`), else `vdpbf16ps` on AVX512-BF16 (`bf16_dot.rs`), else blocks of output features converted to f32, each an f32 GEMM (f16 weights always take that last way); f32 weights: burn's `matmul` on the weight stored `[in, out]` where [`KernelBackend::F32_LINEAR_INPUT_MAJOR`] (then [`linear_heads`] splits the product's rows into heads) | burn's `matmul` on the transposed view of the PyTorch-layout weight; a quantized layer is dequantised to the activation dtype first, one layer at a time |
//! | [`rms_norm`] | one threaded pass per row block | burn ops, statistics in f32 |
//! | [`silu_mul`] | one threaded pass | `up * silu(gate)` |
//! | [`rope`] | one pass over the heads, in place from the fused projection | `x·cos + rotate_half(x)·sin` |
//! | [`qkv_heads`] | the fused projection, then one pass that splits it into heads and rotates q and k | [`linear_heads`], then [`rope`] on the q and k heads |
//! | [`attention`] | flash-style tiles (64 queries × 512 keys, online softmax) reading the mask's [`KeyRanges`], into `[B, S, D]` (`flash.rs`): AVX-512 micro-kernels over keys transposed once per head where the CPU has AVX-512F and `hd` is a multiple of 16, else two `gemm` calls per tile | the additive bias expanded on the device ([`attention_bias`]); burn's `attention` where it is fused ([`KernelBackend::FUSED_ATTENTION`]), else query tiles of at most 64 Mi scores, softmax in f32 as the official eager attention |
//! | [`full_attention`] | as otherwise | burn's `attention` where it is fused ([`KernelBackend::FUSED_ATTENTION`]), else query tiles as [`attention`]'s, without a mask |
//! | [`group_norm_silu`] | one threaded pass per group | burn's `GroupNorm` then `silu` |
//! | [`conv3x3`] | Winograd F(4×4, 3×3), or F(2×2, 3×3) for images of fewer than 36 tiles: batched GEMMs over the transformed tiles | burn's `conv2d` |
//! | [`conv1x1`] | burn's `conv2d` | the `[C_out, C_in]` weight times the `[B, C_in, H·W]` input, one product (not burn's im2col kernel) |
//! | [`upsample2x_conv3x3`] | the Winograd kernels of [`conv3x3`], reading the nearest 2× in place | nearest 2× by broadcasting, then [`conv3x3`] |
//! | [`downsample_conv3x3`] | nine shifted GEMMs over the input's four polyphase planes, at the output's resolution | burn's `conv2d` (stride 2, padding bottom/right) |
//!
//! # Where a new kernel goes
//! A kernel for one family of backends (a fused GPU kernel, a quantized or bf16 GEMM) is a new
//! implementation behind the op it speeds up: its code in a file of this module, a capability
//! const on [`KernelBackend`] (default `false`) that the backends having it set in
//! `backends.rs`, and one branch in the op's function here. Module records never depend on the
//! kernel: parameters keep the checkpoint's shapes and a kernel reads them as they are. The one
//! layout choice is a dense f32 linear weight's storage order, the transposed view of the
//! checkpoint's `[out, in]` or `[in, out]` contiguous ([`KernelBackend::F32_LINEAR_INPUT_MAJOR`]):
//! the ops below read either.

mod amx;
mod backends;
mod bf16_dot;
mod flash;
mod host;
mod mask;
mod portable;
mod quant;
mod winograd;

pub use quant::{code_dtype, LinearLayer, QuantizedLinear, WeightFormat};

use mask::BiasRepr;
pub use mask::{attention_bias, mask_min, AttentionBias, KeyRanges};

use burn::nn::conv::Conv2d;
use burn::nn::GroupNorm;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use host::HostWeight;

/// A burn [`Backend`] with the capabilities that choose OmniGen's kernels.
///
/// Implemented for burn's Flex, NdArray and Cuda backends (whichever the cargo features
/// enable). A backend type of your own runs every op on burn's portable ops once it opts in with
/// an empty impl, which keeps every default:
///
/// ```text
/// impl omnigen_models::KernelBackend for MyBackend {}
/// ```
///
/// Another of burn's backends cannot be opted in from outside this crate (Rust's orphan rule):
/// its impl belongs in `ops/backends.rs`, behind a cargo feature of its own.
pub trait KernelBackend: Backend {
    /// f32 tensors live in host memory, where the kernels of `ops/host.rs` read and write them
    /// (a tensor's data is a plain `Vec<f32>` away).
    const HOST_KERNELS: bool = false;
    /// Tensors live in the process's memory (the memory guard then reads the system's
    /// available memory) rather than on a device with its own.
    const HOST_MEMORY: bool = false;
    /// burn's `attention` on this backend never materialises the `[B, H, S, T]` score tensor.
    const FUSED_ATTENTION: bool = false;
    /// [`linear`] multiplies f32 activations by a bf16, f16 or quantized (int8, fp8) weight on
    /// the host, converting the weight a block of output features at a time: a model whose
    /// weights are stored in half precision computes in f32 here (see [`compute_dtype`]).
    /// Requires [`HOST_KERNELS`](Self::HOST_KERNELS).
    const MIXED_PRECISION_LINEAR: bool = false;
    /// f32 linear weights are stored input-major, `[in, out]` contiguous (burn's `Linear`
    /// layout, materialised once at load), rather than as the transposed view of the
    /// checkpoint's `[out, in]`: the backend's GEMM packs right-hand-side rows faster than
    /// columns (`docs/performance.md`). Only the storage order changes; the parameter's shape is
    /// `[in, out]` either way. Applied by [`Loader::with_kernel_layout`](crate::loader::Loader::with_kernel_layout).
    const F32_LINEAR_INPUT_MAJOR: bool = false;

    /// The bytes of a contiguous, row-major float tensor, borrowed, where the backend can lend
    /// them; `None` (the default) makes the host kernels copy them out with `into_data`.
    fn float_bytes(_tensor: &Self::FloatTensorPrimitive) -> Option<&[u8]> {
        None
    }

    /// [`float_bytes`](Self::float_bytes) for int tensors (quantized weights).
    fn int_bytes(_tensor: &Self::IntTensorPrimitive) -> Option<&[u8]> {
        None
    }

    /// What the backend's memory pools hold on `device`, where it tells (the GPU backends);
    /// `None` on the CPU backends, whose tensors are the process's memory.
    fn device_memory(_device: &Self::Device) -> Option<DeviceMemory> {
        None
    }
}

/// A device's memory use as its backend's pools report it ([`device_memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes of live tensors.
    pub in_use: u64,
    /// Bytes the pools have reserved from the device: live tensors, padding and free pages kept
    /// for reuse. Pools keep what they reserve, so after a run this is close to its peak.
    pub reserved: u64,
}

/// [`KernelBackend::device_memory`]: `None` on the CPU backends.
pub fn device_memory<B: KernelBackend>(device: &B::Device) -> Option<DeviceMemory> {
    B::device_memory(device)
}

/// `x` in `dtype` (no op when it already is).
pub fn cast<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() == dtype {
        x
    } else {
        x.cast(dtype)
    }
}

/// The dtype a model whose weights are stored in `weight_dtype` computes in on backend `B`:
/// f32 where [`linear`] takes half-precision weights with f32 activations
/// ([`KernelBackend::MIXED_PRECISION_LINEAR`]: weights in bf16 / f16, activations, norms and
/// the residual stream in f32), else `weight_dtype` itself.
pub fn compute_dtype<B: KernelBackend>(weight_dtype: DType) -> DType {
    if B::MIXED_PRECISION_LINEAR && matches!(weight_dtype, DType::BF16 | DType::F16) {
        DType::F32
    } else {
        weight_dtype
    }
}

/// The transformer dtype `--dtype auto` means on `device`: bf16 on a device backend that
/// computes in it (a GPU: half the memory, the tensor cores' rate, as the official pipeline
/// runs), f32 on the CPU backends (whose host kernels compute in f32) and on devices without
/// bf16 (WGSL, for one, has no bf16 type).
pub fn default_dtype<B: KernelBackend>(device: &B::Device) -> DType {
    if !B::HOST_MEMORY && B::supports_dtype(device, DType::BF16) {
        DType::BF16
    } else {
        DType::F32
    }
}

/// Refuses a `dtype` the backend cannot compute in on `device` (WGSL has no bf16, for one) with
/// an [`Error::InvalidArgument`](omnigen_core::Error) naming `what`, before any tensor of it is
/// made: a kernel would otherwise fail deep inside the backend.
pub fn check_dtype<B: KernelBackend>(
    device: &B::Device,
    what: &'static str,
    dtype: DType,
) -> omnigen_core::Result<()> {
    if B::supports_dtype(device, dtype) {
        Ok(())
    } else {
        Err(omnigen_core::Error::invalid_argument(
            what,
            format!("{dtype:?} is not supported by this backend on {device:?}; use f32"),
        ))
    }
}

/// Whether the host kernels run on `x`: an f32 tensor of a backend with
/// [`KernelBackend::HOST_KERNELS`].
fn on_host<B: KernelBackend, const D: usize>(x: &Tensor<B, D>) -> bool {
    B::HOST_KERNELS && x.dtype() == DType::F32
}

/// The query tiles of the portable attention on `B`: none where burn's own is fused.
fn score_tile<B: KernelBackend>() -> Option<u64> {
    (!B::FUSED_ATTENTION).then_some(portable::ATTENTION_TILE_SCORES)
}

/// The most attention scores an [`attention`] over tensors of `dtype` holds at once (what the
/// memory guard must count): `None` where its kernel keeps only cache-sized tiles (the host
/// kernel, a backend with [`KernelBackend::FUSED_ATTENTION`]), otherwise the size of one query
/// tile, `Some(n)`: a call holds [`attention_scores_held`] of them.
pub fn attention_score_tile<B: KernelBackend>(dtype: DType) -> Option<u64> {
    let host = B::HOST_KERNELS && dtype == DType::F32;
    if host {
        None
    } else {
        score_tile::<B>()
    }
}

/// Scores held at once by an attention over `[b, h, s, t]` scores split into query tiles of
/// at most `tile` scores (whole query rows, at least one).
pub fn attention_scores_held(tile: u64, b: usize, h: usize, s: usize, t: usize) -> u64 {
    let rows = portable::attention_tile_rows(tile, b, h, s, t);
    (b as u64)
        .saturating_mul(h as u64)
        .saturating_mul(rows as u64)
        .saturating_mul(t as u64)
}

/// Whether [`attention_bias`] expands the mask to a dense `[B, 1, S, T]` tensor for tensors of
/// `dtype` (rather than keeping its key ranges).
pub fn attention_mask_is_dense<B: KernelBackend>(dtype: DType) -> bool {
    !(B::HOST_KERNELS && dtype == DType::F32)
}

/// A run of heads of a `[B, H_total, L, head_dim]` tensor: heads `start..start + len`.
///
/// Lets [`rope`] and [`attention`] read q, k and v in place from one fused projection; kernels
/// that cannot read it in place narrow it first.
#[derive(Debug, Clone)]
pub struct HeadRange<B: Backend> {
    /// The whole tensor, `[B, H_total, L, head_dim]`.
    pub tensor: Tensor<B, 4>,
    /// First head of the range.
    pub start: usize,
    /// Number of heads.
    pub len: usize,
}

impl<B: Backend> HeadRange<B> {
    /// Heads `start..start + len` of `tensor`.
    pub fn new(tensor: Tensor<B, 4>, start: usize, len: usize) -> Self {
        debug_assert!(start + len <= tensor.dims()[1]);
        Self { tensor, start, len }
    }

    /// Every head of `tensor`.
    pub fn all(tensor: Tensor<B, 4>) -> Self {
        let len = tensor.dims()[1];
        Self::new(tensor, 0, len)
    }

    /// The heads as a tensor of their own, `[B, len, L, head_dim]`.
    pub fn narrowed(self) -> Tensor<B, 4> {
        if self.start == 0 && self.len == self.tensor.dims()[1] {
            self.tensor
        } else {
            self.tensor.narrow(1, self.start, self.len)
        }
    }
}

/// Whether the host's mixed linear ([`host::linear_rows`]) runs `layer` on `x`: an f32 input on
/// a backend with [`KernelBackend::MIXED_PRECISION_LINEAR`] and a weight that is not f32.
fn mixed_on_host<B: KernelBackend, const D: usize>(
    layer: &LinearLayer<B>,
    x: &Tensor<B, D>,
) -> bool {
    B::HOST_KERNELS
        && B::MIXED_PRECISION_LINEAR
        && on_host(x)
        && match layer {
            LinearLayer::Dense(l) => matches!(l.weight.val().dtype(), DType::BF16 | DType::F16),
            LinearLayer::Quantized(_) => true,
        }
}

/// Output features `rows` of `layer` applied to host f32 rows `x` `[m, in]`: `[m, rows.len()]`.
fn mixed_rows<B: KernelBackend>(
    layer: &LinearLayer<B>,
    x: &[f32],
    m: usize,
    rows: std::ops::Range<usize>,
) -> Vec<f32> {
    let [k, _] = layer.dims();
    let bias = layer
        .bias()
        .map(|b| host::f32_view(b.val().cast(DType::F32)));
    let bias = bias.as_deref();
    match layer {
        LinearLayer::Dense(l) => {
            let weight = l.weight.val();
            let dtype = weight.dtype();
            // The parameter is the transposed view of the `[out, in]` storage: its transpose
            // is that storage, row-major.
            host::with_float_bytes(weight.transpose(), |bytes| {
                if dtype == DType::F16 {
                    let w = host::cast_or_copy::<half::f16>(bytes);
                    host::linear_rows(x, m, k, HostWeight::F16(&w), rows, bias)
                } else {
                    let w = host::cast_or_copy::<u16>(bytes);
                    if amx::available() {
                        amx::linear_rows(x, m, k, bf16_dot::DotWeight::Bf16(&w), rows, bias)
                    } else if bf16_dot::available() {
                        bf16_dot::linear_rows(x, m, k, bf16_dot::DotWeight::Bf16(&w), rows, bias)
                    } else {
                        host::linear_rows(x, m, k, HostWeight::Bf16(&w), rows, bias)
                    }
                }
            })
        }
        LinearLayer::Quantized(q) => {
            let scales = host::f32_view(q.scales.val().cast(DType::F32));
            host::with_int_bytes(q.values.val(), |bytes| {
                if amx::available() || bf16_dot::available() {
                    let table = bf16_dot::code_table(q.scheme.table());
                    let w = bf16_dot::DotWeight::Codes {
                        bytes,
                        table: &table,
                        scales: &scales,
                    };
                    return if amx::available() {
                        amx::linear_rows(x, m, k, w, rows, bias)
                    } else {
                        bf16_dot::linear_rows(x, m, k, w, rows, bias)
                    };
                }
                let w = match q.scheme {
                    omnigen_core::QuantScheme::Int8 => HostWeight::Int8 {
                        bytes,
                        scales: &scales,
                    },
                    omnigen_core::QuantScheme::Fp8E4M3 => HostWeight::Quantized {
                        bytes,
                        scales: &scales,
                        table: q.scheme.table(),
                    },
                };
                host::linear_rows(x, m, k, w, rows, bias)
            })
        }
    }
}

/// `x · Wᵀ + b` for a [`LinearLayer`] (a dense weight is held as the transposed view of the
/// PyTorch-layout weight).
///
/// # Shapes
/// `x` `[..., in]` -> `[..., out]`.
pub fn linear<B: KernelBackend, const D: usize>(
    layer: &LinearLayer<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    if mixed_on_host(layer, &x) {
        let device = x.device();
        let mut dims = x.dims();
        let m = dims[..D - 1].iter().product();
        let [_, n] = layer.dims();
        let y = mixed_rows(layer, &host::f32_view(x), m, 0..n);
        dims[D - 1] = n;
        return Tensor::from_data(TensorData::new(y, dims), &device);
    }
    match layer {
        LinearLayer::Dense(l) => portable::linear(l, x),
        LinearLayer::Quantized(q) => {
            let dense = q.dequantize(x.dtype());
            portable::linear(&dense, x)
        }
    }
}

/// The layer's output features in `N` equal, contiguous parts (a fused projection such as
/// gate | up), each computed by its own product with a column view of the weight.
///
/// # Shapes
/// `x` `[B, S, in]` -> `N` × `[B, S, out / N]`.
pub fn linear_chunks<B: KernelBackend, const N: usize>(
    layer: &LinearLayer<B>,
    x: Tensor<B, 3>,
) -> [Tensor<B, 3>; N] {
    if mixed_on_host(layer, &x) {
        let device = x.device();
        let [b, s, _] = x.dims();
        let part = layer.dims()[1] / N;
        let xs = host::f32_view(x);
        return std::array::from_fn(|c| {
            let y = mixed_rows(layer, &xs, b * s, c * part..(c + 1) * part);
            Tensor::from_data(TensorData::new(y, [b, s, part]), &device)
        });
    }
    match layer {
        LinearLayer::Dense(l) => portable::linear_chunks(l, x),
        LinearLayer::Quantized(q) => portable::linear_chunks(&q.dequantize(x.dtype()), x),
    }
}

/// A bias-free layer whose output features are `heads` heads, returned head-major (the layout
/// attention reads), without a strided copy after the product.
///
/// # Shapes
/// `x` `[B, S, in]` -> `[B, heads, S, out / heads]`.
pub fn linear_heads<B: KernelBackend>(
    layer: &LinearLayer<B>,
    x: Tensor<B, 3>,
    heads: usize,
) -> Tensor<B, 4> {
    // An input-major f32 weight: the portable kernel's batched product reads the `[out, in]`
    // storage, which this one would be copied into on every call.
    let input_major = match layer {
        LinearLayer::Dense(l) => {
            B::F32_LINEAR_INPUT_MAJOR && on_host(&x) && l.weight.val().dtype() == DType::F32
        }
        LinearLayer::Quantized(_) => false,
    };
    if input_major || mixed_on_host(layer, &x) {
        // One product, then the head split.
        let device = x.device();
        let [b, s, _] = x.dims();
        let n = layer.dims()[1];
        let y = match layer {
            LinearLayer::Dense(l) if input_major => host::f32_data(portable::linear(l, x)),
            _ => mixed_rows(layer, &host::f32_view(x), b * s, 0..n),
        }; // [B, S, out]
        let hd = n / heads;
        let out = host::split_heads(&y, b, s, heads, hd);
        return Tensor::from_data(TensorData::new(out, [b, heads, s, hd]), &device);
    }
    match layer {
        LinearLayer::Dense(l) => portable::linear_heads(l, x, heads),
        LinearLayer::Quantized(q) => portable::linear_heads(&q.dequantize(x.dtype()), x, heads),
    }
}

/// q, k and v of a fused attention projection, as three head ranges.
#[derive(Debug, Clone)]
pub struct QkvHeads<B: Backend> {
    /// The queries, RoPE applied.
    pub q: HeadRange<B>,
    /// The keys, RoPE applied (what a kv cache stores).
    pub k: HeadRange<B>,
    /// The values.
    pub v: HeadRange<B>,
}

/// A fused `qkv_proj` (output rows q | k | v, `H` heads each) applied to `x`, split into heads,
/// with RoPE (`x·cos + rotate_half(x)·sin`) applied to q and k.
///
/// On the host the split and the rotation are one pass over the projection's output, and the
/// three ranges share one `[B, 3H, S, hd]` tensor that [`attention`] reads in place; elsewhere
/// it is [`linear_heads`] then [`rope`] on the q | k heads.
///
/// # Shapes
/// `x` `[B, S, D]`, `cos` and `sin_signed` `[B or 1, 1, S, hd]` -> three `H`-head ranges of
/// `[B, ·, S, hd]` tensors.
pub fn qkv_heads<B: KernelBackend>(
    layer: &LinearLayer<B>,
    x: Tensor<B, 3>,
    heads: usize,
    cos: Tensor<B, 4>,
    sin_signed: Tensor<B, 4>,
) -> QkvHeads<B> {
    let [tb, th, ts, hd] = cos.dims();
    let [b, s, _] = x.dims();
    if on_host(&x) && cos.dtype() == DType::F32 && th == 1 && ts == s && (tb == 1 || tb == b) {
        let device = x.device();
        let y = linear(layer, x); // [B, S, 3H·hd]
        let hd_out = y.dims()[2] / (3 * heads);
        assert_eq!(hd_out, hd, "qkv_heads: rope tables for another head width");
        let (cos, sin_signed) = (host::f32_view(cos), host::f32_view(sin_signed));
        let rope = host::RopeRows {
            cos: &cos,
            sin_signed: &sin_signed,
            per_batch: tb == b && b > 1,
            heads: 2 * heads,
        };
        let out = host::with_float_bytes(y, |bytes| {
            let y = host::cast_or_copy::<f32>(bytes);
            host::split_heads_rope(&y, b, s, 3 * heads, hd, Some(&rope))
        });
        let qkv = Tensor::<B, 4>::from_data(TensorData::new(out, [b, 3 * heads, s, hd]), &device);
        return QkvHeads {
            q: HeadRange::new(qkv.clone(), 0, heads),
            k: HeadRange::new(qkv.clone(), heads, heads),
            v: HeadRange::new(qkv, 2 * heads, heads),
        };
    }
    let qkv = linear_heads(layer, x, 3 * heads); // [B, 3H, S, hd]
    let qk = rope(HeadRange::new(qkv.clone(), 0, 2 * heads), cos, sin_signed); // [B, 2H, S, hd]
    QkvHeads {
        q: HeadRange::new(qk.clone(), 0, heads),
        k: HeadRange::new(qk, heads, heads),
        v: HeadRange::new(qkv, 2 * heads, heads),
    }
}

/// Phi-3's RMSNorm, `weight · x / sqrt(mean(x²) + eps)` over the last axis, statistics in f32.
///
/// # Shapes
/// `x` `[B, S, D]`, `weight` `[D]` -> `[B, S, D]`.
pub fn rms_norm<B: KernelBackend>(x: Tensor<B, 3>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    if on_host(&x) {
        host::rms_norm(x, weight, eps)
    } else {
        portable::rms_norm(x, weight, eps)
    }
}

/// `up · silu(gate)`, the SwiGLU product.
///
/// # Shapes
/// `gate`, `up` of one shape -> that shape.
pub fn silu_mul<B: KernelBackend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    if on_host(&gate) {
        host::silu_mul(gate, up)
    } else {
        portable::silu_mul(gate, up)
    }
}

/// Rotary embedding, `x · cos + rotate_half(x) · sin`, with `rotate_half(x) = cat(-x2, x1)`
/// (the sign folded into `sin_signed`).
///
/// # Shapes
/// `x`: a range of `H` heads of `[B, H_total, S, hd]`; `cos`, `sin_signed` `[B or 1, 1 or H, S,
/// hd]` -> `[B, H, S, hd]`.
pub fn rope<B: KernelBackend>(
    x: HeadRange<B>,
    cos: Tensor<B, 4>,
    sin_signed: Tensor<B, 4>,
) -> Tensor<B, 4> {
    if on_host(&x.tensor) {
        host::rope(x, cos, sin_signed)
    } else {
        portable::rope(x.narrowed(), cos, sin_signed)
    }
}

/// Multi-head attention under OmniGen's mask, `softmax(q·kᵀ/sqrt(hd) + bias)·v`, heads
/// concatenated on the way out.
///
/// `bias` comes from [`attention_bias`] for the dtype of q, k and v: the host kernel reads the
/// mask's key ranges as it goes (flash-style tiles, no `[S, T]` score buffer); other backends
/// get the official finite additive bias (0 where a query may attend, the dtype's most
/// negative value elsewhere), so a fully masked row stays finite, as in the official code.
///
/// # Shapes
/// `q`: `H` heads of `[B, ·, S, hd]`; `k`, `v`: `H` heads of `[B, ·, T, hd]`; `bias` for a
/// `[B, S, T]` mask -> `[B, S, H·hd]`.
pub fn attention<B: KernelBackend>(
    q: HeadRange<B>,
    k: HeadRange<B>,
    v: HeadRange<B>,
    bias: &AttentionBias<B>,
) -> Tensor<B, 3> {
    match &bias.repr {
        BiasRepr::Ranges(ranges) if on_host(&q.tensor) => flash::attention(q, k, v, ranges),
        BiasRepr::Additive(additive) => portable::attention(
            q.narrowed(),
            k.narrowed(),
            v.narrowed(),
            Some(additive.clone()),
            score_tile::<B>(),
        ),
        // Ranges prepared for another dtype than q's: expand them here.
        BiasRepr::Ranges(ranges) => {
            let additive = mask::additive_bias(ranges, q.tensor.dtype(), &q.tensor.device());
            portable::attention(
                q.narrowed(),
                k.narrowed(),
                v.narrowed(),
                Some(additive),
                score_tile::<B>(),
            )
        }
    }
}

/// Attention without a mask, every query over every key (the VAE's mid-block attention), with
/// the default scale `1/sqrt(hd)`.
///
/// # Shapes
/// `q` `[B, H, S, hd]`, `k`, `v` `[B, H, T, hd]` -> `[B, S, H·hd]`.
pub fn full_attention<B: KernelBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 3> {
    portable::attention(q, k, v, None, score_tile::<B>())
}

/// `silu(group_norm(x))`, every GroupNorm → SiLU pair of the VAE.
///
/// # Shapes
/// `x` `[B, C, H, W]` -> `[B, C, H, W]`.
pub fn group_norm_silu<B: KernelBackend>(gn: &GroupNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    match (&gn.gamma, &gn.beta) {
        (Some(gamma), Some(beta)) if gn.affine && on_host(&x) => {
            host::group_norm_silu(x, gamma.val(), beta.val(), gn.num_groups, gn.epsilon)
        }
        _ => portable::group_norm_silu(gn, x),
    }
}

/// A 3×3, stride-1, padding-1 convolution (the VAE's resnets, upsamplers, `conv_in`,
/// `conv_out`), from the PyTorch-layout weight `[C_out, C_in, 3, 3]` of `conv`.
///
/// # Shapes
/// `x` `[B, C_in, H, W]` -> `[B, C_out, H, W]`.
pub fn conv3x3<B: KernelBackend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    debug_assert!(conv.kernel_size == [3, 3] && conv.stride == [1, 1] && conv.groups == 1);
    let [b, c_in, h, w] = x.dims();
    let c_out = conv.weight.dims()[0];
    let Some(bias) = conv.bias.as_ref().filter(|_| on_host(&x)) else {
        return portable::conv3x3(conv, x);
    };
    match Conv3x3Kernel::choose(b, c_in, c_out, h, w) {
        Conv3x3Kernel::Winograd4 => {
            winograd::conv3x3_tensor(&winograd::F4, x, false, conv.weight.val(), bias.val())
        }
        Conv3x3Kernel::Winograd2 => {
            winograd::conv3x3_tensor(&winograd::F2, x, false, conv.weight.val(), bias.val())
        }
        #[cfg(test)]
        Conv3x3Kernel::ShiftedGemm => host::conv3x3(x, conv.weight.val(), bias.val()),
        #[cfg(test)]
        Conv3x3Kernel::Portable => portable::conv3x3(conv, x),
    }
}

/// A 1×1, stride-1 convolution without padding (the VAE's resnet shortcuts, `quant_conv`,
/// `post_quant_conv`), from the PyTorch-layout weight `[C_out, C_in, 1, 1]` of `conv`.
///
/// # Shapes
/// `x` `[B, C_in, H, W]` -> `[B, C_out, H, W]`.
pub fn conv1x1<B: KernelBackend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    debug_assert!(conv.kernel_size == [1, 1] && conv.stride == [1, 1] && conv.groups == 1);
    if B::HOST_KERNELS {
        conv.forward(x)
    } else {
        portable::conv1x1(conv, x)
    }
}

/// Nearest-neighbour 2× upsampling, then [`conv3x3`] (diffusers' `Upsample2D`).
///
/// The host's Winograd kernels read each source pixel for the four it becomes, so the
/// upsampled tensor (4× the input) is never materialised; elsewhere it is, by broadcasting
/// each pixel to a 2×2 block.
///
/// # Shapes
/// `x` `[B, C_in, H, W]` -> `[B, C_out, 2H, 2W]`.
pub fn upsample2x_conv3x3<B: KernelBackend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, c_in, h, w] = x.dims();
    let c_out = conv.weight.dims()[0];
    if let Some(bias) = conv.bias.as_ref().filter(|_| on_host(&x)) {
        let (weight, bias) = (conv.weight.val(), bias.val());
        match Conv3x3Kernel::choose(b, c_in, c_out, 2 * h, 2 * w) {
            Conv3x3Kernel::Winograd4 => {
                return winograd::conv3x3_tensor(&winograd::F4, x, true, weight, bias)
            }
            Conv3x3Kernel::Winograd2 => {
                return winograd::conv3x3_tensor(&winograd::F2, x, true, weight, bias)
            }
            #[cfg(test)]
            _ => {}
        }
    }
    conv3x3(conv, portable::upsample_nearest2x(x))
}

/// diffusers' `Downsample2D` convolution: zero-pad one row at the bottom and one column at the
/// right, then `conv`, a 3×3 convolution of stride 2 without padding of its own (as
/// `Downsample2D::load` builds it: burn padding `Explicit(0, 0, 1, 1)`).
///
/// # Shapes
/// `x` `[B, C, H, W]` -> `[B, C_out, ⌊H/2⌋, ⌊W/2⌋]` (`H`, `W` ≥ 2).
pub fn downsample_conv3x3<B: KernelBackend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    debug_assert!(conv.kernel_size == [3, 3] && conv.stride == [2, 2] && conv.groups == 1);
    let [_, _, h, w] = x.dims();
    match conv.bias.as_ref() {
        Some(bias) if on_host(&x) && h % 2 == 0 && w % 2 == 0 && h > 0 && w > 0 => {
            host::downsample_conv3x3(x, conv.weight.val(), bias.val())
        }
        _ => conv.forward(x),
    }
}

/// A rule choosing the 3×3 kernel from `(b, c_in, c_out, h, w)`.
#[cfg(test)]
type Conv3x3Rule = fn(usize, usize, usize, usize, usize) -> Conv3x3Kernel;

#[cfg(test)]
thread_local! {
    /// A rule that [`Conv3x3Kernel::choose`] defers to on this thread (where the dispatch
    /// runs), for the tests to compare whole models across kernels.
    static CONV3X3_RULE: std::cell::Cell<Option<Conv3x3Rule>> =
        const { std::cell::Cell::new(None) };
}

/// The host kernels of [`conv3x3`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conv3x3Kernel {
    /// Winograd F(4×4, 3×3) (`ops/winograd.rs`).
    Winograd4,
    /// Winograd F(2×2, 3×3).
    Winograd2,
    /// Nine shifted GEMMs (`host::conv3x3`), the host kernel before Winograd: a baseline for
    /// the tests and measurements.
    #[cfg(test)]
    ShiftedGemm,
    /// burn's `conv2d` on the host, likewise.
    #[cfg(test)]
    Portable,
}

impl Conv3x3Kernel {
    /// The kernel for a convolution of `b` images of `c_in` → `c_out` channels at `h`×`w` on
    /// the host.
    ///
    /// Measured in CPU time per call at the VAE's layer sizes, from 3 to 512 channels and
    /// 8×8 to 256×256 (docs/performance.md): F(4×4) is the fastest kernel wherever the
    /// image has a few dozen tiles; below, the cost of its weight transform (4× the weight's
    /// size, for few GEMM columns) makes F(2×2) faster. burn's `conv2d` and the shifted GEMMs
    /// were slower than one of them at every size tried but the decoder's 4-channel `conv_in`
    /// at 64×64, by milliseconds, too little for a rule of its own.
    fn choose(b: usize, c_in: usize, c_out: usize, h: usize, w: usize) -> Self {
        #[cfg(test)]
        if let Some(rule) = CONV3X3_RULE.get() {
            return rule(b, c_in, c_out, h, w);
        }
        let _ = (c_in, c_out);
        if b * h.div_ceil(4) * w.div_ceil(4) >= winograd::F4_MIN_TILES {
            Self::Winograd4
        } else {
            Self::Winograd2
        }
    }
}

// The host kernels against the portable ops, where the default backend has them.
#[cfg(all(
    test,
    any(feature = "flex", feature = "ndarray"),
    not(any(feature = "cuda", feature = "wgpu"))
))]
mod tests;
