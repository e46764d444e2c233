//! The batch report: `report.html`, one self-contained page (inline style, script and SVG; the
//! images referenced by relative paths, nothing fetched from a network) with a contact sheet
//! per job, and `contact_sheet.png` in the folder of each job that makes several images.
//! Both are made from the manifest and the latest records of `results.jsonl`, so they show
//! the state of the whole folder, whichever run made each image.

use std::fmt::Write as _;
use std::path::Path;

use image::RgbImage;
use omnigen::prelude::*;
use serde_json::{json, Value};

use super::manifest::{Job, SweepValue};
use super::results::{Record, Results, Status};
use super::{human_seconds, key_of, output_of};

/// The report's file name in the output folder.
pub const FILE: &str = "report.html";
/// The contact sheet's file name in a job's folder.
pub const SHEET: &str = "contact_sheet.png";

/// Pixels between contact sheet cells.
const GAP: u32 = 4;

/// One place of a job's grid.
struct Slot<'a> {
    output: String,
    record: Option<&'a Record>,
}

/// A job's images as rows and columns, each labelled with its swept values.
struct Grid<'a> {
    rows: Vec<String>,
    cols: Vec<String>,
    slots: Vec<Vec<Slot<'a>>>,
}

/// Rows are the first swept field's values; columns the other fields' (and the image index
/// when a cell has several images).
fn grid<'a>(job: &Job, results: &'a Results) -> Grid<'a> {
    let cells = job.cells();
    let n = job.per_cell();
    let rows = job.axes.first().map_or(1, |a| a.values.len()).max(1);
    let per_row = (cells.len() / rows).max(1);
    let col_label = |values: &[SweepValue], k: usize| {
        let mut parts: Vec<String> = values.iter().skip(1).map(SweepValue::label).collect();
        if n > 1 {
            parts.push(format!("#{}", k + 1));
        }
        parts.join(", ")
    };
    let mut g = Grid {
        rows: Vec::new(),
        cols: Vec::new(),
        slots: Vec::new(),
    };
    for (r, chunk) in cells.chunks(per_row).enumerate() {
        g.rows.push(
            chunk
                .first()
                .and_then(|c| c.first())
                .map_or_else(String::new, SweepValue::label),
        );
        let mut slots = Vec::new();
        for values in chunk {
            for k in 0..n {
                if r == 0 {
                    g.cols.push(col_label(values, k));
                }
                slots.push(Slot {
                    output: output_of(job, values, k),
                    record: results.latest.get(&key_of(job, values, k)),
                });
            }
        }
        g.slots.push(slots);
    }
    // a job with one swept field shows it across, not down
    if job.axes.len() == 1 && n == 1 {
        g.cols = std::mem::take(&mut g.rows);
        g.rows = vec![String::new()];
        let all: Vec<Slot> = g.slots.drain(..).flatten().collect();
        g.slots = vec![all];
    }
    g
}

