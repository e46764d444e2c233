//! Every op in burn's own tensor ops: what runs on any backend (GPU backends, other dtypes).

use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Tensor};

/// `a · b`, `a` `[..., m, k]`, `b` `[..., k, n]` -> `[..., m, n]`.
///
/// Two faults of burn 0.21's cubecl kernels (seen on wgpu, pinned by
/// `tests/transformer/device_ops.rs`) are kept out of every product here:
/// - its fusion of a one-row product (`m = 1`) whose right-hand side is a strided view (a
///   transposed weight, `kᵀ`) with the elementwise ops that follow it computes wrong values,
///   while the same product of two or more rows is right. A one-row product therefore runs as
///   two identical rows; the products it concerns (the time embedding and the final layer's
///   modulation of one guidance row, a last query tile of one row) are tiny.
/// - cubek 0.2's multi-stage matmuls (double-buffered, ordered, specialized: `DoubleUnit`,
///   fusion's `fused_double_buffering_unit`, the `*Double*` tensor-core kernels) always run an
///   even number of `k` stages, one past the end when `k / stage_k` is odd, and they check `k`
///   against the matrix only when `k` is not a multiple of `stage_k`: an odd multiple of
///   `stage_k` reads a stage of whatever follows each row. Autotuning may pick them for any
///   shape. Measured on lavapipe with the unit kernels (`stage_k` = 8 in f32): wrong for
///   `k` = 8, 24, 40, …, 1064, 1080, right for every multiple of 16 and every `k` not a multiple
///   of 8 (`docs/backends.md`). `stage_k` is 8 or 16 for the unit kernels (twice their tile)
///   and the plane width (32 on NVIDIA, 64 on AMD) for the tensor-core ones, so a `k` that is a
///   multiple of 8 but not of 128 is zero-padded to the next multiple of 128 ([`padded_inner`]):
///   the same sums, exactly. Among OmniGen's products that is the attention's head size (96),
///   an 8-channel `quant_conv`, the 16 inputs of the patch embedding, and `probs · v` over a
///   number of keys that is a multiple of 8.
pub(super) fn matmul<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    let (a, b) = match padded_inner(a.dims()[D - 1]) {
        Some(pad) => (zeros_after(a, D - 1, pad), zeros_after(b, D - 2, pad)),
        None => (a, b),
    };
    padded_product(a, b)
}

/// [`matmul`] of operands whose inner size needs no more padding ([`padded_inner`] of it is
/// `None`, or they were padded already): only the one-row guard.
fn padded_product<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    if a.dims()[D - 2] != 1 {
        return a.matmul(b);
    }
    Tensor::cat(vec![a.clone(), a], D - 2)
        .matmul(b)
        .narrow(D - 2, 0, 1)
}

/// `x` with `n` zeros appended along `dim`, in `x`'s dtype (burn 0.21's `pad` makes its
/// padding in the default float dtype, which a half-precision tensor cannot be joined with).
fn zeros_after<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize, n: usize) -> Tensor<B, D> {
    let mut shape = x.dims();
    shape[dim] = n;
    let zeros = Tensor::zeros(shape, (&x.device(), x.dtype()));
    Tensor::cat(vec![x, zeros], dim)
}

/// The zeros [`matmul`] appends to an inner size `k`: `None` where none are needed (`k` not a
/// multiple of 8, or a multiple of 128), and always where `OMNIGEN_NO_MATMUL_PAD=1` is set (a
/// diagnostic: `tools/gpu/check.sh` runs the products that need it without it, to see whether a
/// device's kernels still get them wrong).
pub(super) fn padded_inner(k: usize) -> Option<usize> {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off =
        *OFF.get_or_init(|| std::env::var_os("OMNIGEN_NO_MATMUL_PAD").is_some_and(|v| v == "1"));
    (!off && k.is_multiple_of(8) && !k.is_multiple_of(128)).then(|| k.next_multiple_of(128) - k)
}

/// burn's `Linear::forward` unsqueezes the weight to the input's rank, and burn-flex
/// materialises that reshape of the transposed (PyTorch-layout) view on every call. Flattening
/// the contiguous input to 2-D instead lets the GEMM read the transposed weight by its strides.
pub(super) fn linear<B: Backend, const D: usize>(
    linear: &Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    let rows = dims[..D - 1].iter().product();
    let w = linear.weight.val(); // [in, out]
    dims[D - 1] = w.dims()[1];
    let y = matmul(x.reshape([rows, d_in]), w);
    let y = match &linear.bias {
        Some(bias) => y + bias.val().unsqueeze::<2>(),
        None => y,
    };
    y.reshape(dims)
}

