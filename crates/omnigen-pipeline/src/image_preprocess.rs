//! Input-image preprocessing, bit-exact with the official transform.
//!
//! The official processor runs `crop_arr(pil_image, max_image_size)` (OmniGen 1.0.3,
//! `OmniGen/utils.py`) then `ToTensor()` and `Normalize(0.5, 0.5)`:
//!
//! 1. while the shorter side is at least `2 * max`: halve both sides (floor) with Pillow's BOX filter;
//! 2. if the longer side exceeds `max`: scale by `max / longer` with BICUBIC, sides rounded
//!    with Python's `round` (ties to even);
//! 3. if the shorter side is below 16: scale by `16 / shorter` with BICUBIC, same rounding;
//! 4. center-crop each side down to a multiple of 16 (the odd pixel goes to the bottom/right);
//! 5. `x / 255` in f32, then `(x - 0.5) / 0.5`.
//!
//! Pillow's resampler (`src/libImaging/Resample.c`) works on 8-bit data in fixed point, so
//! any float implementation differs by ±1 level here and there. [`pillow_resize`] reimplements
//! its 8-bit path: separable convolution, per-output-pixel coefficients normalised to sum 1
//! and quantised to 22 fractional bits, each pass rounded and clipped to u8.
//!
//! The pass order follows Pillow 13.0.0 (the version that produced the reference fixtures).
//! Its `ImagingResampleInner` runs the vertical pass first when the height shrinks by more
//! than twice as many pixels as the width, i.e. when
//! `in_h - out_h > 0 && in_h - out_h > 2 * (in_w - out_w)` (signed differences, so a widened
//! image with a shrinking height goes vertical-first too); otherwise horizontal then
//! vertical, as every Pillow <= 12 does. Since each pass rounds to u8 the order can change
//! results by ±1 level. Nothing else in the 8-bit BOX/BICUBIC path changed between 12.0.0 and
//! 13.0.0, and `Image.resize` with the default `reducing_gap=None` never calls `reduce()`.

use image::RgbImage;
use omnigen_core::{Error, Result};

/// A resampling filter of Pillow's `Image.resize` (the two the official transform uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleFilter {
    /// `Image.BOX`: each output pixel averages the input pixels its footprint covers.
    Box,
    /// `Image.BICUBIC`: Keys cubic convolution with `a = -0.5`, widened when downscaling.
    Bicubic,
}

