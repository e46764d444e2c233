//! Pillow-exact resizing and the official `crop_arr`.
//!
//! `proc/proc_resize.*` (the official processor-only dump, every intermediate step) is checked
//! when present, `proc/pillow13_pass_order.safetensors` (Pillow 13's vertical-first cases)
//! always. An extra, ignored test compares against a directory of Pillow outputs
//! (`OMNIGEN_PILLOW_VECTORS`).

use crate::support::*;
use image::RgbImage;
use omnigen_pipeline::image_preprocess::{
    crop_arr, normalize, pillow_resize, preprocess_image, ResampleFilter,
};

fn load(path: &std::path::Path) -> RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// A deterministic test pattern: a gradient plus pseudo-random noise.
fn pattern(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let n = (x.wrapping_mul(73_856_093)
            ^ y.wrapping_mul(19_349_663)
            ^ seed.wrapping_mul(83_492_791))
            % 251;
        image::Rgb([
            n as u8,
            ((x * 7 + y * 3) % 256) as u8,
            ((x * y + seed) % 256) as u8,
        ])
    })
}

#[test]
fn crop_only_and_identity() {
    let img = pattern(72, 56, 1);
    let out = crop_arr(&img, 1024, "t").unwrap();
    assert_eq!(out.dimensions(), (64, 48));
    // (72 % 16) / 2 = 4 columns cut on the left, (56 % 16) / 2 = 4 rows on top.
    assert_eq!(out.get_pixel(0, 0), img.get_pixel(4, 4));
    let img = pattern(17, 17, 2);
    let out = crop_arr(&img, 1024, "t").unwrap();
    assert_eq!(out.dimensions(), (16, 16));
    assert_eq!(out.get_pixel(0, 0), img.get_pixel(0, 0));
    let img = pattern(64, 48, 3);
    assert_eq!(crop_arr(&img, 1024, "t").unwrap(), img);
}

#[test]
fn resize_rules_give_official_sizes() {
    for (w, h, max, expected) in [
        (200, 150, 48, (48, 32)),  // BOX 100x75, BICUBIC 48x36, crop
        (257, 64, 32, (64, 16)),   // BOX 128x32, BICUBIC 32x8, up to 64x16
        (40, 10, 1024, (64, 16)),  // up 64x16
        (15, 100, 1024, (16, 96)), // up 16x107, crop
        (99, 31, 64, (64, 16)),    // down 64x20, crop
        (128, 81, 64, (64, 32)),   // 40.5 rounds to 40 (ties to even)
        (128, 83, 64, (64, 32)),   // 41.5 rounds to 42
        (130, 67, 128, (128, 64)),
    ] {
        let out = crop_arr(&pattern(w, h, 9), max, "t").unwrap();
        assert_eq!(out.dimensions(), expected, "{w}x{h} max {max}");
    }
}

#[test]
fn same_size_resize_is_identity_and_constant_stays_constant() {
    let img = pattern(31, 17, 4);
    assert_eq!(
        pillow_resize(&img, 31, 17, ResampleFilter::Bicubic).unwrap(),
        img
    );
    let flat = RgbImage::from_pixel(53, 41, image::Rgb([200, 3, 77]));
    for filter in [ResampleFilter::Box, ResampleFilter::Bicubic] {
        for (w, h) in [(26, 20), (7, 5), (100, 90), (1, 1)] {
            let out = pillow_resize(&flat, w, h, filter).unwrap();
            assert!(
                out.pixels().all(|p| *p == image::Rgb([200, 3, 77])),
                "{filter:?} {w}x{h}"
            );
        }
    }
}

#[test]
fn normalization_matches_torch() {
    let img = RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 16 + y) as u8, 0, 255]));
    let pre = preprocess_image(&img, 1024, "t").unwrap();
    assert_eq!((pre.height, pre.width, pre.num_tokens()), (16, 16, 1));
    assert_eq!(pre.pixels[0], -1.0);
    assert_eq!(pre.pixels[256], -1.0);
    assert_eq!(pre.pixels[512], 1.0);
    assert_eq!(pre.pixels, normalize(&img));
}

