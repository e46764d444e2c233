//! `results.jsonl`: one JSON record per image (or per bad line) per attempt, appended after the
//! image itself was written, so the file and the images never disagree about what is done:
//! an image without its record is made again, a record is never written for a missing image.
//! The latest record of a key is its state; a torn last line (the process killed while
//! appending) is skipped when read.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The file name in the output folder.
pub const FILE: &str = "results.jsonl";

/// Seconds of each stage of one generation call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Times {
    /// Preprocessing and tokenisation.
    pub process: f64,
    /// VAE encoding of the input images.
    pub encode: f64,
    /// The denoising loop.
    pub denoise: f64,
    /// VAE decoding.
    pub decode: f64,
    /// Writing the image files.
    pub save: f64,
}

/// A typed error as recorded: the library's kind and its message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedError {
    /// `manifest` for a problem of the line itself, else the library error's kind
    /// (`invalid_argument`, `invalid_image`, `out_of_memory`, ...).
    pub kind: String,
    /// What went wrong, for a person.
    pub message: String,
}

/// One record of `results.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// What the record is about: `ID/STEM` for an image, `ID` for a line that could not run.
    pub key: String,
    /// The job's id.
    pub id: String,
    /// The manifest line.
    pub line: usize,
    /// `done` or `failed`.
    pub status: Status,
    /// The image, relative to the output folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// The swept fields' values of the image's cell.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub sweep: serde_json::Map<String, Value>,
    /// The library request the image was made from (serde form of `GenerationRequest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// The seed the image came from (drawn when the request had none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Image size `[width, height]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<[u32; 2]>,
    /// Sequence length per guidance branch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens_per_branch: Vec<usize>,
    /// Stage times of the generation call that made the image (shared by its `n` images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<Times>,
    /// This image's share of the call's time, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Peak resident memory of the process during the call, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    /// The memory guard's estimate of the call's memory beyond the model, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_estimate_bytes: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RecordedError>,
}

/// A record's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The image is written.
    Done,
    /// It could not be made; a re-run tries again.
    Failed,
}

/// The records of a results file, latest per key, with how many lines it held.
#[derive(Debug, Default)]
pub struct Results {
    /// The latest record of each key.
    pub latest: HashMap<String, Record>,
}

impl Results {
    /// Reads `dir/results.jsonl`; no file is no records.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        };
        let mut latest = HashMap::new();
        for line in text.lines() {
            // a line that does not parse is the torn tail of a killed run
            if let Ok(record) = serde_json::from_str::<Record>(line) {
                latest.insert(record.key.clone(), record);
            }
        }
        Ok(Self { latest })
    }

    /// Whether `key` is done with exactly `parameters` and its image is still in `dir`.
    pub fn is_done(&self, dir: &Path, key: &str, parameters: &Value) -> bool {
        self.latest.get(key).is_some_and(|r| {
            r.status == Status::Done
                && r.parameters.as_ref() == Some(parameters)
                && r.output.as_ref().is_some_and(|o| dir.join(o).is_file())
        })
    }
}

/// Appends records to `dir/results.jsonl`, each as one write of one line followed by a sync.
pub struct Writer {
    path: PathBuf,
    file: std::fs::File,
}

impl Writer {
    /// Opens (creating) the results file of `dir`; a torn last line is ended first so the next
    /// record starts on a line of its own.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(FILE);
        let torn = std::fs::read(&path)
            .ok()
            .is_some_and(|b| !b.is_empty() && !b.ends_with(b"\n"));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        if torn {
            file.write_all(b"\n")
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        }
        Ok(Self { path, file })
    }

    /// Appends `record` and waits until it is on disk.
    pub fn append(&mut self, record: &Record) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", self.path.display()))
    }
}

/// The kind of a library error, as `results.jsonl` names it.
pub fn kind_of(e: &omnigen::Error) -> &'static str {
    use omnigen::Error as E;
    match e {
        E::Io { .. } => "io",
        E::Config { .. } => "config",
        E::CorruptWeights { .. } => "corrupt_weights",
        E::MissingTensor { .. } => "missing_tensor",
        E::ShapeMismatch { .. } => "shape_mismatch",
        E::UnsupportedDtype { .. } => "unsupported_dtype",
        E::UnknownLayout { .. } => "unknown_layout",
        E::InvalidArgument { .. } => "invalid_argument",
        E::InvalidImage { .. } => "invalid_image",
        E::Prompt(_) => "prompt",
        E::Tokenizer { .. } => "tokenizer",
        E::OutOfMemory { .. } => "out_of_memory",
        E::ModelNotFound { .. } => "model_not_found",
        E::NonFinite { .. } => "non_finite",
        E::Cancelled { .. } => "cancelled",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, status: Status) -> Record {
        Record {
            key: key.into(),
            id: "a".into(),
            line: 1,
            status,
            output: Some(format!("{key}.png")),
            sweep: Default::default(),
            parameters: Some(serde_json::json!({"seed": 1})),
            seed: Some(1),
            size: Some([64, 64]),
            tokens_per_branch: vec![10],
            times: Some(Times::default()),
            seconds: Some(0.5),
            peak_memory_bytes: None,
            memory_estimate_bytes: None,
            error: None,
        }
    }

    #[test]
    fn the_latest_record_wins_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/x.png"), b"png").unwrap();
        let mut w = Writer::open(dir.path()).unwrap();
        w.append(&record("a/x", Status::Failed)).unwrap();
        w.append(&record("a/x", Status::Done)).unwrap();
        w.append(&record("a/y", Status::Done)).unwrap();
        drop(w);
        // a killed run's half line, then a new run's record
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        f.write_all(b"{\"key\": \"a/z\", \"st").unwrap();
        Writer::open(dir.path())
            .unwrap()
            .append(&record("a/w", Status::Failed))
            .unwrap();
        let r = Results::read(dir.path()).unwrap();
        assert_eq!(r.latest.len(), 3);
        let params = serde_json::json!({"seed": 1});
        assert!(r.is_done(dir.path(), "a/x", &params));
        // done but its image is gone, or made with other parameters: not done
        assert!(!r.is_done(dir.path(), "a/y", &params));
        assert!(!r.is_done(dir.path(), "a/x", &serde_json::json!({"seed": 2})));
        assert!(!r.is_done(dir.path(), "a/w", &params));
    }
}
