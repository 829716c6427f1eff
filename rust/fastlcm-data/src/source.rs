//! Byte stream per shard: local file | HTTP(S) with timeouts, retries and Range resume | `pipe:` subprocess.
//!
//! Every source is a plain `Read`. A failure surfaces as an `io::Error` from `read`; the tar stage turns it
//! into `Error::Source` with the shard URL and byte offset. A stalled source times out instead of hanging.

use std::io::{self, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::shards::{locate, Location};

/// How sources behave on slow or failing networks.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// Connect / response / per-read idle timeout for HTTP, and the idle timeout for `pipe:` output.
    pub timeout: Duration,
    /// Retries after the first attempt, per shard, before the shard is given up.
    pub retries: u32,
    /// First backoff delay; doubles per retry, capped at 5 s.
    pub backoff: Duration,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            timeout: Duration::from_secs(30),
            retries: 3,
            backoff: Duration::from_millis(200),
        }
    }
}

/// Opens the byte stream of one shard URL.
pub fn open(url: &str, opts: &SourceOptions) -> Result<Box<dyn Read + Send>> {
    match locate(url) {
        Location::File(path) => {
            // Kept as an I/O error so that its kind (not found, permission denied) reaches the caller.
            let f = std::fs::File::open(&path).map_err(|source| Error::Io {
                shard: url.to_string(),
                offset: 0,
                source,
            })?;
            Ok(Box::new(BufReader::with_capacity(1 << 20, f)))
        }
        Location::Http(u) => {
            let mut r = HttpReader::new(u, opts.clone());
            r.connect().map_err(|e| Error::Source {
                shard: url.to_string(),
                offset: 0,
                message: e.to_string(),
            })?;
            Ok(Box::new(BufReader::with_capacity(1 << 20, r)))
        }
        Location::Pipe(cmd) => {
            let r = PipeReader::spawn(&cmd, opts.timeout).map_err(|e| Error::Source {
                shard: url.to_string(),
                offset: 0,
                message: e.to_string(),
            })?;
            Ok(Box::new(r))
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// HTTP(S)
// ------------------------------------------------------------------------------------------------------------

/// Streams an HTTP(S) body; on a dropped connection, error status or stall it reconnects with
/// `Range: bytes=<received>-` (skipping the prefix itself if the server ignores Range), with backoff.
pub struct HttpReader {
    agent: ureq::Agent,
    url: String,
    opts: SourceOptions,
    body: Option<Box<dyn Read + Send>>,
    received: u64,
    total: Option<u64>,
    failures: u32,
}

fn is_retryable(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::StatusCode(s) => *s >= 500 || *s == 429 || *s == 408,
        ureq::Error::BadUri(_) | ureq::Error::InvalidProxyUrl | ureq::Error::RedirectFailed => {
            false
        }
        _ => true,
    }
}

impl HttpReader {
    pub fn new(url: String, opts: SourceOptions) -> Self {
        let t = Some(opts.timeout);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(t)
            .timeout_recv_response(t)
            .timeout_per_read(t)
            .build()
            .into();
        HttpReader {
            agent,
            url,
            opts,
            body: None,
            received: 0,
            total: None,
            failures: 0,
        }
    }

    fn backoff(&self) {
        let ms = self.opts.backoff.as_millis() as u64 * (1u64 << self.failures.min(10));
        std::thread::sleep(Duration::from_millis(ms.min(5000)));
    }

    /// One connection attempt at the current offset; retries are driven by `connect` / `read`.
    fn try_connect(&mut self) -> std::result::Result<(), ureq::Error> {
        let mut req = self.agent.get(&self.url);
        if self.received > 0 {
            req = req.header("Range", format!("bytes={}-", self.received));
        }
        let resp = req.call()?;
        let status = resp.status().as_u16();
        let headers = resp.headers();
        let content_len = headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let mut body: Box<dyn Read + Send> = Box::new(resp.into_body().into_reader());
        if status == 206 {
            if let Some(n) = content_len {
                self.total = Some(self.received + n);
            }
        } else {
            // 200: full body; skip what was already delivered.
            self.total = content_len;
            if self.received > 0 {
                let skipped = io::copy(&mut (&mut body).take(self.received), &mut io::sink())?;
                if skipped != self.received {
                    return Err(ureq::Error::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "body shorter on retry",
                    )));
                }
            }
        }
        self.body = Some(body);
        Ok(())
    }

    /// Connects (at the current offset), retrying retryable failures with backoff.
    pub fn connect(&mut self) -> io::Result<()> {
        loop {
            match self.try_connect() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.failures += 1;
                    if !is_retryable(&e) || self.failures > self.opts.retries {
                        return Err(io::Error::other(format!(
                            "{e} (after {} attempt(s), at byte {})",
                            self.failures, self.received
                        )));
                    }
                    self.backoff();
                }
            }
        }
    }
}

