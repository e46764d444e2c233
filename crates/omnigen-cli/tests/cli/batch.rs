//! `omnigen batch` on the tiny checkpoint: a manifest with a sweep, an edit and two bad lines
//! gives its images, `results.jsonl`, the report and the contact sheet; an interrupted run
//! resumed by the same command ends with the same set and no image made twice; a dry run
//! lists every problem with its line; (ignored unless asked for: it needs `chromium`) the
//! report in headless Chromium.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{omnigen, root};

const MODEL: &str = "tests/fixtures/A/model";

/// A temporary folder holding `manifest.jsonl` (its lines given) and `photos/cat.png`.
fn workspace(lines: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("photos")).unwrap();
    std::fs::copy(
        root().join("tests/fixtures/A/edit_in.png"),
        dir.path().join("photos/cat.png"),
    )
    .unwrap();
    let manifest = dir.path().join("manifest.jsonl");
    std::fs::write(&manifest, lines.join("\n") + "\n").unwrap();
    (dir, manifest)
}

/// The manifest of the main test: a 2 × 2 sweep, an edit, a missing image, a bad size and a
/// last job long enough to be interrupted.
const LINES: [&str; 5] = [
    r#"{"id": "trial", "prompt": "a red cat on a blue mat", "guidance_scale": [1.5, 2.5], "seed": [1, 2]}"#,
    r#"{"id": "edit", "prompt": "<img><|image_1|></img> make the cat green", "images": ["photos/cat.png"], "use_input_image_size_as_output": true, "seed": 5}"#,
    r#"{"id": "missing", "prompt": "<img><|image_1|></img> a hat", "images": ["photos/none.png"]}"#,
    r#"{"prompt": "a dog", "size": "65x64"}"#,
    r#"{"id": "slow", "prompt": "a slow cat", "steps": 1000, "size": "64x64", "seed": 3}"#,
];

fn batch_command(manifest: &Path, out: &Path) -> std::process::Command {
    let mut cmd = omnigen();
    cmd.arg("batch")
        .arg(manifest)
        .args([
            "--model", MODEL, "--height", "32", "--width", "32", "--steps", "2",
        ])
        .arg("--out")
        .arg(out)
        .env("RUST_LOG", "warn");
    cmd
}

