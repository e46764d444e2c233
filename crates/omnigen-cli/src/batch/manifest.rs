//! Reading a batch manifest: JSON Lines (one object per line) or CSV with a header, each line a
//! job whose fields are `generate`'s options under the library's names. A line may give a list
//! for a sweepable field; the job then expands to the product of its lists (a grid). Every
//! problem is collected with its line number instead of stopping at the first, so a whole
//! manifest is checked before the model loads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use omnigen::pipeline::{CfgRange, GenerationOptions, SchedulerKind};
use omnigen::prelude::*;
use serde_json::{Map, Value};

/// The longest manifest read: far beyond any catalog, it only keeps an endless input out.
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// The most images one line may expand to: a typo in a sweep (`seed: [0, ..., 9999]`) should
/// be a refusal, not a day of work.
pub const MAX_IMAGES_PER_LINE: usize = 4096;

/// The fields a sweep may give as a list, in the order a grid's axes take: the first is the
/// rows of a contact sheet, the others (seed last) its columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Param {
    /// `guidance_scale`.
    GuidanceScale,
    /// `img_guidance_scale`.
    ImgGuidanceScale,
    /// `steps`.
    Steps,
    /// `scheduler`.
    Scheduler,
    /// `size` (`WIDTHxHEIGHT`).
    Size,
    /// `seed`.
    Seed,
}

impl Param {
    /// Every sweepable field, in axis order.
    pub const ALL: [Param; 6] = [
        Param::GuidanceScale,
        Param::ImgGuidanceScale,
        Param::Steps,
        Param::Scheduler,
        Param::Size,
        Param::Seed,
    ];

    /// The manifest field's name.
    pub fn name(self) -> &'static str {
        match self {
            Param::GuidanceScale => "guidance_scale",
            Param::ImgGuidanceScale => "img_guidance_scale",
            Param::Steps => "steps",
            Param::Scheduler => "scheduler",
            Param::Size => "size",
            Param::Seed => "seed",
        }
    }
}

/// One value of a swept field.
#[derive(Debug, Clone, PartialEq)]
pub enum SweepValue {
    /// A text guidance scale.
    GuidanceScale(f32),
    /// An image guidance scale.
    ImgGuidanceScale(f32),
    /// A step count.
    Steps(usize),
    /// A scheduler.
    Scheduler(SchedulerKind),
    /// An output size `(width, height)`.
    Size(usize, usize),
    /// A seed.
    Seed(u64),
}

impl SweepValue {
    /// The field this value is for.
    pub fn param(&self) -> Param {
        match self {
            SweepValue::GuidanceScale(_) => Param::GuidanceScale,
            SweepValue::ImgGuidanceScale(_) => Param::ImgGuidanceScale,
            SweepValue::Steps(_) => Param::Steps,
            SweepValue::Scheduler(_) => Param::Scheduler,
            SweepValue::Size(..) => Param::Size,
            SweepValue::Seed(_) => Param::Seed,
        }
    }

    /// The value as a person reads it (`2.5`, `euler`, `64x48`).
    pub fn text(&self) -> String {
        match self {
            SweepValue::GuidanceScale(v) | SweepValue::ImgGuidanceScale(v) => v.to_string(),
            SweepValue::Steps(v) => v.to_string(),
            SweepValue::Scheduler(k) => k.to_string(),
            SweepValue::Size(w, h) => format!("{w}x{h}"),
            SweepValue::Seed(v) => v.to_string(),
        }
    }

    /// `field=value`, the label of a contact sheet's row or column.
    pub fn label(&self) -> String {
        format!("{}={}", self.param().name(), self.text())
    }

    /// The value's part of an image's file name (`gs2.5`, `seed3`, `64x48`).
    pub fn file_part(&self) -> String {
        match self {
            SweepValue::GuidanceScale(v) => format!("gs{v}"),
            SweepValue::ImgGuidanceScale(v) => format!("igs{v}"),
            SweepValue::Steps(v) => format!("steps{v}"),
            SweepValue::Scheduler(k) => k.to_string(),
            SweepValue::Size(w, h) => format!("{w}x{h}"),
            SweepValue::Seed(v) => format!("seed{v}"),
        }
    }

