//! An in-process Kubernetes API server: enough of list, watch, get, create, replace, apply
//! (approximated as a deep merge), merge patch, JSON patch, delete with finalizers and the status
//! subresource for the real kube-runtime `Controller` to run against it.
//!
//! Objects live in one map; every change gets the next resourceVersion and goes into a log that
//! watches replay from the resourceVersion they ask for. A write that changes nothing is a no-op:
//! no new resourceVersion, no watch event, as the real API server does. There is no garbage
//! collector: what the operator does not delete stays.

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use kube::client::Body;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::{mpsc, watch};

type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;

/// Where an object lives: resource prefix (`api/v1/pods`), namespace ("" when cluster-scoped), name.
type Key = (String, String, String);

#[derive(Debug)]
struct Watcher {
    resource: String,
    namespace: Option<String>,
    selector: Selector,
    sender: mpsc::UnboundedSender<Bytes>,
}

#[derive(Debug, Default)]
struct State {
    /// Resources this server does not serve (a CRD that is not installed).
    absent: Vec<String>,
    /// What API discovery lists, by group version (`monitoring.coreos.com/v1`): (plural, kind).
    /// Only these group versions answer discovery; every resource answers requests.
    discovery: BTreeMap<String, Vec<(String, String)>>,
    resource_version: u64,
    objects: BTreeMap<Key, Value>,
    /// (resourceVersion, resource, event type, object)
    log: Vec<(u64, String, &'static str, Value)>,
    watchers: Vec<Watcher>,
    uid: u64,
}

/// The fake API server. Clone it to share; `client()` gives a kube client that talks to it.
#[derive(Clone, Debug)]
pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
    changes: watch::Sender<u64>,
}

/// Resources that have a status subresource: writes to the object ignore `.status`, writes to
/// `/status` change only `.status`.
const STATUS_SUBRESOURCE: &[&str] = &["apis/parallax.dev/v1alpha1/inferencepools", "api/v1/pods"];

impl Default for FakeApiServer {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            changes: watch::channel(0).0,
        }
    }
}

impl FakeApiServer {
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    /// Answers 404 for `resource` (e.g. `apis/example.org/v1/widgets`), as a server without
    /// its CRD does.
    pub fn without(&self, resource: &str) {
        self.state.lock().unwrap().absent.push(resource.to_owned());
    }

    /// Lists `plural` (of `kind`) in discovery of `group_version` (`monitoring.coreos.com/v1`),
    /// as a server does once the CRD is installed.
    pub fn discoverable(&self, group_version: &str, plural: &str, kind: &str) {
        self.state
            .lock()
            .unwrap()
            .discovery
            .entry(group_version.to_owned())
            .or_default()
            .push((plural.to_owned(), kind.to_owned()));
    }

