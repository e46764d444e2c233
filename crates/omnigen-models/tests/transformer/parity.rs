//! Parity of the uncached transformer forward with the official PyTorch code (fixtures A).

use crate::support::*;
use burn::tensor::Tensor;
use omnigen_models::transformer::TransformerCondition;

#[test]
fn transformer_only_matches_official_forward_and_intermediates() {
    let dir = fixtures_a();
    let model = load_model(&dir.join("model"));
    let fx = Fixture::open(&dir, "transformer_only");
    let ids = fx.i::<2>("tf.input_ids");
    let (x, timestep): (Tensor<B, 4>, Tensor<B, 1>) = (fx.f("tf.x"), fx.f("tf.timestep"));
    let input = TransformerCondition {
        input_ids: Some(ids.clone()),
        input_img_latents: vec![fx.f("tf.input_img_latents.0")],
        image_spans: Fixture::spans(&fx.json["input_image_sizes"], 1),
        attention_mask: fx.mask("tf.attention_mask"),
        position_ids: fx.i("tf.position_ids"),
    };

    // Intermediates first, so that a mismatch points at its stage.
    let s = input.position_ids.dims()[1];
    let rope = model
        .rope
        .tables(input.position_ids.clone(), s, model.dtype());
    check(
        "rope cos",
        rope.cos.clone().squeeze_dim::<3>(1),
        fx.f("tf.rope_cos_layer0"),
        1e-5,
    );
    check(
        "rope sin",
        rope.sin().squeeze_dim::<3>(1),
        fx.f("tf.rope_sin_layer0"),
        1e-5,
    );
    check(
        "time_token",
        model.time_token.forward(timestep.clone()),
        fx.f("tf.time_token_emb"),
        1e-5,
    );
    check(
        "t_embedder",
        model.t_embedder.forward(timestep.clone()),
        fx.f("tf.t_embedder_emb"),
        1e-5,
    );
    // Recorded as the bare patch embedding; the position crop is checked via the full sequence.
    check(
        "x_embedder",
        model.x_embedder.forward(x.clone()),
        fx.f("tf.x_embedder_out"),
        1e-5,
    );
    let emb: Tensor<B, 3> = fx.f("tf.llm_inputs_embeds");
    let l = ids.dims()[1];
    // Condition part (text + spliced image) through the public embedders.
    let text = model.llm.embed_tokens.forward(ids);
    let lat = model
        .input_x_embedder
        .forward(fx.f("tf.input_img_latents.0"))
        + model.pos_embed.crop(3, 4).expect("crop").unsqueeze::<3>();
    let cond = text.slice_assign([0..1, 24..36, 0..48], lat);
    check("llm_inputs_embeds[cond]", cond, emb.narrow(1, 0, l), 1e-6);

    let out = model.forward(&input, x, timestep).expect("forward");
    check("tf.out", out, fx.f("tf.out"), TOL);
}

/// Every transformer call of the uncached pipeline cases, every step and branch.
fn pipeline_case_uncached(name: &str) {
    let dir = fixtures_a();
    let model = load_model(&dir.join("model"));
    let fx = Fixture::open(&dir, name);
    let mut worst = 0f32;
    for step in 0..fx.steps() {
        for br in fx.branches() {
            let out = fx.branch_input(&br, step).forward(&model).expect("forward");
            worst = worst.max(check(
                &format!("{name} step{step}.{br}"),
                out,
                fx.f(&format!("step{step}.{br}.out")),
                TOL,
            ));
        }
    }
    println!("{name}: worst {worst:.3e}");
}

#[test]
fn t2i_nokv_every_call_matches() {
    pipeline_case_uncached("t2i_nokv");
}

#[test]
fn edit_nokv_every_call_matches() {
    pipeline_case_uncached("edit_nokv");
}