    /// The value as JSON, for the results and the report.
    pub fn json(&self) -> Value {
        match self {
            SweepValue::GuidanceScale(v) | SweepValue::ImgGuidanceScale(v) => {
                serde_json::json!(v)
            }
            SweepValue::Steps(v) => serde_json::json!(v),
            SweepValue::Scheduler(k) => serde_json::json!(k.to_string()),
            SweepValue::Size(w, h) => serde_json::json!(format!("{w}x{h}")),
            SweepValue::Seed(v) => serde_json::json!(v),
        }
    }

    /// Sets this value on `options`.
    pub fn set(&self, o: &mut GenerationOptions) {
        match *self {
            SweepValue::GuidanceScale(v) => o.guidance_scale = Some(v),
            SweepValue::ImgGuidanceScale(v) => o.img_guidance_scale = Some(v),
            SweepValue::Steps(v) => {
                o.steps = Some(v);
                o.sigmas = None;
            }
            SweepValue::Scheduler(k) => o.scheduler = Some(k),
            SweepValue::Size(w, h) => {
                o.width = Some(w);
                o.height = Some(h);
            }
            SweepValue::Seed(v) => o.seed = Some(v),
        }
    }
}

/// A swept field and its values, in the order the line gave them.
#[derive(Debug, Clone)]
pub struct Axis {
    /// The field.
    pub param: Param,
    /// Its values (at least two).
    pub values: Vec<SweepValue>,
}

/// One manifest line read: what it asks for, or what is wrong with it.
#[derive(Debug, Clone)]
pub struct Job {
    /// 1-based line number in the manifest (of the record's first line for CSV).
    pub line: usize,
    /// The job's id: the line's `id`, or its line number.
    pub id: String,
    /// The prompt text (placeholders `<img><|image_k|></img>` for the images).
    pub prompt: String,
    /// Input images, resolved against the manifest's folder.
    pub images: Vec<PathBuf>,
    /// The line's options laid over the command line's; swept fields are left to the axes.
    pub options: GenerationOptions,
    /// The swept fields (each with at least two values), in [`Param`] order.
    pub axes: Vec<Axis>,
    /// Output format of its images.
    pub format: ImageFormat,
    /// Every problem found in the line, each `field: reason`; a job with any is not run.
    pub problems: Vec<String>,
}

impl Job {
    /// The grid's cells in row-major order: one value per axis each.
    pub fn cells(&self) -> Vec<Vec<SweepValue>> {
        let mut cells = vec![Vec::new()];
        for axis in &self.axes {
            cells = cells
                .into_iter()
                .flat_map(|cell| {
                    axis.values.iter().map(move |v| {
                        let mut c = cell.clone();
                        c.push(v.clone());
                        c
                    })
                })
                .collect();
        }
        cells
    }

    /// Images per cell (`n`).
    pub fn per_cell(&self) -> usize {
        self.options.n.unwrap_or(1)
    }

    /// The request of one cell: the job's prompt and options with the cell's values set.
    pub fn request(&self, cell: &[SweepValue]) -> omnigen::Result<GenerationRequest> {
        let mut options = self.options.clone();
        for v in cell {
            v.set(&mut options);
        }
        let images = self.images.iter().map(ConditionImage::from_path).collect();
        let prompt = Prompt::from_text(self.prompt.clone(), images)?;
        let request = options.apply(GenerationRequest::new(prompt));
        request.validate()?;
        Ok(request)
    }

    /// The file stem of image `index` (0-based within its cell) of `cell`: the id, then each
    /// swept value, then the index when the cell has several images.
    pub fn stem(&self, cell: &[SweepValue], index: usize) -> String {
        let mut stem = self.id.clone();
        for v in cell {
            stem.push('_');
            stem.push_str(&v.file_part());
        }
        if self.per_cell() > 1 {
            stem.push_str(&format!("_{index}"));
        }
        stem
    }

    /// Whether the job makes more than one image (its contact sheet is worth a file).
    pub fn is_grid(&self) -> bool {
        !self.axes.is_empty() || self.per_cell() > 1
    }
}

/// What the command line gives every line: options a line may override, and the output format.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Generation options.
    pub options: GenerationOptions,
    /// Output format.
    pub format: ImageFormat,
}

