//! Where everything lives in a model folder, for the two checkpoint layouts OmniGen ships in.
//!
//! | piece | official (`Shitao/OmniGen-v1`) | diffusers (`Shitao/OmniGen-v1-diffusers`) |
//! |---|---|---|
//! | transformer config | `config.json` | `transformer/config.json` |
//! | transformer weights | `model.safetensors` or `model-0000N-of-0000M.safetensors` + `model.safetensors.index.json` | `transformer/diffusion_pytorch_model*.safetensors` (same sharding scheme) |
//! | tokenizer | `tokenizer.json` | `tokenizer/tokenizer.json` |
//! | VAE | `vae/config.json` + `vae/diffusion_pytorch_model.safetensors` | the same |
//!
//! A diffusers `transformer/` folder given on its own is a third, transformer-only layout.
//! [`ModelFolder`] is the one place that knows these names: model loading, the processor, the
//! pipeline and hub downloads all ask it instead of probing paths themselves. Lookups are
//! lazy, so a folder that holds only part of a checkpoint (a tokenizer, say) can still serve
//! that part; asking for a missing piece is an [`Error::ModelNotFound`] naming the folder and
//! the file that is not there.

use std::path::{Path, PathBuf};

use crate::error::{missing_in, Error, Result};
use crate::layout::CheckpointLayout;
use crate::weights::WeightFiles;

/// Weights stem of the official transformer checkpoint (`model.safetensors`).
pub const OFFICIAL_WEIGHTS_STEM: &str = "model";

/// Weights stem of every diffusers model folder (`diffusion_pytorch_model.safetensors`): the
/// diffusers transformer and the VAE of both layouts.
pub const DIFFUSERS_WEIGHTS_STEM: &str = "diffusion_pytorch_model";

/// Name of a model's JSON configuration inside its folder.
pub const CONFIG_FILE: &str = "config.json";

/// Name of the tokenizer file.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The VAE's sub-folder, in both layouts.
pub const VAE_DIR: &str = "vae";

/// The diffusers transformer's sub-folder.
pub const TRANSFORMER_DIR: &str = "transformer";

/// The diffusers tokenizer's sub-folder.
pub const TOKENIZER_DIR: &str = "tokenizer";

/// Which folder layout a model directory uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FolderLayout {
    /// `config.json`, `model*.safetensors`, `tokenizer.json` and `vae/` side by side.
    Official,
    /// A diffusers repository root: `transformer/`, `tokenizer/`, `vae/` (and `model_index.json`).
    Diffusers,
    /// A diffusers `transformer/` folder on its own: `config.json` and
    /// `diffusion_pytorch_model*.safetensors`, no tokenizer or VAE.
    DiffusersTransformer,
}

impl FolderLayout {
    /// The key naming its transformer weights use: the checkpoint converted to diffusers renames
    /// the tensors as well as the files.
    pub fn key_layout(self) -> CheckpointLayout {
        match self {
            FolderLayout::Official => CheckpointLayout::Official,
            FolderLayout::Diffusers | FolderLayout::DiffusersTransformer => {
                CheckpointLayout::Diffusers
            }
        }
    }

    /// The stem of the transformer weights files.
    pub fn weights_stem(self) -> &'static str {
        match self {
            FolderLayout::Official => OFFICIAL_WEIGHTS_STEM,
            FolderLayout::Diffusers | FolderLayout::DiffusersTransformer => DIFFUSERS_WEIGHTS_STEM,
        }
    }

    /// The files a hub download of a whole (unsharded) model in this layout fetches, relative
    /// to the repository root, small files first so that a broken repository fails before the
    /// large weights are transferred. A transformer-only folder is not a hub repository: its
    /// list is the transformer's two files.
    pub fn hub_files(self) -> &'static [&'static str] {
        match self {
            FolderLayout::Official => &[
                "config.json",
                "tokenizer.json",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
                "model.safetensors",
            ],
            FolderLayout::Diffusers => &[
                "model_index.json",
                "transformer/config.json",
                "tokenizer/tokenizer.json",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
                "transformer/diffusion_pytorch_model.safetensors",
            ],
            FolderLayout::DiffusersTransformer => {
                &["config.json", "diffusion_pytorch_model.safetensors"]
            }
        }
    }

    /// A short name for messages and `inspect` output.
    pub fn name(self) -> &'static str {
        match self {
            FolderLayout::Official => "official",
            FolderLayout::Diffusers => "diffusers",
            FolderLayout::DiffusersTransformer => "diffusers transformer/",
        }
    }
}

