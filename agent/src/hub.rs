//! Models on a Hugging Face hub: `hf://ORG/NAME[@REVISION][/FILE]` sources, fetched once into a
//! cache folder before the engine loads, as the hub's own client does it (the revision's metadata,
//! then each file from `resolve/COMMIT/FILE`, following the redirect to its store).
//!
//! A download resumes where it stopped (a `Range` request on the `.part` file), checks every file
//! against the hub's checksum (SHA-256 for large files, the git blob hash for small ones) before it
//! takes the file's name, and logs its progress. A finished revision is recorded, so a pod that
//! restarts while the hub is unreachable still starts from its cache. `HF_ENDPOINT` points at
//! another hub or a mirror; `HF_TOKEN` (or `HUGGING_FACE_HUB_TOKEN`) is sent to it;
//! `HF_HUB_OFFLINE=1` uses the cache alone.

use serde::{Deserialize, Serialize};
use sha1::Digest as _;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The public hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// A file of this name in a finished revision's folder lists what the download fetched.
const MANIFEST: &str = ".parallax-complete.json";

/// Files of a Hugging Face layout other than the weights: configuration and tokenizer.
const LAYOUT_FILES: [&str; 7] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
];

const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("model source {given:?}: {reason}")]
    BadSource { given: String, reason: String },
    #[error(
        "the hub refused {repo}@{revision} ({status}): the repository does not exist, or it is private or gated and needs a token — set HF_TOKEN (a pool names its Secret in model.hubTokenSecret) and accept the model's licence on the hub"
    )]
    Refused {
        repo: String,
        revision: String,
        status: u16,
    },
    #[error("{repo} has no revision {revision:?} (404)")]
    NoRevision { repo: String, revision: String },
    #[error("{repo}@{revision} has no file {file:?}{}", hint_files(.available))]
    NoSuchFile {
        repo: String,
        revision: String,
        file: String,
        available: Vec<String>,
    },
    #[error(
        "{repo}@{revision} has several GGUF files; name one as hf://{repo}@{revision}/FILE:{}",
        hint_files(.files)
    )]
    SeveralGguf {
        repo: String,
        revision: String,
        files: Vec<String>,
    },
    #[error("{repo}@{revision} holds no model.safetensors (or index) and no GGUF file")]
    NoWeights { repo: String, revision: String },
    #[error("{url}: the hub answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: {reason}")]
    Network { url: String, reason: String },
    #[error(
        "{file}: checksum mismatch (expected {expected}, got {actual}); the partial file was removed"
    )]
    Checksum {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{file}: {actual} bytes arrived where the hub said {expected}")]
    Size {
        file: String,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{repo}@{revision} is not in the cache at {cache} and the hub is not to be asked (HF_HUB_OFFLINE)"
    )]
    NotCached {
        repo: String,
        revision: String,
        cache: PathBuf,
    },
    #[error("{0}")]
    Client(String),
}