/// Reads the manifest at `path`: CSV when its extension is `.csv`, JSON Lines otherwise. Fails
/// only when the file cannot be read at all; a bad line becomes a [`Job`] with problems.
pub fn read(path: &Path, defaults: &Defaults) -> anyhow::Result<Vec<Job>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    omnigen::core::open_regular(path, Some(MAX_MANIFEST_BYTES))?
        .read_to_end(&mut bytes)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let base = path
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let is_csv = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    // spreadsheet programs start their UTF-8 exports with a byte-order mark
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let records = if is_csv {
        csv_records(text)?
    } else {
        jsonl_records(text)
    };
    let mut jobs: Vec<Job> = records
        .into_iter()
        .map(|(line, fields)| match fields {
            Ok(fields) => job_of(line, fields, &base, defaults),
            Err(problem) => Job {
                line,
                id: line.to_string(),
                prompt: String::new(),
                images: Vec::new(),
                options: GenerationOptions::default(),
                axes: Vec::new(),
                format: defaults.format,
                problems: vec![problem],
            },
        })
        .collect();
    // Ids name folders and results: a second line with an id already taken is refused.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for job in &mut jobs {
        if let Some(first) = seen.get(&job.id) {
            job.problems
                .push(format!("id: `{}` is also line {first}'s id", job.id));
        } else {
            seen.insert(job.id.clone(), job.line);
        }
    }
    Ok(jobs)
}

/// A line's fields, or why it is no JSON object.
type Record = (usize, Result<Map<String, Value>, String>);

/// The non-empty lines of a JSON Lines text, each parsed.
fn jsonl_records(text: &str) -> Vec<Record> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let fields = match serde_json::from_str::<Value>(l) {
                Ok(Value::Object(map)) => Ok(map),
                Ok(_) => Err("the line is not a JSON object".to_string()),
                Err(e) => Err(format!("not JSON: {e}")),
            };
            (i + 1, fields)
        })
        .collect()
}

/// Fields whose CSV cell is text as written; the others are read as JSON values (numbers,
/// booleans), and the sweepable fields and `images` as `;`-separated lists.
const TEXT_FIELDS: [&str; 8] = [
    "prompt",
    "id",
    "negative_prompt",
    "kv_cache",
    "input_latents",
    "format",
    "cfg_range",
    "sigmas",
];

/// The records of a CSV text (RFC 4180: quoted fields, `""` for a quote, line breaks inside
/// quotes) under its header's names; an empty cell is a field not given.
fn csv_records(text: &str) -> anyhow::Result<Vec<Record>> {
    let rows = parse_csv(text)?;
    let mut rows = rows.into_iter();
    let Some((_, header)) = rows.next() else {
        return Ok(Vec::new());
    };
    let header: Vec<String> = header.into_iter().map(|h| h.trim().to_string()).collect();
    Ok(rows
        .filter(|(_, cells)| cells.iter().any(|c| !c.trim().is_empty()))
        .map(|(line, cells)| {
            if cells.len() != header.len() {
                return (
                    line,
                    Err(format!(
                        "{} cells, the header names {}",
                        cells.len(),
                        header.len()
                    )),
                );
            }
            let mut map = Map::new();
            for (name, cell) in header.iter().zip(cells) {
                if cell.trim().is_empty() {
                    continue;
                }
                let value = csv_value(name, &cell);
                map.insert(name.clone(), value);
            }
            (line, Ok(map))
        })
        .collect())
}

/// A CSV cell as the JSON value the field reads.
fn csv_value(name: &str, cell: &str) -> Value {
    let scalar = |s: &str| -> Value {
        let s = s.trim();
        if TEXT_FIELDS.contains(&name) || matches!(name, "scheduler" | "size" | "images") {
            Value::String(s.to_string())
        } else {
            serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_string()))
        }
    };
    let listed = name == "images" || Param::ALL.iter().any(|p| p.name() == name);
    if listed && cell.contains(';') {
        Value::Array(cell.split(';').map(scalar).collect())
    } else if name == "prompt" || name == "negative_prompt" {
        Value::String(cell.to_string())
    } else {
        scalar(cell)
    }
}