/// Escapes text for HTML content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A record's tokens: the sum of its branches' sequence lengths.
fn tokens(r: &Record) -> usize {
    r.tokens_per_branch.iter().sum()
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// Writes `report.html` into `out` and the contact sheet of every multi-image job.
pub fn write(out: &Path, jobs: &[Job], results: &Results) -> anyhow::Result<()> {
    let mut html = String::new();
    let done: Vec<&Record> = jobs
        .iter()
        .filter(|j| j.problems.is_empty())
        .flat_map(|j| {
            let g = grid(j, results);
            g.slots
                .into_iter()
                .flatten()
                .filter_map(|s| s.record.filter(|r| r.status == Status::Done))
                .collect::<Vec<_>>()
        })
        .collect();
    let expected: usize = jobs
        .iter()
        .filter(|j| j.problems.is_empty())
        .map(|j| j.cells().len() * j.per_cell())
        .sum();
    let failed_images: usize = jobs
        .iter()
        .filter(|j| j.problems.is_empty())
        .flat_map(|j| grid(j, results).slots.into_iter().flatten())
        .filter(|s| s.record.is_some_and(|r| r.status == Status::Failed))
        .count();
    let bad: Vec<&Job> = jobs.iter().filter(|j| !j.problems.is_empty()).collect();
    let total_seconds: f64 = done.iter().filter_map(|r| r.seconds).sum();
    let total_tokens: usize = done.iter().map(|r| tokens(r)).sum();
    let peak = done.iter().filter_map(|r| r.peak_memory_bytes).max();

    html.push_str(concat!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
        "<title>omnigen batch report</title>\n<style>\n",
        "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}\n",
        "h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em}\n",
        "table{border-collapse:collapse}td,th{padding:4px;vertical-align:top}\n",
        ".totals td,.totals th,.bad td,.bad th{border:1px solid #ccc;text-align:left}\n",
        ".sheet th{font-weight:600;font-size:12px;text-align:center}\n",
        ".sheet th.row{text-align:right;vertical-align:middle}\n",
        "figure{margin:0}figure img{display:block;max-width:256px;min-width:64px;",
        "image-rendering:pixelated;cursor:pointer;border:1px solid #ccc}\n",
        "figcaption{font-size:11px;color:#555}\n",
        ".failed{color:#a00;max-width:256px;font-size:12px}.pending{color:#777;font-size:12px}\n",
        ".prompt{font-family:monospace;white-space:pre-wrap}\n",
        "#details{position:fixed;right:1em;top:1em;max-width:40em;max-height:90vh;overflow:auto;",
        "background:#fff;border:1px solid #888;padding:.5em 1em;box-shadow:0 2px 8px #0003}\n",
        "#details pre{font-size:12px;white-space:pre-wrap}\n",
        "</style>\n</head>\n<body>\n<h1>omnigen batch report</h1>\n"
    ));
    let _ = writeln!(
        html,
        "<table class=\"totals\"><tr><th>images done</th><td id=\"done\">{}</td></tr>\
         <tr><th>failed</th><td>{failed_images}</td></tr>\
         <tr><th>not yet generated</th><td>{}</td></tr>\
         <tr><th>lines with problems</th><td>{}</td></tr>\
         <tr><th>total time</th><td>{}</td></tr>\
         <tr><th>total tokens</th><td>{total_tokens}</td></tr>\
         <tr><th>peak memory</th><td>{}</td></tr></table>",
        done.len(),
        expected.saturating_sub(done.len() + failed_images),
        bad.len(),
        human_seconds(total_seconds),
        peak.map_or("?".into(), mib),
    );
    html.push_str("<h2>Time per image against its pixel count</h2>\n");
    html.push_str(&plot(&done));

    if !bad.is_empty() {
        html.push_str(
            "<h2>Lines with problems</h2>\n<table class=\"bad\"><tr><th>line</th><th>id</th>\
             <th>problems</th></tr>\n",
        );
        for job in &bad {
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                job.line,
                esc(&job.id),
                job.problems
                    .iter()
                    .map(|p| esc(p))
                    .collect::<Vec<_>>()
                    .join("<br>")
            );
        }
        html.push_str("</table>\n");
    }

    for job in jobs.iter().filter(|j| j.problems.is_empty()) {
        let g = grid(job, results);
        let records: Vec<&Record> = g
            .slots
            .iter()
            .flatten()
            .filter_map(|s| s.record.filter(|r| r.status == Status::Done))
            .collect();
        let seconds: f64 = records.iter().filter_map(|r| r.seconds).sum();
        let tokens_sum: usize = records.iter().map(|r| tokens(r)).sum();
        let peak = records.iter().filter_map(|r| r.peak_memory_bytes).max();
        let _ = write!(
            html,
            "<section class=\"job\" id=\"job-{id}\">\n<h2>{id} <small>(line {line})</small></h2>\n\
             <p class=\"prompt\">{prompt}</p>\n<p>{done} of {all} images · {time} · {tokens_sum} \
             tokens · peak memory {peak}</p>\n",
            id = esc(&job.id),
            line = job.line,
            prompt = esc(&job.prompt),
            done = records.len(),
            all = g.slots.iter().map(Vec::len).sum::<usize>(),
            time = human_seconds(seconds),
            peak = peak.map_or("?".into(), mib),
        );
        html.push_str("<table class=\"sheet\">\n");
        if g.cols.iter().any(|c| !c.is_empty()) {
            html.push_str("<tr><th></th>");
            for c in &g.cols {
                let _ = write!(html, "<th>{}</th>", esc(c));
            }
            html.push_str("</tr>\n");
        }
        for (label, row) in g.rows.iter().zip(&g.slots) {
            let _ = write!(html, "<tr><th class=\"row\">{}</th>", esc(label));
            for slot in row {
                html.push_str("<td>");
                html.push_str(&slot_html(slot));
                html.push_str("</td>");
            }
            html.push_str("</tr>\n");
        }
        html.push_str("</table>\n");
        if job.is_grid() && !records.is_empty() {
            let _ = writeln!(
                html,
                "<p><a href=\"{}/{SHEET}\">contact sheet (PNG)</a></p>",
                esc(&job.id)
            );
            contact_sheet(out, job, &g)?;
        }
        html.push_str("</section>\n");
    }
    html.push_str(concat!(
        "<div id=\"details\" hidden><p><strong id=\"details-title\"></strong> ",
        "<button type=\"button\" id=\"details-close\">close</button></p>",
        "<pre id=\"details-body\"></pre></div>\n<script>\n",
        "(function () {\n",
        "  var box = document.getElementById('details');\n",
        "  function show(img) {\n",
        "    document.getElementById('details-title').textContent = img.getAttribute('alt');\n",
        "    var params = JSON.parse(img.getAttribute('data-params'));\n",
        "    document.getElementById('details-body').textContent = JSON.stringify(params, null, 2);\n",
        "    box.hidden = false;\n",
        "  }\n",
        "  document.querySelectorAll('img[data-params]').forEach(function (img) {\n",
        "    img.addEventListener('click', function () { show(img); });\n",
        "    img.addEventListener('keydown', function (e) { if (e.key === 'Enter') show(img); });\n",
        "  });\n",
        "  document.getElementById('details-close').addEventListener('click', function () {\n",
        "    box.hidden = true;\n",
        "  });\n",
        "})();\n</script>\n</body>\n</html>\n"
    ));
    omnigen::pipeline::output::write_atomically(&out.join(FILE), |f| {
        std::io::Write::write_all(f, html.as_bytes())
    })?;
    Ok(())
}