/// One product per column view of the weight gives contiguous parts, so the elementwise ops
/// after them read contiguous data instead of strided slices of one `[B, S, out]` result.
pub(super) fn linear_chunks<B: Backend, const N: usize>(
    linear: &Linear<B>,
    x: Tensor<B, 3>,
) -> [Tensor<B, 3>; N] {
    let [b, s, d_in] = x.dims();
    let x = x.reshape([b * s, d_in]);
    let w = linear.weight.val(); // [in, out]
    let part = w.dims()[1] / N;
    std::array::from_fn(|c| {
        let y = matmul(x.clone(), w.clone().narrow(1, c * part, part)); // [B·S, part]
        let y = match &linear.bias {
            Some(bias) => y + bias.val().narrow(0, c * part, part).unsqueeze::<2>(),
            None => y,
        };
        y.reshape([b, s, part])
    })
}

/// The weight's `[out, in]` storage viewed as `[heads, in, out / heads]` (no copy: reshapes only
/// of the contiguous storage, which burn-flex does not copy) is the right-hand side of one
/// batched product, so no strided `[B, S, H, hd] -> [B, H, S, hd]` copy follows.
pub(super) fn linear_heads<B: Backend>(
    linear: &Linear<B>,
    x: Tensor<B, 3>,
    heads: usize,
) -> Tensor<B, 4> {
    debug_assert!(linear.bias.is_none(), "linear_heads takes bias-free layers");
    let d_in = x.dims()[2];
    let d_out = linear.weight.dims()[1];
    let w = linear
        .weight
        .val() // [in, out] (transposed view of the checkpoint's [out, in])
        .transpose() // [out, in], contiguous
        .reshape([1, heads, d_out / heads, d_in])
        .swap_dims(2, 3); // [1, heads, in, hd]
    matmul(x.unsqueeze_dim::<4>(1), w) // [B, heads, S, hd]
}

pub(super) fn rms_norm<B: Backend>(
    x: Tensor<B, 3>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, 3> {
    let dtype = x.dtype();
    // transformers upcasts to f32 for the statistics, then casts back before the scale.
    let x32 = x.cast(DType::F32);
    let inv_rms = x32
        .clone()
        .square()
        .mean_dim(2)
        .add_scalar(eps)
        .sqrt()
        .recip(); // [B, S, 1]
    let normed = (x32 * inv_rms).cast(dtype);
    normed * weight.unsqueeze::<3>()
}

pub(super) fn silu_mul<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    up * silu(gate)
}

/// `x` `[B, H, S, hd]`; the tables broadcast over batch and heads.
pub(super) fn rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 4>,
    sin_signed: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let half = x.dims()[3] / 2;
    let swapped = Tensor::cat(
        vec![
            x.clone().narrow(3, half, half),
            x.clone().narrow(3, 0, half),
        ],
        3,
    );
    x * cos + swapped * sin_signed
}

/// `q` `[B, H, S, hd]`, `k`, `v` `[B, H, T, hd]`, `bias` `[B, 1, S, T]` (none: every query
/// sees every key) -> `[B, S, H·hd]`.
///
/// With `tile` `None` (a backend whose own `attention` never holds the whole score tensor),
/// burn's `attention`; otherwise query tiles of at most `tile` scores each
/// ([`ATTENTION_TILE_SCORES`] from [`super::attention`]), so a 1024² request never holds its
/// `[B, H, S, S]` scores (4.4 GB in f32 for two guidance rows of 4,140 tokens), only one tile.
pub(super) fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    tile: Option<u64>,
) -> Tensor<B, 3> {
    let [b, h, s, hd] = q.dims();
    let t = k.dims()[2];
    let scale = (hd as f64).sqrt().recip();
    let out = if let Some(tile) = tile {
        // The zeros `matmul` appends, once for every tile: to the head size of q and k (the
        // inner size of `q · kᵀ`) and to the keys of v (that of `probs · v`).
        let (q, k) = match padded_inner(hd) {
            Some(pad) => (zeros_after(q, 3, pad), zeros_after(k, 3, pad)),
            None => (q, k),
        };
        let v = match padded_inner(t) {
            Some(pad) => zeros_after(v, 2, pad),
            None => v,
        };
        let rows = attention_tile_rows(tile, b, h, s, t);
        if rows >= s {
            attention_tile(q, k, v, bias, scale)
        } else {
            let tiles = (0..s)
                .step_by(rows)
                .map(|start| {
                    let n = rows.min(s - start);
                    attention_tile(
                        q.clone().narrow(2, start, n),
                        k.clone(),
                        v.clone(),
                        bias.clone().map(|bias| bias.narrow(2, start, n)),
                        scale,
                    )
                })
                .collect();
            Tensor::cat(tiles, 2)
        }
    } else {
        burn_attention(q, k, v, None, bias, AttentionModuleOptions::default())
    }; // [B, H, S, hd]
    out.swap_dims(1, 2).reshape([b, s, h * hd])
}