/// RFC 4180 records with the 1-based line each starts on.
fn parse_csv(text: &str) -> anyhow::Result<Vec<(usize, Vec<String>)>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut cell = String::new();
    let mut quoted = false;
    let mut line = 1;
    let mut start = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    cell.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    cell.push(c);
                }
                _ => cell.push(c),
            }
            continue;
        }
        match c {
            '"' if cell.is_empty() => quoted = true,
            ',' => row.push(std::mem::take(&mut cell)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                row.push(std::mem::take(&mut cell));
                rows.push((start, std::mem::take(&mut row)));
                line += 1;
                start = line;
            }
            _ => cell.push(c),
        }
    }
    if quoted {
        anyhow::bail!("line {start}: a quoted CSV field is not closed");
    }
    if !cell.is_empty() || !row.is_empty() {
        row.push(cell);
        rows.push((start, row));
    }
    Ok(rows)
}

/// Reads one line's fields into a job, collecting every problem.
fn job_of(line: usize, fields: Map<String, Value>, base: &Path, defaults: &Defaults) -> Job {
    let mut problems = Vec::new();
    let mut o = GenerationOptions::default();
    let mut id = line.to_string();
    let mut prompt = None;
    let mut images = Vec::new();
    let mut format = defaults.format;
    let mut jpeg_quality: Option<u8> = None;
    let mut lists: BTreeMap<Param, Vec<SweepValue>> = BTreeMap::new();
    let mut height_or_width = false;
    for (name, value) in &fields {
        let f = Field { name, value };
        let outcome: Result<(), String> = (|| {
            match name.as_str() {
                "id" => {
                    id = match value {
                        Value::String(s) => s.clone(),
                        Value::Number(n) if n.is_u64() => n.to_string(),
                        _ => return Err("must be a string or a whole number".into()),
                    };
                    check_id(&id)?;
                }
                "prompt" => {
                    let text = f.string()?;
                    if text.trim().is_empty() {
                        return Err("must not be empty".into());
                    }
                    prompt = Some(text);
                }
                "images" => {
                    let list = match value {
                        Value::Array(items) => items.iter().collect(),
                        other => vec![other],
                    };
                    for item in list {
                        let Value::String(p) = item else {
                            return Err("must be a path or a list of paths".into());
                        };
                        images.push(base.join(p));
                    }
                }
                "n" => o.n = Some(f.uint()? as usize),
                "height" => {
                    o.height = Some(f.uint()? as usize);
                    height_or_width = true;
                }
                "width" => {
                    o.width = Some(f.uint()? as usize);
                    height_or_width = true;
                }
                "negative_prompt" => o.negative_prompt = Some(f.string()?),
                "time_shift" => o.time_shift = Some(f.float()?),
                "sigmas" => {
                    o.sigmas = Some(match value {
                        Value::String(s) => {
                            omnigen::pipeline::parse_sigmas(s).map_err(|e| reason(&e))?
                        }
                        Value::Array(items) => items
                            .iter()
                            .map(|v| {
                                v.as_f64()
                                    .map(|v| v as f32)
                                    .ok_or_else(|| "must be numbers".to_string())
                            })
                            .collect::<Result<_, _>>()?,
                        _ => return Err("must be a list of numbers or `a,b,c`".into()),
                    })
                }
                "cfg_range" => {
                    o.cfg_range = Some(match value {
                        Value::String(s) => s.parse::<CfgRange>().map_err(|e| reason(&e))?,
                        Value::Array(items) if items.len() == 2 => {
                            let end = |v: &Value| {
                                v.as_f64()
                                    .map(|v| v as f32)
                                    .ok_or_else(|| "must be two numbers".to_string())
                            };
                            CfgRange::new(end(&items[0])?, end(&items[1])?)
                                .map_err(|e| reason(&e))?
                        }
                        _ => return Err("must be `START,END` or [START, END]".into()),
                    })
                }
                "kv_cache" => o.kv_cache = Some(f.string()?.parse().map_err(|e| reason(&e))?),
                "input_latents" => {
                    o.input_latents = Some(f.string()?.parse().map_err(|e| reason(&e))?)
                }
                "use_input_image_size_as_output" => {
                    o.use_input_image_size_as_output = Some(f.boolean()?)
                }
                "max_input_image_size" => o.max_input_image_size = Some(f.uint()? as usize),
                "joint_cfg" => o.separate_cfg_infer = Some(!f.boolean()?),
                "use_img_guidance" => o.use_img_guidance = Some(f.boolean()?),
                "format" => {
                    format = f.string()?.parse().map_err(|e| reason(&e))?;
                }
                "jpeg_quality" => {
                    let q = f.uint()?;
                    jpeg_quality = Some(
                        u8::try_from(q)
                            .ok()
                            .filter(|q| (1..=100).contains(q))
                            .ok_or_else(|| format!("{q} is not between 1 and 100"))?,
                    );
                }
                other => {
                    let Some(param) = Param::ALL.into_iter().find(|p| p.name() == other) else {
                        return Err("unknown field (see docs/batch.md for the fields)".into());
                    };
                    let items: Vec<&Value> = match value {
                        Value::Array(items) if items.is_empty() => {
                            return Err("an empty list sweeps nothing".into())
                        }
                        Value::Array(items) => items.iter().collect(),
                        one => vec![one],
                    };
                    let values = items
                        .into_iter()
                        .map(|v| sweep_value(param, v))
                        .collect::<Result<Vec<_>, _>>()?;
                    // a value listed twice would name two cells' images alike
                    for (i, v) in values.iter().enumerate() {
                        if values[..i].contains(v) {
                            return Err(format!("{} is listed twice", v.text()));
                        }
                    }
                    lists.insert(param, values);
                }
            }
            Ok(())
        })();
        if let Err(problem) = outcome {
            problems.push(format!("{name}: {problem}"));
        }
    }
    if prompt.is_none() && !fields.contains_key("prompt") {
        problems.push("prompt: is required".into());
    }
    if height_or_width && lists.contains_key(&Param::Size) {
        problems.push("size: give `size` or `height`/`width`, not both".into());
    }
    match (format, jpeg_quality) {
        (ImageFormat::Jpeg { .. }, Some(quality)) => format = ImageFormat::Jpeg { quality },
        (_, Some(_)) => problems.push("jpeg_quality: is for JPEG output only".into()),
        _ => {}
    }
    let mut options = o.or(&defaults.options);
    let mut axes = Vec::new();
    for (param, values) in lists {
        if let [one] = values.as_slice() {
            one.set(&mut options);
        } else {
            axes.push(Axis { param, values });
        }
    }
    let job = Job {
        line,
        id,
        prompt: prompt.unwrap_or_default(),
        images,
        options,
        axes,
        format,
        problems,
    };
    let images = job.cells().len().saturating_mul(job.per_cell());
    let mut job = job;
    if images > MAX_IMAGES_PER_LINE {
        job.problems.push(format!(
            "the line expands to {images} images; at most {MAX_IMAGES_PER_LINE} per line"
        ));
    }
    job
}