impl Read for HttpReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.body.is_none() {
                self.connect()?;
            }
            let res = self.body.as_mut().expect("connected").read(buf);
            match res {
                Ok(0) if self.total.is_none_or(|t| self.received >= t) => return Ok(0),
                Ok(0) => {
                    // Closed before Content-Length was reached: resume.
                    self.body = None;
                }
                Ok(n) => {
                    self.received += n as u64;
                    self.failures = 0;
                    return Ok(n);
                }
                Err(e) => {
                    self.body = None;
                    self.failures += 1;
                    if self.failures > self.opts.retries {
                        return Err(io::Error::new(
                            e.kind(),
                            format!(
                                "{e} (after {} attempt(s), at byte {})",
                                self.failures, self.received
                            ),
                        ));
                    }
                    self.backoff();
                    continue;
                }
            }
            self.failures += 1;
            if self.failures > self.opts.retries {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed at byte {}", self.received),
                ));
            }
            self.backoff();
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// pipe:
// ------------------------------------------------------------------------------------------------------------

/// Runs `sh -c CMD` and reads its stdout. A non-zero exit status is an error at the end of the stream;
/// no output for `timeout` kills the command and is an error.
pub struct PipeReader {
    child: Child,
    chunks: Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    at: usize,
    stderr: Arc<Mutex<Vec<u8>>>,
    timeout: Duration,
    done: bool,
}

impl PipeReader {
    pub fn spawn(cmd: &str, timeout: Duration) -> io::Result<Self> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stdout = child.stdout.take().expect("piped stdout");
        let mut err_pipe = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::sync_channel(4);
        std::thread::spawn(move || loop {
            let mut buf = vec![0u8; 1 << 18];
            match stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send(Ok(buf)).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
                s.extend_from_slice(&buf[..n]);
                let len = s.len();
                if len > 4096 {
                    s.drain(..len - 4096); // keep the tail
                }
            }
        });
        Ok(PipeReader {
            child,
            chunks: rx,
            current: Vec::new(),
            at: 0,
            stderr,
            timeout,
            done: false,
        })
    }

    fn stderr_tail(&self) -> String {
        let s = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        let text = String::from_utf8_lossy(&s);
        let t = text.trim();
        if t.is_empty() {
            String::new()
        } else {
            format!(
                "; stderr: {}",
                t.chars()
                    .rev()
                    .take(500)
                    .collect::<String>()
                    .chars()
                    .rev()
                    .collect::<String>()
            )
        }
    }
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        while self.at >= self.current.len() {
            match self.chunks.recv_timeout(self.timeout) {
                Ok(Ok(chunk)) => {
                    self.current = chunk;
                    self.at = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "pipe command produced no output for {:.1} s; killed",
                            self.timeout.as_secs_f64()
                        ),
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.done = true;
                    let status = self.child.wait()?;
                    if !status.success() {
                        // Give the stderr thread a moment to collect the message.
                        std::thread::sleep(Duration::from_millis(20));
                        return Err(io::Error::other(format!(
                            "pipe command exited with {status}{}",
                            self.stderr_tail()
                        )));
                    }
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Drop for PipeReader {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_reads_stdout_and_reports_exit_status() {
        let opts = SourceOptions::default();
        let mut s = String::new();
        open("pipe:printf hello", &opts)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "hello");
        let mut out = Vec::new();
        let err = open("pipe:printf x; echo oops >&2; exit 3", &opts)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(
            err.to_string().contains("exit") && err.to_string().contains("oops"),
            "{err}"
        );
    }

    #[test]
    fn stalled_pipe_times_out() {
        let opts = SourceOptions {
            timeout: Duration::from_millis(200),
            ..Default::default()
        };
        let mut out = Vec::new();
        let t = std::time::Instant::now();
        let err = open("pipe:sleep 5", &opts)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn missing_file_names_the_shard() {
        let err = open("/nonexistent/x.tar", &SourceOptions::default())
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/x.tar"), "{err}");
    }
}
