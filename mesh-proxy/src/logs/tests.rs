use std::time::Instant;

use super::*;

/// A stdout stand-in: what was written, and in how many calls.
#[derive(Clone, Default)]
struct Sink {
    bytes: Arc<Mutex<Vec<u8>>>,
    calls: Arc<AtomicU64>,
    /// Held by the test to make the "reader" slow.
    gate: Arc<Mutex<()>>,
}

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let _gate = self.gate.lock().unwrap();
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.bytes.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn text(&self) -> String {
        String::from_utf8(self.bytes.lock().unwrap().clone()).unwrap()
    }
}

fn log(writer: &BatchWriter, line: &str) {
    (&mut writer.make_writer()).write_all(line.as_bytes()).unwrap();
}

fn wait_for(mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// A lone line is written at once, not after the batch window.
#[test]
fn a_lone_line_is_written_without_waiting_for_the_window() {
    let sink = Sink::default();
    let (writer, _guard) = batch_writer(sink.clone(), Duration::from_hours(1));
    log(&writer, "one\n");
    assert!(wait_for(|| sink.text() == "one\n"), "{:?}", sink.text());
}

/// Lines logged while the writer waits out its window go out together, in order,
/// in one write: the point of batching.
#[test]
fn lines_logged_during_the_window_are_one_write_in_order() {
    let sink = Sink::default();
    let (writer, guard) = batch_writer(sink.clone(), Duration::from_secs(10));
    log(&writer, "first\n");
    assert!(wait_for(|| sink.calls.load(Ordering::Relaxed) == 1));
    for i in 0..1000 {
        log(&writer, &format!("line {i}\n"));
    }
    drop(guard);
    let expected: String =
        std::iter::once("first\n".to_owned()).chain((0..1000).map(|i| format!("line {i}\n"))).collect();
    assert_eq!(sink.text(), expected);
    assert_eq!(sink.calls.load(Ordering::Relaxed), 2, "1000 lines in one batch");
    assert_eq!(writer.shared.dropped.dropped_lines(), 0);
}

/// A reader that stops reading costs lines, counted, never a blocked logger; lines
/// are dropped whole.
#[test]
fn a_stalled_reader_drops_whole_lines_and_counts_them() {
    let sink = Sink::default();
    let (writer, guard) = batch_writer(sink.clone(), Duration::ZERO);
    // Taken after the guard, so that a failing assertion releases it first.
    let stall = sink.gate.lock().unwrap();
    let line = format!("{}\n", "x".repeat(1023));
    // A first line, taken by the writer, which then blocks on the reader.
    log(&writer, &line);
    assert!(wait_for(|| writer.shared.pending.lock().unwrap().buffer.is_empty()), "writer took nothing");
    let start = Instant::now();
    for _ in 0..(MAX_BUFFERED / 1024 + 100) {
        log(&writer, &line);
    }
    assert!(start.elapsed() < Duration::from_secs(5), "logging blocked on the reader");
    // The buffer takes MAX_BUFFERED bytes: the 100 lines beyond are dropped.
    let dropped = writer.shared.dropped.dropped_lines();
    assert_eq!(dropped, 100);
    drop(stall);
    drop(guard);
    let text = sink.text();
    assert!(text.lines().all(|l| l.len() == 1023), "a line was cut");
    assert_eq!(text.lines().count(), 1 + MAX_BUFFERED / 1024);
    // After close, nothing more is accepted.
    log(&writer, "late\n");
    assert_eq!(writer.shared.dropped.dropped_lines(), dropped + 1);
}