    /// A receiver that changes on every write that changed something.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Every object of a resource (e.g. `api/v1/pods`), any namespace.
    pub fn objects(&self, resource: &str) -> Vec<Value> {
        let state = self.state.lock().unwrap();
        state
            .objects
            .iter()
            .filter(|((r, _, _), _)| r == resource)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn handle(
        &self,
        method: Method,
        path: &str,
        query: &BTreeMap<String, String>,
        content_type: &str,
        body: &[u8],
    ) -> Response<ResponseBody> {
        tracing::debug!(target: "fake_api", %method, path, ?query, content_type, "request");
        if let ["apis", group, version] = path.trim_matches('/').split('/').collect::<Vec<_>>()[..]
            && method == Method::GET
        {
            return self.discover(&format!("{group}/{version}"));
        }
        let Some(route) = Route::parse(path) else {
            return status_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no route for {path}"),
            );
        };
        let body: Option<Value> = if body.is_empty() {
            None
        } else {
            match serde_json::from_slice(body) {
                Ok(v) => Some(v),
                Err(e) => {
                    return status_response(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("body is not JSON: {e}"),
                    );
                }
            }
        };
        let mut state = self.state.lock().unwrap();
        if state.absent.contains(&route.resource) {
            return status_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
        match (&method, &route.name) {
            (&Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                self.watch(&mut state, &route, query)
            }
            (&Method::GET, None) => list(&state, &route, query),
            (&Method::GET, Some(name)) => match state.objects.get(&route.key(name)) {
                Some(object) => json_response(StatusCode::OK, object),
                None => not_found(&route, name),
            },
            (&Method::POST, None) => {
                let mut object = body.unwrap_or(Value::Null);
                let Some(name) = object
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                else {
                    return status_response(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        "metadata.name is required",
                    );
                };
                if state.objects.contains_key(&route.key(&name)) {
                    status_response(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        &format!("{} \"{name}\" already exists", route.resource),
                    )
                } else {
                    object["metadata"]["namespace"] =
                        route.namespace.clone().map_or(Value::Null, Value::String);
                    let created = self.write(&mut state, &route, &name, None, object, false);
                    json_response(StatusCode::CREATED, &created)
                }
            }
            (&Method::PUT, Some(name)) => {
                let object = body.unwrap_or(Value::Null);
                let Some(existing) = state.objects.get(&route.key(name)).cloned() else {
                    return not_found(&route, name);
                };
                let asked = object
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str);
                if asked.is_some_and(|rv| {
                    Some(rv)
                        != existing
                            .pointer("/metadata/resourceVersion")
                            .and_then(Value::as_str)
                }) {
                    status_response(
                        StatusCode::CONFLICT,
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version and try again",
                    )
                } else {
                    let written = self.write(
                        &mut state,
                        &route,
                        name,
                        Some(existing),
                        object,
                        route.subresource.as_deref() == Some("status"),
                    );
                    json_response(StatusCode::OK, &written)
                }
            }
            // The scale subresource: `spec.replicas` in and out as an autoscaling/v1 Scale.
            (&Method::PATCH, Some(name)) if route.subresource.as_deref() == Some("scale") => {
                let Some(existing) = state.objects.get(&route.key(name)).cloned() else {
                    return not_found(&route, name);
                };
                let patch = body.unwrap_or(Value::Null);
                let mut object = existing.clone();
                if let Some(replicas) = patch["spec"].get("replicas") {
                    object["spec"]["replicas"] = replicas.clone();
                }
                let written = self.write(&mut state, &route, name, Some(existing), object, false);
                let scale = json!({
                    "apiVersion": "autoscaling/v1", "kind": "Scale",
                    "metadata": {"name": name, "namespace": written["metadata"]["namespace"]},
                    "spec": {"replicas": written["spec"]["replicas"]},
                    "status": {"replicas": written["status"]["replicas"].as_i64().unwrap_or(0)},
                });
                json_response(StatusCode::OK, &scale)
            }
            (&Method::PATCH, Some(name)) => {
                let patch = body.unwrap_or(Value::Null);
                let existing = state.objects.get(&route.key(name)).cloned();
                let status_only = route.subresource.as_deref() == Some("status");
                let patched = match (content_type, existing.clone()) {
                    ("application/apply-patch+yaml", None) => Ok(patch),
                    ("application/apply-patch+yaml", Some(mut e)) => {
                        deep_merge(&mut e, &patch);
                        Ok(e)
                    }
                    ("application/merge-patch+json", Some(mut e)) => {
                        merge_patch(&mut e, &patch);
                        Ok(e)
                    }
                    ("application/json-patch+json", Some(mut e)) => {
                        match serde_json::from_value::<json_patch::Patch>(patch.clone()) {
                            Ok(p) => {
                                null_for_absent_tests(&mut e, &patch);
                                json_patch::patch(&mut e, &p).map(|()| e).map_err(|err| {
                                    (StatusCode::UNPROCESSABLE_ENTITY, err.to_string())
                                })
                            }
                            Err(err) => Err((StatusCode::BAD_REQUEST, err.to_string())),
                        }
                    }
                    (_, None) => return not_found(&route, name),
                    (other, _) => Err((
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        format!("patch type {other} is not supported"),
                    )),
                };
                match patched {
                    Ok(mut object) => {
                        if existing.is_none() {
                            object["metadata"]["namespace"] =
                                route.namespace.clone().map_or(Value::Null, Value::String);
                        }
                        let written =
                            self.write(&mut state, &route, name, existing, object, status_only);
                        json_response(StatusCode::OK, &written)
                    }
                    Err((code, message)) => status_response(code, "Invalid", &message),
                }
            }
            (&Method::DELETE, Some(name)) => {
                let Some(existing) = state.objects.get(&route.key(name)).cloned() else {
                    return not_found(&route, name);
                };
                let finalizers = existing
                    .pointer("/metadata/finalizers")
                    .and_then(Value::as_array)
                    .is_some_and(|f| !f.is_empty());
                if finalizers {
                    let mut marked = existing.clone();
                    if marked.pointer("/metadata/deletionTimestamp").is_none() {
                        marked["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
                    }
                    let written =
                        self.write(&mut state, &route, name, Some(existing), marked, false);
                    json_response(StatusCode::OK, &written)
                } else {
                    self.remove(&mut state, &route, name);
                    json_response(StatusCode::OK, &existing)
                }
            }
            _ => status_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                &format!("{method} {path}"),
            ),
        }
    }