/// Each recorded intermediate of the official `crop_arr` (`NAME.after_box`, `NAME.after_down`,
/// `NAME.after_up`), recomputed from the previous recorded step so a mismatch is pinned to
/// one resize.
fn check_official_steps(tensors: &SafetensorsFile, name: &str, input: &RgbImage, max: u32) {
    let recorded = |step: &str| -> Option<RgbImage> {
        let key = format!("{name}.{step}");
        if !tensors.has(&key) {
            return None;
        }
        let shape = tensors.shape(&key);
        assert_eq!(shape.len(), 3, "{key}: HWC expected");
        assert_eq!(shape[2], 3, "{key}: RGB expected");
        Some(RgbImage::from_raw(shape[1] as u32, shape[0] as u32, tensors.u8(&key)).unwrap())
    };
    let mut current = input.clone();
    if let Some(want) = recorded("after_box") {
        while current.width().min(current.height()) >= 2 * max {
            let (w, h) = current.dimensions();
            current = pillow_resize(&current, w / 2, h / 2, ResampleFilter::Box).unwrap();
        }
        assert!(current == want, "{name}.after_box");
        current = want;
    }
    for step in ["after_down", "after_up"] {
        if let Some(want) = recorded(step) {
            let got = pillow_resize(
                &current,
                want.width(),
                want.height(),
                ResampleFilter::Bicubic,
            )
            .unwrap();
            assert!(got == want, "{name}.{step}");
            current = want;
        }
    }
}