impl std::fmt::Display for FolderLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A model directory and its layout: the paths of every piece of an OmniGen checkpoint.
///
/// ```no_run
/// # use omnigen_core::{FolderLayout, ModelFolder};
/// let folder = ModelFolder::open("OmniGen-v1")?;
/// assert_eq!(folder.layout(), FolderLayout::Official);
/// let tokenizer = folder.tokenizer()?; // OmniGen-v1/tokenizer.json
/// let weights = folder.transformer_weights()?; // model.safetensors, or its shards
/// # Ok::<(), omnigen_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFolder {
    root: PathBuf,
    layout: FolderLayout,
}

impl ModelFolder {
    /// Opens `dir`, detecting its layout from what is there:
    ///
    /// 1. official transformer weights (`model.safetensors` or its index): [`FolderLayout::Official`];
    /// 2. a `transformer/` or `tokenizer/` folder or `model_index.json`: [`FolderLayout::Diffusers`];
    /// 3. `diffusion_pytorch_model.safetensors` (or its index) and `config.json`:
    ///    [`FolderLayout::DiffusersTransformer`];
    /// 4. otherwise [`FolderLayout::Official`], whose names then appear in the errors of the
    ///    lookups that find nothing.
    ///
    /// Only a `dir` that is not a directory is an error here ([`Error::ModelNotFound`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let root = dir.as_ref();
        if !root.is_dir() {
            return Err(missing_in(root, "no such directory".into()));
        }
        let has_weights = |stem: &str| {
            root.join(format!("{stem}.safetensors")).is_file()
                || root
                    .join(format!("{stem}.safetensors.index.json"))
                    .is_file()
        };
        let layout = if has_weights(OFFICIAL_WEIGHTS_STEM) {
            FolderLayout::Official
        } else if root.join(TRANSFORMER_DIR).is_dir()
            || root.join(TOKENIZER_DIR).is_dir()
            || root.join("model_index.json").is_file()
        {
            FolderLayout::Diffusers
        } else if has_weights(DIFFUSERS_WEIGHTS_STEM) && root.join(CONFIG_FILE).is_file() {
            FolderLayout::DiffusersTransformer
        } else {
            FolderLayout::Official
        };
        Ok(Self {
            root: root.to_path_buf(),
            layout,
        })
    }

    /// The folder as given.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The detected layout.
    pub fn layout(&self) -> FolderLayout {
        self.layout
    }

    /// The folder holding the transformer's config and weights.
    pub fn transformer_dir(&self) -> PathBuf {
        match self.layout {
            FolderLayout::Diffusers => self.root.join(TRANSFORMER_DIR),
            FolderLayout::Official | FolderLayout::DiffusersTransformer => self.root.clone(),
        }
    }

    /// The transformer's `config.json` (Phi-3's, or diffusers' `OmniGenTransformer2DModel`'s).
    pub fn transformer_config(&self) -> Result<PathBuf> {
        self.existing(
            self.transformer_dir().join(CONFIG_FILE),
            "transformer config",
        )
    }

    /// The stem of the transformer weights files (`model` or `diffusion_pytorch_model`).
    pub fn weights_stem(&self) -> &'static str {
        self.layout.weights_stem()
    }

    /// The transformer's weights files (one file, or every shard of its index).
    pub fn transformer_weights(&self) -> Result<WeightFiles> {
        WeightFiles::find(&self.transformer_dir(), self.weights_stem())
    }

    /// `tokenizer.json` (official) or `tokenizer/tokenizer.json` (diffusers).
    pub fn tokenizer(&self) -> Result<PathBuf> {
        match self.layout {
            FolderLayout::Official => self.existing(self.root.join(TOKENIZER_FILE), "tokenizer"),
            FolderLayout::Diffusers => self.existing(
                self.root.join(TOKENIZER_DIR).join(TOKENIZER_FILE),
                "tokenizer",
            ),
            FolderLayout::DiffusersTransformer => Err(self.not_in_transformer_dir("tokenizer")),
        }
    }

    /// The VAE folder, checked to hold its config and weights.
    pub fn vae_dir(&self) -> Result<PathBuf> {
        self.vae_config()?;
        self.vae_weights()?;
        Ok(self.root.join(VAE_DIR))
    }

    /// `vae/config.json`.
    pub fn vae_config(&self) -> Result<PathBuf> {
        if self.layout == FolderLayout::DiffusersTransformer {
            return Err(self.not_in_transformer_dir("VAE"));
        }
        self.existing(self.root.join(VAE_DIR).join(CONFIG_FILE), "VAE config")
    }

    /// `vae/diffusion_pytorch_model.safetensors` (or its shards).
    pub fn vae_weights(&self) -> Result<WeightFiles> {
        if self.layout == FolderLayout::DiffusersTransformer {
            return Err(self.not_in_transformer_dir("VAE"));
        }
        WeightFiles::find(&self.root.join(VAE_DIR), DIFFUSERS_WEIGHTS_STEM).map_err(|e| match e {
            Error::ModelNotFound { reason, .. } => missing_in(&self.root, format!("VAE: {reason}")),
            other => other,
        })
    }

    /// The files a hub download of this layout fetches (see [`FolderLayout::hub_files`]).
    pub fn hub_files(&self) -> &'static [&'static str] {
        self.layout.hub_files()
    }

    fn existing(&self, path: PathBuf, what: &str) -> Result<PathBuf> {
        if path.is_file() {
            Ok(path)
        } else {
            Err(missing_in(
                &self.root,
                format!("missing {what} {} ({} layout)", path.display(), self.layout),
            ))
        }
    }

    fn not_in_transformer_dir(&self, what: &str) -> Error {
        missing_in(
            &self.root,
            format!(
                "no {what}: this is a diffusers transformer/ folder, which holds only the \
                 transformer; pass the repository root that contains it"
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/A")
    }

    fn touch(root: &Path, rel: &str) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(&path, b"{}").expect("write");
    }

    fn reason(err: Error) -> String {
        match err {
            Error::ModelNotFound { reason, .. } => reason,
            other => panic!("expected ModelNotFound, got {other:?}"),
        }
    }

    #[test]
    fn official_fixture_is_found_piece_by_piece() {
        let root = fixtures().join("model");
        let folder = ModelFolder::open(&root).expect("opens");
        assert_eq!(folder.layout(), FolderLayout::Official);
        assert_eq!(folder.layout().key_layout(), CheckpointLayout::Official);
        assert_eq!(folder.transformer_dir(), root);
        assert_eq!(
            folder.transformer_config().unwrap(),
            root.join("config.json")
        );
        assert_eq!(folder.weights_stem(), "model");
        let weights = folder.transformer_weights().unwrap();
        assert_eq!(
            weights.single(),
            Some(root.join("model.safetensors").as_path())
        );
        assert_eq!(folder.tokenizer().unwrap(), root.join("tokenizer.json"));
        assert_eq!(folder.vae_dir().unwrap(), root.join("vae"));
        assert_eq!(
            folder.vae_weights().unwrap().files,
            [root.join("vae/diffusion_pytorch_model.safetensors")]
        );
        for file in folder.hub_files() {
            assert!(root.join(file).is_file(), "{file}");
        }
    }

    #[test]
    fn diffusers_fixture_root_and_transformer_folder() {
        let root = fixtures().join("model_diffusers");
        let folder = ModelFolder::open(&root).expect("opens");
        assert_eq!(folder.layout(), FolderLayout::Diffusers);
        assert_eq!(folder.layout().key_layout(), CheckpointLayout::Diffusers);
        assert_eq!(folder.transformer_dir(), root.join("transformer"));
        assert_eq!(
            folder.transformer_weights().unwrap().files,
            [root.join("transformer/diffusion_pytorch_model.safetensors")]
        );
        assert_eq!(
            folder.tokenizer().unwrap(),
            root.join("tokenizer/tokenizer.json")
        );
        assert_eq!(folder.vae_config().unwrap(), root.join("vae/config.json"));
        for file in folder.hub_files() {
            assert!(root.join(file).is_file(), "{file}");
        }

        let transformer = ModelFolder::open(root.join("transformer")).expect("opens");
        assert_eq!(transformer.layout(), FolderLayout::DiffusersTransformer);
        assert_eq!(transformer.transformer_dir(), root.join("transformer"));
        assert_eq!(
            transformer.transformer_config().unwrap(),
            root.join("transformer/config.json")
        );
        assert!(transformer.transformer_weights().is_ok());
        assert!(reason(transformer.tokenizer().unwrap_err()).contains("repository root"));
        assert!(reason(transformer.vae_dir().unwrap_err()).contains("VAE"));
    }

    #[test]
    fn sharded_weights_are_listed_from_their_index() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(root, "config.json");
        std::fs::write(
            root.join("model.safetensors.index.json"),
            r#"{"metadata": {}, "weight_map": {
                "a": "model-00002-of-00002.safetensors",
                "b": "model-00001-of-00002.safetensors",
                "c": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        touch(root, "model-00001-of-00002.safetensors");
        let folder = ModelFolder::open(root).unwrap();
        assert_eq!(folder.layout(), FolderLayout::Official);
        // One shard absent: the error names it.
        let why = reason(folder.transformer_weights().unwrap_err());
        assert!(why.contains("model-00002-of-00002.safetensors"), "{why}");
        touch(root, "model-00002-of-00002.safetensors");
        let weights = folder.transformer_weights().unwrap();
        assert_eq!(
            weights.index.as_deref(),
            Some(root.join("model.safetensors.index.json").as_path())
        );
        assert_eq!(
            weights.files,
            [
                root.join("model-00001-of-00002.safetensors"),
                root.join("model-00002-of-00002.safetensors")
            ]
        );
        assert_eq!(weights.single(), None);
    }

    #[test]
    fn diffusers_shards_live_in_transformer() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(root, "model_index.json");
        touch(root, "transformer/config.json");
        std::fs::write(
            root.join("transformer/diffusion_pytorch_model.safetensors.index.json"),
            r#"{"weight_map": {"a": "diffusion_pytorch_model-00001-of-00001.safetensors"}}"#,
        )
        .unwrap();
        touch(
            root,
            "transformer/diffusion_pytorch_model-00001-of-00001.safetensors",
        );
        let folder = ModelFolder::open(root).unwrap();
        assert_eq!(folder.layout(), FolderLayout::Diffusers);
        assert_eq!(
            folder.transformer_weights().unwrap().files,
            [root.join("transformer/diffusion_pytorch_model-00001-of-00001.safetensors")]
        );
        // A transformer/ folder holding only shards is still recognised as one.
        let inner = ModelFolder::open(root.join("transformer")).unwrap();
        assert_eq!(inner.layout(), FolderLayout::DiffusersTransformer);
    }

    #[test]
    fn missing_pieces_name_the_folder_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(root, "config.json");
        let folder = ModelFolder::open(root).unwrap();
        assert_eq!(folder.layout(), FolderLayout::Official);
        match folder.transformer_weights().unwrap_err() {
            Error::ModelNotFound { id, reason } => {
                assert_eq!(id, root.display().to_string());
                assert!(reason.contains("model.safetensors"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(reason(folder.tokenizer().unwrap_err()).contains("tokenizer.json"));
        assert!(reason(folder.vae_dir().unwrap_err()).contains("vae/config.json"));
        touch(root, "vae/config.json");
        let why = reason(folder.vae_dir().unwrap_err());
        assert!(
            why.contains("vae/diffusion_pytorch_model.safetensors"),
            "{why}"
        );
        // A shard without its index.
        touch(root, "model-00001-of-00002.safetensors");
        let why = reason(folder.transformer_weights().unwrap_err());
        assert!(why.contains("model.safetensors.index.json"), "{why}");
        // A diffusers root without its transformer config.
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), "tokenizer/tokenizer.json");
        let folder = ModelFolder::open(dir.path()).unwrap();
        assert_eq!(folder.layout(), FolderLayout::Diffusers);
        assert!(folder.tokenizer().is_ok());
        let why = reason(folder.transformer_config().unwrap_err());
        assert!(why.contains("transformer/config.json"), "{why}");
    }

    #[test]
    fn a_missing_directory_is_model_not_found() {
        let err = ModelFolder::open("/no/such/omnigen/model").unwrap_err();
        assert!(reason(err).contains("no such directory"));
    }

    #[test]
    fn malformed_index_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors.index.json"), "{ nope").unwrap();
        let err = WeightFiles::find(dir.path(), "model").unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
        std::fs::write(dir.path().join("model.safetensors.index.json"), "{}").unwrap();
        let err = WeightFiles::find(dir.path(), "model").unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
    }
}
