//! The lab's workload and its load client.
//!
//! `mesh-echo serve --name POD` answers every HTTP/1.1 request on `--http-port` with
//! `pod=<name> peer=<ip:port>` (the address it saw the client come from) and echoes
//! bytes back on `--tcp-port`. `mesh-echo rr --addr IP:PORT` measures request/response
//! latency against the echo port at a fixed rate and prints JSON; `http` does the same
//! with HTTP/1.1 requests on one keep-alive connection (`POST /echo`, whose body the
//! server sends back; `--header 'name: value'`, repeatable, adds a request header,
//! e.g. a bearer token). `load` keeps a
//! steady rate of new connections and counts the failures; `many` holds many idle
//! connections open at once.
//!
//! Half-closed bulk transfers: `serve` also runs a sink on `--sink-port` that reads
//! each connection to its end (the client's FIN), then answers one line
//! `bytes=<n> sha256=<hex>` and closes; `bulk --addr IP:PORT --bytes N` sends N bytes
//! of a fixed pseudo-random pattern, shuts down its write side, waits for that line
//! and checks it against what it sent (JSON out, exit status 1 on a mismatch).
use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, rest) = args.split_first().context("usage: mesh-echo serve|rr [options]")?;
    let opt =
        |name: &str| -> Option<String> { rest.iter().position(|a| a == name).and_then(|i| rest.get(i + 1)).cloned() };
    match mode.as_str() {
        "serve" => {
            let name = opt("--name").context("--name is required")?;
            let http_port: u16 = opt("--http-port").map_or(Ok(8080), |p| p.parse()).context("--http-port")?;
            let tcp_port: u16 = opt("--tcp-port").map_or(Ok(9000), |p| p.parse()).context("--tcp-port")?;
            let sink_port: u16 = opt("--sink-port").map_or(Ok(9001), |p| p.parse()).context("--sink-port")?;
            serve(name, http_port, tcp_port, sink_port)
        }
        "bulk" => {
            let addr: SocketAddr = opt("--addr").context("--addr is required")?.parse().context("--addr")?;
            let bytes: u64 = opt("--bytes").map_or(Ok(16 << 20), |v| v.parse()).context("--bytes")?;
            let seconds: u64 = opt("--seconds").map_or(Ok(30), |v| v.parse()).context("--seconds")?;
            bulk(addr, bytes, Duration::from_secs(seconds))
        }
        "rr" => {
            let addr: SocketAddr = opt("--addr").context("--addr is required")?.parse().context("--addr")?;
            let size: usize = opt("--size").map_or(Ok(1024), |v| v.parse()).context("--size")?;
            let count: usize = opt("--count").map_or(Ok(2000), |v| v.parse()).context("--count")?;
            let rate: u64 = opt("--rate").map_or(Ok(1000), |v| v.parse()).context("--rate")?;
            request_response(addr, size, count, rate)
        }
        "http" => {
            let addr: SocketAddr = opt("--addr").context("--addr is required")?.parse().context("--addr")?;
            let size: usize = opt("--size").map_or(Ok(1024), |v| v.parse()).context("--size")?;
            let count: usize = opt("--count").map_or(Ok(2000), |v| v.parse()).context("--count")?;
            let rate: u64 = opt("--rate").map_or(Ok(1000), |v| v.parse()).context("--rate")?;
            let headers = rest
                .iter()
                .zip(rest.iter().skip(1))
                .filter(|(flag, _)| *flag == "--header")
                .map(|(_, value)| header_line(value))
                .collect::<anyhow::Result<String>>()?;
            http_request_response(addr, size, count, rate, &headers)
        }
        "cps" => {
            let addr: SocketAddr = opt("--addr").context("--addr is required")?.parse().context("--addr")?;
            let clients: usize = opt("--clients").map_or(Ok(4), |v| v.parse()).context("--clients")?;
            let seconds: u64 = opt("--seconds").map_or(Ok(3), |v| v.parse()).context("--seconds")?;
            connection_rate(addr, clients, Duration::from_secs(seconds))
        }
        "hold" => {
            let addr: SocketAddr = opt("--addr").context("--addr is required")?.parse().context("--addr")?;
            let seconds: u64 = opt("--seconds").map_or(Ok(30), |v| v.parse()).context("--seconds")?;
            hold(addr, Duration::from_secs(seconds))
        }
        "load" => {
            let addr: SocketAddr = opt("--addr").context("--addr is required")?.parse().context("--addr")?;
            let rate: u64 = opt("--rate").map_or(Ok(500), |v| v.parse()).context("--rate")?;
            let seconds: u64 = opt("--seconds").map_or(Ok(5), |v| v.parse()).context("--seconds")?;
            let clients: u64 = opt("--clients").map_or(Ok(8), |v| v.parse()).context("--clients")?;
            paced_load(addr, rate, Duration::from_secs(seconds), clients)
        }
        "many" => {
            let addr: SocketAddr = opt("--addr").context("--addr is required")?.parse().context("--addr")?;
            let count: usize = opt("--count").map_or(Ok(1000), |v| v.parse()).context("--count")?;
            let seconds: u64 = opt("--seconds").map_or(Ok(10), |v| v.parse()).context("--seconds")?;
            many(addr, count, Duration::from_secs(seconds))
        }
        other => bail!("unknown mode {other}; expected serve, rr, http, cps, hold, load, many or bulk"),
    }
}

