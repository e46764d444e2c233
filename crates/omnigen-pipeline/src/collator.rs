//! Batching of tokenised branch rows, as the official `OmniGenCollator` does it.
//!
//! Rows are LEFT-padded with token id 2 to the longest row; padding gets position 0 and is
//! masked out. Each row's sequence is `[text (L), time token (1), output image (N)]`, so
//! `S = L + 1 + N` with `N` the largest output-token count in the batch.

use omnigen_core::{Error, Result};

use omnigen_models::transformer::KeyRanges;

use crate::image_preprocess::PreprocessedImage;

/// Token id the official collator pads with (`</s>`; not the config's `pad_token_id`).
pub const PAD_TOKEN_ID: i64 = 2;

/// One tokenised row before padding: the official `mllm_input` dict.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedRow {
    /// Token ids; each image span is a run of id 0.
    pub input_ids: Vec<i64>,
    /// The images of the spans, in span order (a repeated placeholder repeats its image).
    pub images: Vec<PreprocessedImage>,
    /// Token spans `[start, end)` replaced by the image latents, one per image.
    pub image_spans: Vec<(usize, usize)>,
}

/// Which keys one batch row's queries may attend to, stored by its structure instead of as a
/// dense `[S, S]` mask: the dense mask of a 2048² request is gigabytes, its structure a few
/// numbers. [`ModelInput::key_ranges`] gives it the transformer's form, and
/// [`ModelInput::attention_mask`] expands it when a dense mask is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowMask {
    /// Left padding (P): the first P tokens.
    pub pad: usize,
    /// This row's own text length, placeholders included (T): tokens `P..P+T`, then the time
    /// token at `P+T`.
    pub text: usize,
    /// Token spans `[start, end)` (after padding) of the input images, attending to themselves
    /// bidirectionally.
    pub spans: Vec<(usize, usize)>,
    /// This row's own output-image tokens; the batch's longer rows pad the rest (masked).
    pub output_tokens: usize,
}

/// The inputs of one transformer forward, all plain row-major data.
///
/// Maps 1:1 onto the official `forward` arguments: `input_ids`, `attention_mask`
/// ([`ModelInput::attention_mask`], from [`ModelInput::masks`]), `position_ids`,
/// `input_img_latents` (VAE-encode [`ModelInput::images`] in order) and `input_image_sizes`
/// ([`ModelInput::image_spans`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInput {
    /// Rows in this batch (B).
    pub batch_size: usize,
    /// Padded text length (L), placeholders included.
    pub text_len: usize,
    /// Full sequence length S = L + 1 + max(num_output_tokens).
    pub seq_len: usize,
    /// Token ids `[B, L]`, left-padded with [`PAD_TOKEN_ID`].
    pub input_ids: Vec<i64>,
    /// Each row's attention structure; [`ModelInput::attention_mask`] expands it.
    pub masks: Vec<RowMask>,
    /// Position ids `[B, S]`.
    pub position_ids: Vec<i64>,
    /// Input images in the order the model consumes them: row by row, then span by span.
    pub images: Vec<PreprocessedImage>,
    /// Per row, the token spans `[start, end)` (after padding) that the image latents replace;
    /// `images` lists them flattened in the same order.
    pub image_spans: Vec<Vec<(usize, usize)>>,
    /// Per row, the number of output-image tokens (`h * w / 256`); rows with fewer than the
    /// maximum are padded with masked image tokens (the official `padding_images`).
    pub num_output_tokens: Vec<usize>,
}

impl ModelInput {
    /// Shape of `input_ids`: `[B, L]`.
    pub fn input_ids_shape(&self) -> [usize; 2] {
        [self.batch_size, self.text_len]
    }

    /// Shape of the attention mask: `[B, S, S]`.
    pub fn attention_mask_shape(&self) -> [usize; 3] {
        [self.batch_size, self.seq_len, self.seq_len]
    }

    /// Shape of `position_ids`: `[B, S]`.
    pub fn position_ids_shape(&self) -> [usize; 2] {
        [self.batch_size, self.seq_len]
    }

    /// The largest output-token count of the batch (N).
    pub fn output_tokens(&self) -> usize {
        self.seq_len - self.text_len - 1
    }

    /// Row `b` of `input_ids`.
    pub fn row_ids(&self, b: usize) -> &[i64] {
        &self.input_ids[b * self.text_len..(b + 1) * self.text_len]
    }

    /// The first `n` rows (all of them when `n >= B`) without the images' pixels: what a call
    /// needs once the images are encoded, or the conditional rows of a joint batch (still padded
    /// to the batch's length).
    pub fn rows_without_pixels(&self, n: usize) -> ModelInput {
        let n = n.min(self.batch_size);
        ModelInput {
            batch_size: n,
            input_ids: self.input_ids[..n * self.text_len].to_vec(),
            masks: self.masks[..n].to_vec(),
            position_ids: self.position_ids[..n * self.seq_len].to_vec(),
            images: Vec::new(),
            image_spans: self.image_spans.iter().take(n).cloned().collect(),
            num_output_tokens: self.num_output_tokens.iter().take(n).copied().collect(),
            ..*self
        }
    }

