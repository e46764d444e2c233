//! `omnigen serve` as clients meet it, on the committed tiny checkpoint and 127.0.0.1 only: the
//! load and fault test (many concurrent clients, a queue smaller than their number, mixed valid
//! and invalid requests, every image compared with the same request run single-threaded in
//! this process), the jobs API, shutdown on SIGTERM, and (ignored unless asked for: it needs
//! `chromium` and `chromedriver`) the web page driven in headless Chromium.
//!
//! The client is a few lines over `TcpStream`, one request per connection: it sees the bytes
//! the server sends, so a response answered twice or cut short is noticed, and the faults
//! (disconnects, slow headers) are plain socket operations.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use image::RgbImage;
use omnigen::prelude::*;
use serde_json::{json, Value};

const KEY: &str = "test-key";
const STEPS: usize = 2;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_dir() -> PathBuf {
    root().join("tests/fixtures/A/model")
}

/// A running `omnigen serve` child process.
struct Server {
    child: Child,
    client: Client,
    log: Arc<Mutex<Vec<String>>>,
}

impl std::ops::Deref for Server {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

/// Speaks HTTP/1.1 to 127.0.0.1:`port`, one request per connection.
#[derive(Clone, Copy)]
struct Client {
    port: u16,
    /// Whether the peer keeps connections open despite `Connection: close` (chromedriver):
    /// then a response ends with its body, not with the connection.
    keeps_alive: bool,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_omnigen"))
            .arg("serve")
            .arg("--model")
            .arg(model_dir())
            .args([
                "--port",
                "0",
                "--default-size",
                "32x32",
                "--max-steps",
                "100",
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .env_remove("OMNIGEN_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start omnigen serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no address printed: {:?}", log.lock().unwrap()));
        assert!(addr.starts_with("127.0.0.1:"), "bound {addr}");
        let port = addr.rsplit(':').next().unwrap().parse().unwrap();
        let server = Server {
            child,
            client: Client {
                port,
                keeps_alive: false,
            },
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = server.try_call("GET", "/health", &[], &[]) {
                if r.status == 200 {
                    break;
                }
                assert_eq!(r.status, 503, "health while loading: {}", r.text());
            }
            assert!(Instant::now() < deadline, "not ready: {:?}", server.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kib / 1024.0
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: sends a signal to our own child process by its id.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit after SIGTERM: {:?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Client {
    fn connect(&self) -> std::io::Result<TcpStream> {
        let s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(s)
    }

    fn try_call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Resp> {
        let mut s = self.connect()?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        if !self.keeps_alive {
            let mut raw = Vec::new();
            s.read_to_end(&mut raw)?;
            return Ok(Resp::parse(&raw));
        }
        let mut raw = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if length.is_some_and(|n| raw.len() >= end + 4 + n) {
                    break;
                }
            }
        }
        Ok(Resp::parse(&raw))
    }

    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        self.try_call(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn post_json(&self, path: &str, body: &Value) -> Resp {
        let auth = format!("Bearer {KEY}");
        self.call(
            "POST",
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
    }

    fn post_form(&self, path: &str, form: &Form) -> Resp {
        let auth = format!("Bearer {KEY}");
        let ct = form.content_type();
        self.call(
            "POST",
            path,
            &[("Authorization", &auth), ("Content-Type", &ct)],
            &form.bytes(),
        )
    }

    fn get(&self, path: &str) -> Resp {
        let auth = format!("Bearer {KEY}");
        self.call("GET", path, &[("Authorization", &auth)], &[])
    }

    fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").text();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP response, and whatever followed it on the connection.
#[derive(Debug, Clone)]
struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
    trailing: usize,
}

impl Resp {
    fn parse(raw: &[u8]) -> Resp {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&raw[..end]).to_string();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let rest = &raw[end + 4..];
        let (body, trailing) = if let Some(n) = headers.get("content-length") {
            let n: usize = n.parse().unwrap();
            assert!(rest.len() >= n, "body cut short: {} of {n}", rest.len());
            (rest[..n].to_vec(), rest.len() - n)
        } else if headers
            .get("transfer-encoding")
            .is_some_and(|t| t == "chunked")
        {
            dechunk(rest)
        } else {
            (rest.to_vec(), 0)
        };
        Resp {
            status,
            headers,
            body,
            trailing,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The images of an OpenAI images response.
    fn images(&self) -> Vec<RgbImage> {
        images_of(&self.json())
    }
}

fn images_of(response: &Value) -> Vec<RgbImage> {
    response["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no data in {response}"))
        .iter()
        .map(|d| {
            let png = base64::engine::general_purpose::STANDARD
                .decode(d["b64_json"].as_str().unwrap())
                .unwrap();
            image::load_from_memory(&png).unwrap().to_rgb8()
        })
        .collect()
}

fn dechunk(mut rest: &[u8]) -> (Vec<u8>, usize) {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        rest = &rest[line_end + 2..];
        if size == 0 {
            // the terminating chunk's CRLF
            return (body, rest.len().saturating_sub(2));
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// A `multipart/form-data` body.
#[derive(Default, Clone)]
struct Form {
    parts: Vec<(String, Option<String>, Vec<u8>)>,
}

impl Form {
    fn text(mut self, name: &str, value: &str) -> Self {
        self.parts
            .push((name.into(), None, value.as_bytes().to_vec()));
        self
    }

    fn file(mut self, name: &str, file: &str, bytes: Vec<u8>) -> Self {
        self.parts.push((name.into(), Some(file.into()), bytes));
        self
    }

    fn content_type(&self) -> String {
        "multipart/form-data; boundary=omnigen-test-boundary".into()
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, file, bytes) in &self.parts {
            out.extend_from_slice(b"--omnigen-test-boundary\r\n");
            match file {
                Some(f) => out.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: image/png\r\n\r\n").as_bytes(),
                ),
                None => out.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            out.extend_from_slice(bytes);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--omnigen-test-boundary--\r\n");
        out
    }
}

fn fixture_png(name: &str) -> Vec<u8> {
    std::fs::read(root().join("tests/fixtures/A").join(name)).unwrap()
}

/// What a client sends, and what it must get back.
#[derive(Clone)]
enum Case {
    /// A generation with this prompt and seed.
    Generate { prompt: &'static str, seed: u64 },
    /// An edit of this fixture image.
    Edit { image: &'static str, seed: u64 },
    /// An invalid body and the field its 400 must name.
    Invalid { body: Value, field: &'static str },
    /// An edit missing its image.
    EditWithoutImage,
}

const PROMPTS: [&str; 2] = ["a red cat sitting on a blue mat", "a dog"];
const EDIT_PROMPT: &str = "make the cat green";

impl Case {
    fn of(i: usize) -> Case {
        let seed = ((i / 10) % 2) as u64;
        match i % 10 {
            0..=4 => Case::Generate {
                prompt: PROMPTS[i % PROMPTS.len()],
                seed,
            },
            5..=7 => Case::Edit {
                image: "edit_in.png",
                seed,
            },
            8 => Case::EditWithoutImage,
            _ => {
                let bad = [
                    (json!({"prompt": "a", "steps": 0}), "steps"),
                    (json!({"prompt": "a", "size": "33x32"}), "size"),
                    (json!({"prompt": "a", "sizes": "32x32"}), "sizes"),
                    (json!({"prompt": "a", "n": 0}), "n"),
                    (json!({"steps": 2}), "prompt"),
                    (
                        json!({"prompt": "a", "guidance_scale": "high"}),
                        "guidance_scale",
                    ),
                ];
                let (body, field) = bad[(i / 10) % bad.len()].clone();
                Case::Invalid { body, field }
            }
        }
    }

    /// The key of the reference image, for valid cases.
    fn key(&self) -> Option<String> {
        match self {
            Case::Generate { prompt, seed } => Some(format!("gen {prompt} {seed}")),
            Case::Edit { image, seed } => Some(format!("edit {image} {seed}")),
            _ => None,
        }
    }

    fn send(&self, server: &Client) -> Resp {
        match self {
            Case::Generate { prompt, seed } => server.post_json(
                "/v1/images/generations",
                &json!({"prompt": prompt, "seed": seed, "steps": STEPS, "size": "32x32",
                        "model": "omnigen", "response_format": "b64_json", "n": 1}),
            ),
            Case::Edit { image, seed } => server.post_form(
                "/v1/images/edits",
                &Form::default()
                    .file("image", image, fixture_png(image))
                    .text("prompt", EDIT_PROMPT)
                    .text("seed", &seed.to_string())
                    .text("steps", &STEPS.to_string())
                    .text("size", "32x32"),
            ),
            Case::Invalid { body, .. } => server.post_json("/v1/images/generations", body),
            Case::EditWithoutImage => server.post_form(
                "/v1/images/edits",
                &Form::default().text("prompt", EDIT_PROMPT),
            ),
        }
    }
}

/// The images each valid case must get, generated here, one after another, on one pipeline.
fn references(cases: &[Case]) -> BTreeMap<String, RgbImage> {
    let pipeline = OmniGenPipeline::<DefaultBackend>::from_dir(model_dir(), &default_device())
        .expect("load the tiny checkpoint");
    let mut out = BTreeMap::new();
    for case in cases {
        let Some(key) = case.key() else { continue };
        if out.contains_key(&key) {
            continue;
        }
        let request = match case {
            Case::Generate { prompt, .. } => GenerationRequest::new(Prompt::from(*prompt)),
            Case::Edit { image, .. } => {
                let img = image::load_from_memory(&fixture_png(image)).unwrap();
                let text = format!("<img><|image_1|></img> {EDIT_PROMPT}");
                GenerationRequest::new(
                    Prompt::from_text(text, vec![ConditionImage::from_dynamic(img)]).unwrap(),
                )
            }
            _ => unreachable!(),
        };
        let seed = match case {
            Case::Generate { seed, .. } | Case::Edit { seed, .. } => *seed,
            _ => unreachable!(),
        };
        let request = request.size(32, 32).steps(STEPS).seed(seed);
        let generation = pipeline.generate(&request).unwrap();
        out.insert(key, generation.images[0].clone());
    }
    out
}

/// A response and how long it took.
type Answer = (Resp, Duration);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One request that never finishes its headers, a byte at a time.
fn slow_loris(server: &Client) -> TcpStream {
    let mut s = server.connect().unwrap();
    s.write_all(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .unwrap();
    s
}

#[test]
fn load_and_faults() {
    let mut server = Server::start(&[
        "--workers",
        "2",
        "--queue",
        "4",
        "--api-key",
        KEY,
        "--header-timeout",
        "1",
        "--max-body-bytes",
        "1000000",
    ]);
    let cases: Vec<Case> = (0..200).map(Case::of).collect();
    let refs = references(&cases);
    assert_eq!(refs.len(), 6, "{:?}", refs.keys());

    // Warm-up, so the memory figure after it is the steady state's.
    for case in cases.iter().take(20) {
        let r = case.send(&server);
        assert!(matches!(r.status, 200 | 400), "{}", r.text());
    }
    let completed_before = server.metric("omnigen_jobs_completed_total");
    let rejected_before = server.metric("omnigen_jobs_rejected_total");
    let rss_before = server.rss_mib();

    // 200 requests from 16 clients, a queue of 4.
    let next = Arc::new(AtomicUsize::new(0));
    let answers: Arc<Mutex<Vec<Option<Answer>>>> = Arc::new(Mutex::new(vec![None; cases.len()]));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..16 {
            let (next, answers, cases, client) =
                (next.clone(), answers.clone(), &cases, server.client);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= cases.len() {
                    break;
                }
                let t = Instant::now();
                let r = cases[i].send(&client);
                let took = t.elapsed();
                // A refused client waits a little, as clients do (not the whole Retry-After,
                // which would only make the test slower), so that the queue is refilled by
                // several clients at once rather than by whoever retries fastest.
                let refused = r.status == 429;
                let slot = &mut answers.lock().unwrap()[i];
                assert!(slot.is_none(), "request {i} answered twice");
                *slot = Some((r, took));
                if refused {
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
    });
    let wall = started.elapsed();
    let answers: Vec<Answer> = Arc::try_unwrap(answers)
        .unwrap()
        .into_inner()
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(i, a)| a.unwrap_or_else(|| panic!("request {i} lost")))
        .collect();

    let (mut ok, mut busy, mut invalid) = (0, 0, 0);
    let mut latencies = Vec::new();
    for (i, (case, (r, took))) in cases.iter().zip(&answers).enumerate() {
        assert_eq!(r.trailing, 0, "request {i}: bytes after the response");
        match (case, r.status) {
            (Case::Generate { .. } | Case::Edit { .. }, 200) => {
                let images = r.images();
                assert_eq!(images.len(), 1);
                let want = &refs[&case.key().unwrap()];
                assert!(
                    &images[0] == want,
                    "request {i}: the image differs from the single-threaded one"
                );
                ok += 1;
                latencies.push(*took);
            }
            (Case::Generate { .. } | Case::Edit { .. }, 429) => {
                let retry: u64 = r.headers["retry-after"].parse().unwrap();
                assert!(retry >= 1);
                assert_eq!(r.json()["error"]["code"], "queue_full");
                busy += 1;
            }
            (Case::Invalid { field, .. }, 400) => {
                assert_eq!(r.json()["error"]["param"], *field, "{}", r.text());
                invalid += 1;
            }
            (Case::EditWithoutImage, 400) => {
                assert_eq!(r.json()["error"]["param"], "image");
                invalid += 1;
            }
            (_, status) => panic!("request {i}: unexpected {status}: {}", r.text()),
        }
    }
    latencies.sort();
    let completed = server.metric("omnigen_jobs_completed_total") - completed_before;
    let rejected = server.metric("omnigen_jobs_rejected_total") - rejected_before;
    assert_eq!(completed as usize, ok, "jobs completed vs images answered");
    assert_eq!(rejected as usize, busy, "queue refusals vs 429 answered");
    assert_eq!(ok + busy + invalid, cases.len());
    assert!(ok >= 30, "only {ok} generations got through");
    let rss_after = server.rss_mib();
    println!(
        "load: {} requests in {wall:.2?} ({:.1} req/s; {:.1} images/s): {ok} images, {busy} × 429, \
         {invalid} × 400; latency of answered generations p50 {:.0?} p95 {:.0?}; \
         server RSS {rss_before:.1} MiB -> {rss_after:.1} MiB",
        cases.len(),
        cases.len() as f64 / wall.as_secs_f64(),
        ok as f64 / wall.as_secs_f64(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.95),
    );
    assert!(
        rss_after - rss_before < 64.0,
        "memory grew from {rss_before:.1} to {rss_after:.1} MiB"
    );

    faults(&server);
    jobs_api(&server, &refs);

    // SIGTERM with a generation running: it finishes, new work is refused, the exit is clean.
    let running = {
        let port = server.port;
        std::thread::spawn(move || {
            let s = Client {
                port,
                keeps_alive: false,
            };
            let r = s.post_json(
                "/v1/images/generations",
                &json!({"prompt": "a dog", "steps": 100, "size": "256x256", "seed": 1}),
            );
            (r.status, r.text())
        })
    };
    wait_until(&server, |s| s.metric("omnigen_jobs_running") >= 1.0);
    let status = server.terminate();
    let (code, body) = running.join().unwrap();
    assert_eq!(code, 200, "the running generation at shutdown: {body}");
    assert!(status.success(), "exit {status:?}: {:?}", server.log());
    assert!(server.try_call("GET", "/health", &[], &[]).is_err());
}

fn wait_until(server: &Server, done: impl Fn(&Server) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(server) {
        assert!(Instant::now() < deadline, "timed out: {:?}", server.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Clients that misbehave leave the server serving.
fn faults(server: &Server) {
    // credentials
    let body = json!({"prompt": "a", "steps": 1}).to_string();
    let r = server.call("POST", "/v1/images/generations", &[], body.as_bytes());
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = server.call(
        "POST",
        "/v1/images/generations",
        &[("Authorization", "Bearer wrong")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 401);
    assert_eq!(server.call("GET", "/health", &[], &[]).status, 200);

    // oversized bodies: announced, and sent chunked without a length
    let auth = format!("Bearer {KEY}");
    let mut s = server.connect().unwrap();
    write!(
        s,
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: {auth}\r\nContent-Length: 2000000\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let r = Resp::parse(&raw);
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    let mut s = server.connect().unwrap();
    write!(
        s,
        "POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {auth}\r\n\
         Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .unwrap();
    let mut part =
        b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
            .to_vec();
    part.extend(vec![b'x'; 1_500_000]);
    let _ = write!(s, "{:x}\r\n", part.len()).and_then(|_| s.write_all(&part));
    let _ = s.write_all(b"\r\n0\r\n\r\n");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let r = Resp::parse(&raw);
    assert_eq!(r.status, 413, "{}", r.text());

    // slow-loris: headers that never end are cut off while others are served
    let mut slow: Vec<TcpStream> = (0..12).map(|_| slow_loris(server)).collect();
    let t = Instant::now();
    let r = Case::of(0).send(server);
    assert!(matches!(r.status, 200 | 429), "{}", r.text());
    for s in &mut slow {
        let _ = s.write_all(b"a");
    }
    for mut s in slow {
        let mut buf = [0u8; 256];
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let n = s.read(&mut buf).unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            n == 0 || text.starts_with("HTTP/1.1 408"),
            "slow client got {text}"
        );
    }
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "slow clients held for {:?}",
        t.elapsed()
    );

    // a client that disconnects mid-generation: its job is cancelled
    let cancelled = server.metric("omnigen_jobs_cancelled_total");
    let mut s = server.connect().unwrap();
    let body = json!({"prompt": "a dog", "steps": 100, "size": "256x256", "seed": 3}).to_string();
    write!(
        s,
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_until(server, |s| s.metric("omnigen_jobs_running") >= 1.0);
    s.shutdown(Shutdown::Both).unwrap();
    drop(s);
    wait_until(server, |s| {
        s.metric("omnigen_jobs_cancelled_total") > cancelled
    });
    wait_until(server, |s| s.metric("omnigen_jobs_running") == 0.0);

    // bodies that are not what the endpoint reads
    let r = server.call(
        "POST",
        "/v1/images/generations",
        &[("Authorization", &auth)],
        b"{not json",
    );
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (400, json!("invalid_body"))
    );
    let r = server.post_form(
        "/v1/images/edits",
        &Form::default()
            .file("image", "a.png", b"not an image".to_vec())
            .text("prompt", "x"),
    );
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("image"))
    );

    let r = Case::of(1).send(server);
    assert!(matches!(r.status, 200 | 429), "still serving: {}", r.text());
    assert_eq!(server.get("/health").json()["status"], "ok");
    let models = server.get("/v1/models").json();
    assert_eq!(models["data"][0]["id"], "omnigen");
}

/// Reads a job's events stream to its `done` event; the progress events seen before it.
/// `mid_run` is called once, at the first event of a job that has done a step.
fn follow(server: &Server, id: &str, mid_run: impl FnOnce()) -> (Vec<Value>, Value) {
    let mut s = server.connect().unwrap();
    write!(
        s,
        "GET /v1/jobs/{id}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    let mut progress = Vec::new();
    let mut event = String::new();
    let mut mid_run = Some(mid_run);
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stream ended before `done`"
        );
        let l = line.trim_end();
        if let Some(name) = l.strip_prefix("event: ") {
            event = name.to_string();
        } else if let Some(data) = l.strip_prefix("data: ") {
            let v: Value = serde_json::from_str(data).unwrap();
            if event == "done" {
                return (progress, v);
            }
            if v["step"].as_u64() >= Some(1) {
                if let Some(f) = mid_run.take() {
                    f();
                }
            }
            progress.push(v);
        }
    }
}

fn jobs_api(server: &Server, refs: &BTreeMap<String, RgbImage>) {
    // A job runs to its result, reported step by step.
    let r = server.post_json(
        "/v1/jobs",
        &json!({"prompt": PROMPTS[0], "seed": 1, "steps": STEPS, "size": "32x32"}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let (progress, done) = follow(server, &id, || {});
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["step"], STEPS);
    assert!(progress.iter().all(|p| p["total"] == STEPS));
    let want = &refs[&format!("gen {} 1", PROMPTS[0])];
    assert!(&images_of(&done["result"])[0] == want);
    let status = server.get(&format!("/v1/jobs/{id}")).json();
    assert_eq!(status["status"], "succeeded");
    assert!(&images_of(&status["result"])[0] == want);

    // An edit job from a multipart body.
    let r = server.post_form(
        "/v1/jobs",
        &Form::default()
            .file("image[]", "edit_in.png", fixture_png("edit_in.png"))
            .text("prompt", EDIT_PROMPT)
            .text("seed", "0")
            .text("steps", &STEPS.to_string())
            .text("size", "32x32"),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let (_, done) = follow(server, &id, || {});
    assert!(images_of(&done["result"])[0] == refs["edit edit_in.png 0"]);

    // DELETE stops a running job through its cancellation token.
    let r = server.post_json(
        "/v1/jobs",
        &json!({"prompt": "a dog", "steps": 100, "size": "256x256", "seed": 2}),
    );
    let id = r.json()["id"].as_str().unwrap().to_string();
    let auth = format!("Bearer {KEY}");
    let (_, done) = follow(server, &id, || {
        let r = server.call(
            "DELETE",
            &format!("/v1/jobs/{id}"),
            &[("Authorization", &auth)],
            &[],
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["cancel_requested"], true);
    });
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(done["step"].as_u64().unwrap() < 100);
    assert_eq!(done["error"]["code"], "cancelled");

    let r = server.get("/v1/jobs/job_0123");
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (404, json!("not_found"))
    );
    let r = server.post_json("/v1/jobs", &json!({"prompt": "a", "steps": 101}));
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("steps"))
    );
}

/// The page at `/` in headless Chromium: type a prompt, generate, see the image.
#[test]
#[ignore = "needs chromium and chromedriver (.ci/run installs them and runs it)"]
fn web_page_in_headless_chromium() {
    let server = Server::start(&[]);
    let driver_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let driver_bin = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
    let mut driver = Command::new(&driver_bin)
        .arg(format!("--port={driver_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {driver_bin}: {e}"));
    let wd = Client {
        port: driver_port,
        keeps_alive: true,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while wd.try_call("GET", "/status", &[], &[]).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let post = |path: &str, body: Value| {
        let r = wd.call(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        );
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        r.json()["value"].clone()
    };
    let mut args = vec![
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
    ];
    args.push("--window-size=1200,900");
    let mut options = json!({ "args": args });
    if let Ok(bin) = std::env::var("CHROMIUM") {
        options["binary"] = json!(bin);
    }
    let session = post(
        "/session",
        json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}}),
    );
    let sid = session["sessionId"].as_str().unwrap().to_string();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let at = |p: &str| format!("/session/{sid}{p}");
        post(
            &at("/url"),
            json!({"url": format!("http://127.0.0.1:{}/", server.port)}),
        );
        let element = |css: &str| {
            let v = post(
                &at("/element"),
                json!({"using": "css selector", "value": css}),
            );
            v.as_object()
                .unwrap()
                .values()
                .next()
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        };
        let fill = |css: &str, text: &str| {
            let id = element(css);
            post(&at(&format!("/element/{id}/clear")), json!({}));
            post(&at(&format!("/element/{id}/value")), json!({"text": text}));
        };
        fill("#prompt", PROMPTS[0]);
        fill("#width", "32");
        fill("#height", "32");
        fill("#steps", &STEPS.to_string());
        fill("#seed", "1");
        let button = element("#generate");
        post(&at(&format!("/element/{button}/click")), json!({}));
        let script = |s: &str| post(&at("/execute/sync"), json!({"script": s, "args": []}));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = script(
                "const i = document.getElementById('image'); \
                 return [i.hidden, i.naturalWidth, document.getElementById('status').textContent, \
                 document.getElementById('error').textContent];",
            );
            if state[0] == false && state[1] == 32 {
                assert_eq!(state[2], "succeeded");
                break;
            }
            assert!(state[3] == "", "the page shows an error: {state}");
            assert!(Instant::now() < deadline, "no image on the page: {state}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let src = script("return document.getElementById('image').src;");
        let b64 = src
            .as_str()
            .unwrap()
            .strip_prefix("data:image/png;base64,")
            .unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let shown = image::load_from_memory(&png).unwrap().to_rgb8();
        let refs = references(&[Case::Generate {
            prompt: PROMPTS[0],
            seed: 1,
        }]);
        assert!(
            &shown == refs.values().next().unwrap(),
            "the page shows another image"
        );
        let link = script("return document.getElementById('download').download;");
        assert_eq!(link, "omnigen-1.png");
        let params = script("return document.getElementById('params').textContent;");
        assert!(params.as_str().unwrap().contains(PROMPTS[0]), "{params}");

        // An upload inserts its placeholder at the cursor and the job becomes an edit.
        let upload = root().join("tests/fixtures/A/edit_in.png");
        let upload = upload.canonicalize().unwrap();
        let input = element("#images");
        post(
            &at(&format!("/element/{input}/value")),
            json!({"text": upload.to_str().unwrap()}),
        );
        let prompt = script("return document.getElementById('prompt').value;");
        let prompt = prompt.as_str().unwrap().to_string();
        assert_eq!(prompt, format!("{}<img><|image_1|></img> ", PROMPTS[0]));
        let before = script("return document.getElementById('image').src;");
        post(&at(&format!("/element/{button}/click")), json!({}));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = script(
                "return [document.getElementById('image').src, \
                 document.getElementById('status').textContent, \
                 document.getElementById('error').textContent];",
            );
            if state[0] != before && state[1] == "succeeded" {
                break;
            }
            assert!(state[2] == "", "the page shows an error: {state}");
            assert!(
                Instant::now() < deadline,
                "no edited image on the page: {state}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let src = script("return document.getElementById('image').src;");
        let b64 = src
            .as_str()
            .unwrap()
            .strip_prefix("data:image/png;base64,")
            .unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let shown = image::load_from_memory(&png).unwrap().to_rgb8();
        let pipeline =
            OmniGenPipeline::<DefaultBackend>::from_dir(model_dir(), &default_device()).unwrap();
        let input = image::load_from_memory(&fixture_png("edit_in.png")).unwrap();
        let want = pipeline
            .generate(
                &GenerationRequest::new(
                    Prompt::from_text(prompt, vec![ConditionImage::from_dynamic(input)]).unwrap(),
                )
                .size(32, 32)
                .steps(STEPS)
                .seed(1),
            )
            .unwrap();
        assert!(
            shown == want.images[0],
            "the page shows another edited image"
        );
    }));
    let _ = wd.call("DELETE", &format!("/session/{sid}"), &[], &[]);
    let _ = driver.kill();
    let _ = driver.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// A model that cannot load, or a port that is taken, ends the server with status 1 and a
/// message naming the flag.
#[test]
fn bad_model_or_port_fails_cleanly() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_omnigen"))
            .arg("serve")
            .args(args)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = run(&["--model", "/no/such/model", "--port", "0"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("error: --model: cannot resolve model"),
        "{err}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let model = model_dir();
    let (code, err) = run(&["--model", model.to_str().unwrap(), "--port", &port]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("error: --port: cannot listen on 127.0.0.1:"),
        "{err}"
    );
}