/// The official processor-only dump (`tests/fixtures/proc/proc_resize.*`), when committed.
#[test]
fn official_resize_dump() {
    let dir = fixtures_dir().join("proc");
    let json_path = dir.join("proc_resize.json");
    if !json_path.is_file() {
        eprintln!("skipping: {} not present", json_path.display());
        return;
    }
    let json = read_json(json_path);
    let tensors = SafetensorsFile::open(dir.join("proc_resize.safetensors"));
    let names: std::collections::BTreeSet<String> = tensors
        .names()
        .iter()
        .filter_map(|n| n.strip_suffix(".cropped").map(str::to_string))
        .collect();
    assert!(!names.is_empty());
    for name in names {
        let entry = &json["images"][&name];
        let file = entry["file"]
            .as_str()
            .map(str::to_string)
            .unwrap_or(format!("resize_{name}.png"));
        let max = entry["max_input_image_size"]
            .as_u64()
            .or_else(|| {
                entry["max_input_image_size"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
            })
            .unwrap_or_else(|| panic!("{name}: no max_input_image_size in JSON"))
            as u32;
        let input = load(&dir.join(file));
        check_official_steps(&tensors, &name, &input, max);
        let pre = preprocess_image(&input, max, &name).unwrap();
        let shape = tensors.shape(&format!("{name}.cropped"));
        assert_eq!(shape, vec![pre.height, pre.width, 3], "{name} shape");
        assert_eq!(
            pre.rgb.as_raw(),
            &tensors.u8(&format!("{name}.cropped")),
            "{name}.cropped"
        );
        let pv = format!("{name}.pixel_values");
        if tensors.has(&pv) {
            let diff = max_abs_diff(&pre.pixels, &tensors.f32(&pv));
            assert!(diff <= 1e-6, "{pv}: {diff}");
        }
    }
}

/// Ad-hoc check against Pillow 13 outputs: `inN.png`, `outN.png` (= crop_arr), `bicN.png`
/// (BICUBIC to w/3 x h/2), `boxN.png` (BOX to w/2 x h/2), `upN.png` (BICUBIC to 2w+1 x h+3),
/// `cases.txt` lines `N max`; optionally `pairs.txt` lines `N box|bicubic W H FILE` (`inN.png`
/// resized to WxH with that filter). Every mismatch is collected and reported at the end.
#[test]
#[ignore = "needs OMNIGEN_PILLOW_VECTORS"]
fn pillow_vectors() {
    let dir = std::path::PathBuf::from(
        std::env::var("OMNIGEN_PILLOW_VECTORS").expect("set OMNIGEN_PILLOW_VECTORS"),
    );
    let mut failures = Vec::new();
    let mut checked = 0usize;
    let mut check = |name: &str, got: RgbImage| {
        checked += 1;
        let want = load(&dir.join(name));
        if got.dimensions() != want.dimensions() {
            failures.push(format!(
                "{name}: size {:?} vs {:?}",
                got.dimensions(),
                want.dimensions()
            ));
            return;
        }
        let diffs = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        if diffs != 0 {
            failures.push(format!("{name}: {diffs} bytes differ"));
        }
    };
    let cases = std::fs::read_to_string(dir.join("cases.txt")).unwrap();
    for line in cases.lines() {
        let mut it = line.split_whitespace();
        let (i, max): (usize, u32) = (
            it.next().unwrap().parse().unwrap(),
            it.next().unwrap().parse().unwrap(),
        );
        let input = load(&dir.join(format!("in{i}.png")));
        let (w, h) = input.dimensions();
        check(&format!("out{i}.png"), crop_arr(&input, max, "t").unwrap());
        check(
            &format!("bic{i}.png"),
            pillow_resize(
                &input,
                (w / 3).max(1),
                (h / 2).max(1),
                ResampleFilter::Bicubic,
            )
            .unwrap(),
        );
        check(
            &format!("box{i}.png"),
            pillow_resize(&input, (w / 2).max(1), (h / 2).max(1), ResampleFilter::Box).unwrap(),
        );
        check(
            &format!("up{i}.png"),
            pillow_resize(&input, w * 2 + 1, h + 3, ResampleFilter::Bicubic).unwrap(),
        );
    }
    if let Ok(pairs) = std::fs::read_to_string(dir.join("pairs.txt")) {
        for line in pairs.lines().filter(|l| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let input = load(&dir.join(format!("in{}.png", f[0])));
            let filter = match f[1] {
                "box" => ResampleFilter::Box,
                "bicubic" => ResampleFilter::Bicubic,
                other => panic!("unknown filter {other}"),
            };
            let (ow, oh) = (f[2].parse().unwrap(), f[3].parse().unwrap());
            check(f[4], pillow_resize(&input, ow, oh, filter).unwrap());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} images differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{checked} images bit-exact");
}

/// `proc/pillow13_pass_order.safetensors`: Pillow 13.0.0 resizes chosen around its pass-order
/// rule (vertical pass first iff `in_h - out_h > 0 && in_h - out_h > 2 * (in_w - out_w)`),
/// including both sides of the boundary (`20x24` / `20x23`, `39x62` / `39x61`), a widened
/// image whose height shrinks (`50x30`), a height-only resize and an upscale; plus the
/// official `crop_arr(b, 64)` of a 24x150 portrait whose BICUBIC downscale runs vertical-first.
/// Input `a.input` [64,40,3], `b.input` [150,24,3]; `a.{box,bicubic}.WxH` = `a.resize((W, H))`.
/// Made by this script under `tools/reference/.venv` (Pillow 13.0.0):
///
/// ```python
/// rng = np.random.default_rng(1300)
/// a = rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)
/// b = rng.integers(0, 256, (150, 24, 3), dtype=np.uint8)
/// b[..., 1] = np.arange(24, dtype=np.uint8)[None, :] * 10
/// # a.F.WxH = Image.fromarray(a).resize((W, H), F); b.crop64.after_down = b resized to 10x64
/// # BICUBIC, .after_up = that to 16x102 BICUBIC, .cropped = OmniGen.utils.crop_arr(b, 64),
/// # b.box_half = b resized to 12x75 BOX
/// ```
#[test]
fn pillow13_pass_order_vectors() {
    let path = fixtures_dir().join("proc/pillow13_pass_order.safetensors");
    let tensors = SafetensorsFile::open(&path);
    let image = |key: &str| {
        let shape = tensors.shape(key);
        RgbImage::from_raw(shape[1] as u32, shape[0] as u32, tensors.u8(key)).unwrap()
    };
    let a = image("a.input");
    let mut checked = 0;
    for key in tensors.names() {
        let Some(rest) = key.strip_prefix("a.") else {
            continue;
        };
        let Some((filter, size)) = rest.split_once('.') else {
            continue;
        };
        let filter = match filter {
            "box" => ResampleFilter::Box,
            "bicubic" => ResampleFilter::Bicubic,
            _ => continue,
        };
        let (w, h) = size.split_once('x').unwrap();
        let got = pillow_resize(&a, w.parse().unwrap(), h.parse().unwrap(), filter).unwrap();
        assert!(got == image(&key), "{key}");
        checked += 1;
    }
    assert_eq!(checked, 15);
    let b = image("b.input");
    let down = pillow_resize(&b, 10, 64, ResampleFilter::Bicubic).unwrap();
    assert!(down == image("b.crop64.after_down"), "b.crop64.after_down");
    let up = pillow_resize(&down, 16, 102, ResampleFilter::Bicubic).unwrap();
    assert!(up == image("b.crop64.after_up"), "b.crop64.after_up");
    assert!(
        crop_arr(&b, 64, "b").unwrap() == image("b.crop64.cropped"),
        "b.crop64.cropped"
    );
    let half = pillow_resize(&b, 12, 75, ResampleFilter::Box).unwrap();
    assert!(half == image("b.box_half"), "b.box_half");
}
