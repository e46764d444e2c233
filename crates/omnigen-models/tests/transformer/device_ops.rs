//! The backend's own products against a host reference: what every model op is built on, checked
//! in the shapes the models use (one-row products, transposed weight views).

use burn::tensor::{Tensor, TensorData};
use omnigen_models::default_device;
use omnigen_test_support::{assert_close, max_abs_diff, to_vec};

use crate::support::B;

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
        })
        .collect()
}

/// `x [m, k] · wᵀ` with `w` stored `[n, k]` as PyTorch stores a linear weight.
fn host_matmul_t(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k).map(|l| x[i * k + l] * w[j * k + l]).sum();
        }
    }
    y
}

/// [`host_matmul_t`] plus a bias per output feature.
fn host_linear(x: &[f32], w: &[f32], bias: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    host_matmul_t(x, w, m, k, n)
        .iter()
        .enumerate()
        .map(|(i, v)| v + bias[i % n])
        .collect()
}

/// A linear layer of the PyTorch-layout weight `w` `[n, k]` (held as its transposed view, as
/// loaded) and `bias` `[n]`.
fn biased_linear(
    w: &[f32],
    bias: &[f32],
    k: usize,
    n: usize,
) -> omnigen_models::ops::LinearLayer<B> {
    use burn::module::Param;
    use burn::nn::Linear;
    let device = default_device();
    omnigen_models::ops::LinearLayer::Dense(Linear {
        weight: Param::from_tensor(
            Tensor::<B, 2>::from_data(TensorData::new(w.to_vec(), [n, k]), &device).swap_dims(0, 1),
        ),
        bias: Some(Param::from_tensor(Tensor::<B, 1>::from_data(
            TensorData::new(bias.to_vec(), [n]),
            &device,
        ))),
    })
}