/// New connections per second: `clients` threads each connect, exchange 1 KiB with
/// the echo port and close, for `duration`. Prints JSON.
fn connection_rate(addr: SocketAddr, clients: usize, duration: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            thread::spawn(move || -> (u64, u64) {
                let request = [0x5a_u8; 1024];
                let mut response = [0u8; 1024];
                let (mut done, mut failed) = (0u64, 0u64);
                while start.elapsed() < duration {
                    let ok = (|| -> std::io::Result<()> {
                        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                        stream.set_nodelay(true)?;
                        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                        stream.write_all(&request)?;
                        stream.read_exact(&mut response)?;
                        Ok(())
                    })();
                    if ok.is_ok() { done += 1 } else { failed += 1 }
                }
                (done, failed)
            })
        })
        .collect();
    let (mut done, mut failed) = (0, 0);
    for thread in threads {
        let (d, f) = thread.join().map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        done += d;
        failed += f;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({ "connections": done, "failed": failed, "seconds": elapsed, "per_second": done as f64 / elapsed })
    );
    Ok(())
}

/// A steady load of new connections: `rate` per second in all, paced over `clients`
/// threads, for `duration`; each connection sends a line with a marker and reads the
/// echo. Prints JSON with the count of connections, the failures and their errors.
fn paced_load(addr: SocketAddr, rate: u64, duration: Duration, clients: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    let per_client = Duration::from_nanos(1_000_000_000 * clients.max(1) / rate.max(1));
    let threads: Vec<_> = (0..clients.max(1))
        .map(|client| {
            thread::spawn(move || -> (u64, Vec<String>) {
                let (mut done, mut errors) = (0u64, Vec::new());
                // Spread the clients' first connections over one interval.
                let mut next = start + per_client.mul_f64(client as f64 / clients.max(1) as f64);
                while next < start + duration {
                    let now = Instant::now();
                    if next > now {
                        thread::sleep(next - now);
                    }
                    next += per_client;
                    let result = echo_line(addr, &format!("load-marker {client} {done}\n")).map(drop);
                    match result {
                        Ok(()) => done += 1,
                        Err(error) => errors.push(error.to_string()),
                    }
                }
                (done, errors)
            })
        })
        .collect();
    let (mut done, mut errors) = (0, Vec::new());
    for thread in threads {
        let (d, e) = thread.join().map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        done += d;
        errors.extend(e);
    }
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for error in &errors {
        *kinds.entry(error.clone()).or_default() += 1;
    }
    println!(
        "{}",
        serde_json::json!({ "connections": done, "failed": errors.len(), "errors": kinds, "seconds": start.elapsed().as_secs_f64() })
    );
    Ok(())
}

