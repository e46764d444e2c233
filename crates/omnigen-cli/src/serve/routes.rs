//! The HTTP surface: the OpenAI images endpoints, the jobs API, health, metrics and the page.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use omnigen::prelude::*;
use serde_json::{json, Value};

use super::jobs::{cancel_unstarted, Job, JobStore, Queue, Refused, Status};
use super::metrics::{Gauges, Metrics};
use super::openai::{self, ApiError, Kind, Limits, Source};

/// The page at `/`: static HTML and JavaScript, no build step.
const PAGE: &str = include_str!("page.html");

/// Model loading, serving, or shutting down.
pub const LOADING: u8 = 0;
/// Serving.
pub const READY: u8 = 1;
/// Refusing new work while running jobs finish.
pub const SHUTTING_DOWN: u8 = 2;

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    /// [`LOADING`], [`READY`] or [`SHUTTING_DOWN`].
    pub phase: AtomicU8,
    /// The queue the workers take jobs from.
    pub queue: Arc<Queue>,
    /// Jobs of `/v1/jobs`.
    pub jobs: JobStore,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Per-request limits and the served model's name.
    pub limits: Limits,
    /// The key `Authorization: Bearer` must carry, if any.
    pub api_key: Option<String>,
    /// Largest request body, bytes.
    pub max_body: usize,
    /// Time allowed for a request body to arrive.
    pub body_timeout: Duration,
    /// Generation worker threads.
    pub workers: usize,
    /// Seconds since the epoch when the server started.
    pub started: u64,
}

impl AppState {
    fn phase(&self) -> u8 {
        self.phase.load(Ordering::SeqCst)
    }

    /// Queues a job, or the error that tells the client why not.
    fn submit(&self, job: Arc<Job>) -> Result<(), ApiError> {
        match self.phase() {
            LOADING => return Err(ApiError::loading()),
            SHUTTING_DOWN => return Err(ApiError::shutting_down()),
            _ => {}
        }
        match self.queue.submit(job) {
            Ok(()) => Ok(()),
            Err(Refused::Closed) => Err(ApiError::shutting_down()),
            Err(Refused::Full) => {
                self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                Err(ApiError::queue_full(
                    self.queue.capacity,
                    self.retry_after(),
                ))
            }
        }
    }

    /// Seconds until a queue slot is likely free: the waiting jobs' share of the workers at
    /// the mean latency so far.
    fn retry_after(&self) -> u64 {
        let mean = self.metrics.mean_latency().map_or(1.0, |d| d.as_secs_f64());
        let waiting = self.queue.depth() as f64 + 1.0;
        (mean * waiting / self.workers.max(1) as f64)
            .ceil()
            .clamp(1.0, 600.0) as u64
    }

    fn gauges(&self) -> Gauges {
        Gauges {
            queue_depth: self.queue.depth(),
            queue_capacity: self.queue.capacity,
            running: self.queue.running(),
            workers: self.workers,
            ready: self.phase() == READY,
        }
    }
}

type Shared = Arc<AppState>;

/// Every route, with the API key required on `/v1`.
pub fn router(state: Shared) -> Router {
    let v1 = Router::new()
        .route("/models", get(models))
        .route("/models/{id}", get(model))
        .route("/images/generations", post(generations))
        .route("/images/edits", post(edits))
        .route("/jobs", post(create_job))
        .route("/jobs/{id}", get(job_status).delete(cancel_job))
        .route("/jobs/{id}/events", get(job_events))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .nest("/v1", v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Axum's own body limit would answer in plain text; bodies are read (and limited)
        // by `read_body` and the multipart reader instead, in OpenAI's error shape.
        .layer(axum::extract::DefaultBodyLimit::max(state.max_body))
        .layer(middleware::from_fn_with_state(state.clone(), count_errors))
        .layer(middleware::from_fn_with_state(state.clone(), limit_length))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

/// A body announced as larger than the limit is refused before a byte of it is read.
async fn limit_length(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if length.is_some_and(|n| n > state.max_body as u64) {
        state.metrics.client_errors.fetch_add(1, Ordering::Relaxed);
        return ApiError::too_large(state.max_body).into_response();
    }
    next.run(request).await
}

async fn count_errors(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if response.status().is_client_error() && response.status() != StatusCode::TOO_MANY_REQUESTS {
        state.metrics.client_errors.fetch_add(1, Ordering::Relaxed);
    }
    response
}

async fn require_key(
    State(state): State<Shared>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            None => {
                return Err(ApiError::unauthorized(
                    "no API key given; send `Authorization: Bearer KEY`",
                ))
            }
            Some(given) if !same_secret(given.trim().as_bytes(), key.as_bytes()) => {
                return Err(ApiError::unauthorized("incorrect API key"))
            }
            Some(_) => {}
        }
    }
    Ok(next.run(request).await)
}

