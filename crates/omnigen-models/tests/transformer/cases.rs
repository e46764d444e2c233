//! Every recorded transformer call of the added pipeline cases: left-padded batches (joint CFG,
//! prompt lists), several input images, the LongRoPE long/short switch (model B) and
//! non-square outputs; cached cases through the official KV cache, `*_nokv` uncached.

use crate::support::*;

macro_rules! cases {
    ($fixtures:ident: $($test:ident => $name:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            let dir = $fixtures();
            let model = load_model(&dir.join("model"));
            replay_case(&model, &dir, $name);
        }
    )*};
}

cases!(fixtures_a:
    a_t2i_joint_padded_batch_of_two_cached => "t2i_joint",
    a_t2i_joint_padded_batch_of_two_uncached => "t2i_joint_nokv",
    a_edit_joint_padded_batch_of_three_cached => "edit_joint",
    a_edit_joint_padded_batch_of_three_uncached => "edit_joint_nokv",
    a_edit_mean_cached => "edit_mean",
    a_edit_mean_uncached => "edit_mean_nokv",
    a_two_images_cached => "two_img",
    a_two_images_joint_cached => "two_img_joint",
    a_two_images_mean_cached => "two_img_mean",
    a_two_images_mean_uncached => "two_img_mean_nokv",
    a_two_prompts_separate_cfg_cached => "batch2",
    a_two_prompts_joint_six_rows_cached => "batch2_joint",
    a_two_t2i_prompts_joint_four_rows_cached => "batch2_t2i_joint",
);

cases!(fixtures_b:
    b_t2i_branches_straddle_long_rope_cached => "t2i",
    b_t2i_branches_straddle_long_rope_uncached => "t2i_nokv",
    b_t2i_joint_padded_length_picks_long_cached => "t2i_joint",
    b_t2i_joint_padded_length_picks_long_uncached => "t2i_joint_nokv",
    b_edit_cached => "edit",
    b_edit_uncached => "edit_nokv",
    b_edit_joint_cached => "edit_joint",
    b_non_square_48x80_cached => "t2i_48x80",
    b_resize_big_cached => "resize_big",
    b_resize_thin_cached => "resize_thin",
    b_input_size_as_output_cached => "edit_inputsize",
);

/// `B/transformer_only` (S = 77 > 72: LONG factors) and `_imgcond` (S = 66: SHORT factors).
#[test]
fn b_transformer_only_long_and_short_rope() {
    let dir = fixtures_b();
    let model = load_model(&dir.join("model"));
    for (name, long) in [
        ("transformer_only", true),
        ("transformer_only_imgcond", false),
    ] {
        let fx = Fixture::open(&dir, name);
        assert_eq!(
            fx.json["rope_factors"].as_str(),
            Some(if long { "long" } else { "short" })
        );
        let input = fx.tf_input();
        let s = input.cond.position_ids.dims()[1];
        assert_eq!(model.rope.uses_long_factors(s), long);
        let rope = model
            .rope
            .tables(input.cond.position_ids.clone(), s, model.dtype());
        check(
            &format!("{name} rope cos"),
            rope.cos.clone().squeeze_dim::<3>(1),
            fx.f("tf.rope_cos_layer0"),
            1e-5,
        );
        check(
            &format!("{name} rope sin"),
            rope.sin().squeeze_dim::<3>(1),
            fx.f("tf.rope_sin_layer0"),
            1e-5,
        );
        check(
            &format!("{name} tf.out"),
            input.forward(&model).expect("forward"),
            fx.f("tf.out"),
            TOL,
        );
    }
}
