//! `cargo xtask fuzz`: the cargo-fuzz targets of `fuzz/` (the parsers that face the
//! network or the user), each run for a bounded time. `cargo xtask test` runs them
//! briefly from the committed seeds; `cargo xtask fuzz` runs them longer and keeps the
//! corpus it grows in `fuzz/target/corpus/` for the next run. The seeds in
//! `fuzz/corpus/` are only read.
//!
//! The fuzz crate is its own workspace built by `cargo +nightly fuzz` with sanitizers
//! into `fuzz/target`, so it never touches the main workspace's build.
use std::{fs, path::PathBuf, process::Stdio};

use anyhow::{Context, bail};

use crate::{cargo, root, sh};

/// Where each run's corpus lives.
#[derive(Clone, Copy)]
pub enum Corpus {
    /// The seeds and a temporary directory, removed afterwards (CI: the same start
    /// every time).
    Fresh,
    /// The seeds and `fuzz/target/corpus/<target>`, kept between runs (local, longer runs).
    Kept,
}

fn fuzz_dir() -> PathBuf {
    root().join("fuzz")
}

/// Every target: the files of `fuzz/fuzz_targets/`.
pub fn targets() -> anyhow::Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".rs").map(str::to_owned))
        .collect();
    names.sort();
    Ok(names)
}

/// Builds the targets, then runs each (or only `only`) for `seconds`. Fails when a
/// target crashes (or does not build or run), after running the others.
pub fn fuzz(seconds: u64, only: Option<&str>, corpus: Corpus) -> anyhow::Result<()> {
    let all = targets()?;
    let selected: Vec<&str> = match only {
        None => all.iter().map(String::as_str).collect(),
        Some(name) if all.iter().any(|t| t == name) => vec![name],
        Some(name) => bail!("no fuzz target {name}: expected one of {}", all.join(", ")),
    };
    println!("==> building the fuzz targets (nightly, sanitizers, into fuzz/target)");
    sh(cargo(Some("nightly")).args(["fuzz", "build"]).current_dir(fuzz_dir()))?;
    println!("==> fuzzing {} target(s), {seconds} s each", selected.len());
    let mut failed = Vec::new();
    for target in selected {
        if !run(target, seconds, corpus)? {
            failed.push(target);
        }
    }
    if !failed.is_empty() {
        bail!("fuzz target(s) failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Runs one target; false when it failed (the input and the output's tail printed).
fn run(target: &str, seconds: u64, corpus: Corpus) -> anyhow::Result<bool> {
    let seeds = fuzz_dir().join("corpus").join(target);
    let work = match corpus {
        Corpus::Fresh => std::env::temp_dir().join(format!("mesh-fuzz-{}-{target}", std::process::id())),
        Corpus::Kept => fuzz_dir().join("target/corpus").join(target),
    };
    fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let log_path = fuzz_dir().join("target/logs").join(format!("{target}.log"));
    fs::create_dir_all(log_path.parent().expect("a log file has a directory"))?;
    let log = fs::File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let status = cargo(Some("nightly"))
        .args(["fuzz", "run", target])
        // libFuzzer reads every corpus directory and writes what it finds to the first.
        .arg(&work)
        .arg(&seeds)
        .args([
            "--".to_owned(),
            format!("-max_total_time={seconds}"),
            // An input that takes seconds is a denial of service, not a slow test.
            "-timeout=10".to_owned(),
        ])
        .current_dir(fuzz_dir())
        // The target's panic keeps its backtrace (in the log); cargo-fuzz's own error does not.
        .env("RUST_LIB_BACKTRACE", "0")
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("run cargo fuzz run {target} (cargo xtask setup installs cargo-fuzz)"))?;
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    if matches!(corpus, Corpus::Fresh) {
        let _ = fs::remove_dir_all(&work);
    }
    if status.success() {
        let runs = output
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("Done ")?.split_once(" runs")?.0.parse::<u64>().ok())
            .map_or_else(|| "? runs".to_owned(), |n| format!("{n} runs"));
        println!("fuzz: {target}: {runs} in {seconds} s, no crash");
        return Ok(true);
    }
    // libFuzzer names the reproducer in "Test unit written to <path>" (a crash, a
    // timeout, a leak or running out of memory); without one, the build or the run failed.
    let input = output
        .lines()
        .find_map(|l| l.split_once("Test unit written to ").map(|(_, path)| fuzz_dir().join(path.trim())));
    match &input {
        Some(input) => println!("fuzz: {target}: CRASH ({status}), input {}", input.display()),
        None => println!("fuzz: {target}: FAILED ({status}), no input saved"),
    }
    for line in cause_and_tail(&output) {
        println!("    {line}");
    }
    if let Some(input) = &input {
        println!("    reproduce: cd fuzz && cargo +nightly fuzz run {target} {}", input.display());
    }
    println!("    full output: {}", log_path.display());
    Ok(false)
}

/// What to show of a failed run: the panic message (the target's backtrace stays in
/// the log), then the end of libFuzzer's report from its summary (error kind, input
/// bytes, where it was saved), without the banner cargo-fuzz appends.
fn cause_and_tail(output: &str) -> Vec<&str> {
    let lines: Vec<&str> = output.lines().take_while(|l| !l.starts_with('\u{2500}')).collect();
    let mut shown: Vec<&str> = lines
        .iter()
        .skip_while(|l| !l.contains("panicked at"))
        .take_while(|l| !l.starts_with("stack backtrace:") && !l.starts_with("note: ") && !l.starts_with("=="))
        .take(10)
        .copied()
        .collect();
    let summary = lines.iter().rposition(|l| l.starts_with("SUMMARY:")).unwrap_or(lines.len().saturating_sub(12));
    shown.extend(lines[summary..].iter().copied());
    // The input's bytes come in the report too, on one line each way: keep it short.
    shown.into_iter().map(|l| l.get(..300).unwrap_or(l)).collect()
}