impl ResampleFilter {
    /// Half-width of the kernel at scale 1, as in Pillow.
    fn support(self) -> f64 {
        match self {
            ResampleFilter::Box => 0.5,
            ResampleFilter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            ResampleFilter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            ResampleFilter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fractional bits of Pillow's 8-bit fixed-point coefficients (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// Fixed-point coefficients of a 1-D resampling: for each output index the first input
/// index, the number of taps and the taps themselves.
struct Coefficients {
    taps_per_output: usize,
    first: Vec<usize>,
    count: Vec<usize>,
    taps: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for a full-image box.
fn coefficients(in_size: usize, out_size: usize, filter: ResampleFilter) -> Coefficients {
    // Pillow passes the source box as C floats; for whole images these are exact integers.
    let in0 = 0.0f64;
    let in1 = in_size as f32 as f64;
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let taps_per_output = support.ceil() as usize * 2 + 1;
    let mut first = Vec::with_capacity(out_size);
    let mut count = Vec::with_capacity(out_size);
    let mut taps = vec![0i32; out_size * taps_per_output];
    let mut weights = vec![0f64; taps_per_output];
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero; the clamp to 0 makes that equal to floor here.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64)
            .min(in_size as i64)
            .max(xmin as i64) as usize;
        let n = (xmax - xmin).min(taps_per_output);
        let mut total = 0.0f64;
        for (x, w) in weights.iter_mut().enumerate().take(n) {
            *w = filter.weight(((x + xmin) as f64 - center + 0.5) * ss);
            total += *w;
        }
        let row = &mut taps[xx * taps_per_output..xx * taps_per_output + n];
        for (tap, &w) in row.iter_mut().zip(weights.iter()) {
            let w = if total != 0.0 { w / total } else { w };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            *tap = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        first.push(xmin);
        count.push(n);
    }
    Coefficients {
        taps_per_output,
        first,
        count,
        taps,
    }
}

/// Rounds and clips a fixed-point accumulator to u8 like Pillow's `clip8`.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One separable pass over interleaved RGB8 data along rows (`horizontal`) or columns.
fn resample_pass(
    src: &RgbImage,
    out_w: u32,
    out_h: u32,
    coeffs: &Coefficients,
    horizontal: bool,
) -> RgbImage {
    let (in_w, _) = src.dimensions();
    let src = src.as_raw();
    let mut out = vec![0u8; out_w as usize * out_h as usize * 3];
    let half = 1i32 << (PRECISION_BITS - 1);
    for y in 0..out_h as usize {
        for x in 0..out_w as usize {
            // Horizontal: taps walk along row y; vertical: down column x.
            let (o, base, step) = if horizontal {
                (x, y * in_w as usize * 3, 3)
            } else {
                (y, x * 3, in_w as usize * 3)
            };
            let k = &coeffs.taps[o * coeffs.taps_per_output..][..coeffs.count[o]];
            let mut acc = [half; 3];
            for (t, &w) in k.iter().enumerate() {
                let p = base + (coeffs.first[o] + t) * step;
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = a.wrapping_add((src[p + c] as i32).wrapping_mul(w));
                }
            }
            let q = (y * out_w as usize + x) * 3;
            for c in 0..3 {
                out[q + c] = clip8(acc[c]);
            }
        }
    }
    // The buffer length matches the dimensions by construction.
    RgbImage::from_raw(out_w, out_h, out).unwrap_or_else(|| RgbImage::new(out_w, out_h))
}

/// Pillow 13's pass order: vertical first when the height loses more than twice as many
/// pixels as the width (`ImagingResampleInner`, "to make the horizontal pass faster").
fn vertical_first(in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> bool {
    let dh = in_h as i64 - out_h as i64;
    let dw = in_w as i64 - out_w as i64;
    dh > 0 && dh > 2 * dw
}

/// `Image.resize((width, height), filter)` of Pillow for an RGB image, bit for bit.
///
/// Fails with [`Error::InvalidArgument`] for a zero target size.
pub fn pillow_resize(
    src: &RgbImage,
    width: u32,
    height: u32,
    filter: ResampleFilter,
) -> Result<RgbImage> {
    if width == 0 || height == 0 {
        return Err(Error::invalid_argument(
            "resize",
            format!("target size {width}x{height} is empty"),
        ));
    }
    let (in_w, in_h) = src.dimensions();
    let mut current = src.clone();
    // Pillow skips a pass whose size does not change (a scale-1 pass would be the identity).
    let horizontal = |img: &RgbImage| {
        let coeffs = coefficients(in_w as usize, width as usize, filter);
        resample_pass(img, width, img.height(), &coeffs, true)
    };
    let vertical = |img: &RgbImage| {
        let coeffs = coefficients(in_h as usize, height as usize, filter);
        resample_pass(img, img.width(), height, &coeffs, false)
    };
    if vertical_first(in_w, in_h, width, height) {
        // The height shrinks here, so the vertical pass always runs.
        current = vertical(&current);
        if width != in_w {
            current = horizontal(&current);
        }
    } else {
        if width != in_w {
            current = horizontal(&current);
        }
        if height != in_h {
            current = vertical(&current);
        }
    }
    Ok(current)
}

/// Python's `round(x)` for the sizes computed in `crop_arr` (ties to even).
fn python_round(x: f64) -> u64 {
    x.round_ties_even().max(0.0) as u64
}

fn scaled_size(w: u32, h: u32, scale: f64, source_name: &str) -> Result<(u32, u32)> {
    let nw = python_round(w as f64 * scale);
    let nh = python_round(h as f64 * scale);
    if nw == 0 || nh == 0 || nw > u32::MAX as u64 || nh > u32::MAX as u64 {
        return Err(Error::InvalidImage {
            source_name: source_name.to_string(),
            reason: format!("{w}x{h} cannot be resized by {scale} (gives {nw}x{nh})"),
        });
    }
    Ok((nw as u32, nh as u32))
}

/// The official `crop_arr`: resize rules for `max_image_size`, then center crop to multiples
/// of 16. Returns the cropped RGB8 image.
///
/// `source_name` names the image in errors. Fails with [`Error::InvalidArgument`] when
/// `max_image_size` is 0 and [`Error::InvalidImage`] when the image is empty or its aspect
/// ratio is so extreme that a side would round to 0 pixels.
pub fn crop_arr(image: &RgbImage, max_image_size: u32, source_name: &str) -> Result<RgbImage> {
    if max_image_size == 0 {
        return Err(Error::invalid_argument(
            "max_input_image_size",
            "must be at least 1",
        ));
    }
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::InvalidImage {
            source_name: source_name.to_string(),
            reason: format!("image is empty ({w}x{h})"),
        });
    }
    let mut img = image.clone();
    let max = max_image_size as u64;
    while (img.width().min(img.height()) as u64) >= 2 * max {
        let (w, h) = img.dimensions();
        img = pillow_resize(&img, w / 2, h / 2, ResampleFilter::Box)?;
    }
    let longer = img.width().max(img.height());
    if longer as u64 > max {
        let scale = max_image_size as f64 / longer as f64;
        let (nw, nh) = scaled_size(img.width(), img.height(), scale, source_name)?;
        img = pillow_resize(&img, nw, nh, ResampleFilter::Bicubic)?;
    }
    let shorter = img.width().min(img.height());
    if shorter < 16 {
        let scale = 16.0 / shorter as f64;
        let (nw, nh) = scaled_size(img.width(), img.height(), scale, source_name)?;
        img = pillow_resize(&img, nw, nh, ResampleFilter::Bicubic)?;
    }
    let (w, h) = img.dimensions();
    let (y1, x1) = ((h % 16) / 2, (w % 16) / 2);
    let (ch, cw) = (h - h % 16, w - w % 16);
    if ch == 0 || cw == 0 {
        return Err(Error::InvalidImage {
            source_name: source_name.to_string(),
            reason: format!("{w}x{h} is smaller than 16 pixels after resizing"),
        });
    }
    Ok(image::imageops::crop_imm(&img, x1, y1, cw, ch).to_image())
}

/// An input image after the official transform.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessedImage {
    /// Pixels in `[-1, 1]`, channel-major `[3, height, width]` (the official `[1, 3, h, w]`
    /// tensor without its batch axis).
    pub pixels: Vec<f32>,
    /// Height in pixels (a multiple of 16).
    pub height: usize,
    /// Width in pixels (a multiple of 16).
    pub width: usize,
    /// The cropped RGB8 image the pixels were computed from.
    pub rgb: RgbImage,
}

impl PreprocessedImage {
    /// Number of transformer tokens this image occupies: one per 16x16 pixel block.
    pub fn num_tokens(&self) -> usize {
        self.height * self.width / 256
    }
}

/// `ToTensor` + `Normalize(0.5, 0.5)` with torch's f32 operation order.
pub fn normalize(rgb: &RgbImage) -> Vec<f32> {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let raw = rgb.as_raw();
    let mut out = vec![0f32; 3 * h * w];
    for c in 0..3 {
        for i in 0..h * w {
            out[c * h * w + i] = (raw[i * 3 + c] as f32 / 255.0 - 0.5) / 0.5;
        }
    }
    out
}

/// The full official image transform: [`crop_arr`] then [`normalize`].
pub fn preprocess_image(
    image: &RgbImage,
    max_image_size: u32,
    source_name: &str,
) -> Result<PreprocessedImage> {
    let rgb = crop_arr(image, max_image_size, source_name)?;
    Ok(PreprocessedImage {
        pixels: normalize(&rgb),
        height: rgb.height() as usize,
        width: rgb.width() as usize,
        rgb,
    })
}
