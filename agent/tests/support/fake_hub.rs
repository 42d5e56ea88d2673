//! A Hugging Face hub on loopback: the revision metadata route and the file route the hub's
//! client uses (`/api/models/REPO/revision/REV?blobs=true`, `/REPO/resolve/REV/FILE`), large
//! files redirected to a store route as the hub sends them to its CDN, `Range` requests, private
//! repositories behind a token — and faults on request: a connection that drops mid-file, a
//! corrupted body, a body that waits for the test.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;
use sha1::Digest as _;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// A file of a repository; `lfs` files are redirected to the store and carry a SHA-256.
#[derive(Debug, Clone)]
pub struct HubFile {
    pub name: String,
    pub bytes: Bytes,
    pub lfs: bool,
}

impl HubFile {
    pub fn new(name: &str, bytes: impl Into<Bytes>) -> Self {
        let name = name.to_owned();
        let lfs = name.ends_with(".safetensors") || name.ends_with(".gguf");
        Self {
            name,
            bytes: bytes.into(),
            lfs,
        }
    }

    fn sha256(&self) -> String {
        hex(&sha2::Sha256::digest(&self.bytes))
    }

    /// The git blob hash the hub reports as `blobId`.
    fn blob_id(&self) -> String {
        let mut hash = sha1::Sha1::new();
        hash.update(format!("blob {}\0", self.bytes.len()).as_bytes());
        hash.update(&self.bytes);
        hex(&hash.finalize())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every file of a folder written by a test (its subfolders' files under their paths).
pub fn files_of(dir: &std::path::Path) -> Vec<HubFile> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let name = path
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                files.push(HubFile::new(&name, std::fs::read(&path).unwrap()));
            }
        }
    }
    files
}

#[derive(Debug, Clone)]
pub struct Repo {
    pub commit: String,
    pub files: Vec<HubFile>,
    /// A private repository answers only this bearer token.
    pub token: Option<String>,
}

/// A request as the hub saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

#[derive(Debug, Default)]
struct Faults {
    /// Per file: the next downloads stop after this many bytes (one per download).
    drop_after: HashMap<String, VecDeque<usize>>,
    /// Per file: how many more downloads arrive with a byte changed.
    corrupt: HashMap<String, usize>,
    /// A file whose body waits, after its first megabyte, until the gate opens.
    gate: Option<(String, watch::Receiver<bool>)>,
}

#[derive(Debug, Default)]
struct Hub {
    repos: Mutex<HashMap<String, Repo>>,
    faults: Mutex<Faults>,
    seen: Mutex<Vec<Seen>>,
}

