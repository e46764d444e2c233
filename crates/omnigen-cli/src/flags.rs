//! The command line's names for the library's options: the library reports a bad value under
//! its field name (`num_inference_steps`), the user typed a flag (`--steps`), and the message
//! should lead to what was typed.

use omnigen::Error;

/// The `generate` flag that sets the library option `name`, where there is one.
pub fn flag_of(name: &str) -> Option<&'static str> {
    Some(match name {
        "prompts" => "--prompt",
        "negative_prompt" => "--negative-prompt",
        "height" => "--height",
        "width" => "--width",
        "num_inference_steps" => "--steps",
        "guidance_scale" => "--guidance-scale",
        "img_guidance_scale" => "--img-guidance-scale",
        "kv_cache" => "--kv-cache",
        "input_latents" => "--input-latents",
        "max_input_image_size" => "--max-input-image-size",
        "latents" => "--latents",
        "dtype" => "--dtype",
        "lora_scale" => "--lora-scale",
        "format" => "--format",
        "jpeg_quality" => "--jpeg-quality",
        "scheduler" => "--scheduler",
        "time_shift" => "--time-shift",
        "sigmas" => "--sigmas",
        "cfg_range" => "--cfg-range",
        _ => return None,
    })
}

/// `e` led by the flag at fault (`--steps: invalid argument `num_inference_steps`: ...`) when
/// the library named an option the command line sets; other errors pass unchanged.
pub fn name_flag(e: anyhow::Error) -> anyhow::Error {
    let flag = match e.downcast_ref::<Error>() {
        Some(Error::InvalidArgument { name, .. }) => flag_of(name),
        Some(Error::ModelNotFound { .. }) => Some("--model"),
        _ => None,
    };
    match flag {
        Some(flag) if !format!("{e:#}").starts_with(flag) => e.context(flag),
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_options_are_reported_under_their_flags() {
        let e = anyhow::Error::new(Error::invalid_argument(
            "num_inference_steps",
            "must be at least 1",
        ));
        assert_eq!(
            format!("{:#}", name_flag(e)),
            "--steps: invalid argument `num_inference_steps`: must be at least 1"
        );
        let e = anyhow::Error::new(Error::ModelNotFound {
            id: "x".into(),
            reason: "no such directory".into(),
        });
        let msg = format!("{:#}", name_flag(e));
        assert!(
            msg.starts_with("--model: cannot resolve model `x`"),
            "{msg}"
        );
        // an error that already leads with its flag is not prefixed twice
        let e = anyhow::Error::new(Error::invalid_argument("latents", "bad")).context("--latents");
        assert_eq!(
            format!("{:#}", name_flag(e)),
            "--latents: invalid argument `latents`: bad"
        );
    }

    #[test]
    fn other_errors_keep_their_message() {
        let e = anyhow::Error::new(Error::invalid_argument("weights", "no file given"));
        assert_eq!(
            format!("{:#}", name_flag(e)),
            "invalid argument `weights`: no file given"
        );
        let e = anyhow::anyhow!("plain").context("outer");
        assert_eq!(format!("{:#}", name_flag(e)), "outer: plain");
    }
}