    /// Stores `object` as the new state of `name`, honouring the status subresource, generation
    /// and no-op writes. Returns what is stored.
    /// An `APIResourceList` of the group version, or 404 where nothing is discoverable.
    fn discover(&self, group_version: &str) -> Response<ResponseBody> {
        let state = self.state.lock().unwrap();
        let Some(resources) = state.discovery.get(group_version) else {
            return status_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            );
        };
        let resources: Vec<Value> = resources
            .iter()
            .map(|(plural, kind)| {
                json!({"name": plural, "singularName": "", "namespaced": true, "kind": kind,
                       "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
            })
            .collect();
        json_response(
            StatusCode::OK,
            &json!({"kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": group_version, "resources": resources}),
        )
    }

    fn write(
        &self,
        state: &mut State,
        route: &Route,
        name: &str,
        existing: Option<Value>,
        mut object: Value,
        status_only: bool,
    ) -> Value {
        let has_status = STATUS_SUBRESOURCE.contains(&route.resource.as_str());
        if let Some(old) = &existing {
            if status_only {
                let status = object.get("status").cloned();
                object = old.clone();
                match status {
                    Some(s) => object["status"] = s,
                    None => {
                        object.as_object_mut().map(|o| o.remove("status"));
                    }
                }
            } else if has_status {
                match old.get("status") {
                    Some(s) => object["status"] = s.clone(),
                    None => {
                        object.as_object_mut().map(|o| o.remove("status"));
                    }
                }
            }
            // Immutable and server-owned metadata; a deletion mark, once set, stays.
            if let Some(mark) = old["metadata"].get("deletionTimestamp") {
                object["metadata"]["deletionTimestamp"] = mark.clone();
            }
            for field in ["uid", "creationTimestamp", "generation", "resourceVersion"] {
                match old["metadata"].get(field) {
                    Some(v) => object["metadata"][field] = v.clone(),
                    None => {
                        object["metadata"].as_object_mut().map(|m| m.remove(field));
                    }
                }
            }
            if old.get("spec") != object.get("spec") {
                let generation = old
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(1);
                object["metadata"]["generation"] = json!(generation + 1);
            }
            if &object == old {
                return object;
            }
            let finalizers_gone = object
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_none_or(|f| f.is_empty());
            if object.pointer("/metadata/deletionTimestamp").is_some() && finalizers_gone {
                self.remove(state, route, name);
                return object;
            }
        } else {
            state.uid += 1;
            object["metadata"]["uid"] = json!(format!("uid-{}", state.uid));
            object["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            object["metadata"]["generation"] = json!(1);
            // Creation through the main endpoint drops status on resources that have one.
            if has_status && !status_only {
                object.as_object_mut().map(|o| o.remove("status"));
            }
        }
        state.resource_version += 1;
        let rv = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.objects.insert(route.key(name), object.clone());
        let kind = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.emit(state, &route.resource, kind, &object);
        object
    }

    fn remove(&self, state: &mut State, route: &Route, name: &str) {
        if let Some(mut object) = state.objects.remove(&route.key(name)) {
            state.resource_version += 1;
            object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            self.emit(state, &route.resource, "DELETED", &object);
        }
    }

    fn emit(&self, state: &mut State, resource: &str, kind: &'static str, object: &Value) {
        let rv = state.resource_version;
        state
            .log
            .push((rv, resource.to_owned(), kind, object.clone()));
        let line = watch_line(kind, object);
        state.watchers.retain(|w| {
            if w.resource != resource || !w.matches(object) {
                return !w.sender.is_closed();
            }
            w.sender.send(line.clone()).is_ok()
        });
        self.changes.send_replace(rv);
    }

    fn watch(
        &self,
        state: &mut State,
        route: &Route,
        query: &BTreeMap<String, String>,
    ) -> Response<ResponseBody> {
        let since: u64 = query
            .get("resourceVersion")
            .and_then(|rv| rv.parse().ok())
            .unwrap_or(0);
        let (sender, receiver) = mpsc::unbounded_channel();
        let watcher = Watcher {
            resource: route.resource.clone(),
            namespace: route.namespace.clone(),
            selector: Selector::parse(query.get("labelSelector").map_or("", String::as_str)),
            sender,
        };
        for (rv, resource, kind, object) in &state.log {
            if *rv > since && *resource == route.resource && watcher.matches(object) {
                let _ = watcher.sender.send(watch_line(kind, object));
            }
        }
        state.watchers.push(watcher);
        let stream = futures::stream::unfold(receiver, |mut r| async move {
            r.recv().await.map(|line| (Ok(Frame::data(line)), r))
        });
        let body = UnsyncBoxBody::new(StreamBody::new(stream.boxed()));
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(body)
            .unwrap()
    }
}

impl Watcher {
    fn matches(&self, object: &Value) -> bool {
        let namespace = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("");
        self.namespace.as_deref().is_none_or(|ns| ns == namespace) && self.selector.matches(object)
    }
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

fn list(state: &State, route: &Route, query: &BTreeMap<String, String>) -> Response<ResponseBody> {
    let selector = Selector::parse(query.get("labelSelector").map_or("", String::as_str));
    let items: Vec<Value> = state
        .objects
        .iter()
        .filter(|((resource, namespace, _), object)| {
            *resource == route.resource
                && route.namespace.as_deref().is_none_or(|ns| ns == namespace)
                && selector.matches(object)
        })
        .map(|(_, object)| object.clone())
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "apiVersion": "v1", "kind": "List",
            "metadata": {"resourceVersion": state.resource_version.to_string()},
            "items": items,
        }),
    )
}