/// Compares without stopping at the first differing byte, so the time taken does not tell how
/// much of a guessed key was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, &x) in a.iter().enumerate() {
        diff |= x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0);
    }
    diff == 0
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn health(State(state): State<Shared>) -> Response {
    let (status, name) = match state.phase() {
        LOADING => (StatusCode::SERVICE_UNAVAILABLE, "loading"),
        READY => (StatusCode::OK, "ok"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
    };
    let g = state.gauges();
    let body = json!({
        "status": name,
        "model": state.limits.model_name,
        "queue_depth": g.queue_depth,
        "queue_capacity": g.queue_capacity,
        "running": g.running,
        "workers": g.workers,
        "jobs_stored": state.jobs.count(),
    });
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(state.gauges()),
    )
        .into_response()
}

fn model_object(state: &AppState) -> Value {
    json!({
        "id": state.limits.model_name,
        "object": "model",
        "created": state.started,
        "owned_by": "omnigen-rs",
    })
}

async fn models(State(state): State<Shared>) -> Json<Value> {
    Json(json!({ "object": "list", "data": [model_object(&state)] }))
}

async fn model(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if id != state.limits.model_name {
        return Err(ApiError::not_found(format!("no model `{id}`")));
    }
    Ok(Json(model_object(&state)))
}

/// The whole body, within the size and time limits.
async fn read_body(state: &AppState, request: Request) -> Result<Bytes, ApiError> {
    let read = Bytes::from_request(request, &());
    match tokio::time::timeout(state.body_timeout, read).await {
        Err(_) => Err(ApiError::body_timeout(state.body_timeout.as_secs())),
        Ok(Err(rejection)) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::too_large(state.max_body))
        }
        Ok(Err(rejection)) => Err(ApiError::bad_body(rejection.body_text())),
        Ok(Ok(bytes)) => Ok(bytes),
    }
}

/// A JSON body's fields, in order.
fn json_fields(bytes: &[u8]) -> Result<Vec<(String, Value)>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map.into_iter().collect()),
        Ok(_) => Err(ApiError::bad_body("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_body(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

/// The text fields and image files of a multipart body, within the size and time limits.
async fn form_fields(
    state: &AppState,
    request: Request,
) -> Result<(Vec<(String, Value)>, Vec<Bytes>), ApiError> {
    let read = async {
        let mut form = Multipart::from_request(request, &())
            .await
            .map_err(|e| ApiError::bad_body(e.body_text()))?;
        let mut fields = Vec::new();
        let mut files = Vec::new();
        let failed = |e: axum::extract::multipart::MultipartError| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(state.max_body)
            } else {
                ApiError::bad_body(format!("malformed multipart body: {}", e.body_text()))
            }
        };
        while let Some(field) = form.next_field().await.map_err(failed)? {
            let name = field.name().unwrap_or_default().to_string();
            if matches!(name.as_str(), "image" | "image[]") {
                files.push(field.bytes().await.map_err(failed)?);
            } else if name == "mask" {
                field.bytes().await.map_err(failed)?;
                fields.push((name, Value::String("(file)".into())));
            } else {
                let text = field.text().await.map_err(failed)?;
                fields.push((name, Value::String(text)));
            }
        }
        Ok::<_, ApiError>((fields, files))
    };
    tokio::time::timeout(state.body_timeout, read)
        .await
        .unwrap_or_else(|_| Err(ApiError::body_timeout(state.body_timeout.as_secs())))
}

/// Decodes uploaded images off the async threads: a large PNG takes a while.
async fn decode_images(files: Vec<Bytes>) -> Result<Vec<ConditionImage>, ApiError> {
    if files.len() > openai::MAX_IMAGES {
        return Err(ApiError::invalid(
            "image",
            format!(
                "{} images given; at most {}",
                files.len(),
                openai::MAX_IMAGES
            ),
        ));
    }
    tokio::task::spawn_blocking(move || {
        files
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                image::load_from_memory(bytes)
                    .map(ConditionImage::from_dynamic)
                    .map_err(|e| {
                        ApiError::invalid(
                            "image",
                            format!("image {} cannot be decoded: {e}", i + 1),
                        )
                    })
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::internal(format!("image decoding stopped: {e}")))?
}

fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("multipart/form-data"))
}