impl HubError {
    /// A bounded name for logs and metric labels.
    pub fn category(&self) -> &'static str {
        match self {
            Self::BadSource { .. } => "bad_source",
            Self::Refused { .. } => "refused",
            Self::NoRevision { .. } | Self::NoSuchFile { .. } => "not_found",
            Self::SeveralGguf { .. } | Self::NoWeights { .. } => "no_model",
            Self::Status { .. } | Self::Network { .. } => "network",
            Self::Checksum { .. } | Self::Size { .. } => "corrupt",
            Self::Io { .. } => "io",
            Self::NotCached { .. } => "not_cached",
            Self::Client(_) => "client",
        }
    }

    /// Worth another try: the connection, not the request, failed.
    fn is_transient(&self) -> bool {
        match self {
            Self::Network { .. } | Self::Size { .. } => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

fn hint_files(files: &[String]) -> String {
    if files.is_empty() {
        return String::new();
    }
    let shown: Vec<&str> = files.iter().take(12).map(String::as_str).collect();
    let more = files.len().saturating_sub(shown.len());
    let tail = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!(" ({}{tail})", shown.join(", "))
}

pub type Result<T, E = HubError> = std::result::Result<T, E>;

/// A model on the hub: a repository, a revision (branch, tag or commit) and, for repositories
/// of GGUF files, which file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    pub repo: String,
    pub revision: String,
    pub file: Option<String>,
}

impl HubModel {
    /// `hf://ORG/NAME[@REVISION][/FILE]`, or a bare `ORG/NAME[@REVISION]` that is not a path on
    /// this machine (as vLLM takes `--model org/name`). `None`: not a hub source.
    pub fn parse(source: &str) -> Option<Result<Self>> {
        let (text, explicit) = match source.strip_prefix("hf://") {
            Some(rest) => (rest, true),
            None => (source, false),
        };
        if !explicit && !Self::looks_like_repo(source) {
            return None;
        }
        let bad = |reason: &str| HubError::BadSource {
            given: source.to_owned(),
            reason: reason.to_owned(),
        };
        let mut parts = text.splitn(3, '/');
        let org = parts.next().unwrap_or_default();
        let Some(name_at) = parts.next() else {
            return Some(Err(bad("a hub model is hf://ORG/NAME[@REVISION][/FILE]")));
        };
        let (name, revision) = match name_at.split_once('@') {
            Some((name, revision)) => (name, revision),
            None => (name_at, "main"),
        };
        let valid = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !valid(org) || !valid(name) {
            return Some(Err(bad(
                "the organisation and name take letters, digits, '-', '_' and '.'",
            )));
        }
        if !valid(revision) {
            return Some(Err(bad(
                "the revision after '@' is a branch, tag or commit of letters, digits, '-', '_' and '.'",
            )));
        }
        let file = match parts.next() {
            None | Some("") => None,
            Some(file)
                if file
                    .split('/')
                    .any(|s| s.is_empty() || s == "." || s == "..") =>
            {
                return Some(Err(bad("the file is a path inside the repository")));
            }
            Some(file) => Some(file.to_owned()),
        };
        Some(Ok(Self {
            repo: format!("{org}/{name}"),
            revision: revision.to_owned(),
            file,
        }))
    }

    /// `org/name`: two segments, nothing of a path (no leading `/` or `.`, no `.gguf`), and no
    /// such file or folder here.
    fn looks_like_repo(source: &str) -> bool {
        let segments: Vec<&str> = source.split('/').collect();
        segments.len() == 2
            && segments
                .iter()
                .all(|s| !s.is_empty() && !s.starts_with('.'))
            && !source.ends_with(".gguf")
            && !source.contains(':')
            && !Path::new(source).exists()
    }

    fn folder(&self) -> String {
        self.repo.replace('/', "--")
    }
}

impl fmt::Display for HubModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hf://{}@{}", self.repo, self.revision)?;
        if let Some(file) = &self.file {
            write!(f, "/{file}")?;
        }
        Ok(())
    }
}

/// Where and how to fetch.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub endpoint: String,
    pub token: Option<String>,
    /// Downloads go under `cache/ORG--NAME/`.
    pub cache: PathBuf,
    /// Use the cache alone.
    pub offline: bool,
    /// Tries per file after a dropped connection or a server error, and the first pause between
    /// them (doubling, at most 30 s).
    pub attempts: u32,
    pub backoff: Duration,
    /// How often progress is logged.
    pub log_every: Duration,
}

impl HubConfig {
    /// From the hub client's environment (`HF_ENDPOINT`, `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`,
    /// `HF_HUB_OFFLINE`), caching under `cache`.
    pub fn from_env(cache: PathBuf) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Self {
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned()),
            token: var("HF_TOKEN")
                .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
                .map(|t| t.trim().to_owned()),
            cache,
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| matches!(v.as_str(), "1" | "true")),
            attempts: 8,
            backoff: Duration::from_secs(1),
            log_every: Duration::from_secs(5),
        }
    }
}

/// How far a download has come; `/ready` shows it as `download`, and the operator reads it.
pub use parallax_crds::DownloadProgress as Progress;

