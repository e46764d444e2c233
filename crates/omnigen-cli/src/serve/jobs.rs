//! Jobs: one generation each, waiting in a bounded queue for a pool of blocking worker threads
//! that share one loaded pipeline. A job's state is published on a `watch` channel, so the
//! synchronous endpoints, `GET /v1/jobs/{id}` and the events stream all read the same value.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use omnigen::prelude::*;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::metrics::Metrics;
use super::openai::ApiError;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Waiting for a worker.
    Queued,
    /// On a worker.
    Running,
    /// Done; its images are in the result.
    Succeeded,
    /// Ended in an error.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
}

impl Status {
    /// The name the API reports.
    pub fn name(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    /// Whether the job will not change again.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }
}

/// A job's state as its observers see it.
#[derive(Debug, Clone)]
pub struct JobState {
    /// Where the job is.
    pub status: Status,
    /// Denoising steps done.
    pub step: usize,
    /// Denoising steps in all.
    pub total: usize,
    /// When it finished (for expiry).
    pub finished: Option<Instant>,
    /// The OpenAI images response, once succeeded.
    pub result: Option<Arc<Value>>,
    /// Why it failed or was cancelled.
    pub error: Option<ApiError>,
}

/// One generation.
#[derive(Debug)]
pub struct Job {
    /// Its id (`job_` and 32 hex digits).
    pub id: String,
    /// Seconds since the epoch at submission.
    pub created: u64,
    submitted: Instant,
    request: GenerationRequest,
    /// The parameters as the client will see them reported.
    pub parameters: Value,
    cancel: CancellationToken,
    state: watch::Sender<JobState>,
}

impl Job {
    /// A queued job for `request`.
    pub fn new(request: GenerationRequest, parameters: Value) -> Arc<Self> {
        let total = request.num_inference_steps;
        let (state, _) = watch::channel(JobState {
            status: Status::Queued,
            step: 0,
            total,
            finished: None,
            result: None,
            error: None,
        });
        Arc::new(Self {
            id: format!("job_{:032x}", rand::random::<u128>()),
            created: unix_now(),
            submitted: Instant::now(),
            request,
            parameters,
            cancel: CancellationToken::new(),
            state,
        })
    }

    /// A copy of the current state.
    pub fn state(&self) -> JobState {
        self.state.borrow().clone()
    }

    /// A receiver of every later state change.
    pub fn subscribe(&self) -> watch::Receiver<JobState> {
        self.state.subscribe()
    }

    /// Asks the job to stop: a queued job never starts, a running one stops before its next
    /// step (the pipeline's cancellation token).
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Whether cancellation was asked for.
    pub fn cancel_requested(&self) -> bool {
        self.cancel.is_cancelled()
    }

    fn finish(&self, status: Status, result: Option<Arc<Value>>, error: Option<ApiError>) {
        self.state.send_modify(|s| {
            s.status = status;
            s.finished = Some(Instant::now());
            s.result = result;
            s.error = error;
        });
    }