/// One grid place: the image with its parameters (hover: a summary; click: all of them), its
/// error, or a note that it has not been made yet.
fn slot_html(slot: &Slot) -> String {
    match slot.record {
        Some(r) if r.status == Status::Done => {
            let output = r.output.as_deref().unwrap_or(&slot.output);
            let sweep: Vec<String> = r.sweep.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let steps = r
                .parameters
                .as_ref()
                .and_then(|p| p["num_inference_steps"].as_u64());
            let size = r.size.map_or("?".into(), |[w, h]| format!("{w}x{h}"));
            let title = format!(
                "{output}: {}seed {}, {} steps, {size}",
                if sweep.is_empty() {
                    String::new()
                } else {
                    format!("{}; ", sweep.join(", "))
                },
                r.seed.map_or("?".into(), |s| s.to_string()),
                steps.map_or("?".into(), |s| s.to_string()),
            );
            let details = json!({
                "output": output,
                "sweep": r.sweep,
                "seed": r.seed,
                "size": size,
                "seconds": r.seconds,
                "times": r.times,
                "tokens_per_branch": r.tokens_per_branch,
                "peak_memory_bytes": r.peak_memory_bytes,
                "memory_estimate_bytes": r.memory_estimate_bytes,
                "parameters": r.parameters.clone().unwrap_or(Value::Null),
            });
            format!(
                "<figure><img src=\"{src}\" alt=\"{alt}\" title=\"{title}\" tabindex=\"0\" \
                 data-params=\"{params}\"><figcaption>{secs} · {tok} tokens · {mem}</figcaption>\
                 </figure>",
                src = esc(&url_path(output)),
                alt = esc(output),
                title = esc(&title),
                params = esc(&details.to_string()),
                secs = r.seconds.map_or("?".into(), |s| format!("{s:.2} s")),
                tok = tokens(r),
                mem = r.peak_memory_bytes.map_or("?".into(), mib),
            )
        }
        Some(r) => format!(
            "<div class=\"failed\">failed: {}</div>",
            esc(&r
                .error
                .as_ref()
                .map_or("unknown error".to_string(), |e| e.message.clone()))
        ),
        None => "<div class=\"pending\">not generated yet</div>".to_string(),
    }
}