/// A new connection to an echo port that sent `line` and got it back (a slow answer
/// is a success: a busy 2-core lab can drop a SYN, which costs seconds; a failure is
/// an error or no answer within 15 s).
fn echo_line(addr: SocketAddr, line: &str) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(15))?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    stream.write_all(line.as_bytes())?;
    let mut echoed = vec![0u8; line.len()];
    stream.read_exact(&mut echoed)?;
    if echoed != line.as_bytes() {
        return Err(std::io::Error::other("wrong echo"));
    }
    Ok(stream)
}

/// Opens `count` connections to an echo port (each exchanges one line), prints
/// `opened N` (N that succeeded), holds them for `duration`, closes them all and
/// prints `closed`.
fn many(addr: SocketAddr, count: usize, duration: Duration) -> anyhow::Result<()> {
    let mut streams = Vec::with_capacity(count);
    let mut failed = 0;
    for i in 0..count {
        match echo_line(addr, &format!("many {i}\n")) {
            Ok(stream) => streams.push(stream),
            Err(_) => failed += 1,
        }
    }
    println!("opened {} failed {failed}", streams.len());
    std::io::stdout().flush()?;
    thread::sleep(duration);
    drop(streams);
    println!("closed");
    Ok(())
}

/// Keeps one connection to an echo port busy (a line every 50 ms, each echoed back)
/// for `duration`, then prints `held N lines`; if the connection breaks first, prints
/// `closed after N lines: REASON`. Either way the exit status is 0: the output says
/// what happened.
fn hold(addr: SocketAddr, duration: Duration) -> anyhow::Result<()> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).context("connect")?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let start = Instant::now();
    let mut lines = 0u64;
    let outcome = loop {
        if start.elapsed() >= duration {
            break None;
        }
        let line = format!("line {lines}\n");
        if let Err(error) = writer.write_all(line.as_bytes()) {
            break Some(error.to_string());
        }
        let mut echoed = String::new();
        match reader.read_line(&mut echoed) {
            Ok(0) => break Some("connection closed by peer".to_owned()),
            Ok(_) if echoed == line => lines += 1,
            Ok(_) => break Some(format!("unexpected echo {echoed:?}")),
            Err(error) => break Some(error.to_string()),
        }
        println!("ok {lines}");
        thread::sleep(Duration::from_millis(50));
    };
    match outcome {
        None => println!("held {lines} lines"),
        Some(reason) => println!("closed after {lines} lines: {reason}"),
    }
    Ok(())
}

fn serve(name: String, http_port: u16, tcp_port: u16, sink_port: u16) -> anyhow::Result<()> {
    let http = bind(http_port)?;
    let tcp = bind(tcp_port)?;
    let sink_listener = bind(sink_port)?;
    let echo_name = name.clone();
    thread::spawn(move || accept_loop(&tcp, move |s| echo(s, &echo_name)));
    thread::spawn(move || accept_loop(&sink_listener, sink));
    accept_loop(&http, move |s| http_conn(s, &name));
    Ok(())
}

/// Dual-stack listener when the namespace has IPv6, IPv4 otherwise.
fn bind(port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind(("::", port))
        .or_else(|_| TcpListener::bind(("0.0.0.0", port)))
        .with_context(|| format!("bind port {port}"))
}

fn accept_loop(listener: &TcpListener, handle: impl Fn(TcpStream) + Clone + Send + 'static) {
    for stream in listener.incoming().flatten() {
        let handle = handle.clone();
        thread::spawn(move || handle(stream));
    }
}

fn echo(mut stream: TcpStream, _name: &str) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

