//! The reader thread: shards → source → tar → samples → shuffle, handing samples (with their stream position)
//! to the decode threads, and events (shard done, epoch end, errors, end) straight to the consumer.
//!
//! Resume without re-reading everything: the state records how many samples each shard of the current epoch
//! contributed before the resume point. The shuffle buffer is then rebuilt by simulating its random choices on
//! placeholders and re-reading only the shards whose samples are still in the buffer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::batch::DecodedSample;
use crate::config::{LoaderConfig, OnError, ResumeState};
use crate::error::Error;
use crate::rng::{stream, Rng};
use crate::samples::{select, select_raw, Group, Grouper, RawSample, Reject};
use crate::shards::{epoch_shards, Resampler};
use crate::shuffle::ShuffleBuffer;
use crate::source::open;
use crate::stats::{add, add_time, Stats};
use crate::tar::TarReader;

pub(crate) enum Event {
    /// A shard finished; it contributed `count` samples to the shuffle buffer.
    ShardDone {
        count: u64,
    },
    EpochEnd {
        next_start: u64,
        replayed: u64,
    },
    Error(Error),
    End,
}

pub(crate) struct Work {
    pub seq: u64,
    pub pos: u64,
    pub epoch: u64,
    /// Ordinal (within the epoch, or draw number when resampling) of the shard being read when this sample
    /// left the shuffle buffer.
    pub ordinal: u64,
    pub raw: RawSample,
}

pub(crate) enum Outcome {
    Decoded {
        epoch: u64,
        pos: u64,
        ordinal: u64,
        sample: DecodedSample,
    },
    Failed {
        err: Error,
        shard: String,
    },
    Event(Event),
}

pub(crate) struct Done {
    pub seq: u64,
    pub out: Outcome,
}

pub(crate) struct Stop;

type Flow<T = ()> = std::result::Result<T, Stop>;

/// Where grouped samples go: the shuffle buffer, or (while restoring) a collector of wanted indices.
enum Sink<'a> {
    Shuffle(&'a mut ShuffleBuffer<RawSample>),
    Collect {
        wanted: &'a BTreeSet<u64>,
        found: &'a mut BTreeMap<u64, RawSample>,
        next: u64,
    },
}

/// What the reader shares with the consumer and the decode threads.
pub(crate) struct Links {
    /// Set when the loader stops or restarts.
    pub stop: Arc<AtomicBool>,
    /// One token per sample the consumer has room for (bounds the samples in flight).
    pub tokens: Receiver<()>,
    /// Samples for the decode threads.
    pub work: Sender<Work>,
    /// Events, straight to the consumer.
    pub results: Sender<Done>,
}

pub(crate) struct Reader {
    pub cfg: LoaderConfig,
    pub urls: Arc<Vec<String>>,
    pub stats: Arc<Stats>,
    pub stop: Arc<AtomicBool>,
    pub tokens: Receiver<()>,
    pub work: Sender<Work>,
    pub results: Sender<Done>,
    pub start: ResumeState,
    seq: u64,
    pos: u64,
    resume_at: u64,
    replayed: u64,
    consecutive_rejects: u64,
    epoch: u64,
    ordinal: u64,
}

impl Reader {
    pub fn new(
        cfg: LoaderConfig,
        urls: Arc<Vec<String>>,
        stats: Arc<Stats>,
        links: Links,
        start: ResumeState,
    ) -> Self {
        let (pos, resume_at, epoch) = (start.epoch_start, start.position, start.epoch);
        let Links {
            stop,
            tokens,
            work,
            results,
        } = links;
        Reader {
            cfg,
            urls,
            stats,
            stop,
            tokens,
            work,
            results,
            start,
            seq: 0,
            pos,
            resume_at,
            replayed: 0,
            consecutive_rejects: 0,
            epoch,
            ordinal: 0,
        }
    }

    fn event(&mut self, ev: Event) -> Flow {
        let seq = self.seq;
        self.seq += 1;
        self.results
            .send(Done {
                seq,
                out: Outcome::Event(ev),
            })
            .map_err(|_| Stop)
    }

    fn fail(&mut self, e: Error) -> Stop {
        let _ = self.event(Event::Error(e));
        Stop
    }

    pub fn run(mut self) {
        let _ = self.run_inner();
    }