/// A relative path as a URL path: each segment percent-encoded where a URL needs it.
fn url_path(path: &str) -> String {
    let mut out = String::new();
    for b in path.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' | b'~' => {
                out.push(b as char)
            }
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// An inline SVG scatter plot of seconds per image against pixels per image.
fn plot(done: &[&Record]) -> String {
    let points: Vec<(f64, f64, String)> = done
        .iter()
        .filter_map(|r| {
            let [w, h] = r.size?;
            let label = format!(
                "{}: {w}x{h}, {:.2} s",
                r.output.as_deref().unwrap_or("?"),
                r.seconds?
            );
            Some(((w as f64) * (h as f64), r.seconds?, label))
        })
        .collect();
    if points.is_empty() {
        return "<p>No image generated yet.</p>\n".to_string();
    }
    let (width, height, left, bottom, pad) = (520.0, 260.0, 60.0, 40.0, 12.0);
    let max_x = points.iter().map(|p| p.0).fold(0.0, f64::max).max(1.0) * 1.05;
    let max_y = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.1;
    let x = |v: f64| left + v / max_x * (width - left - pad);
    let y = |v: f64| height - bottom - v / max_y * (height - bottom - pad);
    let mut svg = format!(
        "<svg id=\"plot\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" \
         height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\" \
         aria-label=\"seconds per image against pixels per image\">\n\
         <rect width=\"{width}\" height=\"{height}\" fill=\"#fff\"/>\n\
         <line x1=\"{left}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"#444\"/>\n\
         <line x1=\"{left}\" y1=\"{y0}\" x2=\"{left}\" y2=\"{pad}\" stroke=\"#444\"/>\n\
         <text x=\"{xm}\" y=\"{yl}\" font-size=\"12\" text-anchor=\"middle\">pixels per image \
         (max {maxx:.0})</text>\n\
         <text x=\"14\" y=\"{ym}\" font-size=\"12\" text-anchor=\"middle\" \
         transform=\"rotate(-90 14 {ym})\">seconds per image (max {maxy:.2})</text>\n",
        y0 = height - bottom,
        x1 = width - pad,
        xm = (left + width) / 2.0,
        yl = height - 8.0,
        ym = (height - bottom) / 2.0,
        maxx = max_x / 1.05,
        maxy = max_y / 1.1,
    );
    for (px, secs, label) in &points {
        let _ = writeln!(
            svg,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#2a6fdb\" fill-opacity=\"0.7\">\
             <title>{}</title></circle>",
            x(*px),
            y(*secs),
            esc(label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Draws the job's done images into one PNG grid (cells the size of its largest image) with
/// its row and column labels drawn above and beside it (and kept in its text chunks), and
/// writes it as `ID/contact_sheet.png`. An image that cannot be read back (a WebP, which the
/// `image` build here does not decode) stays a grey cell.
fn contact_sheet(out: &Path, job: &Job, g: &Grid) -> anyhow::Result<()> {
    let images: Vec<Vec<Option<RgbImage>>> = g
        .slots
        .iter()
        .map(|row| {
            row.iter()
                .map(|s| {
                    let r = s.record.filter(|r| r.status == Status::Done)?;
                    let path = out.join(r.output.as_deref()?);
                    image::open(path).ok().map(|i| i.to_rgb8())
                })
                .collect()
        })
        .collect();
    let all = images.iter().flatten().flatten();
    let cw = all.clone().map(RgbImage::width).max().unwrap_or(16);
    let ch = all.map(RgbImage::height).max().unwrap_or(16);
    let cols = g.slots.iter().map(Vec::len).max().unwrap_or(1) as u32;
    let rows = g.slots.len() as u32;
    // labels twice as large once cells are large enough to carry them
    let scale = if cw >= 128 { 2 } else { 1 };
    let advance = font::ADVANCE * scale;
    let chars = |t: &String| t.chars().count() as u32;
    let top = if g.cols.iter().any(|c| !c.is_empty()) {
        font::HEIGHT * scale + 2 * GAP
    } else {
        0
    };
    let left = match g.rows.iter().map(chars).max().unwrap_or(0) {
        0 => 0,
        n => n * advance + 2 * GAP,
    };
    let mut sheet = RgbImage::from_pixel(
        left + cols * (cw + GAP) + GAP,
        top + rows * (ch + GAP) + GAP,
        image::Rgb([255, 255, 255]),
    );
    let ink = image::Rgb([30, 30, 30]);
    for (c, label) in g.cols.iter().enumerate() {
        // a label longer than its column is cut at the column's end
        let fits = ((cw + GAP) / advance) as usize;
        let text: String = label.chars().take(fits).collect();
        let x = left + GAP + c as u32 * (cw + GAP);
        font::draw(&mut sheet, x, GAP, &text, scale, ink);
    }
    for (r, label) in g.rows.iter().enumerate() {
        let y = top + GAP + r as u32 * (ch + GAP) + ch.saturating_sub(font::HEIGHT * scale) / 2;
        font::draw(&mut sheet, GAP, y, label, scale, ink);
    }
    for (r, row) in images.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            let x0 = left + GAP + c as u32 * (cw + GAP);
            let y0 = top + GAP + r as u32 * (ch + GAP);
            match img {
                Some(img) => image::imageops::replace(&mut sheet, img, x0.into(), y0.into()),
                None => {
                    let grey = RgbImage::from_pixel(cw, ch, image::Rgb([200, 200, 200]));
                    image::imageops::replace(&mut sheet, &grey, x0.into(), y0.into());
                }
            }
        }
    }
    let metadata = OutputMetadata {
        text: vec![
            ("Title".into(), format!("contact sheet of job {}", job.id)),
            ("rows".into(), g.rows.join(" | ")),
            ("columns".into(), g.cols.join(" | ")),
            (
                "swept".into(),
                job.axes
                    .iter()
                    .map(|a| a.param.name())
                    .collect::<Vec<_>>()
                    .join(" x "),
            ),
        ],
        ..OutputMetadata::default()
    };
    let folder = out.join(&job.id);
    std::fs::create_dir_all(&folder).map_err(|e| Error::io("create the folder", &folder, e))?;
    save_image(&folder.join(SHEET), &sheet, ImageFormat::Png, &metadata)?;
    Ok(())
}

/// A 5 × 7 pixel font for the labels of contact sheets: digits, lower-case letters (upper case
/// is drawn as lower case) and the signs labels use; anything else is drawn as a box.
mod font {
    use image::{Rgb, RgbImage};

    /// Glyph height in pixels (at scale 1).
    pub const HEIGHT: u32 = 7;
    /// Horizontal advance per character: five columns and one of space.
    pub const ADVANCE: u32 = 6;

    /// Rows top to bottom; bit 4 is the leftmost column.
    const GLYPHS: &[(char, [u8; 7])] = &[
        ('0', [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E]),
        ('1', [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E]),
        ('2', [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F]),
        ('3', [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E]),
        ('4', [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02]),
        ('5', [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E]),
        ('6', [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E]),
        ('7', [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08]),
        ('8', [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E]),
        ('9', [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C]),
        ('a', [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F]),
        ('b', [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E]),
        ('c', [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E]),
        ('d', [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F]),
        ('e', [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E]),
        ('f', [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08]),
        ('g', [0x00, 0x00, 0x0F, 0x11, 0x0F, 0x01, 0x0E]),
        ('h', [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11]),
        ('i', [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E]),
        ('j', [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C]),
        ('k', [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12]),
        ('l', [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E]),
        ('m', [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11]),
        ('n', [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11]),
        ('o', [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E]),
        ('p', [0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10]),
        ('q', [0x00, 0x00, 0x0D, 0x13, 0x0F, 0x01, 0x01]),
        ('r', [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10]),
        ('s', [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E]),
        ('t', [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06]),
        ('u', [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D]),
        ('v', [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04]),
        ('w', [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A]),
        ('x', [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11]),
        ('y', [0x00, 0x00, 0x11, 0x11, 0x0F, 0x01, 0x0E]),
        ('z', [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F]),
        ('=', [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00]),
        ('.', [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C]),
        (',', [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08]),
        ('-', [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00]),
        ('_', [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F]),
        ('#', [0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A]),
        ('|', [0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04]),
        (' ', [0x00; 7]),
    ];

    /// Drawn for a character the font lacks.
    const BOX: [u8; 7] = [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F];

    fn glyph(c: char) -> [u8; 7] {
        let c = c.to_ascii_lowercase();
        GLYPHS
            .iter()
            .find(|(g, _)| *g == c)
            .map_or(BOX, |(_, rows)| *rows)
    }

    /// Draws `text` with its top-left corner at `(x, y)`, each font pixel `scale` pixels wide;
    /// what falls outside `img` is clipped.
    pub fn draw(img: &mut RgbImage, x: u32, y: u32, text: &str, scale: u32, ink: Rgb<u8>) {
        for (i, c) in text.chars().enumerate() {
            let x0 = x + i as u32 * ADVANCE * scale;
            for (r, bits) in glyph(c).iter().enumerate() {
                for col in 0..5u32 {
                    if bits & (0x10 >> col) == 0 {
                        continue;
                    }
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let (px, py) = (x0 + col * scale + dx, y + r as u32 * scale + dy);
                            if px < img.width() && py < img.height() {
                                img.put_pixel(px, py, ink);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::manifest::{Axis, Param};
    use omnigen::pipeline::GenerationOptions;

    fn job(axes: Vec<Axis>, n: usize) -> Job {
        Job {
            line: 1,
            id: "j".into(),
            prompt: "p".into(),
            images: Vec::new(),
            options: GenerationOptions {
                n: Some(n),
                ..Default::default()
            },
            axes,
            format: ImageFormat::Png,
            problems: Vec::new(),
        }
    }

    #[test]
    fn the_first_swept_field_runs_down_the_others_across() {
        let axes = vec![
            Axis {
                param: Param::GuidanceScale,
                values: vec![
                    SweepValue::GuidanceScale(2.0),
                    SweepValue::GuidanceScale(3.0),
                ],
            },
            Axis {
                param: Param::Seed,
                values: (0..3).map(SweepValue::Seed).collect(),
            },
        ];
        let results = Results::default();
        let g = grid(&job(axes.clone(), 1), &results);
        assert_eq!(g.rows, ["guidance_scale=2", "guidance_scale=3"]);
        assert_eq!(g.cols, ["seed=0", "seed=1", "seed=2"]);
        assert_eq!(g.slots[1][2].output, "j/j_gs3_seed2.png");
        // several images per cell: one column each
        let g = grid(&job(axes[1..].to_vec(), 2), &results);
        assert_eq!(g.rows, ["seed=0", "seed=1", "seed=2"]);
        assert_eq!(g.cols, ["#1", "#2"]);
        assert_eq!(g.slots[0][1].output, "j/j_seed0_1.png");
        // one swept field lies across
        let g = grid(&job(axes[1..].to_vec(), 1), &results);
        assert_eq!((g.rows.len(), g.cols.len(), g.slots[0].len()), (1, 3, 3));
    }

    #[test]
    fn labels_are_drawn_and_clipped() {
        let mut img = RgbImage::from_pixel(20, 7, image::Rgb([255, 255, 255]));
        let ink = image::Rgb([0, 0, 0]);
        font::draw(&mut img, 0, 0, "1=", 1, ink);
        // the `1`'s stem is column 2, the `=` bars rows 2 and 4 of the second cell
        assert_eq!(*img.get_pixel(2, 6), ink);
        assert_eq!(*img.get_pixel(6, 2), ink);
        assert_eq!(*img.get_pixel(6, 3), image::Rgb([255, 255, 255]));
        // text past the edge is clipped, never a panic
        font::draw(&mut img, 18, 5, "seed=12345", 2, ink);
    }

    #[test]
    fn text_and_paths_are_escaped() {
        assert_eq!(
            esc("<a href='x'>&\""),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;"
        );
        assert_eq!(url_path("a b/c#1.png"), "a%20b/c%231.png");
    }
}
