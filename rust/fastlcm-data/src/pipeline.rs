//! The loader: one reader thread (shards → source → tar → samples → shuffle, assigning stream positions),
//! N decode threads, and the caller's thread, which takes results back in stream order and assembles batches.
//!
//! Order never depends on thread count: every item the reader produces gets a sequence number and the caller
//! consumes them strictly in that order; crop/flip randomness comes from `(seed, stream position)`.
//! Resume state is (epoch, position of the epoch's first sample, position after the last returned batch):
//! loading it replays the epoch's read + shuffle without decoding and discards positions already consumed.
//!
//! Raw mode (`LoaderConfig::raw`, cached latents): the same stream, but the decode threads only check each
//! sample's `latent.safetensors` member and batches carry every member's bytes instead of pixels.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::batch::{assemble, batch_nbytes, BatchMeta, DecodedSample};
use crate::config::{LoaderConfig, OnError, ResumeState};
use crate::decode::{DecodeOptions, MAX_PIXELS};
use crate::error::{Error, Result};
use crate::reader::{Done, Event, Links, Outcome, Reader, Work};
use crate::resume::{self, Fingerprint};
use crate::spec::expand_specs;
use crate::stats::{add, add_time, Stats};
use crate::worker::{Pool, Worker};

struct Running {
    stop: Arc<AtomicBool>,
    results: Receiver<Done>,
    tokens: SyncSender<()>,
    pending: BTreeMap<u64, Outcome>,
    next_seq: u64,
    batch: Vec<DecodedSample>,
    epoch_start: u64,
    shard_counts: Vec<u64>,
    epoch_decoded: u64,
    consecutive_failures: u64,
    _handles: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Threads notice `stop` or their closed channels and exit on their own; a reader blocked on a stalled
        // source exits after its timeout. Handles are detached so dropping never blocks the caller.
    }
}

/// Result of one bounded wait for a batch.
pub enum Poll {
    Ready(BatchMeta),
    Pending,
    Finished,
}

pub struct Loader {
    cfg: LoaderConfig,
    urls: Arc<Vec<String>>,
    state: ResumeState,
    stats: Arc<Stats>,
    running: Option<Running>,
    pool: Pool,
    pid: u32,
}

