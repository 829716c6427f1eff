//! Shard specs → concrete shard URLs: brace expansion, `::` lists, and the split across ranks
//! (or seeded resampling with replacement).

use crate::error::{Error, Result};
use crate::rng::{stream, Rng};

/// Upper bound on the number of URLs one spec may expand to (guards against typos like `{0..99999999999}`).
pub const MAX_EXPANSION: usize = 10_000_000;

/// Expands one spec string: `::`-separated parts, each brace-expanded (`{a,b}`, `{000..099}`, nested).
pub fn expand_spec(spec: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for part in spec.split("::") {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        out.extend(expand_braces(part)?);
        if out.len() > MAX_EXPANSION {
            return Err(Error::InvalidArgument(format!(
                "shards: '{spec}' expands to more than {MAX_EXPANSION} URLs"
            )));
        }
    }
    Ok(out)
}

/// Expands all specs in order; errors if the result is empty.
pub fn expand_specs(specs: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for s in specs {
        out.extend(expand_spec(s)?);
    }
    if out.is_empty() {
        return Err(Error::InvalidArgument(
            "shards: the spec expands to no shard".into(),
        ));
    }
    Ok(out)
}

/// Brace expansion like the `braceexpand` package webdataset uses.
pub fn expand_braces(s: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    expand_from(s.to_string(), 0, &mut out)?;
    Ok(out)
}

fn expand_from(s: String, start: usize, out: &mut Vec<String>) -> Result<()> {
    let bytes = s.as_bytes();
    let mut i = start;
    while i < bytes.len() {
        if bytes[i] == b'{' {
            if let Some(close) = matching_brace(bytes, i) {
                let inner = &s[i + 1..close];
                if let Some(alts) = alternatives(inner)? {
                    let (prefix, suffix) = (&s[..i], &s[close + 1..]);
                    for alt in alts {
                        if out.len() > MAX_EXPANSION {
                            return Err(Error::InvalidArgument(format!(
                                "shards: brace pattern expands to more than {MAX_EXPANSION} URLs"
                            )));
                        }
                        expand_from(format!("{prefix}{alt}{suffix}"), i, out)?;
                    }
                    return Ok(());
                }
            }
        }
        i += 1;
    }
    out.push(s);
    Ok(())
}

fn matching_brace(b: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (j, &c) in b.iter().enumerate().skip(open) {
        match c {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(j);
                }
            }
            _ => {}
        }
    }
    None
}

/// The alternatives a brace group stands for, or None if it is a literal (`{}`, `{x}`).
fn alternatives(inner: &str) -> Result<Option<Vec<String>>> {
    // Top-level commas → list.
    let mut parts = Vec::new();
    let (mut depth, mut last) = (0usize, 0usize);
    for (j, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(inner[last..j].to_string());
                last = j + 1;
            }
            _ => {}
        }
    }
    if !parts.is_empty() {
        parts.push(inner[last..].to_string());
        return Ok(Some(parts));
    }
    let fields: Vec<&str> = inner.split("..").collect();
    if fields.len() == 2 || fields.len() == 3 {
        let step: i64 = match fields.get(2) {
            Some(s) => match s.parse::<i64>() {
                Ok(v) if v != 0 => v.abs(),
                _ => return Ok(None),
            },
            None => 1,
        };
        if let (Ok(a), Ok(b)) = (fields[0].parse::<i64>(), fields[1].parse::<i64>()) {
            let padded = |f: &str| {
                let d = f.trim_start_matches('-');
                d.len() > 1 && d.starts_with('0')
            };
            let width = if padded(fields[0]) || padded(fields[1]) {
                fields[0].len().max(fields[1].len())
            } else {
                0
            };
            let count = ((a - b).unsigned_abs() / step as u64) as usize + 1;
            if count > MAX_EXPANSION {
                return Err(Error::InvalidArgument(format!(
                    "shards: range {{{inner}}} has more than {MAX_EXPANSION} values"
                )));
            }
            let dir = if b >= a { step } else { -step };
            return Ok(Some(
                (0..count as i64)
                    .map(|k| format!("{:0width$}", a + k * dir, width = width))
                    .collect(),
            ));
        }
        let (ca, cb) = (
            fields[0].chars().collect::<Vec<_>>(),
            fields[1].chars().collect::<Vec<_>>(),
        );
        if ca.len() == 1
            && cb.len() == 1
            && ca[0].is_ascii_alphabetic()
            && cb[0].is_ascii_alphabetic()
        {
            let (a, b) = (ca[0] as i64, cb[0] as i64);
            let dir = if b >= a { step } else { -step };
            let count = (a - b).abs() / step + 1;
            return Ok(Some(
                (0..count)
                    .map(|k| ((a + k * dir) as u8 as char).to_string())
                    .collect(),
            ));
        }
    }
    Ok(None)
}

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
    fn ranges_keep_zero_padding() {
        assert_eq!(
            expand_braces("/d/{00000..00002}.tar").unwrap(),
            vec!["/d/00000.tar", "/d/00001.tar", "/d/00002.tar"]
        );
        assert_eq!(
            expand_braces("{8..11}").unwrap(),
            vec!["8", "9", "10", "11"]
        );
        assert_eq!(expand_braces("{08..10}").unwrap(), vec!["08", "09", "10"]);
        assert_eq!(expand_braces("{3..1}").unwrap(), vec!["3", "2", "1"]);
        assert_eq!(expand_braces("{0..6..3}").unwrap(), vec!["0", "3", "6"]);
    }

    #[test]
    fn lists_nesting_and_literals() {
        assert_eq!(expand_braces("x{a,b}y").unwrap(), vec!["xay", "xby"]);
        assert_eq!(expand_braces("{a,b{1..2}}").unwrap(), vec!["a", "b1", "b2"]);
        assert_eq!(
            expand_braces("{a,b}-{0..1}").unwrap(),
            vec!["a-0", "a-1", "b-0", "b-1"]
        );
        assert_eq!(expand_braces("lit{x}{").unwrap(), vec!["lit{x}{"]);
        assert_eq!(
            expand_spec("a.tar::{b,c}.tar:: ").unwrap(),
            vec!["a.tar", "b.tar", "c.tar"]
        );
        assert_eq!(
            expand_spec("pipe:curl -s https://h/{0..1}.tar").unwrap(),
            vec![
                "pipe:curl -s https://h/0.tar",
                "pipe:curl -s https://h/1.tar"
            ]
        );
        assert!(expand_braces("{0..99999999999}").is_err());
        assert!(expand_specs(&["::".to_string()]).is_err());
    }

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