    /// Bytes of the dense f32 attention mask, `B * S * S * 4` (saturating).
    pub fn attention_mask_bytes(&self) -> u64 {
        let s = self.seq_len as u64;
        (self.batch_size as u64)
            .saturating_mul(s.saturating_mul(s))
            .saturating_mul(4)
    }

    /// The attention mask as the transformer takes it: per row and query, the one run of keys
    /// it may attend to (`2 · B · S` numbers).
    pub fn key_ranges(&self) -> Result<KeyRanges> {
        let s = self.seq_len;
        let img_len = self.output_tokens();
        let len = self
            .batch_size
            .checked_mul(s)
            .ok_or_else(|| Error::invalid_argument("batch", "the batch's token count overflows"))?;
        let mut ranges = Vec::new();
        ranges
            .try_reserve_exact(len)
            .map_err(|_| Error::OutOfMemory {
                needed_mib: (len as u64 * 16) >> 20,
                available_mib: 0,
                hint: "the attention mask's key ranges cannot be allocated: request a smaller \
                   output size or a shorter prompt"
                    .to_string(),
            })?;
        for row in &self.masks {
            let pad = row.pad;
            // Output-image tokens beyond this row's own count are padding: nobody sees them.
            let visible_end = s - (img_len - row.output_tokens.min(img_len));
            // Padding rows see everything else (keeps softmax finite; their output is ignored).
            ranges.extend(std::iter::repeat_n((0, visible_end), pad));
            // Text + time token: causal among themselves, blind to padding and output image;
            // each input image also sees itself to its end (bidirectional).
            let mut spans = row.spans.iter().peekable();
            for i in 0..=row.text {
                let r = pad + i;
                while spans.next_if(|&&(_, end)| end <= r).is_some() {}
                let end = match spans.peek() {
                    Some(&&(start, end)) if start <= r => end,
                    _ => r + 1,
                };
                ranges.push((pad, end));
            }
            // Output-image rows see every non-padded column.
            ranges.extend(std::iter::repeat_n(
                (pad, visible_end),
                s.saturating_sub(pad + row.text + 1),
            ));
        }
        KeyRanges::new(self.batch_size, s, s, ranges)
    }

    /// The official dense 0/1 attention mask `[B, S, S]` (1 = may attend), row-major.
    ///
    /// An allocation that fails is [`Error::OutOfMemory`], not an abort.
    pub fn attention_mask(&self) -> Result<Vec<f32>> {
        self.key_ranges()?.to_dense()
    }
}

/// Collates rows exactly as the official `OmniGenCollator.process_mllm_input`.
///
/// `output_sizes[b]` is the `[height, width]` of row b's output image (pixels).
/// An empty `rows` yields an empty batch. Nothing here is quadratic in the sequence length: the
/// attention mask is kept as each row's [`RowMask`].
pub fn collate(rows: &[TokenizedRow], output_sizes: &[(usize, usize)]) -> ModelInput {
    let batch_size = rows.len();
    let num_output_tokens: Vec<usize> = output_sizes.iter().map(|&(h, w)| h * w / 256).collect();
    let img_len = num_output_tokens.iter().copied().max().unwrap_or(0);
    let text_len = rows.iter().map(|r| r.input_ids.len()).max().unwrap_or(0);
    let seq_len = text_len + img_len + 1;

    let mut input_ids = Vec::with_capacity(batch_size * text_len);
    let mut position_ids = Vec::with_capacity(batch_size * seq_len);
    let mut masks = Vec::with_capacity(batch_size);
    let mut images = Vec::new();
    let mut image_spans = Vec::with_capacity(batch_size);

    for (b, row) in rows.iter().enumerate() {
        let temp_l = row.input_ids.len();
        let pad_l = text_len - temp_l;
        input_ids.extend(std::iter::repeat_n(PAD_TOKEN_ID, pad_l));
        input_ids.extend_from_slice(&row.input_ids);

        position_ids.extend(std::iter::repeat_n(0i64, pad_l));
        position_ids.extend(0..(temp_l + img_len + 1) as i64);

        let spans: Vec<(usize, usize)> = row
            .image_spans
            .iter()
            .map(|&(s, e)| (s + pad_l, e + pad_l))
            .collect();
        masks.push(RowMask {
            pad: pad_l,
            text: temp_l,
            spans: spans.clone(),
            output_tokens: num_output_tokens.get(b).copied().unwrap_or(img_len),
        });
        image_spans.push(spans);
        images.extend(row.images.iter().cloned());
    }

    ModelInput {
        batch_size,
        text_len,
        seq_len,
        input_ids,
        masks,
        position_ids,
        images,
        image_spans,
        num_output_tokens,
    }
}