fn http_conn(stream: TcpStream, name: &str) {
    let peer = stream.peer_addr().map(|a| canonical(a).to_string()).unwrap_or_default();
    let local = stream.local_addr().map(|a| canonical(a).to_string()).unwrap_or_default();
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let _ = writer.set_nodelay(true);
    let mut reader = BufReader::new(stream);
    loop {
        let mut content_length = 0usize;
        let mut close = false;
        let mut line = String::new();
        // Request line, then headers up to the blank line.
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            } else if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        let mut body = vec![0u8; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        // `POST /echo`: the body back (the benchmark's requests); anything else: who
        // answered and whom it saw.
        let reply = if line.starts_with("POST /echo ") {
            body
        } else {
            format!("pod={name} peer={peer} local={local}\n").into_bytes()
        };
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n",
            reply.len(),
            if close { "connection: close\r\n" } else { "" }
        )
        .into_bytes();
        answer.extend_from_slice(&reply);
        if writer.write_all(&answer).is_err() || close {
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A `--header` value (`name: value`) as a request header line with its CRLF; refuses
/// what would break the request (no colon, an empty name, a line break).
fn header_line(header: &str) -> anyhow::Result<String> {
    let (name, value) =
        header.split_once(':').with_context(|| format!("--header {header:?}: expected 'name: value'"))?;
    let name = name.trim();
    if name.is_empty() || name.contains(char::is_whitespace) || header.contains(['\r', '\n']) {
        bail!("--header {header:?}: expected 'name: value' on one line");
    }
    Ok(format!("{name}: {}\r\n", value.trim()))
}

/// One persistent HTTP/1.1 connection; a `POST /echo` with a `size`-byte body and the
/// extra `headers` (header lines with their CRLF) every 1/`rate` s (at once when the
/// previous answer came late), `count` times; each answer must be a 200 with the body
/// echoed. Prints latency percentiles and the count of answers that were not.
fn http_request_response(addr: SocketAddr, size: usize, count: usize, rate: u64, headers: &str) -> anyhow::Result<()> {
    let stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut request =
        format!("POST /echo HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/octet-stream\r\ncontent-length: {size}\r\n{headers}\r\n")
            .into_bytes();
    request.extend(std::iter::repeat_n(0x5a_u8, size));
    let mut bad = 0u64;
    let mut report = paced(count, rate, || {
        writer.write_all(&request)?;
        let (status, body) = read_response(&mut reader)?;
        if status != 200 || body.len() != size {
            bad += 1;
        }
        Ok(())
    })?;
    report["bad"] = bad.into();
    println!("{report}");
    Ok(())
}

/// Runs `exchange` `count` times, one every 1/`rate` s (at once when the previous one
/// came late), for a minute at most; returns the count and the latency percentiles as
/// JSON.
fn paced(
    count: usize,
    rate: u64,
    mut exchange: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<serde_json::Value> {
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let mut latencies = Vec::with_capacity(count);
    let started = Instant::now();
    let mut next = Instant::now();
    for _ in 0..count {
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        }
        next += interval;
        let t = Instant::now();
        exchange()?;
        latencies.push(t.elapsed());
        if started.elapsed() > Duration::from_mins(1) {
            break;
        }
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64() * 1e6;
    Ok(serde_json::json!({ "count": latencies.len(), "p50_us": pct(0.50), "p99_us": pct(0.99), "max_us": pct(1.0) }))
}

/// One HTTP/1.1 response with a `content-length` body: (status, body).
fn read_response(reader: &mut BufReader<TcpStream>) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        bail!("connection closed before a response");
    }
    let status: u16 = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("status line")?;
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            bail!("connection closed in the response headers");
        }
        let header = header.trim_end().to_ascii_lowercase();
        if header.is_empty() {
            break;
        }
        if let Some(v) = header.strip_prefix("content-length:") {
            length = v.trim().parse().context("content-length")?;
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).context("response body")?;
    Ok((status, body))
}

/// One persistent connection; a `size`-byte request every 1/`rate` s (sent at once
/// when the previous answer came late), `count` times; prints latency percentiles.
fn request_response(addr: SocketAddr, size: usize, count: usize, rate: u64) -> anyhow::Result<()> {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let request = vec![0x5a_u8; size];
    let mut response = vec![0u8; size];
    let report = paced(count, rate, || {
        stream.write_all(&request)?;
        stream.read_exact(&mut response).context("read echo")?;
        Ok(())
    })?;
    println!("{report}");
    Ok(())
}

/// The bytes a bulk client sends: a fixed xorshift64 stream, so a reordered, dropped
/// or repeated chunk changes the digest (all zeros would hide a repeat).
struct Pattern(u64);