/// The revision's metadata (`/api/models/REPO/revision/REV?blobs=true`), the fields used.
#[derive(Debug, Deserialize)]
struct RevisionInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(Debug, Clone, Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

impl Sibling {
    fn size(&self) -> Option<u64> {
        self.lfs.as_ref().map(|l| l.size).or(self.size)
    }
    fn checksum(&self) -> Option<Checksum> {
        match (&self.lfs, &self.blob_id) {
            (Some(lfs), _) => Some(Checksum::Sha256(lfs.sha256.to_ascii_lowercase())),
            (None, Some(blob)) => Some(Checksum::GitBlob(blob.to_ascii_lowercase())),
            (None, None) => None,
        }
    }
}

#[derive(Debug, Clone)]
enum Checksum {
    Sha256(String),
    /// SHA-1 of `blob LEN\0` and the bytes.
    GitBlob(String),
}

/// A running checksum of a file's bytes.
enum Hasher {
    Sha256(sha2::Sha256),
    GitBlob(sha1::Sha1),
    None,
}

impl Hasher {
    fn new(checksum: Option<&Checksum>, size: u64) -> Self {
        match checksum {
            Some(Checksum::Sha256(_)) => Self::Sha256(sha2::Sha256::new()),
            Some(Checksum::GitBlob(_)) => {
                let mut h = sha1::Sha1::new();
                h.update(format!("blob {size}\0").as_bytes());
                Self::GitBlob(h)
            }
            None => Self::None,
        }
    }
    fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(bytes),
            Self::GitBlob(h) => h.update(bytes),
            Self::None => {}
        }
    }
    fn hex(self) -> String {
        let bytes = match self {
            Self::Sha256(h) => h.finalize().to_vec(),
            Self::GitBlob(h) => h.finalize().to_vec(),
            Self::None => Vec::new(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// What a finished download wrote, and which path is the model.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    commit: String,
    model: String,
    files: Vec<(String, u64)>,
}

/// What the hub (or the cache) says of a revision.
enum Known {
    Revision(RevisionInfo),
    /// The model's path from an earlier download.
    Cached(PathBuf),
}

/// A file to fetch.
#[derive(Debug, Clone)]
struct Wanted {
    name: String,
    size: Option<u64>,
    checksum: Option<Checksum>,
}

/// Fetches hub models into a cache.
#[derive(Debug)]
pub struct Hub {
    config: HubConfig,
    client: reqwest::Client,
}

impl Hub {
    pub fn new(config: HubConfig) -> Result<Self> {
        let client = crate::http_client::builder()
            .user_agent(concat!("parallax-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| HubError::Client(e.to_string()))?;
        Ok(Self { config, client })
    }

    /// Fetches `model` (what is not in the cache yet) and returns the local path the engine
    /// loads: the revision's folder (Hugging Face layout) or its GGUF file. Blocks; `progress`
    /// hears of every chunk.
    pub fn fetch(&self, model: &HubModel, progress: &dyn Fn(&Progress)) -> Result<PathBuf> {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => handle.block_on(self.fetch_async(model, progress)),
            Err(_) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| HubError::Client(e.to_string()))?
                .block_on(self.fetch_async(model, progress)),
        }
    }

    async fn fetch_async(&self, model: &HubModel, progress: &dyn Fn(&Progress)) -> Result<PathBuf> {
        let root = self.config.cache.join(model.folder());
        let info = match self.revision_or_cache(model, &root).await? {
            Known::Cached(path) => return Ok(path),
            Known::Revision(info) => info,
        };
        let folder = root.join("snapshots").join(&info.sha);
        if let Some(path) = complete(&folder)? {
            tracing::info!(model = %model, commit = %info.sha, "the model is in the cache");
            write_ref(&root, &model.revision, &info.sha)?;
            return Ok(path);
        }
        let (wanted, model_path) = self.plan(model, &info, &folder).await?;
        self.download_all(model, &info.sha, &folder, &wanted, progress)
            .await?;
        let manifest = Manifest {
            commit: info.sha.clone(),
            model: model_path.clone(),
            files: wanted
                .iter()
                .map(|w| (w.name.clone(), w.size.unwrap_or(0)))
                .collect(),
        };
        write_file(
            &folder.join(MANIFEST),
            &serde_json::to_vec_pretty(&manifest).expect("a manifest serializes"),
        )?;
        write_ref(&root, &model.revision, &info.sha)?;
        Ok(folder.join(model_path))
    }

    /// The revision from the hub; or, offline or with the hub unreachable, the model as an
    /// earlier download left it.
    async fn revision_or_cache(&self, model: &HubModel, root: &Path) -> Result<Known> {
        if self.config.offline {
            return match self.cached(model, root)? {
                Some(path) => Ok(Known::Cached(path)),
                None => Err(HubError::NotCached {
                    repo: model.repo.clone(),
                    revision: model.revision.clone(),
                    cache: self.config.cache.clone(),
                }),
            };
        }
        match self.revision(model).await {
            Ok(info) => Ok(Known::Revision(info)),
            Err(e) if e.is_transient() => match self.cached(model, root)? {
                Some(path) => {
                    tracing::warn!(model = %model, error = %e, "the hub is unreachable: starting from the cache");
                    Ok(Known::Cached(path))
                }
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// The files to fetch and the model's path in the revision. A safetensors index is fetched
    /// first: only the shards it names follow.
    async fn plan(
        &self,
        model: &HubModel,
        info: &RevisionInfo,
        folder: &Path,
    ) -> Result<(Vec<Wanted>, String)> {
        let (mut wanted, model_path) = self.choose(model, info)?;
        if let Some(i) = wanted.iter().position(|w| w.name == SAFETENSORS_INDEX) {
            let mut uncounted = Progress::default();
            self.download(
                model,
                &info.sha,
                folder,
                &wanted[i],
                &mut uncounted,
                &|_| {},
            )
            .await?;
            let shards = index_shards(&folder.join(SAFETENSORS_INDEX))?;
            wanted.retain(|w| !w.name.ends_with(".safetensors") || shards.contains(&w.name));
        }
        Ok((wanted, model_path))
    }

    /// Every wanted file, in turn; `progress` hears of every chunk, the log every `log_every`.
    async fn download_all(
        &self,
        model: &HubModel,
        commit: &str,
        folder: &Path,
        wanted: &[Wanted],
        progress: &dyn Fn(&Progress),
    ) -> Result<()> {
        let mut state = Progress {
            model: model.to_string(),
            files: wanted.len() as u64,
            bytes: wanted.iter().filter_map(|w| w.size).sum(),
            ..Progress::default()
        };
        tracing::info!(
            model = %model,
            commit,
            files = state.files,
            gib = format!("{:.2}", state.bytes as f64 / f64::from(1u32 << 30)),
            cache = %folder.display(),
            "downloading"
        );
        let started = Instant::now();
        let last_log = std::cell::Cell::new(Instant::now());
        let report = |p: &Progress| {
            progress(p);
            if last_log.get().elapsed() >= self.config.log_every {
                tracing::info!("{p}");
                last_log.set(Instant::now());
            }
        };
        for entry in wanted {
            self.download(model, commit, folder, entry, &mut state, &report)
                .await?;
            state.files_done += 1;
            progress(&state);
        }
        tracing::info!("{state}");
        tracing::info!(
            model = %model,
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            "downloaded and verified"
        );
        Ok(())
    }

    /// The revision's commit and files.
    async fn revision(&self, model: &HubModel) -> Result<RevisionInfo> {
        let url = format!(
            "{}/api/models/{}/revision/{}?blobs=true",
            self.endpoint(),
            model.repo,
            model.revision
        );
        let response = self.get(&url, None).await?;
        match response.status().as_u16() {
            200 => response.json().await.map_err(|e| HubError::Network {
                url,
                reason: format!("unreadable revision metadata: {e}"),
            }),
            401 | 403 => Err(HubError::Refused {
                repo: model.repo.clone(),
                revision: model.revision.clone(),
                status: response.status().as_u16(),
            }),
            404 => Err(HubError::NoRevision {
                repo: model.repo.clone(),
                revision: model.revision.clone(),
            }),
            status => Err(HubError::Status { url, status }),
        }
    }

    /// The files to fetch, and the model's path inside the revision ("" for the folder).
    fn choose(&self, model: &HubModel, info: &RevisionInfo) -> Result<(Vec<Wanted>, String)> {
        let wanted = |s: &Sibling| Wanted {
            name: s.rfilename.clone(),
            size: s.size(),
            checksum: s.checksum(),
        };
        let top: Vec<&Sibling> = info
            .siblings
            .iter()
            .filter(|s| !s.rfilename.contains('/'))
            .collect();
        let ggufs = || -> Vec<String> {
            info.siblings
                .iter()
                .filter(|s| s.rfilename.ends_with(".gguf"))
                .map(|s| s.rfilename.clone())
                .collect()
        };
        if let Some(file) = &model.file {
            let Some(sibling) = info.siblings.iter().find(|s| &s.rfilename == file) else {
                return Err(HubError::NoSuchFile {
                    repo: model.repo.clone(),
                    revision: model.revision.clone(),
                    file: file.clone(),
                    available: ggufs(),
                });
            };
            return Ok((vec![wanted(sibling)], file.clone()));
        }
        let has = |name: &str| top.iter().any(|s| s.rfilename == name);
        if has(SAFETENSORS_INDEX) || has("model.safetensors") {
            let files = top
                .iter()
                .filter(|s| {
                    let n = s.rfilename.as_str();
                    LAYOUT_FILES.contains(&n)
                        || n == SAFETENSORS_INDEX
                        || (n.ends_with(".safetensors")
                            && (has(SAFETENSORS_INDEX) || n == "model.safetensors"))
                })
                .map(|s| wanted(s))
                .collect();
            return Ok((files, String::new()));
        }
        match ggufs().as_slice() {
            [] => Err(HubError::NoWeights {
                repo: model.repo.clone(),
                revision: model.revision.clone(),
            }),
            [one] => {
                let sibling = info.siblings.iter().find(|s| &s.rfilename == one);
                Ok((sibling.map(wanted).into_iter().collect(), one.clone()))
            }
            several => Err(HubError::SeveralGguf {
                repo: model.repo.clone(),
                revision: model.revision.clone(),
                files: several.to_vec(),
            }),
        }
    }

    /// One file into `folder`, resuming a `.part` left by an earlier try or start, verified.
    async fn download(
        &self,
        model: &HubModel,
        commit: &str,
        folder: &Path,
        entry: &Wanted,
        progress: &mut Progress,
        report: &dyn Fn(&Progress),
    ) -> Result<()> {
        let target = folder.join(&entry.name);
        if let (Ok(meta), Some(size)) = (std::fs::metadata(&target), entry.size)
            && meta.len() == size
        {
            progress.bytes_done += size;
            return Ok(());
        }
        let part = folder.join(format!("{}.part", entry.name));
        if let Some(parent) = part.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let url = format!(
            "{}/{}/resolve/{commit}/{}",
            self.endpoint(),
            model.repo,
            entry.name
        );
        let base = progress.bytes_done;
        let mut checksum_failures = 0;
        let mut attempt = 0;
        loop {
            progress.bytes_done = base;
            match self
                .try_download(&url, &part, entry, progress, report)
                .await
            {
                Ok(()) => break,
                Err(e @ HubError::Checksum { .. }) if checksum_failures == 0 => {
                    checksum_failures += 1;
                    tracing::warn!(file = %entry.name, error = %e, "downloading the file again");
                }
                Err(e) if e.is_transient() && attempt + 1 < self.config.attempts => {
                    let pause = self
                        .config
                        .backoff
                        .saturating_mul(1 << attempt.min(5))
                        .min(Duration::from_secs(30));
                    attempt += 1;
                    let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
                    tracing::warn!(
                        file = %entry.name,
                        error = %e,
                        resume_at = have,
                        attempt,
                        "download interrupted; resuming"
                    );
                    tokio::time::sleep(pause).await;
                }
                Err(e) => return Err(e),
            }
        }
        std::fs::rename(&part, &target).map_err(io(&target))?;
        Ok(())
    }

    /// One request for the rest of `part`; `Ok` when the whole file is there and verified.
    async fn try_download(
        &self,
        url: &str,
        part: &Path,
        entry: &Wanted,
        progress: &mut Progress,
        report: &dyn Fn(&Progress),
    ) -> Result<()> {
        let mut have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if entry.size.is_some_and(|size| have > size) {
            have = 0;
        }
        let response = self.get(url, (have > 0).then_some(have)).await?;
        let status = response.status().as_u16();
        let mut hasher = Hasher::new(entry.checksum.as_ref(), entry.size.unwrap_or(0));
        let mut file = match status {
            206 if have > 0 => {
                // Hash what is there already, then append.
                let mut file = std::fs::OpenOptions::new()
                    .read(true)
                    .append(true)
                    .open(part)
                    .map_err(io(part))?;
                let mut buffer = vec![0u8; 1 << 20];
                loop {
                    let n = file.read(&mut buffer).map_err(io(part))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buffer[..n]);
                }
                file
            }
            200 | 206 => {
                have = 0;
                std::fs::File::create(part).map_err(io(part))?
            }
            416 => {
                // The part is longer than the file: start over.
                std::fs::remove_file(part).map_err(io(part))?;
                return Err(HubError::Size {
                    file: entry.name.clone(),
                    expected: entry.size.unwrap_or(0),
                    actual: have,
                });
            }
            _ => {
                return Err(HubError::Status {
                    url: url.to_owned(),
                    status,
                });
            }
        };
        let expected = entry
            .size
            .or_else(|| response.content_length().map(|n| n + have));
        let mut written = have;
        progress.bytes_done += have;
        let mut response = response;
        let mut writer = std::io::BufWriter::with_capacity(1 << 20, &mut file);
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    writer.write_all(&chunk).map_err(io(part))?;
                    hasher.update(&chunk);
                    written += chunk.len() as u64;
                    progress.bytes_done += chunk.len() as u64;
                    report(progress);
                }
                Ok(None) => break,
                Err(e) => {
                    writer.flush().map_err(io(part))?;
                    return Err(HubError::Network {
                        url: url.to_owned(),
                        reason: format!("the connection dropped after {written} bytes: {e}"),
                    });
                }
            }
        }
        writer.flush().map_err(io(part))?;
        drop(writer);
        file.sync_all().map_err(io(part))?;
        if let Some(expected) = expected
            && written != expected
        {
            if written > expected {
                std::fs::remove_file(part).map_err(io(part))?;
            }
            return Err(HubError::Size {
                file: entry.name.clone(),
                expected,
                actual: written,
            });
        }
        if let Some(checksum) = &entry.checksum {
            let (Checksum::Sha256(want) | Checksum::GitBlob(want)) = checksum;
            let got = hasher.hex();
            if &got != want {
                std::fs::remove_file(part).map_err(io(part))?;
                return Err(HubError::Checksum {
                    file: entry.name.clone(),
                    expected: want.clone(),
                    actual: got,
                });
            }
        }
        Ok(())
    }

    async fn get(&self, url: &str, from: Option<u64>) -> Result<reqwest::Response> {
        let mut request = self.client.get(url);
        if let Some(token) = &self.config.token {
            request = request.bearer_auth(token);
        }
        if let Some(from) = from {
            request = request.header(reqwest::header::RANGE, format!("bytes={from}-"));
        }
        request.send().await.map_err(|e| HubError::Network {
            url: url.to_owned(),
            reason: error_chain(&e),
        })
    }

    fn endpoint(&self) -> &str {
        self.config.endpoint.trim_end_matches('/')
    }

    /// The revision as recorded by an earlier, finished download.
    fn cached(&self, model: &HubModel, root: &Path) -> Result<Option<PathBuf>> {
        let reference = root.join("refs").join(&model.revision);
        let commit = match std::fs::read_to_string(&reference) {
            Ok(commit) => commit.trim().to_owned(),
            Err(_) => return Ok(None),
        };
        complete(&root.join("snapshots").join(commit))
    }
}

/// The model's path in a finished revision folder (its manifest's files all there).
fn complete(folder: &Path) -> Result<Option<PathBuf>> {
    let Ok(text) = std::fs::read(folder.join(MANIFEST)) else {
        return Ok(None);
    };
    let Ok(manifest) = serde_json::from_slice::<Manifest>(&text) else {
        return Ok(None);
    };
    let whole = manifest.files.iter().all(|(name, size)| {
        std::fs::metadata(folder.join(name)).is_ok_and(|m| *size == 0 || m.len() == *size)
    });
    Ok(whole.then(|| folder.join(&manifest.model)))
}

/// The shard files a safetensors index names.
fn index_shards(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read(path).map_err(io(path))?;
    let index: serde_json::Value = serde_json::from_slice(&text).map_err(|e| HubError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    let mut shards: Vec<String> = index["weight_map"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

fn write_ref(root: &Path, revision: &str, commit: &str) -> Result<()> {
    write_file(&root.join("refs").join(revision), commit.as_bytes())
}

/// Writes `bytes` to `path` whole or not at all.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, bytes).map_err(io(&temporary))?;
    std::fs::rename(&temporary, path).map_err(io(path))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_owned(),
        source,
    }
}

/// An error and its causes on one line (reqwest's own message says little).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(source: &str) -> Option<Result<HubModel>> {
        HubModel::parse(source)
    }

    #[test]
    fn hub_sources_name_a_repository_a_revision_and_maybe_a_file() {
        let model = parse("hf://meta-llama/Llama-3.2-1B-Instruct")
            .unwrap()
            .unwrap();
        assert_eq!(model.repo, "meta-llama/Llama-3.2-1B-Instruct");
        assert_eq!(model.revision, "main");
        assert_eq!(model.file, None);
        let model = parse("hf://org/name@v1.0/sub/model-Q4_K_M.gguf")
            .unwrap()
            .unwrap();
        assert_eq!(
            (model.repo.as_str(), model.revision.as_str()),
            ("org/name", "v1.0")
        );
        assert_eq!(model.file.as_deref(), Some("sub/model-Q4_K_M.gguf"));
        assert_eq!(
            model.to_string(),
            "hf://org/name@v1.0/sub/model-Q4_K_M.gguf"
        );
        // A bare org/name is a repository, as vLLM reads --model.
        assert_eq!(parse("org/name").unwrap().unwrap().repo, "org/name");
    }

    #[test]
    fn paths_and_other_sources_are_not_hub_sources() {
        for source in [
            "dummy:llama-3.2-1b",
            "/models/a.gguf",
            "models/a.gguf",
            "a.gguf",
            "./x/y",
            "a/b/c",
        ] {
            assert!(parse(source).is_none(), "{source}");
        }
    }

    #[test]
    fn malformed_hub_sources_are_refused_by_what_is_wrong() {
        for (source, says) in [
            ("hf://justone", "hf://ORG/NAME"),
            ("hf://org/na me", "organisation and name"),
            ("hf://org/name@", "revision"),
            ("hf://org/name/../x.gguf", "path inside"),
        ] {
            let err = parse(source).unwrap().unwrap_err();
            assert!(err.to_string().contains(says), "{source}: {err}");
            assert_eq!(err.category(), "bad_source");
        }
    }

    #[test]
    fn progress_reads_as_files_and_gibibytes() {
        let progress = Progress {
            model: "hf://a/b@main".into(),
            files_done: 2,
            files: 7,
            bytes_done: 3 << 29,
            bytes: 3 << 30,
        };
        assert_eq!(
            progress.to_string(),
            "downloading hf://a/b@main: 2 of 7 files, 1.50 of 3.00 GiB (50%)"
        );
    }
}