/// A parsed request path.
#[derive(Debug)]
struct Route {
    /// `api/v1/pods`, `apis/parallax.dev/v1alpha1/inferencepools`, …
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

impl Route {
    fn parse(path: &str) -> Option<Self> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (prefix, rest) = match parts.as_slice() {
            ["api", version, rest @ ..] => (format!("api/{version}"), rest),
            ["apis", group, version, rest @ ..] => (format!("apis/{group}/{version}"), rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
            _ => (None, rest),
        };
        let (resource, name, subresource) = match rest {
            [resource] => (*resource, None, None),
            [resource, name] => (*resource, Some(*name), None),
            [resource, name, sub] => (*resource, Some(*name), Some(*sub)),
            _ => return None,
        };
        Some(Self {
            resource: format!("{prefix}/{resource}"),
            namespace,
            name: name.map(str::to_owned),
            subresource: subresource.map(str::to_owned),
        })
    }

    fn key(&self, name: &str) -> Key {
        (
            self.resource.clone(),
            self.namespace.clone().unwrap_or_default(),
            name.to_owned(),
        )
    }
}

/// Equality-based label selectors: `k=v`, `k==v`, `k!=v`, `k`, `!k`.
#[derive(Debug, Default)]
struct Selector(Vec<(String, Option<String>, bool)>);

impl Selector {
    fn parse(text: &str) -> Self {
        Self(
            text.split(',')
                .filter(|t| !t.is_empty())
                .map(|term| {
                    if let Some((k, v)) = term.split_once("!=") {
                        (k.to_owned(), Some(v.to_owned()), false)
                    } else if let Some((k, v)) =
                        term.split_once("==").or_else(|| term.split_once('='))
                    {
                        (k.to_owned(), Some(v.to_owned()), true)
                    } else if let Some(k) = term.strip_prefix('!') {
                        (k.to_owned(), None, false)
                    } else {
                        (term.to_owned(), None, true)
                    }
                })
                .collect(),
        )
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        self.0.iter().all(|(key, value, positive)| {
            let actual = labels.and_then(|l| l.get(key)).and_then(Value::as_str);
            let hit = match value {
                Some(v) => actual == Some(v.as_str()),
                None => actual.is_some(),
            };
            hit == *positive
        })
    }
}

/// Server-side apply, approximated: maps merge key by key, everything else is replaced.
fn deep_merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                deep_merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// The API server's JSON patch treats an absent field as null, so `test` against null passes
/// where the field is missing (kube's finalizer helper relies on it).
fn null_for_absent_tests(document: &mut Value, patch: &Value) {
    for op in patch.as_array().into_iter().flatten() {
        let (Some("test"), Some(path), Some(Value::Null)) =
            (op["op"].as_str(), op["path"].as_str(), op.get("value"))
        else {
            continue;
        };
        if document.pointer(path).is_none()
            && let Some((parent, key)) = path.rsplit_once('/')
            && let Some(Value::Object(map)) = document.pointer_mut(parent)
        {
            map.insert(key.to_owned(), Value::Null);
        }
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        p => *target = p.clone(),
    }
}

fn json_response(code: StatusCode, value: &Value) -> Response<ResponseBody> {
    let body = UnsyncBoxBody::new(Full::new(Bytes::from(serde_json::to_vec(value).unwrap())));
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<ResponseBody> {
    json_response(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

fn not_found(route: &Route, name: &str) -> Response<ResponseBody> {
    status_response(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} \"{name}\" not found", route.resource),
    )
}

fn parse_query(query: Option<&str>) -> BTreeMap<String, String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

impl tower::Service<Request<Body>> for FakeApiServer {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let server = self.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let content_type = parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let query = parse_query(parts.uri.query());
            Ok(server.handle(parts.method, parts.uri.path(), &query, &content_type, &body))
        })
    }
}