impl Pattern {
    fn new() -> Self {
        Self(0x9e37_79b9_7f4a_7c15)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// The sink's answer after the end of a transfer of `bytes` bytes with this digest.
fn sink_answer(bytes: u64, digest: &[u8]) -> String {
    let mut answer = format!("bytes={bytes} sha256=");
    for b in digest {
        let _ = write!(answer, "{b:02x}");
    }
    answer.push('\n');
    answer
}

/// Reads a connection to its end, counting and hashing, then answers
/// [`sink_answer`] and closes: the answer exists only once the client's FIN arrived.
fn sink(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_mins(1)));
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                context.update(&buf[..n]);
                total += n as u64;
            }
            // A reset or a stall: no answer, the client reports it.
            Err(_) => return,
        }
    }
    let answer = sink_answer(total, context.finish().as_ref());
    if stream.write_all(answer.as_bytes()).is_ok() {
        let _ = stream.shutdown(Shutdown::Write);
    }
}

/// Sends `bytes` bytes of [`Pattern`] to a sink, half-closes, reads its answer to the
/// end and compares. Prints JSON (`ok`, `bytes`, `sha256`, `answer`, `send_seconds`,
/// `total_seconds`); fails when the answer differs or does not come within `limit`.
fn bulk(addr: SocketAddr, bytes: u64, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).context("connect")?;
    stream.set_write_timeout(Some(limit))?;
    stream.set_read_timeout(Some(limit))?;
    let mut pattern = Pattern::new();
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..n]);
        context.update(&buf[..n]);
        stream.write_all(&buf[..n]).with_context(|| format!("send after {sent} bytes"))?;
        sent += n as u64;
    }
    stream.shutdown(Shutdown::Write).context("shut down the write side")?;
    let send_seconds = start.elapsed().as_secs_f64();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).with_context(|| {
        format!("no answer {:.1} s after the half-close (did the sink see the end of the data?)", limit.as_secs_f64())
    })?;
    let expected = sink_answer(bytes, context.finish().as_ref());
    let ok = answer == expected;
    println!(
        "{}",
        serde_json::json!({
            "ok": ok, "bytes": bytes, "sha256": expected.trim_end().rsplit('=').next(),
            "answer": answer.trim_end(), "send_seconds": send_seconds, "total_seconds": start.elapsed().as_secs_f64(),
        })
    );
    if !ok {
        bail!("the sink answered {answer:?}, expected {expected:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Pattern, header_line, sink_answer};

    #[test]
    fn pattern_is_deterministic_and_not_flat() {
        let (mut a, mut b) = (vec![0u8; 1000], vec![0u8; 1000]);
        Pattern::new().fill(&mut a);
        Pattern::new().fill(&mut b);
        assert_eq!(a, b);
        // Filling in two pieces continues the stream where it stopped (a chunk size
        // that is a multiple of 8, as the client's 64 KiB buffer is).
        let mut pieces = Pattern::new();
        let mut c = vec![0u8; 1000];
        pieces.fill(&mut c[..512]);
        pieces.fill(&mut c[512..]);
        assert_eq!(a, c);
        assert!(a.windows(8).step_by(8).collect::<std::collections::HashSet<_>>().len() > 100);
    }

    #[test]
    fn sink_answers_count_and_hex_digest() {
        let digest = ring::digest::digest(&ring::digest::SHA256, b"abc");
        assert_eq!(
            sink_answer(3, digest.as_ref()),
            "bytes=3 sha256=ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
        );
    }

    #[test]
    fn header_lines() {
        assert_eq!(header_line("Authorization: Bearer a.b.c").unwrap(), "Authorization: Bearer a.b.c\r\n");
        assert_eq!(header_line("x-empty:").unwrap(), "x-empty: \r\n");
        for bad in ["no colon", ": value", "two words: v", "x: a\r\ninjected: 1"] {
            let error = header_line(bad).unwrap_err().to_string();
            assert!(error.contains("--header"), "{bad}: {error}");
        }
    }
}