/// An id names a folder and a file stem: letters, digits, `-`, `_`, `.`, not starting with a
/// dot, at most 100 characters.
fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 100
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{id}` is not 1 to 100 letters, digits, `-`, `_` or `.` (not starting with `.`)"
        ))
    }
}

/// One value of a sweepable field.
fn sweep_value(param: Param, v: &Value) -> Result<SweepValue, String> {
    let f = Field {
        name: param.name(),
        value: v,
    };
    Ok(match param {
        Param::GuidanceScale => SweepValue::GuidanceScale(f.float()?),
        Param::ImgGuidanceScale => SweepValue::ImgGuidanceScale(f.float()?),
        Param::Steps => SweepValue::Steps(f.uint()? as usize),
        Param::Seed => SweepValue::Seed(f.uint()?),
        Param::Scheduler => SweepValue::Scheduler(f.string()?.parse().map_err(|e| reason(&e))?),
        Param::Size => {
            let text = f.string()?;
            let parsed = text
                .split_once('x')
                .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
            let (w, h) =
                parsed.ok_or_else(|| format!("`{text}` is not WIDTHxHEIGHT (e.g. 1024x768)"))?;
            SweepValue::Size(w, h)
        }
    })
}

/// A library error's reason without its field name (the problem names the field).
pub fn reason(e: &omnigen::Error) -> String {
    match e {
        omnigen::Error::InvalidArgument { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// One field's value, read as the type its name calls for.
struct Field<'a> {
    name: &'a str,
    value: &'a Value,
}

impl Field<'_> {
    fn string(&self) -> Result<String, String> {
        match self.value {
            Value::String(s) => Ok(s.clone()),
            _ => Err("must be a string".into()),
        }
    }

    fn uint(&self) -> Result<u64, String> {
        self.value
            .as_u64()
            .ok_or_else(|| format!("{} is not a whole number ≥ 0", self.value))
    }

    fn float(&self) -> Result<f32, String> {
        let v = self
            .value
            .as_f64()
            .ok_or_else(|| format!("{} is not a number", self.value))?;
        let v = v as f32;
        if v.is_finite() {
            Ok(v)
        } else {
            Err(format!("{} is not a finite number", self.value))
        }
    }

    fn boolean(&self) -> Result<bool, String> {
        self.value
            .as_bool()
            .ok_or_else(|| format!("{} is not true or false (field {})", self.value, self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            options: GenerationOptions {
                steps: Some(2),
                ..Default::default()
            },
            format: ImageFormat::Png,
        }
    }

    fn job(line: &str) -> Job {
        let fields = match serde_json::from_str::<Value>(line).unwrap() {
            Value::Object(map) => map,
            _ => unreachable!(),
        };
        job_of(1, fields, Path::new("/m"), &defaults())
    }

    #[test]
    fn a_sweep_expands_to_its_product_named_by_its_values() {
        let j = job(
            r#"{"id": "cat", "prompt": "a cat", "seed": [1, 2, 3], "guidance_scale": [2, 2.5], "steps": [4]}"#,
        );
        assert!(j.problems.is_empty(), "{:?}", j.problems);
        let axes: Vec<_> = j.axes.iter().map(|a| a.param).collect();
        assert_eq!(axes, [Param::GuidanceScale, Param::Seed]);
        // a one-value list is a plain setting
        assert_eq!(j.options.steps, Some(4));
        let cells = j.cells();
        assert_eq!(cells.len(), 6);
        assert_eq!(j.stem(&cells[1], 0), "cat_gs2_seed2");
        assert_eq!(cells[5][0].label(), "guidance_scale=2.5");
        let request = j.request(&cells[5]).unwrap();
        assert_eq!((request.guidance_scale, request.seed), (2.5, Some(3)));
        assert_eq!(request.num_inference_steps, 4);
    }

    #[test]
    fn every_problem_of_a_line_is_reported() {
        let j = job(
            r#"{"prompt": 3, "steps": "many", "size": "64 by 64", "colour": "red", "id": "a/b"}"#,
        );
        let text = j.problems.join("\n");
        for want in [
            "prompt: must be a string",
            "steps: \"many\" is not a whole number",
            "size: `64 by 64`",
            "colour: unknown field",
            "id: `a/b`",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        let j = job(r#"{"prompt": "a", "seed": [1, 2, 1]}"#);
        assert_eq!(j.problems, ["seed: 1 is listed twice"]);
        let j = job(r#"{"size": ["64x64", "32x32"], "height": 64}"#);
        let text = j.problems.join("\n");
        assert!(
            text.contains("prompt: is required") && text.contains("not both"),
            "{text}"
        );
    }

    #[test]
    fn csv_reads_quotes_lists_and_typed_cells() {
        let text = "id,prompt,seed,guidance_scale,images\n\
                    a,\"a cat, \"\"fluffy\"\"\",1;2,2.5,\n\
                    b,\"two\nlines\",7,3,x.png;y.png\n";
        let records = csv_records(text).unwrap();
        assert_eq!(records.len(), 2);
        let (line, a) = &records[0];
        let a = a.as_ref().unwrap();
        assert_eq!(*line, 2);
        assert_eq!(a["prompt"], "a cat, \"fluffy\"");
        assert_eq!(a["seed"], serde_json::json!([1, 2]));
        assert_eq!(a["guidance_scale"], serde_json::json!(2.5));
        assert!(!a.contains_key("images"));
        let (line, b) = &records[1];
        let b = b.as_ref().unwrap();
        assert_eq!((*line, b["prompt"].as_str()), (3, Some("two\nlines")));
        assert_eq!(b["images"], serde_json::json!(["x.png", "y.png"]));
        assert!(parse_csv("a,\"b\n").is_err());
    }
}
