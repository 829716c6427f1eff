//! The shards each rank reads: the split of the expanded URL list across ranks per epoch (or seeded
//! resampling with replacement), and what kind of source each URL names. Specs are expanded by [`crate::spec`].

use crate::rng::{stream, Rng};

/// The shards rank `rank` reads in `epoch` (without resampling): all URLs, shuffled by `(seed, epoch)` when
/// `shuffle` is set (the same permutation on every rank), then every `world`-th one starting at `rank`.
/// The ranks' lists are disjoint and together cover every URL once.
pub fn epoch_shards(
    urls: &[String],
    seed: u64,
    epoch: u64,
    shuffle: bool,
    rank: usize,
    world: usize,
) -> Vec<String> {
    let mut idx: Vec<usize> = (0..urls.len()).collect();
    if shuffle {
        Rng::from_parts(&[seed, stream::SHARD_ORDER, epoch]).shuffle(&mut idx);
    }
    idx.into_iter()
        .skip(rank)
        .step_by(world.max(1))
        .map(|i| urls[i].clone())
        .collect()
}

/// Infinite seeded draws with replacement for one rank (`resampled=True`).
pub struct Resampler {
    rng: Rng,
    n: u64,
}

impl Resampler {
    pub fn new(num_urls: usize, seed: u64, rank: usize) -> Self {
        Resampler {
            rng: Rng::from_parts(&[seed, stream::RESAMPLE, rank as u64]),
            n: num_urls as u64,
        }
    }

    pub fn next_index(&mut self) -> usize {
        self.rng.below(self.n) as usize
    }
}

/// The kind of byte source a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    File(String),
    Http(String),
    Pipe(String),
}

pub fn locate(url: &str) -> Location {
    if let Some(cmd) = url.strip_prefix("pipe:") {
        Location::Pipe(cmd.to_string())
    } else if url.starts_with("http://") || url.starts_with("https://") {
        Location::Http(url.to_string())
    } else if let Some(p) = url.strip_prefix("file://") {
        Location::File(p.to_string())
    } else if let Some(p) = url.strip_prefix("file:") {
        Location::File(p.to_string())
    } else {
        Location::File(url.to_string())
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_split_has_no_duplicates_and_covers_all() {
        let urls: Vec<String> = (0..23).map(|i| format!("s{i}")).collect();
        for shuffle in [false, true] {
            for world in [1, 2, 3, 5, 8] {
                let mut all: Vec<String> = (0..world)
                    .flat_map(|r| epoch_shards(&urls, 9, 4, shuffle, r, world))
                    .collect();
                all.sort();
                let mut expect = urls.clone();
                expect.sort();
                assert_eq!(all, expect, "world {world} shuffle {shuffle}");
            }
        }
        assert_ne!(
            epoch_shards(&urls, 9, 0, true, 0, 1),
            epoch_shards(&urls, 9, 1, true, 0, 1),
            "reshuffled per epoch"
        );
        assert_eq!(
            epoch_shards(&urls, 9, 0, false, 1, 4),
            vec!["s1", "s5", "s9", "s13", "s17", "s21"]
        );
    }

    #[test]
    fn resampling_is_seeded_per_rank() {
        let draw = |seed, rank| {
            let mut r = Resampler::new(10, seed, rank);
            (0..20).map(|_| r.next_index()).collect::<Vec<_>>()
        };
        assert_eq!(draw(1, 0), draw(1, 0));
        assert_ne!(draw(1, 0), draw(1, 1));
        assert!(draw(2, 3).iter().all(|&i| i < 10));
    }

    #[test]
    fn locations() {
        assert_eq!(locate("file:///x/a.tar"), Location::File("/x/a.tar".into()));
        assert_eq!(locate("/x/a.tar"), Location::File("/x/a.tar".into()));
        assert_eq!(
            locate("https://h/a.tar"),
            Location::Http("https://h/a.tar".into())
        );
        assert_eq!(locate("pipe:cat a.tar"), Location::Pipe("cat a.tar".into()));
    }
}
