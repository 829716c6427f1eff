//! A decode thread: takes samples from the reader (in any order, from a shared queue), decodes and transforms
//! them (raw mode: checks their `latent.safetensors` framing) and sends each result back tagged with its
//! sequence number, so that the consumer can restore stream order.
//!
//! A panic inside a decoder is caught and becomes a counted decode error of that one sample; the thread's
//! scratch buffers are then rebuilt. Pixel buffers are recycled through a pool shared with the consumer.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::batch::DecodedSample;
use crate::decode::{process, DecodeOptions, Scratch};
use crate::error::Error;
use crate::reader::{Done, Outcome, Work};
use crate::rng::{stream, Rng};
use crate::safetensors;
use crate::stats::{add_time, Stats};

/// Spare R×R×3 pixel buffers, returned by the consumer once their batch is written.
pub(crate) type Pool = Arc<Mutex<Vec<Vec<u8>>>>;

/// Everything one decode thread needs.
pub(crate) struct Worker {
    pub work: Arc<Mutex<Receiver<Work>>>,
    pub results: Sender<Done>,
    pub stop: Arc<AtomicBool>,
    pub stats: Arc<Stats>,
    pub pool: Pool,
    pub opts: DecodeOptions,
    /// The loader's seed: crop and flip draws come from `(seed, stream position)`.
    pub seed: u64,
    /// Raw mode: check the latent member instead of decoding an image.
    pub raw: bool,
}

impl Worker {
    /// Runs until the work queue closes, the consumer goes away or `stop` is set.
    pub fn run(self) {
        let mut scratch = Scratch::default();
        loop {
            let w = {
                let guard = self.work.lock().unwrap_or_else(|p| p.into_inner());
                match guard.recv() {
                    Ok(w) => w,
                    Err(_) => return,
                }
            };
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let seq = w.seq;
            let out = self.handle(w, &mut scratch);
            if self.results.send(Done { seq, out }).is_err() {
                return;
            }
        }
    }

    /// Decodes one sample (or checks it, in raw mode) into its outcome.
    fn handle(&self, w: Work, scratch: &mut Scratch) -> Outcome {
        let t0 = Instant::now();
        let mut pixels = if self.raw {
            Vec::new()
        } else {
            self.pool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
                .unwrap_or_default()
        };
        let mut rng = Rng::from_parts(&[self.seed, stream::SAMPLE, w.pos]);
        let mut raw = w.raw;
        let res = catch_unwind(AssertUnwindSafe(|| {
            if self.raw {
                safetensors::check_sample(&raw)
            } else {
                process(&raw.image, &mut rng, &self.opts, scratch, &mut pixels)
            }
        }));
        add_time(&self.stats.decode_ns, t0.elapsed());
        let message = match res {
            Ok(Ok(placement)) => {
                let sample = DecodedSample {
                    key: raw.key,
                    caption: String::from_utf8_lossy(&raw.caption).into_owned(),
                    json: raw.json,
                    shard: raw.shard,
                    placement,
                    pixels,
                    members: std::mem::take(&mut raw.members),
                };
                return Outcome::Decoded {
                    epoch: w.epoch,
                    pos: w.pos,
                    ordinal: w.ordinal,
                    sample,
                };
            }
            Ok(Err(m)) => m,
            Err(_) => {
                *scratch = Scratch::default();
                "decoder panicked".to_string()
            }
        };
        Outcome::Failed {
            err: Error::Decode {
                shard: raw.shard.to_string(),
                member: raw.image_member,
                offset: raw.image_offset,
                message,
            },
            shard: raw.shard.to_string(),
        }
    }
}