/// The hub, serving until dropped.
#[derive(Debug)]
pub struct FakeHub {
    pub url: String,
    hub: Arc<Hub>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeHub {
    pub async fn start() -> Self {
        let hub = Arc::new(Hub::default());
        let router = Router::new()
            .route(
                "/api/models/{org}/{name}/revision/{revision}",
                get(revision),
            )
            .route("/{org}/{name}/resolve/{revision}/{*file}", get(resolve))
            .route("/store/{sha256}", get(store))
            .with_state(hub.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Self { url, hub, task }
    }

    pub fn add(&self, repo: &str, commit: &str, files: Vec<HubFile>, token: Option<&str>) {
        self.hub.repos.lock().unwrap().insert(
            repo.to_owned(),
            Repo {
                commit: commit.to_owned(),
                files,
                token: token.map(str::to_owned),
            },
        );
    }

    /// The next downloads of `file` stop after these many bytes each.
    pub fn drop_after(&self, file: &str, bytes: &[usize]) {
        self.hub
            .faults
            .lock()
            .unwrap()
            .drop_after
            .insert(file.to_owned(), bytes.iter().copied().collect());
    }

    /// The next `times` downloads of `file` arrive with a byte changed.
    pub fn corrupt(&self, file: &str, times: usize) {
        self.hub
            .faults
            .lock()
            .unwrap()
            .corrupt
            .insert(file.to_owned(), times);
    }

    /// `file`'s body stops after its first megabyte until the returned sender sends `true`.
    pub fn hold(&self, file: &str) -> watch::Sender<bool> {
        let (open, gate) = watch::channel(false);
        self.hub.faults.lock().unwrap().gate = Some((file.to_owned(), gate));
        open
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.hub.seen.lock().unwrap().clone()
    }

    pub fn forget_seen(&self) {
        self.hub.seen.lock().unwrap().clear();
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hub {
    fn note(&self, path: String, headers: &HeaderMap) {
        let text = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        self.seen.lock().unwrap().push(Seen {
            path,
            range: text(header::RANGE),
            authorization: text(header::AUTHORIZATION),
        });
    }

    /// The repository, if the request may see it (the hub answers 401 for both missing and
    /// private ones: [`refused`]).
    fn repo(&self, name: &str, headers: &HeaderMap) -> Option<Repo> {
        let repo = self.repos.lock().unwrap().get(name)?.clone();
        if let Some(token) = &repo.token {
            let sent = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if sent != Some(format!("Bearer {token}").as_str()) {
                return None;
            }
        }
        Some(repo)
    }
}

fn refused() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({"error": "Repository Not Found"})),
    )
        .into_response()
}

async fn revision(
    State(hub): State<Arc<Hub>>,
    Path((org, name, revision)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    hub.note(
        format!("/api/models/{org}/{name}/revision/{revision}"),
        &headers,
    );
    let Some(repo) = hub.repo(&format!("{org}/{name}"), &headers) else {
        return refused();
    };
    if revision != "main" && revision != repo.commit {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": "Invalid rev id"})),
        )
            .into_response();
    }
    let siblings: Vec<_> = repo
        .files
        .iter()
        .map(|f| {
            let mut sibling = json!({
                "rfilename": f.name,
                "size": f.bytes.len(),
                "blobId": f.blob_id(),
            });
            if f.lfs {
                sibling["lfs"] =
                    json!({"sha256": f.sha256(), "size": f.bytes.len(), "pointerSize": 134});
            }
            sibling
        })
        .collect();
    axum::Json(json!({
        "id": format!("{org}/{name}"),
        "sha": repo.commit,
        "siblings": siblings,
    }))
    .into_response()
}

async fn resolve(
    State(hub): State<Arc<Hub>>,
    Path((org, name, revision, file)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    hub.note(format!("/{org}/{name}/resolve/{revision}/{file}"), &headers);
    let Some(repo) = hub.repo(&format!("{org}/{name}"), &headers) else {
        return refused();
    };
    let Some(found) = repo.files.iter().find(|f| f.name == file) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if found.lfs {
        return (
            StatusCode::FOUND,
            [(header::LOCATION, format!("/store/{}", found.sha256()))],
        )
            .into_response();
    }
    body(&hub, found, &headers)
}

async fn store(
    State(hub): State<Arc<Hub>>,
    Path(sha256): Path<String>,
    headers: HeaderMap,
) -> Response {
    hub.note(format!("/store/{sha256}"), &headers);
    let found = hub
        .repos
        .lock()
        .unwrap()
        .values()
        .flat_map(|r| r.files.iter())
        .find(|f| f.lfs && f.sha256() == sha256)
        .cloned();
    match found {
        Some(found) => body(&hub, &found, &headers),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The file from the requested offset, with the faults set for it.
fn body(hub: &Hub, file: &HubFile, headers: &HeaderMap) -> Response {
    let from = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let total = file.bytes.len();
    if from.is_some_and(|from| from >= total) {
        return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
    }
    let start = from.unwrap_or(0);
    let mut bytes = file.bytes.slice(start..);
    let mut faults = hub.faults.lock().unwrap();
    if let Some(left) = faults.corrupt.get_mut(&file.name)
        && *left > 0
    {
        *left -= 1;
        let mut changed = bytes.to_vec();
        let middle = changed.len() / 2;
        changed[middle] ^= 0x5a;
        bytes = changed.into();
    }
    let drop_after = faults
        .drop_after
        .get_mut(&file.name)
        .and_then(VecDeque::pop_front);
    let gate = faults
        .gate
        .as_ref()
        .filter(|(name, _)| name == &file.name)
        .map(|(_, gate)| gate.clone());
    drop(faults);
    let length = bytes.len();
    let stream: futures::stream::BoxStream<'static, std::io::Result<Bytes>> =
        match (drop_after, gate) {
            (Some(after), _) => {
                let part = bytes.slice(..after.min(length));
                futures::stream::iter([
                    Ok(part),
                    Err(std::io::Error::other("the fake hub drops the connection")),
                ])
                .boxed()
            }
            (None, Some(mut gate)) => {
                let split = length.min(1 << 20);
                let (first, rest) = (bytes.slice(..split), bytes.slice(split..));
                futures::stream::once(async move { Ok(first) })
                    .chain(futures::stream::once(async move {
                        let _ = gate.wait_for(|open| *open).await;
                        Ok(rest)
                    }))
                    .boxed()
            }
            (None, None) => futures::stream::once(async move { Ok(bytes) }).boxed(),
        };
    let mut response = Response::new(Body::from_stream(stream));
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, length.into());
    if start > 0 {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        response.headers_mut().insert(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{total}", total - 1)
                .parse()
                .unwrap(),
        );
    }
    response
}
