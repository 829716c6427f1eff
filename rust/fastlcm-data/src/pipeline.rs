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
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::batch::{assemble, batch_nbytes, BatchMeta, DecodedSample};
pub use crate::config::{LoaderConfig, ResumeState};
use crate::decode::{process, DecodeOptions, Scratch, MAX_PIXELS};
use crate::error::{Error, Result};
use crate::reader::{Done, Event, Outcome, Reader, Work};
use crate::rng::{derive_seed, stream, Rng};
use crate::safetensors;
use crate::shards::expand_specs;
use crate::stats::{add, add_time, Stats};

type Pool = Arc<Mutex<Vec<Vec<u8>>>>;

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
    pub fn new(cfg: LoaderConfig) -> Result<Self> {
        let bad = |m: &str| Err(Error::InvalidArgument(m.to_string()));
        if cfg.batch_size == 0 {
            return bad("batch_size must be >= 1");
        }
        if cfg.resolution == 0 || cfg.resolution > 16384 {
            return bad("resolution must be in 1..=16384");
        }
        if cfg.threads == 0 {
            return bad("threads must be >= 1");
        }
        if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
            return Err(Error::InvalidArgument(format!(
                "rank must be in 0..world_size (rank={}, world_size={})",
                cfg.rank, cfg.world_size
            )));
        }
        if cfg.max_consecutive_rejections == 0 {
            return bad("max_consecutive_rejections must be >= 1");
        }
        if cfg.epochs == Some(0) {
            return bad("epochs must be >= 1 or None");
        }
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
    pub fn fingerprint(&self) -> Vec<(&'static str, u64)> {
        let c = &self.cfg;
        let url_hash = derive_seed(
            &self
                .urls
                .iter()
                .map(|u| derive_seed(&u.bytes().map(u64::from).collect::<Vec<_>>()))
                .collect::<Vec<_>>(),
        );
        let mut fp = vec![
            ("seed", c.seed),
            ("batch_size", c.batch_size as u64),
            ("resolution", c.resolution as u64),
            ("rank", c.rank as u64),
            ("world_size", c.world_size as u64),
            ("shuffle_buffer", c.shuffle_buffer as u64),
            ("resampled", c.resampled as u64),
            ("num_shards", self.urls.len() as u64),
            ("shards_hash", url_hash >> 12), // fits a JSON double exactly
        ];
        if c.raw {
            fp.push(("raw", 1)); // only in raw mode, so image-mode state dicts stay as they were
        }
        fp
    }

    /// Sets the position to resume from (stops any running pipeline; the next call restarts there).
    pub fn load_state(&mut self, s: ResumeState) -> Result<()> {
        self.check_pid()?;
        if s.position < s.epoch_start {
            return Err(Error::InvalidArgument(
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

    fn check_pid(&self) -> Result<()> {
        let now = std::process::id();
        if now != self.pid {
            return Err(Error::Usage(format!(
                "this ShardLoader was created in process {} and is used in process {now} after a fork; its threads \
                 do not exist here. Create the loader in the process that iterates it (one loader per training \
                 process, no DataLoader worker processes needed)",
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
                    if self.cfg.on_error_raise {
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
            center_crop: cfg.center_crop,
            random_flip: cfg.random_flip,
            dct_scaling: cfg.dct_scaling,
            max_pixels: MAX_PIXELS,
        };
        let mut handles = Vec::new();
        for i in 0..cfg.threads {
            let raw = cfg.raw;
            let (rx, tx, stop, stats, pool, opts, seed) = (
                work_rx.clone(),
                res_tx.clone(),
                stop.clone(),
                self.stats.clone(),
                self.pool.clone(),
                opts.clone(),
                cfg.seed,
            );
            let h = std::thread::Builder::new()
                .name(format!("fastlcm-decode-{i}"))
                .spawn(move || decode_worker(rx, tx, stop, stats, pool, opts, seed, raw))
                .expect("spawn decode thread");
            handles.push(h);
        }
        let reader = Reader::new(
            cfg.clone(),
            self.urls.clone(),
            self.stats.clone(),
            stop.clone(),
            token_rx,
            work_tx,
            res_tx,
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

#[allow(clippy::too_many_arguments)]
fn decode_worker(
    rx: Arc<Mutex<Receiver<Work>>>,
    tx: Sender<Done>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    pool: Pool,
    opts: DecodeOptions,
    seed: u64,
    raw_mode: bool,
) {
    let mut scratch = Scratch::default();
    loop {
        let w = {
            let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
            match guard.recv() {
                Ok(w) => w,
                Err(_) => return,
            }
        };
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let t0 = Instant::now();
        let mut pixels = if raw_mode {
            Vec::new()
        } else {
            pool.lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
                .unwrap_or_default()
        };
        let mut rng = Rng::from_parts(&[seed, stream::SAMPLE, w.pos]);
        let mut raw = w.raw;
        let res = catch_unwind(AssertUnwindSafe(|| {
            if raw_mode {
                safetensors::check_sample(&raw)
            } else {
                process(&raw.image, &mut rng, &opts, &mut scratch, &mut pixels)
            }
        }));
        let message = match res {
            Ok(Ok(placement)) => {
                add_time(&stats.decode_ns, t0.elapsed());
                let sample = DecodedSample {
                    key: raw.key,
                    caption: String::from_utf8_lossy(&raw.caption).into_owned(),
                    json: raw.json,
                    shard: raw.shard,
                    placement,
                    pixels,
                    members: std::mem::take(&mut raw.members),
                };
                if tx
                    .send(Done {
                        seq: w.seq,
                        out: Outcome::Decoded {
                            epoch: w.epoch,
                            pos: w.pos,
                            ordinal: w.ordinal,
                            sample,
                        },
                    })
                    .is_err()
                {
                    return;
                }
                continue;
            }
            Ok(Err(m)) => m,
            Err(_) => {
                scratch = Scratch::default();
                "decoder panicked".to_string()
            }
        };
        add_time(&stats.decode_ns, t0.elapsed());
        let err = Error::Decode {
            shard: raw.shard.to_string(),
            member: raw.image_member,
            offset: raw.image_offset,
            message,
        };
        if tx
            .send(Done {
                seq: w.seq,
                out: Outcome::Failed {
                    err,
                    shard: raw.shard.to_string(),
                },
            })
            .is_err()
        {
            return;
        }
    }
}