/// Scores one query tile of the portable attention holds at most (64 Mi: 256 MiB in f32).
pub(crate) const ATTENTION_TILE_SCORES: u64 = 1 << 26;

/// Query rows per tile when one tile may hold `tile_scores` scores of a `[B, H, ·, T]` score
/// tensor: at least one row, at most `s`.
pub(crate) fn attention_tile_rows(
    tile_scores: u64,
    b: usize,
    h: usize,
    s: usize,
    t: usize,
) -> usize {
    let per_row = (b as u64)
        .saturating_mul(h as u64)
        .saturating_mul(t as u64)
        .max(1);
    usize::try_from(tile_scores / per_row)
        .unwrap_or(usize::MAX)
        .clamp(1, s.max(1))
}

/// One query tile as the official eager Phi-3 attention computes it: scores in the inputs'
/// dtype, the softmax in f32, the probabilities back in the inputs' dtype for the product
/// with `v`.
///
/// `q` and `k` come with their head size padded and `v` with its keys padded as
/// [`attention`] pads them for [`matmul`]; the probabilities get the same zero keys as `v`.
///
/// # Shapes
/// `q` `[B, H, n, hd']`, `k` `[B, H, T, hd']`, `v` `[B, H, T', hd]`, `bias` `[B, 1, n, T]` ->
/// `[B, H, n, hd]` (`hd' ≥ hd`, `T' ≥ T`: the padded sizes).
fn attention_tile<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    scale: f64,
) -> Tensor<B, 4> {
    let dtype = q.dtype();
    let (t, t_padded) = (k.dims()[2], v.dims()[2]);
    let scores = padded_product(q, k.swap_dims(2, 3)).mul_scalar(scale); // [B, H, n, T]
    let scores = match bias {
        Some(bias) => scores + bias,
        None => scores,
    };
    let probs = softmax(scores.cast(DType::F32), 3).cast(dtype);
    let probs = if t_padded > t {
        zeros_after(probs, 3, t_padded - t)
    } else {
        probs
    };
    padded_product(probs, v)
}

pub(super) fn group_norm_silu<B: Backend>(gn: &GroupNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    silu(gn.forward(x))
}

pub(super) fn conv3x3<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    conv.forward(x)
}

/// A 1×1 convolution as the product of its `[C_out, C_in]` weight with the `[B, C_in, H·W]`
/// input: both operands contiguous, through [`matmul`] (burn's own `conv2d` runs a 1×1 kernel as
/// an im2col product that [`matmul`]'s guards do not reach).
///
/// # Shapes
/// `x` `[B, C_in, H, W]` -> `[B, C_out, H, W]`.
pub(super) fn conv1x1<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, c_in, h, w] = x.dims();
    let c_out = conv.weight.dims()[0];
    let weight = conv
        .weight
        .val()
        .reshape([1, c_out, c_in])
        .expand([b, c_out, c_in]); // [B, C_out, C_in]
    let y = matmul(weight, x.reshape([b, c_in, h * w])); // [B, C_out, H·W]
    let y = match &conv.bias {
        Some(bias) => y + bias.val().reshape([1, c_out, 1]),
        None => y,
    };
    y.reshape([b, c_out, h, w])
}

pub(super) fn upsample_nearest2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    // Each pixel broadcast to a 2×2 block: exact, no interpolation arithmetic.
    x.reshape([b, c, h, 1, w, 1])
        .expand([b, c, h, 2, w, 2])
        .reshape([b, c, 2 * h, 2 * w])
}