/// Every record of `results.jsonl`, in order.
fn records(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The done records' keys, each with how many times it was recorded done.
fn done_counts(out: &Path) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in records(out).iter().filter(|r| r["status"] == "done") {
        *counts
            .entry(r["key"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    counts
}

/// The files under `dir`, relative, sorted.
fn files(dir: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap();
                found.insert(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    found
}

/// `generated` of the run's summary line `batch: N images generated, M already done, ...`.
fn counters(stderr: &str) -> (usize, usize) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("batch: "))
        .unwrap_or_else(|| panic!("no summary line in {stderr}"));
    let number = |after: &str| -> usize {
        line.split(after)
            .next()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (number(" images generated"), number(" already done"))
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[cfg(unix)]
#[test]
fn batch_with_a_sweep_an_edit_and_bad_lines_resumes_after_an_interrupt() {
    let (dir, manifest) = workspace(&LINES);
    let out = dir.path().join("out");

    // Run 1, stopped by SIGINT while the last (slow) job runs: the five quick images are done.
    let mut child = batch_command(&manifest, &out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let done = std::fs::read_to_string(out.join("results.jsonl"))
            .map(|t| t.matches("\"status\":\"done\"").count())
            .unwrap_or(0);
        if done >= 5 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "ended before the slow job"
        );
        assert!(start.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let first = child.wait_with_output().unwrap();
    let err = stderr_of(&first);
    assert_eq!(first.status.code(), Some(1), "{err}");
    assert!(err.contains("error: interrupted"), "{err}");
    assert!(err.contains("line 3: images: invalid image"), "{err}");
    assert!(
        err.contains("line 4: invalid argument `width`: 65"),
        "{err}"
    );
    let (generated_1, skipped_1) = counters(&err);
    assert_eq!((generated_1, skipped_1), (5, 0), "{err}");
    // consistent: no partial file, every recorded image exists, the report shows the state
    assert!(files(&out).iter().all(|f| !f.contains(".partial")));
    assert!(!out.join("slow").exists());
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        report.contains("not generated yet"),
        "the slow job is pending"
    );

    // Run 2: the same command finishes the slow job and nothing else.
    let second = batch_command(&manifest, &out).output().unwrap();
    let err = stderr_of(&second);
    // the two bad lines are failures of the batch, recorded, never a stop
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains("2 manifest lines have problems"), "{err}");
    assert_eq!(counters(&err), (1, 5), "{err}");

    // Run 3: nothing left, so the model is not even loaded.
    let third = batch_command(&manifest, &out).output().unwrap();
    let err = stderr_of(&third);
    assert_eq!(counters(&err), (0, 6), "{err}");
    assert!(!err.contains("loaded "), "{err}");

    // a dry run now estimates the time from the images measured here
    let dry = batch_command(&manifest, &out)
        .arg("--dry-run")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&dry.stdout);
    assert!(
        stdout.contains("6 images in 3 jobs")
            && stdout.contains("(at the rate measured by the 6 images in"),
        "{stdout}"
    );

    let want: BTreeSet<String> = [
        "trial/trial_gs1.5_seed1.png",
        "trial/trial_gs1.5_seed2.png",
        "trial/trial_gs2.5_seed1.png",
        "trial/trial_gs2.5_seed2.png",
        "trial/contact_sheet.png",
        "edit/edit.png",
        "slow/slow.png",
        "results.jsonl",
        "report.html",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(files(&out), want);
    // every image was made exactly once over the three runs
    let counts = done_counts(&out);
    assert_eq!(counts.len(), 6, "{counts:?}");
    assert!(counts.values().all(|&c| c == 1), "{counts:?}");
    assert_eq!(generated_1 + 1, 6);

    // the records: parameters, seed, tokens, times, memory, typed errors for the bad lines
    let all = records(&out);
    let edit = all.iter().find(|r| r["key"] == "edit/edit").unwrap();
    assert_eq!(edit["seed"], 5);
    assert_eq!(edit["size"], serde_json::json!([64, 48]));
    assert_eq!(edit["parameters"]["use_input_image_size_as_output"], true);
    assert!(edit["parameters"]["prompts"][0]["images"][0]
        .as_str()
        .unwrap()
        .ends_with("photos/cat.png"));
    assert!(edit["tokens_per_branch"].as_array().unwrap().len() == 3);
    assert!(edit["times"]["denoise"].as_f64().unwrap() > 0.0);
    assert!(edit["seconds"].as_f64().unwrap() > 0.0);
    let trial = all
        .iter()
        .find(|r| r["key"] == "trial/trial_gs2.5_seed1")
        .unwrap();
    assert_eq!(
        trial["sweep"],
        serde_json::json!({"guidance_scale": 2.5, "seed": 1})
    );
    assert_eq!(trial["parameters"]["guidance_scale"], 2.5);
    assert_eq!(trial["parameters"]["num_inference_steps"], 2);
    let bad: Vec<&Value> = all.iter().filter(|r| r["status"] == "failed").collect();
    assert!(bad.iter().any(|r| r["line"] == 3
        && r["error"]["kind"] == "manifest"
        && r["error"]["message"].as_str().unwrap().contains("none.png")));
    assert!(bad.iter().any(|r| r["line"] == 4 && r["id"] == "4"));

    // the edit is the image `omnigen generate` makes with the same options
    let single = dir.path().join("single.png");
    let o = omnigen()
        .args(["generate", "--model", MODEL, "--steps", "2", "--seed", "5"])
        .args(["--prompt", "<img><|image_1|></img> make the cat green"])
        .arg("--image")
        .arg(dir.path().join("photos/cat.png"))
        .arg("--use-input-image-size-as-output")
        .arg("--output")
        .arg(&single)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let a = image::open(&single).unwrap().to_rgb8();
    let b = image::open(out.join("edit/edit.png")).unwrap().to_rgb8();
    assert!(a == b, "batch and generate made different edits");

    // the contact sheet: 2 x 2 cells of 32 px with 4 px gaps, below a band of column labels
    // (7 px font + 2 gaps) and beside one of row labels (18 characters of 6 px + 2 gaps);
    // the labels are also in its text chunks
    let sheet = image::open(out.join("trial/contact_sheet.png"))
        .unwrap()
        .to_rgb8();
    let (left, top) = (18 * 6 + 8, 7 + 8);
    assert_eq!(sheet.dimensions(), (left + 76, top + 76));
    let cell = image::open(out.join("trial/trial_gs2.5_seed2.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(sheet.get_pixel(left + 40, top + 40), cell.get_pixel(0, 0));
    let inked = |x0: u32, y0: u32, w: u32, h: u32| {
        (x0..x0 + w).any(|x| (y0..y0 + h).any(|y| sheet.get_pixel(x, y).0 == [30, 30, 30]))
    };
    assert!(inked(left, 0, 76, top), "no column labels");
    assert!(inked(0, top, left, 76), "no row labels");
    let text = omnigen::pipeline::read_png_text(&out.join("trial/contact_sheet.png")).unwrap();
    let rows = text.iter().find(|(k, _)| k == "rows").unwrap();
    assert_eq!(rows.1, "guidance_scale=1.5 | guidance_scale=2.5");

    // the report: every image, the grid labels, the costs and the plot, nothing remote
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(report.matches("<img ").count(), 6);
    for want in [
        "src=\"trial/trial_gs1.5_seed2.png\"",
        "src=\"edit/edit.png\"",
        "<th class=\"row\">guidance_scale=2.5</th>",
        "<th>seed=2</th>",
        "trial/contact_sheet.png",
        "none.png",
        "65 is not a positive multiple of 16",
        "<svg id=\"plot\"",
    ] {
        assert!(report.contains(want), "{want} missing from the report");
    }
    assert_eq!(report.matches("<circle ").count(), 6);
    // self-contained: the only URL is the SVG namespace, which names and fetches nothing
    assert!(!report.contains("src=\"http") && !report.contains("href=\"http"));
    assert!(!report.contains("https://"));
}

#[test]
fn dry_run_lists_every_problem_with_its_line_and_counts_the_images() {
    let (dir, manifest) = workspace(&[
        r#"{"id": "ok", "prompt": "a cat", "seed": [1, 2, 3], "steps": [2, 3]}"#,
        r#"{"prompt": "<img><|image_1|></img> x", "images": "photos/none.png"}"#,
        r#"{"prompt": "a dog", "guidance_scale": "high", "colour": "red"}"#,
        "not json",
        r#"{"id": "ok", "prompt": "again"}"#,
        r#"{"prompt": "a", "scheduler": ["euler", "lms"]}"#,
    ]);
    let out = dir.path().join("out");
    let o = batch_command(&manifest, &out)
        .arg("--dry-run")
        .output()
        .unwrap();
    let (stdout, err) = (String::from_utf8_lossy(&o.stdout), stderr_of(&o));
    assert_eq!(o.status.code(), Some(1), "{err}");
    for want in [
        "line 2: images: invalid image",
        "line 3: guidance_scale: \"high\" is not a number",
        "line 3: colour: unknown field",
        "line 4: not JSON",
        "line 5: id: `ok` is also line 1's id",
        "line 6: scheduler: unknown scheduler `lms`",
        "error: 5 manifest lines have problems",
    ] {
        assert!(err.contains(want), "{want} missing from {err}");
    }
    assert!(stdout.contains("6 images in 1 jobs"), "{stdout}");
    assert!(stdout.contains("estimated time"), "{stdout}");
    assert!(!out.exists(), "a dry run writes nothing");

    // CSV: quoted prompts, `;` lists; a clean manifest's dry run succeeds
    let csv = dir.path().join("m.csv");
    std::fs::write(
        &csv,
        "id,prompt,images,guidance_scale,seed\n\
         cat,\"<img><|image_1|></img> make it green, please\",photos/cat.png,2;3,7\n",
    )
    .unwrap();
    let o = batch_command(&csv, &out).arg("--dry-run").output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(stdout.contains("2 images in 1 jobs"), "{stdout}");

    // an --out that is a file is named as the fault, before anything runs
    let file = dir.path().join("taken");
    std::fs::write(&file, "mine").unwrap();
    let o = batch_command(&csv, &file).output().unwrap();
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("exists and is not a folder"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
}

/// The report in headless Chromium: it loads without console messages, every image shows,
/// and clicking one shows its parameters. A page beside the report loads it in a frame and
/// writes what it finds into its own DOM, which `--dump-dom` prints.
#[test]
#[ignore = "needs chromium (.ci/run installs it and runs this)"]
fn batch_report_in_headless_chromium() {
    let (dir, manifest) = workspace(&LINES[..4]);
    let out = dir.path().join("out");
    let o = batch_command(&manifest, &out).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert_eq!(counters(&stderr_of(&o)), (5, 0));
    std::fs::write(
        out.join("check.html"),
        r#"<!DOCTYPE html><html><body><div id="result">pending</div>
<iframe id="report" src="report.html" width="1200" height="900"></iframe>
<script>
document.getElementById('report').addEventListener('load', function () {
  var doc = document.getElementById('report').contentDocument;
  var images = Array.prototype.slice.call(doc.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  images[0].click();
  var details = doc.getElementById('details');
  var shown = !details.hidden && doc.getElementById('details-body').textContent;
  document.getElementById('result').textContent = 'images=' + images.length +
    ' broken=' + broken.length + ' details=' + (shown && shown.indexOf('num_inference_steps') >= 0);
});
</script></body></html>"#,
    )
    .unwrap();
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let url = format!("file://{}", out.join("check.html").display());
    let o = std::process::Command::new(&chromium)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--allow-file-access-from-files",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
            "--dump-dom",
        ])
        .arg(&url)
        .output()
        .unwrap_or_else(|e| panic!("cannot start {chromium}: {e}"));
    let dom = String::from_utf8_lossy(&o.stdout);
    let log = stderr_of(&o);
    assert!(
        dom.contains("<div id=\"result\">images=5 broken=0 details=true</div>"),
        "{dom}\n{log}"
    );
    // console messages (errors, uncaught exceptions, warnings) are logged as CONSOLE lines
    let console: Vec<&str> = log.lines().filter(|l| l.contains("CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:?}");
}