    fn run_inner(&mut self) -> Flow {
        let c = self.cfg.clone();
        let counts = std::mem::take(&mut self.start.shard_counts);
        if c.resampled {
            let mut draws = Resampler::new(self.urls.len(), c.seed, c.rank);
            let mut shuffle = ShuffleBuffer::new(
                c.shuffle_buffer,
                Rng::from_parts(&[c.seed, stream::SHUFFLE, c.rank as u64, 0]),
            );
            if !counts.is_empty() {
                let drawn: Vec<String> = counts
                    .iter()
                    .map(|_| self.urls[draws.next_index()].clone())
                    .collect();
                shuffle = self.restore(shuffle, &drawn, &counts)?;
            }
            let limit = (3 * self.urls.len() as u64).max(10);
            let mut empty_run = 0u64;
            loop {
                let url = self.urls[draws.next_index()].clone();
                let n = self.read_shard(&url, &mut Sink::Shuffle(&mut shuffle))?;
                self.shard_done(n)?;
                if n == 0 {
                    empty_run += 1;
                    if empty_run >= limit {
                        return Err(self.fail(Error::NoData(format!(
                            "{empty_run} shard draws in a row gave no sample (last: {url}); every source seems to fail"
                        ))));
                    }
                } else {
                    empty_run = 0;
                }
            }
        }
        let mut counts = Some(counts);
        while c.epochs.is_none_or(|n| self.epoch < n) {
            let shards = epoch_shards(
                &self.urls,
                c.seed,
                self.epoch,
                c.shuffle_buffer > 0,
                c.rank,
                c.world_size,
            );
            let mut shuffle = ShuffleBuffer::new(
                c.shuffle_buffer,
                Rng::from_parts(&[c.seed, stream::SHUFFLE, c.rank as u64, self.epoch]),
            );
            self.replayed = 0;
            self.ordinal = 0;
            let first = match counts.take() {
                Some(k) if !k.is_empty() => {
                    if k.len() > shards.len() {
                        return Err(self.fail(Error::State(
                            "state_dict: more shard counts than shards in the epoch".into(),
                        )));
                    }
                    shuffle = self.restore(shuffle, &shards[..k.len()], &k)?;
                    k.len()
                }
                _ => 0,
            };
            for url in &shards[first..] {
                let n = self.read_shard(url, &mut Sink::Shuffle(&mut shuffle))?;
                self.shard_done(n)?;
            }
            while let Some(s) = shuffle.pop() {
                self.emit(s)?;
            }
            let (next_start, replayed) = (self.pos, self.replayed);
            self.event(Event::EpochEnd {
                next_start,
                replayed,
            })?;
            self.epoch += 1;
            self.resume_at = self.resume_at.min(self.pos); // only the first epoch after a resume replays
        }
        self.event(Event::End)
    }

    fn shard_done(&mut self, count: u64) -> Flow {
        self.ordinal += 1;
        self.event(Event::ShardDone { count })
    }

    /// Rebuilds the shuffle buffer as it was after `urls[..counts.len()]` were read (see module docs).
    fn restore(
        &mut self,
        shuffle: ShuffleBuffer<RawSample>,
        urls: &[String],
        counts: &[u64],
    ) -> Flow<ShuffleBuffer<RawSample>> {
        let mut sim: ShuffleBuffer<(usize, u64)> = shuffle.map(|_| unreachable!("empty buffer"));
        for (j, &n) in counts.iter().enumerate() {
            for i in 0..n {
                if sim.push((j, i)).is_some() {
                    self.pos += 1;
                    self.replayed += 1;
                }
            }
        }
        if self.pos > self.resume_at {
            return Err(self.fail(Error::State(
                "state_dict is inconsistent (shard counts past its position)".into(),
            )));
        }
        let mut wanted: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
        for &(j, i) in sim.items() {
            wanted.entry(j).or_default().insert(i);
        }
        let mut found: BTreeMap<(usize, u64), RawSample> = BTreeMap::new();
        for (j, idx) in &wanted {
            let mut got = BTreeMap::new();
            self.read_shard(
                &urls[*j],
                &mut Sink::Collect {
                    wanted: idx,
                    found: &mut got,
                    next: 0,
                },
            )?;
            if got.len() != idx.len() {
                let e = Error::Source {
                    shard: urls[*j].clone(),
                    offset: 0,
                    message: format!("re-reading the shard to resume gave {} of the {} samples needed; did it change?", got.len(), idx.len()),
                };
                return Err(self.fail(e));
            }
            found.extend(got.into_iter().map(|(i, s)| ((*j, i), s)));
        }
        self.ordinal = counts.len() as u64;
        Ok(sim.map(|key| found.remove(&key).expect("collected")))
    }