/// `ops::linear` with a PyTorch-layout weight (read through its transposed view, as loaded) and a
/// bias, for one and several rows: burn 0.21 fuses a one-row product with a strided right-hand
/// side and the bias add wrongly on the cubecl backends (`ops/portable.rs`, `matmul`).
#[test]
fn linear_layers_match_the_host_for_every_row_count() {
    use omnigen_models::ops;
    let device = default_device();
    let mut failures = Vec::new();
    for (k, n) in [(40, 24), (256, 16)] {
        let w = values(n * k, 7);
        let bias = values(n, 9);
        let layer = biased_linear(&w, &bias, k, n);
        for m in [1, 2, 3, 17] {
            let x = values(m * k, m as u32);
            let xt = Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
            let want = host_linear(&x, &w, &bias, m, k, n);
            let got = to_vec(ops::linear(&layer, xt));
            let d = max_abs_diff(&got, &want);
            println!("linear [{m}, {k}] -> [{m}, {n}]: max abs diff {d:.3e}");
            if d > 1e-4 {
                failures.push(format!("[{m}, {k}] -> [{m}, {n}]: {d}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn timestep_features_and_a_biased_linear_match_the_host() {
    use omnigen_models::transformer::embedders::timestep_features;
    let device = default_device();
    let t = [0.25f32, 0.75];
    let got = to_vec(timestep_features(
        Tensor::<B, 1>::from_data(TensorData::new(t.to_vec(), [2]), &device),
        256,
    ));
    let mut want = Vec::new();
    for &tv in &t {
        let f: Vec<f32> = (0..128)
            .map(|k| tv * (-(10000f32.ln()) * k as f32 / 128.0).exp())
            .collect();
        want.extend(f.iter().map(|a| a.cos()));
        want.extend(f.iter().map(|a| a.sin()));
    }
    assert_close("timestep features", &got, &want, &[2, 256], 1e-5);
    // silu and a broadcast bias
    let x = values(2 * 24, 3);
    let bias = values(24, 4);
    let xt = Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [2, 24]), &device);
    let bt = Tensor::<B, 1>::from_data(TensorData::new(bias.clone(), [24]), &device);
    let got = to_vec(burn::tensor::activation::silu(xt + bt.unsqueeze::<2>()));
    let want: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let z = v + bias[i % 24];
            z / (1.0 + (-z).exp())
        })
        .collect();
    assert_close("silu(x + bias)", &got, &want, &[2, 24], 1e-5);
}

#[test]
fn the_time_embedder_of_model_b_matches_its_weights_on_the_host() {
    use omnigen_models::ops::LinearLayer;
    use omnigen_models::transformer::embedders::timestep_features;
    let model = crate::support::load_model(&crate::support::fixtures_b().join("model"));
    let device = default_device();
    let t = Tensor::<B, 1>::from_data(TensorData::new(vec![0.3f32], [1]), &device);
    let dense = |l: &LinearLayer<B>| match l {
        LinearLayer::Dense(l) => (
            to_vec(l.weight.val()),
            l.weight.val().dims(),
            to_vec(l.bias.as_ref().map(|b| b.val()).expect("bias")),
        ),
        LinearLayer::Quantized(_) => panic!("dense weights expected"),
    };
    let (w0, d0, b0) = dense(&model.time_token.mlp_0);
    let (w2, d2, b2) = dense(&model.time_token.mlp_2);
    let feats = to_vec(timestep_features(t.clone(), model.time_token.frequency_dim));
    // burn's Linear weight is [in, out]
    let lin = |x: &[f32], w: &[f32], dims: [usize; 2], b: &[f32]| -> Vec<f32> {
        let [din, dout] = dims;
        (0..dout)
            .map(|j| b[j] + (0..din).map(|i| x[i] * w[i * dout + j]).sum::<f32>())
            .collect()
    };
    let h: Vec<f32> = lin(&feats, &w0, d0, &b0)
        .into_iter()
        .map(|z| z / (1.0 + (-z).exp()))
        .collect();
    let want = lin(&h, &w2, d2, &b2);
    let got = to_vec(model.time_token.forward(t));
    assert_close("time_token", &got, &want, &[1, d2[1]], 1e-4);
}

/// `[C_out, C_in]` weights times `[C_in, P]` columns, plus a bias per output channel.
fn host_conv1x1(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    c_in: usize,
    c_out: usize,
    p: usize,
) -> Vec<f32> {
    let mut y = vec![0f32; c_out * p];
    for o in 0..c_out {
        for j in 0..p {
            y[o * p + j] = bias[o]
                + (0..c_in)
                    .map(|c| w[o * c_in + c] * x[c * p + j])
                    .sum::<f32>();
        }
    }
    y
}

/// Products whose inner size is an odd multiple of a multi-stage kernel's `k` stage (8, 16,
/// 32, 64), which cubek's double-buffered matmuls get wrong (`ops/portable.rs`, `matmul`): a
/// linear layer, a 1×1 convolution (the VAE's `quant_conv` has 8 channels) and an attention of
/// OmniGen's head size (96) over a number of keys that is a multiple of 8, in sizes where
/// autotuning considers those kernels (several hundred rows). `tools/gpu/check.sh` also runs it
/// with `OMNIGEN_NO_MATMUL_PAD=1`, to see which of them a GPU's kernels get wrong.
#[test]
fn products_over_an_odd_multiple_of_a_stage_match_the_host() {
    use burn::module::Param;
    use burn::nn::conv::Conv2d;
    use omnigen_models::ops;
    let device = default_device();
    let mut failures = Vec::new();
    let mut check = |what: String, got: Vec<f32>, want: Vec<f32>| {
        let d = max_abs_diff(&got, &want);
        println!("{what}: max abs diff {d:.3e}");
        if d > 1e-4 {
            failures.push(format!("{what}: {d}"));
        }
    };
    let (m, n) = (960, 40);
    for k in [8, 24, 40, 72, 16, 48, 80, 32, 96, 160, 64, 192] {
        let w = values(n * k, 7);
        let bias = values(n, 9);
        let layer = biased_linear(&w, &bias, k, n);
        let x = values(m * k, 3);
        let want = host_linear(&x, &w, &bias, m, k, n);
        let xt = Tensor::<B, 2>::from_data(TensorData::new(x, [m, k]), &device);
        check(
            format!("linear [{m}, {k}] -> [{m}, {n}]"),
            to_vec(ops::linear(&layer, xt)),
            want,
        );

        let (h, wd) = (24, 40);
        let conv = Conv2d {
            weight: Param::from_tensor(Tensor::<B, 4>::from_data(
                TensorData::new(w.clone(), [n, k, 1, 1]),
                &device,
            )),
            bias: Some(Param::from_tensor(Tensor::<B, 1>::from_data(
                TensorData::new(bias.clone(), [n]),
                &device,
            ))),
            ..burn::nn::conv::Conv2dConfig::new([k, n], [1, 1]).init::<B>(&device)
        };
        let x = values(k * h * wd, 5);
        let want = host_conv1x1(&x, &w, &bias, k, n, h * wd);
        let xt = Tensor::<B, 4>::from_data(TensorData::new(x, [1, k, h, wd]), &device);
        check(
            format!("conv1x1 {k} -> {n} at {h}x{wd}"),
            to_vec(ops::conv1x1(&conv, xt)),
            want,
        );
    }
    // attention of 64 queries over 1,064 keys (= 8 · 133), one head of 96 (= 32 · 3)
    let (s, t, hd) = (64, 1064, 96);
    let (q, k, v) = (values(s * hd, 11), values(t * hd, 12), values(t * hd, 13));
    let scale = (hd as f32).sqrt().recip();
    let mut want = vec![0f32; s * hd];
    for i in 0..s {
        let scores: Vec<f32> = (0..t)
            .map(|j| scale * (0..hd).map(|c| q[i * hd + c] * k[j * hd + c]).sum::<f32>())
            .collect();
        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = scores.iter().map(|x| (x - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        for c in 0..hd {
            want[i * hd + c] = (0..t).map(|j| e[j] * v[j * hd + c]).sum::<f32>() / sum;
        }
    }
    let tensor = |x: Vec<f32>, rows: usize| {
        Tensor::<B, 4>::from_data(TensorData::new(x, [1, 1, rows, hd]), &device)
    };
    let got = ops::full_attention(tensor(q, s), tensor(k, t), tensor(v, t));
    check(format!("attention over {t} keys"), to_vec(got), want);
    assert!(failures.is_empty(), "{failures:#?}");
}