    /// The job as `GET /v1/jobs/{id}` reports it; the result only when `with_result`.
    pub fn to_json(&self, state: &JobState, with_result: bool) -> Value {
        json!({
            "id": self.id,
            "object": "job",
            "status": state.status.name(),
            "step": state.step,
            "total": state.total,
            "created": self.created,
            "cancel_requested": self.cancel_requested(),
            "parameters": self.parameters,
            "result": if with_result { state.result.as_deref().cloned() } else { None },
            "error": state.error.as_ref().map(|e| e.body()["error"].clone()),
        })
    }
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue holds its capacity.
    Full,
    /// Shutdown has begun.
    Closed,
}

#[derive(Debug, Default)]
struct QueueInner {
    waiting: VecDeque<Arc<Job>>,
    running: Vec<Arc<Job>>,
    closed: bool,
}

/// The bounded queue between the HTTP handlers and the worker threads.
#[derive(Debug)]
pub struct Queue {
    inner: Mutex<QueueInner>,
    ready: Condvar,
    /// Jobs that may wait at once.
    pub capacity: usize,
}

impl Queue {
    /// An empty queue for at most `capacity` waiting jobs.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(QueueInner::default()),
            ready: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueInner> {
        // A worker that panicked holding the lock left consistent data: every update is a
        // single push, pop or count change.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job`, or says why not.
    pub fn submit(&self, job: Arc<Job>) -> Result<(), Refused> {
        let mut q = self.lock();
        if q.closed {
            return Err(Refused::Closed);
        }
        if q.waiting.len() >= self.capacity {
            return Err(Refused::Full);
        }
        q.waiting.push_back(job);
        drop(q);
        self.ready.notify_one();
        Ok(())
    }

    /// Takes `job` out of the queue if it is still waiting there.
    pub fn withdraw(&self, job: &Job) -> bool {
        let mut q = self.lock();
        let before = q.waiting.len();
        q.waiting.retain(|j| j.id != job.id);
        q.waiting.len() != before
    }

    /// Jobs waiting.
    pub fn depth(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Jobs on a worker.
    pub fn running(&self) -> usize {
        self.lock().running.len()
    }

    /// Cancels every job on a worker (at shutdown, once their time is up).
    pub fn cancel_running(&self) {
        for job in &self.lock().running {
            job.cancel();
        }
    }

    /// Refuses new jobs from now on and returns those still waiting, which will never run.
    pub fn close(&self) -> Vec<Arc<Job>> {
        let mut q = self.lock();
        q.closed = true;
        let left = q.waiting.drain(..).collect();
        drop(q);
        self.ready.notify_all();
        left
    }

    /// The next job for a worker, blocking; `None` once the queue is closed.
    fn next(&self) -> Option<Arc<Job>> {
        let mut q = self.lock();
        loop {
            if q.closed {
                return None;
            }
            if let Some(job) = q.waiting.pop_front() {
                q.running.push(job.clone());
                return Some(job);
            }
            q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn done(&self, job: &Job) {
        self.lock().running.retain(|j| j.id != job.id);
    }
}

/// Jobs submitted through `/v1/jobs`, kept until they expire after finishing.
#[derive(Debug)]
pub struct JobStore {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    ttl: Duration,
}

/// Finished jobs kept at most, whatever their age: each holds its images.
const MAX_FINISHED: usize = 256;

impl JobStore {
    /// An empty store whose finished jobs expire after `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            jobs: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `job` for later lookups.
    pub fn insert(&self, job: Arc<Job>) {
        self.lock().insert(job.id.clone(), job);
    }

    /// The job with this id, unless unknown or expired.
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.lock().get(id).cloned()
    }

    /// Forgets a job that never made it into the queue.
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Drops jobs finished longer than the time to live ago, and the oldest finished ones
    /// beyond [`MAX_FINISHED`].
    pub fn expire(&self) {
        let now = Instant::now();
        let mut jobs = self.lock();
        jobs.retain(|_, j| {
            j.state
                .borrow()
                .finished
                .is_none_or(|t| now.duration_since(t) < self.ttl)
        });
        let mut finished: Vec<(Instant, String)> = jobs
            .values()
            .filter_map(|j| j.state.borrow().finished.map(|t| (t, j.id.clone())))
            .collect();
        if finished.len() > MAX_FINISHED {
            finished.sort();
            for (_, id) in &finished[..finished.len() - MAX_FINISHED] {
                jobs.remove(id);
            }
        }
    }

    /// Jobs stored.
    pub fn count(&self) -> usize {
        self.lock().len()
    }
}

/// Marks jobs that will never run (queue closed, withdrawn) as cancelled.
pub fn cancel_unstarted(job: &Job, metrics: &Metrics) {
    job.cancel();
    job.finish(Status::Cancelled, None, Some(ApiError::cancelled(0)));
    metrics.cancelled.fetch_add(1, Ordering::Relaxed);
}

/// Starts `workers` threads that run the queue's jobs on `pipeline` until it closes.
pub fn start_workers(
    workers: usize,
    queue: Arc<Queue>,
    pipeline: Arc<OmniGenPipeline<DefaultBackend>>,
    metrics: Arc<Metrics>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    (0..workers)
        .map(|i| {
            let (queue, pipeline, metrics) = (queue.clone(), pipeline.clone(), metrics.clone());
            std::thread::Builder::new()
                .name(format!("omnigen-worker-{i}"))
                .spawn(move || {
                    while let Some(job) = queue.next() {
                        run_job(&job, &pipeline, &metrics);
                        queue.done(&job);
                    }
                })
        })
        .collect()
}

fn run_job(job: &Job, pipeline: &OmniGenPipeline<DefaultBackend>, metrics: &Metrics) {
    if job.cancel_requested() {
        return cancel_unstarted(job, metrics);
    }
    job.state.send_modify(|s| s.status = Status::Running);
    // A panic in the library must cost this job, not the worker thread.
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| generate(job, pipeline)))
        .unwrap_or_else(|_| Err(ApiError::internal("the generation panicked")));
    match outcome {
        Ok(result) => {
            job.finish(Status::Succeeded, Some(Arc::new(result)), None);
            metrics.observe(job.submitted.elapsed());
        }
        Err(e) if e.kind == "cancelled" => {
            job.finish(Status::Cancelled, None, Some(e));
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            tracing::warn!(job = %job.id, error = %e.message, "generation failed");
            job.finish(Status::Failed, None, Some(e));
            metrics.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Runs the generation and builds the OpenAI images response, PNGs encoded with their
/// provenance metadata.
fn generate(job: &Job, pipeline: &OmniGenPipeline<DefaultBackend>) -> Result<Value, ApiError> {
    let mut on_progress = |p: Progress| {
        job.state.send_modify(|s| {
            s.step = p.step;
            s.total = p.total;
        });
    };
    let hooks = Hooks {
        on_progress: Some(&mut on_progress),
        cancel: Some(job.cancel.clone()),
        ..Hooks::default()
    };
    let generation = pipeline
        .generate_with_hooks(&job.request, hooks)
        .map_err(|e| ApiError::from_library(&e))?;
    let mut data = Vec::with_capacity(generation.images.len());
    let mut size = String::new();
    for (index, image) in generation.images.iter().enumerate() {
        let metadata = omnigen::io::output_metadata(&job.request, pipeline, &generation, index)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let png = omnigen::pipeline::encode_png(image, &metadata)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(png);
        data.push(json!({ "b64_json": b64 }));
        size = format!("{}x{}", image.width(), image.height());
    }
    Ok(json!({
        "created": unix_now(),
        "data": data,
        "output_format": "png",
        "size": size,
    }))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Arc<Job> {
        Job::new(
            GenerationRequest::new(Prompt::from("x")).steps(3),
            json!({}),
        )
    }

    #[test]
    fn the_queue_refuses_beyond_capacity_and_after_close() {
        let q = Queue::new(2);
        let (a, b, c) = (job(), job(), job());
        q.submit(a.clone()).unwrap();
        q.submit(b.clone()).unwrap();
        assert_eq!(q.submit(c.clone()), Err(Refused::Full));
        assert!(q.withdraw(&a));
        assert!(!q.withdraw(&a));
        q.submit(c).unwrap();
        assert_eq!(q.depth(), 2);
        let left = q.close();
        assert_eq!(left.len(), 2);
        assert_eq!(q.submit(job()), Err(Refused::Closed));
        assert!(q.next().is_none());
    }

    #[test]
    fn finished_jobs_expire() {
        let store = JobStore::new(Duration::ZERO);
        let (a, b) = (job(), job());
        store.insert(a.clone());
        store.insert(b.clone());
        cancel_unstarted(&a, &Metrics::default());
        store.expire();
        assert!(store.get(&a.id).is_none());
        assert!(
            store.get(&b.id).is_some(),
            "an unfinished job never expires"
        );
        assert_eq!(a.state().status, Status::Cancelled);
    }

    #[test]
    fn job_ids_are_distinct_and_json_has_the_state() {
        let (a, b) = (job(), job());
        assert_ne!(a.id, b.id);
        assert_eq!(a.id.len(), 4 + 32);
        let v = a.to_json(&a.state(), true);
        assert_eq!(v["status"], "queued");
        assert_eq!(v["total"], 3);
        assert!(v["result"].is_null() && v["error"].is_null());
    }
}