    /// Hands one sample out of the shuffle buffer to the decoders (or skips it while replaying).
    fn emit(&mut self, raw: RawSample) -> Flow {
        let pos = self.pos;
        self.pos += 1;
        if pos < self.resume_at {
            self.replayed += 1;
            return Ok(());
        }
        loop {
            match self.tokens.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => break,
                Err(RecvTimeoutError::Timeout) if !self.stop.load(Ordering::Relaxed) => {}
                Err(_) => return Err(Stop),
            }
        }
        let seq = self.seq;
        self.seq += 1;
        let (epoch, ordinal) = (self.epoch, self.ordinal);
        self.work
            .send(Work {
                seq,
                pos,
                epoch,
                ordinal,
                raw,
            })
            .map_err(|_| Stop)
    }

    fn reject(&mut self, why: Reject, shard: &str) -> Flow {
        let c = match why {
            Reject::MissingImage => &self.stats.missing_image,
            Reject::MissingCaption => &self.stats.missing_caption,
            Reject::Filtered => &self.stats.filtered,
        };
        add(c, 1);
        self.consecutive_rejects += 1;
        if self.consecutive_rejects >= self.cfg.max_consecutive_rejections {
            let e = Error::TooManyRejections {
                count: self.consecutive_rejects,
                shard: shard.to_string(),
                reason: why.name().to_string(),
            };
            return Err(self.fail(e));
        }
        Ok(())
    }

    /// Streams one shard into `sink`; returns how many samples it contributed.
    fn read_shard(&mut self, url: &str, sink: &mut Sink) -> Flow<u64> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(Stop);
        }
        add(&self.stats.shards_opened, 1);
        let t0 = Instant::now();
        let src = match open(url, &self.cfg.source) {
            Ok(s) => s,
            Err(e) => {
                add_time(&self.stats.read_ns, t0.elapsed());
                add(&self.stats.source_error, 1);
                add(&self.stats.shards_failed, 1);
                return if self.cfg.on_error == OnError::Raise {
                    Err(self.fail(e))
                } else {
                    Ok(0)
                };
            }
        };
        let shard: Arc<str> = Arc::from(url);
        let mut tar = TarReader::new(src, url);
        let mut grouper = if self.cfg.raw {
            Grouper::keep_all()
        } else {
            Grouper::default()
        };
        let mut count = 0u64;
        let mut last_bytes = 0u64;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(Stop);
            }
            let t = Instant::now();
            let next = tar.next_entry();
            add_time(&self.stats.read_ns, t.elapsed());
            add(&self.stats.bytes_read, tar.bytes_read - last_bytes);
            last_bytes = tar.bytes_read;
            match next {
                Ok(Some(entry)) => {
                    if let Some(g) = grouper.push(entry) {
                        count += self.take_group(g, &shard, sink)?;
                    }
                }
                Ok(None) => {
                    if let Some(g) = grouper.finish() {
                        count += self.take_group(g, &shard, sink)?;
                    }
                    return Ok(count);
                }
                Err(e) => {
                    // Like webdataset, the group in progress keeps the members read completely before the error
                    // (a sample missing its image or caption because of the cut is then skipped as such).
                    if let Some(g) = grouper.finish() {
                        count += self.take_group(g, &shard, sink)?;
                    }
                    add(&self.stats.shards_failed, 1);
                    match &e {
                        Error::Source { .. } | Error::Io { .. } => add(&self.stats.source_error, 1),
                        _ => add(&self.stats.truncated_tar, 1),
                    }
                    return if self.cfg.on_error == OnError::Raise {
                        Err(self.fail(e))
                    } else {
                        Ok(count)
                    };
                }
            }
        }
    }

    fn take_group(&mut self, g: Group, shard: &Arc<str>, sink: &mut Sink) -> Flow<u64> {
        add(&self.stats.samples_read, 1);
        let picked = if self.cfg.raw {
            select_raw(g, shard, &self.cfg.filters)
        } else {
            select(g, shard, &self.cfg.filters)
        };
        match picked {
            Ok(s) => {
                self.consecutive_rejects = 0;
                match sink {
                    Sink::Shuffle(buf) => {
                        if let Some(out) = buf.push(s) {
                            self.emit(out)?;
                        }
                    }
                    Sink::Collect {
                        wanted,
                        found,
                        next,
                    } => {
                        if wanted.contains(next) {
                            found.insert(*next, s);
                        }
                        *next += 1;
                    }
                }
                Ok(1)
            }
            Err(why) => {
                self.reject(why, shard)?;
                Ok(0)
            }
        }
    }
}