/// Reads a generation (JSON) or an edit (multipart) body into a job.
async fn read_job(state: &AppState, request: Request, kind: Kind) -> Result<Arc<Job>, ApiError> {
    if state.phase() == LOADING {
        return Err(ApiError::loading());
    }
    let parsed = match kind {
        Kind::Generation => {
            let bytes = read_body(state, request).await?;
            openai::parse(
                json_fields(&bytes)?,
                vec![],
                kind,
                Source::Json,
                &state.limits,
            )?
        }
        Kind::Edit => {
            if !is_multipart(request.headers()) {
                return Err(ApiError::bad_body(
                    "an edit is sent as multipart/form-data with `image` and `prompt` fields",
                ));
            }
            let (fields, files) = form_fields(state, request).await?;
            let images = decode_images(files).await?;
            openai::parse(fields, images, kind, Source::Form, &state.limits)?
        }
    };
    Ok(Job::new(parsed.request, parsed.parameters))
}

/// Cancels its job when dropped before [`disarm`](Self::disarm): a client that disconnects
/// drops the handler, and its generation should not keep a worker busy.
struct CancelOnDrop<'a> {
    job: &'a Job,
    state: &'a AppState,
    armed: bool,
}

impl CancelOnDrop<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            tracing::info!(job = %self.job.id, "client went away: cancelling its generation");
            self.job.cancel();
            if self.state.queue.withdraw(self.job) {
                cancel_unstarted(self.job, &self.state.metrics);
            }
        }
    }
}

/// Runs a job to its end and answers with its images, as the OpenAI endpoints do.
async fn run_to_end(state: &AppState, job: Arc<Job>) -> Result<Json<Value>, ApiError> {
    let mut rx = job.subscribe();
    state.submit(job.clone())?;
    let guard = CancelOnDrop {
        job: &job,
        state,
        armed: true,
    };
    let finished = rx
        .wait_for(|s| s.status.is_final())
        .await
        .map(|s| s.clone())
        .map_err(|_| ApiError::internal("the job vanished"));
    guard.disarm();
    let finished = finished?;
    match (finished.status, finished.result, finished.error) {
        (Status::Succeeded, Some(result), _) => Ok(Json((*result).clone())),
        (Status::Cancelled, _, _) if state.phase() == SHUTTING_DOWN => {
            Err(ApiError::shutting_down())
        }
        (_, _, Some(error)) => Err(error),
        _ => Err(ApiError::internal("the job ended without a result")),
    }
}

async fn generations(
    State(state): State<Shared>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let job = read_job(&state, request, Kind::Generation).await?;
    run_to_end(&state, job).await
}

async fn edits(State(state): State<Shared>, request: Request) -> Result<Json<Value>, ApiError> {
    let job = read_job(&state, request, Kind::Edit).await?;
    run_to_end(&state, job).await
}