impl Loader {
    /// Checks the options (`LoaderConfig::validate`) and expands the shard specs; starts no thread yet.
    pub fn new(cfg: LoaderConfig) -> Result<Self> {
        cfg.validate()?;
        let urls = expand_specs(&cfg.shards)?;
        if !cfg.resampled && urls.len() < cfg.world_size {
            return Err(Error::NoData(format!(
                "only {} shard(s) for world_size={}: rank {} would get none (use more shards or resampled=True)",
                urls.len(),
                cfg.world_size,
                cfg.rank
            )));
        }
        let stats = Arc::new(Stats {
            raw: cfg.raw,
            ..Default::default()
        });
        Ok(Loader {
            cfg,
            urls: Arc::new(urls),
            state: ResumeState::default(),
            stats,
            running: None,
            pool: Arc::new(Mutex::new(Vec::new())),
            pid: std::process::id(),
        })
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// A shared handle to the counters (readable while another thread drives the loader).
    pub fn stats_handle(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Bytes of one batch's pixel buffer (0 in raw mode: pass an empty slice).
    pub fn batch_nbytes(&self) -> usize {
        if self.cfg.raw {
            return 0;
        }
        batch_nbytes(self.cfg.batch_size, self.cfg.resolution, self.cfg.dtype)
    }

    pub fn state(&self) -> &ResumeState {
        &self.state
    }

    /// Fingerprint of everything the stream depends on (except epochs), stored in state dicts.
    pub fn fingerprint(&self) -> Fingerprint {
        resume::fingerprint(&self.cfg, &self.urls)
    }

    /// The resume state after the last returned batch, in the `resume` module's JSON format.
    pub fn state_json(&self) -> Result<String> {
        self.check_pid()?;
        Ok(resume::to_json(&self.state, &self.fingerprint()))
    }

    /// Loads a state written by `state_json` of a loader with the same fingerprint.
    pub fn load_state_json(&mut self, text: &str) -> Result<()> {
        self.check_pid()?;
        let state = resume::from_json(text, &self.fingerprint())?;
        self.load_state(state)
    }

    /// Sets the position to resume from (stops any running pipeline; the next call restarts there).
    pub fn load_state(&mut self, s: ResumeState) -> Result<()> {
        self.check_pid()?;
        if s.position < s.epoch_start {
            return Err(Error::State(
                "state_dict: position is before epoch_start".into(),
            ));
        }
        self.running = None;
        self.state = s;
        Ok(())
    }

    /// Back to the very beginning (a new pass after the stream finished).
    pub fn reset(&mut self) -> Result<()> {
        self.load_state(ResumeState::default())
    }

    /// Refuses use in a forked child: the loader's threads (and any lock they held) exist only in the parent.
    fn check_pid(&self) -> Result<()> {
        let now = std::process::id();
        if now != self.pid {
            return Err(Error::Usage(format!(
                "this loader was created in process {} and is used in process {now} after a fork; its threads do \
                 not exist here. Create the loader in the process that iterates it (one loader per training \
                 process; it needs no DataLoader worker processes)",
                self.pid
            )));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the next batch; writes its pixels into `dst` (exactly `batch_nbytes()` bytes).
    pub fn poll_batch(&mut self, dst: &mut [u8], timeout: Duration) -> Result<Poll> {
        self.check_pid()?;
        if dst.len() != self.batch_nbytes() {
            return Err(Error::InvalidArgument(format!(
                "destination has {} bytes, a batch needs {}",
                dst.len(),
                self.batch_nbytes()
            )));
        }
        if self.state.finished {
            return Ok(Poll::Finished);
        }
        if self.running.is_none() {
            self.running = Some(self.start());
        }
        let deadline = Instant::now() + timeout;
        let res = self.consume(dst, deadline);
        if res.is_err() {
            self.running = None; // a later call restarts from the last good state (and meets the same error)
        }
        res
    }

    /// Blocking convenience for Rust callers and tests: the next batch, or None at the end.
    pub fn next_batch(&mut self, dst: &mut [u8]) -> Result<Option<BatchMeta>> {
        loop {
            match self.poll_batch(dst, Duration::from_secs(3600))? {
                Poll::Ready(m) => return Ok(Some(m)),
                Poll::Finished => return Ok(None),
                Poll::Pending => {}
            }
        }
    }

    fn consume(&mut self, dst: &mut [u8], deadline: Instant) -> Result<Poll> {
        let b = self.cfg.batch_size;
        loop {
            let run = self.running.as_mut().expect("running");
            let out = match run.pending.remove(&run.next_seq) {
                Some(o) => o,
                None => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(Poll::Pending);
                    }
                    let r = run.results.recv_timeout(deadline - now);
                    add_time(&self.stats.wait_ns, now.elapsed());
                    match r {
                        Ok(d) => {
                            run.pending.insert(d.seq, d.out);
                            continue;
                        }
                        Err(RecvTimeoutError::Timeout) => return Ok(Poll::Pending),
                        Err(RecvTimeoutError::Disconnected) => {
                            return Err(Error::Usage("loader threads stopped unexpectedly".into()))
                        }
                    }
                }
            };
            run.next_seq += 1;
            match out {
                Outcome::Decoded {
                    epoch,
                    pos,
                    ordinal,
                    sample,
                } => {
                    let _ = run.tokens.try_send(());
                    run.epoch_decoded += 1;
                    run.consecutive_failures = 0;
                    run.batch.push(sample);
                    if run.batch.len() == b {
                        let meta = assemble(&mut run.batch, self.cfg.dtype, dst, self.cfg.threads);
                        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
                        pool.extend(
                            run.batch
                                .drain(..)
                                .map(|s| s.pixels)
                                .filter(|p| p.capacity() > 0),
                        );
                        drop(pool);
                        let shard_counts = run.shard_counts
                            [..(ordinal as usize).min(run.shard_counts.len())]
                            .to_vec();
                        self.state = ResumeState {
                            epoch,
                            epoch_start: run.epoch_start,
                            position: pos + 1,
                            batches: self.state.batches + 1,
                            finished: false,
                            shard_counts,
                        };
                        add(&self.stats.batches_yielded, 1);
                        add(&self.stats.samples_yielded, b as u64);
                        return Ok(Poll::Ready(meta));
                    }
                }
                Outcome::Failed { err, shard } => {
                    let _ = run.tokens.try_send(());
                    add(&self.stats.corrupt_image, 1);
                    if self.cfg.on_error == OnError::Raise {
                        return Err(err);
                    }
                    run.consecutive_failures += 1;
                    if run.consecutive_failures >= self.cfg.max_consecutive_rejections {
                        return Err(Error::TooManyRejections {
                            count: run.consecutive_failures,
                            shard,
                            reason: format!("corrupt_image: {err}"),
                        });
                    }
                }
                Outcome::Event(Event::ShardDone { count }) => run.shard_counts.push(count),
                Outcome::Event(Event::EpochEnd {
                    next_start,
                    replayed,
                }) => {
                    run.shard_counts.clear();
                    add(&self.stats.partial_batch, run.batch.len() as u64);
                    run.batch.clear();
                    if run.epoch_decoded == 0 && replayed == 0 {
                        let s = self.stats.snapshot();
                        return Err(Error::NoData(format!(
                            "no sample could be read and decoded from the {} shard(s) of rank {} (shards_failed={}, skipped={})",
                            self.urls.len().div_ceil(self.cfg.world_size),
                            self.cfg.rank,
                            s["shards_failed"],
                            s["skipped"]
                        )));
                    }
                    run.epoch_decoded = 0;
                    run.epoch_start = next_start;
                }
                Outcome::Event(Event::Error(e)) => return Err(e),
                Outcome::Event(Event::End) => {
                    self.state.finished = true;
                    self.running = None;
                    return Ok(Poll::Finished);
                }
            }
        }
    }

    fn start(&mut self) -> Running {
        let cfg = &self.cfg;
        let stop = Arc::new(AtomicBool::new(false));
        let tokens_n = (cfg.prefetch_batches.max(1) * cfg.batch_size + 2 * cfg.threads).max(2);
        let (token_tx, token_rx) = mpsc::sync_channel::<()>(tokens_n);
        for _ in 0..tokens_n {
            token_tx.send(()).expect("token channel has room");
        }
        let (work_tx, work_rx) = mpsc::channel::<Work>();
        let (res_tx, res_rx) = mpsc::channel::<Done>();
        let work_rx = Arc::new(Mutex::new(work_rx));
        let opts = DecodeOptions {
            resolution: cfg.resolution,
            crop: cfg.crop,
            random_flip: cfg.random_flip,
            dct_scaling: cfg.dct_scaling,
            max_pixels: MAX_PIXELS,
        };
        let mut handles = Vec::new();
        for i in 0..cfg.threads {
            let worker = Worker {
                work: work_rx.clone(),
                results: res_tx.clone(),
                stop: stop.clone(),
                stats: self.stats.clone(),
                pool: self.pool.clone(),
                opts: opts.clone(),
                seed: cfg.seed,
                raw: cfg.raw,
            };
            let h = std::thread::Builder::new()
                .name(format!("fastlcm-decode-{i}"))
                .spawn(move || worker.run())
                .expect("spawn decode thread");
            handles.push(h);
        }
        let links = Links {
            stop: stop.clone(),
            tokens: token_rx,
            work: work_tx,
            results: res_tx,
        };
        let reader = Reader::new(
            cfg.clone(),
            self.urls.clone(),
            self.stats.clone(),
            links,
            self.state.clone(),
        );
        handles.push(
            std::thread::Builder::new()
                .name("fastlcm-reader".into())
                .spawn(move || reader.run())
                .expect("spawn reader"),
        );
        Running {
            stop,
            results: res_rx,
            tokens: token_tx,
            pending: BTreeMap::new(),
            next_seq: 0,
            batch: Vec::with_capacity(self.cfg.batch_size),
            epoch_start: self.state.epoch_start,
            shard_counts: self.state.shard_counts.clone(),
            epoch_decoded: 0,
            consecutive_failures: 0,
            _handles: handles,
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        if std::process::id() != self.pid {
            // After fork the threads and any locks they held are gone: touch nothing, leak instead.
            if let Some(r) = self.running.take() {
                std::mem::forget(r);
            }
        }
    }
}