async fn create_job(State(state): State<Shared>, request: Request) -> Result<Response, ApiError> {
    let kind = if is_multipart(request.headers()) {
        Kind::Edit
    } else {
        Kind::Generation
    };
    let job = read_job(&state, request, kind).await?;
    state.jobs.insert(job.clone());
    if let Err(e) = state.submit(job.clone()) {
        state.jobs.remove(&job.id);
        return Err(e);
    }
    let body = job.to_json(&job.state(), false);
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

fn find(state: &AppState, id: &str) -> Result<Arc<Job>, ApiError> {
    state
        .jobs
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no job `{id}` (unknown, or expired)")))
}

async fn job_status(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find(&state, &id)?;
    Ok(Json(job.to_json(&job.state(), true)))
}

async fn cancel_job(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find(&state, &id)?;
    if !job.state().status.is_final() {
        job.cancel();
        if state.queue.withdraw(&job) {
            cancel_unstarted(&job, &state.metrics);
        }
    }
    Ok(Json(job.to_json(&job.state(), false)))
}

/// `progress` events while the job waits and runs (the latest state each time the client is
/// ready for one), then one `done` event with the whole job, result included.
async fn job_events(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let job = find(&state, &id)?;
    let rx = job.subscribe();
    let stream = futures_util::stream::unfold(Some((job, rx, true)), |next| async move {
        let (job, mut rx, first) = next?;
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let s = rx.borrow_and_update().clone();
        if s.status.is_final() {
            let event = Event::default()
                .event("done")
                .data(job.to_json(&s, true).to_string());
            return Some((Ok(event), None));
        }
        let progress = json!({"status": s.status.name(), "step": s.step, "total": s.total});
        let event = Event::default()
            .event("progress")
            .data(progress.to_string());
        Some((Ok(event), Some((job, rx, false))))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt as _;

    fn request(method: &str, uri: &str, body: Body) -> Request {
        Request::builder()
            .method(method)
            .uri(uri)
            .body(body)
            .unwrap()
    }

    fn state(key: Option<&str>) -> Shared {
        Arc::new(AppState {
            phase: AtomicU8::new(LOADING),
            queue: Arc::new(Queue::new(2)),
            jobs: JobStore::new(Duration::from_secs(60)),
            metrics: Arc::new(Metrics::default()),
            limits: Limits {
                model_name: "omnigen".into(),
                max_n: 4,
                max_steps: 50,
                default_size: (64, 64),
            },
            api_key: key.map(Into::into),
            max_body: 1000,
            body_timeout: Duration::from_secs(5),
            workers: 1,
            started: 0,
        })
    }

    async fn call(state: &Shared, request: Request) -> (StatusCode, Value) {
        let response = router(state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn loading_answers_503_and_the_key_is_checked_first() {
        let s = state(Some("k"));
        let body = || Body::from(r#"{"prompt":"a"}"#);
        let (status, v) = call(&s, request("POST", "/v1/images/generations", body())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(v["error"]["code"], "invalid_api_key");
        let mut r = request("POST", "/v1/images/generations", body());
        r.headers_mut()
            .insert(header::AUTHORIZATION, "Bearer k".parse().unwrap());
        let (status, v) = call(&s, r).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(v["error"]["code"], "model_loading");
        let (status, v) = call(&s, request("GET", "/health", Body::empty())).await;
        assert_eq!(
            (status, v["status"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("loading"))
        );
    }

    #[tokio::test]
    async fn oversized_bodies_and_unknown_paths_answer_in_openai_shape() {
        let s = state(None);
        s.phase.store(READY, Ordering::SeqCst);
        let big = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(2000));
        let (status, v) = call(
            &s,
            request("POST", "/v1/images/generations", Body::from(big)),
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(v["error"]["code"], "request_too_large");
        let (status, v) = call(&s, request("GET", "/v1/nothing", Body::empty())).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found"))
        );
        let (status, v) = call(&s, request("GET", "/v1/images/generations", Body::empty())).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let (status, v) = call(
            &s,
            request("POST", "/v1/images/generations", Body::from("[1]")),
        )
        .await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_body"))
        );
        let (status, v) = call(
            &s,
            request(
                "POST",
                "/v1/images/generations",
                Body::from(r#"{"prompt":"a","n":9}"#),
            ),
        )
        .await;
        assert_eq!(
            (status, v["error"]["param"].as_str()),
            (StatusCode::BAD_REQUEST, Some("n"))
        );
    }

    #[tokio::test]
    async fn shutting_down_refuses_new_work_with_503() {
        let s = state(None);
        s.phase.store(SHUTTING_DOWN, Ordering::SeqCst);
        let body = Body::from(r#"{"prompt":"a","steps":1}"#);
        let (status, v) = call(&s, request("POST", "/v1/jobs", body)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(v["error"]["code"], "shutting_down");
        assert_eq!(s.jobs.count(), 0, "a refused job is not kept");
        let (status, v) = call(&s, request("GET", "/health", Body::empty())).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(v["status"], "shutting_down");
    }

    #[tokio::test]
    async fn a_full_queue_answers_429_with_retry_after() {
        let s = state(None);
        s.phase.store(READY, Ordering::SeqCst);
        let body = || Body::from(r#"{"prompt":"a","steps":1}"#);
        for _ in 0..2 {
            let (status, _) = call(&s, request("POST", "/v1/jobs", body())).await;
            assert_eq!(status, StatusCode::ACCEPTED);
        }
        let response = router(s.clone())
            .oneshot(request("POST", "/v1/jobs", body()))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        assert_eq!(s.metrics.rejected.load(Ordering::Relaxed), 1);
        let (status, v) = call(&s, request("GET", "/metrics", Body::empty())).await;
        assert_eq!(status, StatusCode::OK);
        assert!(v.is_null(), "metrics are text, not JSON");
    }

    #[test]
    fn secrets_compare_by_content_and_length() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"abcd", b"abc"));
        assert!(!same_secret(b"", b"abc"));
    }
}
