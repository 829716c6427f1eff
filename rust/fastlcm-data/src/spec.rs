//! Shard specs → shard URLs: `::` lists and brace expansion, as webdataset does them.
//!
//! The grammar is that of the `braceexpand` package webdataset uses (its behaviour is the reference;
//! `tests/data/test_shard_grammar.py` compares the two on a grid of specs): a spec is split on `::` (empty parts
//! are skipped: they name no shard), and each part is brace-expanded:
//!
//! - `{a,b,c}` lists alternatives (each may contain groups itself, and may be empty);
//! - `{000..099}`, `{5..1}`, `{-2..2}`, `{0..10..5}` are integer ranges, zero-padded to the longer bound when
//!   a bound has a leading zero; `{a..e}`, `{Z..a}` letter ranges over `A..=Z` then `a..=z`; a step's sign is
//!   ignored and a step of 0 means 1;
//! - any other group (`{}`, `{x}`) is literal text, in which groups are still expanded;
//! - `\` escapes the next character (`\{`, `\,`) and is removed from the result (once per level of
//!   nesting, as braceexpand does);
//! - groups multiply left to right (the leftmost varies slowest); unbalanced braces are an error.
//!
//! Every expansion is counted before any URL is built and refused beyond [`MAX_EXPANSION`].

use crate::error::{Error, Result};

/// Upper bound on the number of URLs the specs of one loader may expand to (guards against typos like
/// `{0..99999999999}`).
pub const MAX_EXPANSION: usize = 10_000_000;

/// Why a pattern cannot be expanded (turned into an error naming the spec by [`Bad::error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bad {
    Unbalanced,
    BigNumber,
    TooMany,
}

impl Bad {
    fn error(self, spec: &str) -> Error {
        Error::InvalidArgument(match self {
            Bad::Unbalanced => {
                format!("shards: '{spec}' has unbalanced braces (write a literal brace as \\{{ or \\}})")
            }
            Bad::BigNumber => format!("shards: '{spec}' has a range bound of more than 38 digits"),
            Bad::TooMany => format!("shards: '{spec}' expands to more than {MAX_EXPANSION} URLs"),
        })
    }
}

/// Expands one spec string: its `::`-separated parts, each brace-expanded, empty parts skipped.
pub fn expand_spec(spec: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    expand_into(spec, MAX_EXPANSION, &mut out).map_err(|b| b.error(spec))?;
    Ok(out)
}

/// Expands all specs in order; errors if the result is empty or has more than [`MAX_EXPANSION`] URLs.
pub fn expand_specs(specs: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for s in specs {
        expand_into(s, MAX_EXPANSION - out.len(), &mut out).map_err(|b| b.error(s))?;
    }
    if out.is_empty() {
        return Err(Error::InvalidArgument(
            "shards: the spec expands to no shard".into(),
        ));
    }
    Ok(out)
}

/// Brace expansion of one pattern (no `::` splitting), like `braceexpand.braceexpand`.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    braces_into(pattern, MAX_EXPANSION, &mut out).map_err(|b| b.error(pattern))?;
    Ok(out)
}

/// Appends the URLs of `spec` to `out`, refusing more than `budget` of them (and then appending none).
fn expand_into(spec: &str, budget: usize, out: &mut Vec<String>) -> Result<(), Bad> {
    let start = out.len();
    for part in spec.split("::").filter(|p| !p.is_empty()) {
        let left = budget - (out.len() - start);
        if let Err(b) = braces_into(part, left, out) {
            out.truncate(start);
            return Err(b);
        }
    }
    Ok(())
}

/// Appends the expansion of `pattern` to `out` if it has at most `budget` strings.
fn braces_into(pattern: &str, budget: usize, out: &mut Vec<String>) -> Result<(), Bad> {
    let parsed = parse_pattern(pattern)?;
    if count(&parsed) > budget as u128 {
        return Err(Bad::TooMany);
    }
    out.extend(expand(&parsed));
    Ok(())
}

/// One piece of a parsed pattern; a pattern is the product of its pieces.
#[derive(Debug)]
enum Piece {
    /// Literal text (escapes still in it).
    Text(String),
    /// `{p,q,…}`: the strings of each alternative, one alternative after the other.
    Choice(Vec<Vec<Piece>>),
    /// The inside of a literal group (`{x}` is `{`, this, `}`), expanded on its own.
    Nested(Vec<Piece>),
    /// `{start..end..step}` of integers, printed `width` wide with leading zeros.
    Ints {
        start: i128,
        descending: bool,
        step: u128,
        count: u128,
        width: usize,
    },
    /// `{x..y..step}` of letters, stepping through [`LETTERS`].
    Letters {
        start: usize,
        descending: bool,
        step: usize,
        count: usize,
    },
}

/// The order letter ranges step through (so `{Z..a}` is `Z a`, as in braceexpand).
const LETTERS: &[u8; 52] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Splits `s` into literal text and groups. A group is what lies between a `{` at depth 0 and the `}` that
/// brings the depth back to 0; a `}` at depth 0 takes the depth below 0 and the rest stays text, as in
/// braceexpand (`a}{b` is literal; the pattern is refused only if the depth is not 0 at its end).
fn parse_pattern(s: &str) -> Result<Vec<Piece>, Bad> {
    let b = s.as_bytes();
    let (mut pos, mut start, mut depth) = (0usize, 0usize, 0i64);
    let mut pieces = Vec::new();
    while pos < b.len() {
        match b[pos] {
            b'\\' => {
                pos += 2;
                continue;
            }
            b'{' => {
                if depth == 0 && pos > start {
                    pieces.push(Piece::Text(s[start..pos].to_string()));
                    start = pos;
                }
                depth += 1;
            }
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    let inner = &s[start + 1..pos];
                    match group(inner)? {
                        Some(p) => pieces.push(p),
                        None => {
                            pieces.push(Piece::Text("{".into()));
                            pieces.push(Piece::Nested(parse_pattern(inner)?));
                            pieces.push(Piece::Text("}".into()));
                        }
                    }
                    start = pos + 1;
                }
            }
            _ => {}
        }
        pos += 1;
    }
    if depth != 0 {
        return Err(Bad::Unbalanced);
    }
    if start < b.len() {
        pieces.push(Piece::Text(s[start..].to_string()));
    }
    Ok(pieces)
}

/// What the inside of a group stands for: an integer or letter range, a list, or None (literal text).
fn group(inner: &str) -> Result<Option<Piece>, Bad> {
    if let Some(p) = range(inner)? {
        return Ok(Some(p));
    }
    let b = inner.as_bytes();
    let (mut pos, mut depth, mut last) = (0usize, 0i64, 0usize);
    let mut alts = Vec::new();
    while pos < b.len() {
        match b[pos] {
            b'\\' => {
                pos += 2;
                continue;
            }
            b'{' => depth += 1,
            b'}' => depth -= 1,
            b',' if depth == 0 => {
                alts.push(parse_pattern(&inner[last..pos])?);
                last = pos + 1;
            }
            _ => {}
        }
        pos += 1;
    }
    if depth != 0 || alts.is_empty() {
        return Ok(None);
    }
    alts.push(parse_pattern(&inner[last..])?);
    Ok(Some(Piece::Choice(alts)))
}

/// `a..b` or `a..b..step` with integer bounds (`-?[0-9]+`) or single-letter bounds, and a step `-?[0-9]+`.
fn range(inner: &str) -> Result<Option<Piece>, Bad> {
    let fields: Vec<&str> = inner.split("..").collect();
    if !(2..=3).contains(&fields.len()) {
        return Ok(None);
    }
    let step = match fields.get(2) {
        None => 1,
        Some(f) if is_int(f) => {
            // The sign is ignored and 0 means 1; a step past u128 is as good as infinite.
            let digits = f.trim_start_matches('-');
            digits.parse::<u128>().unwrap_or(u128::MAX).max(1)
        }
        Some(_) => return Ok(None),
    };
    let (a, z) = (fields[0], fields[1]);
    if is_int(a) && is_int(z) {
        let (start, end) = match (a.parse::<i128>(), z.parse::<i128>()) {
            (Ok(s), Ok(e)) => (s, e),
            _ => return Err(Bad::BigNumber),
        };
        let padded = |f: &str| f != "0" && f != "-0" && (f.starts_with('0') || f.starts_with("-0"));
        let width = if padded(a) || padded(z) {
            a.len().max(z.len())
        } else {
            0
        };
        return Ok(Some(Piece::Ints {
            start,
            descending: start >= end,
            step,
            count: start.abs_diff(end) / step + 1,
            width,
        }));
    }
    let letter = |f: &str| match f.as_bytes() {
        [c] => LETTERS.iter().position(|l| l == c),
        _ => None,
    };
    if let (Some(start), Some(end)) = (letter(a), letter(z)) {
        let step = usize::try_from(step).unwrap_or(usize::MAX);
        return Ok(Some(Piece::Letters {
            start,
            descending: start >= end,
            step,
            count: start.abs_diff(end) / step + 1,
        }));
    }
    Ok(None)
}

/// `-?[0-9]+`.
fn is_int(f: &str) -> bool {
    let digits = f.strip_prefix('-').unwrap_or(f);
    !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit())
}

/// How many strings a pattern stands for (saturating).
fn count(pattern: &[Piece]) -> u128 {
    pattern.iter().fold(1u128, |n, p| {
        n.saturating_mul(match p {
            Piece::Text(_) => 1,
            Piece::Choice(alts) => alts.iter().fold(0u128, |m, a| m.saturating_add(count(a))),
            Piece::Nested(p) => count(p),
            Piece::Ints { count, .. } => *count,
            Piece::Letters { count, .. } => *count as u128,
        })
    })
}

/// Every string of a pattern whose count was checked; the leftmost piece varies slowest. Each string has its
/// escapes removed, so a nested pattern (an alternative, the inside of a literal group) loses one level of
/// escapes per level of nesting, as in braceexpand.
fn expand(pattern: &[Piece]) -> Vec<String> {
    let mut acc = vec![String::new()];
    for piece in pattern {
        let values = values(piece);
        acc = acc
            .iter()
            .flat_map(|a| values.iter().map(move |v| format!("{a}{v}")))
            .collect();
    }
    acc.iter().map(|s| unescape(s)).collect()
}

/// The strings one piece stands for, in order.
fn values(piece: &Piece) -> Vec<String> {
    match piece {
        Piece::Text(t) => vec![t.clone()],
        Piece::Choice(alts) => alts.iter().flat_map(|a| expand(a)).collect(),
        Piece::Nested(p) => expand(p),
        &Piece::Ints {
            start,
            descending,
            step,
            count,
            width,
        } => (0..count)
            .map(|k| {
                // Within [start, end]: no overflow.
                let v = if descending {
                    start.checked_sub_unsigned(k * step)
                } else {
                    start.checked_add_unsigned(k * step)
                };
                format!(
                    "{:0width$}",
                    v.expect("range value lies between its bounds")
                )
            })
            .collect(),
        &Piece::Letters {
            start,
            descending,
            step,
            count,
        } => (0..count)
            .map(|k| {
                let i = if descending {
                    start - k * step
                } else {
                    start + k * step
                };
                char::from(LETTERS[i]).to_string()
            })
            .collect(),
    }
}

/// Removes escapes: `\x` becomes `x` for any character but a newline.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(&n)) if n != '\n' => {
                out.push(n);
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
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
        assert_eq!(
            expand_braces("{-05..1..-3}").unwrap(),
            vec!["-05", "-02", "001"]
        );
        assert_eq!(expand_braces("{2..2..0}").unwrap(), vec!["2"]);
    }

    #[test]
    fn letter_ranges_step_through_upper_then_lower_case() {
        assert_eq!(expand_braces("{a..c}").unwrap(), vec!["a", "b", "c"]);
        assert_eq!(expand_braces("{Y..b}").unwrap(), vec!["Y", "Z", "a", "b"]);
        assert_eq!(
            expand_braces("{c..A..2}").unwrap(),
            vec!["c", "a", "Y", "W", "U", "S", "Q", "O", "M", "K", "I", "G", "E", "C", "A"]
        );
    }

    #[test]
    fn lists_nesting_and_literals() {
        assert_eq!(expand_braces("x{a,b}y").unwrap(), vec!["xay", "xby"]);
        assert_eq!(expand_braces("{a,b{1..2}}").unwrap(), vec!["a", "b1", "b2"]);
        assert_eq!(
            expand_braces("{a,b}-{0..1}").unwrap(),
            vec!["a-0", "a-1", "b-0", "b-1"]
        );
        assert_eq!(expand_braces("lit{x}{}").unwrap(), vec!["lit{x}{}"]);
        assert_eq!(expand_braces("{x{1,2}}").unwrap(), vec!["{x1}", "{x2}"]);
        assert_eq!(expand_braces("a}{b{1,2}").unwrap(), vec!["a}{b1", "a}{b2"]);
        assert_eq!(
            expand_braces(r"\{0..1\},{a\,b}").unwrap(),
            vec!["{0..1},{a,b}"]
        );
        assert_eq!(
            expand_spec("a.tar::{b,c}.tar::").unwrap(),
            vec!["a.tar", "b.tar", "c.tar"]
        );
        assert_eq!(
            expand_spec("pipe:curl -s https://h/{0..1}.tar").unwrap(),
            vec![
                "pipe:curl -s https://h/0.tar",
                "pipe:curl -s https://h/1.tar"
            ]
        );
        assert!(expand_specs(&["::".to_string()]).is_err());
    }

    #[test]
    fn bad_specs_are_refused_naming_the_spec() {
        let msg = |spec: &str| expand_spec(spec).unwrap_err().to_string();
        assert_eq!(
            msg("a::lit{x}{"),
            "invalid argument: shards: 'a::lit{x}{' has unbalanced braces (write a literal brace as \\{ or \\})"
        );
        assert!(msg("{0..99999999999}")
            .contains("'{0..99999999999}' expands to more than 10000000 URLs"));
        assert!(msg("{0..9999}/{0..9999}").contains("expands to more than"));
        assert!(msg(&format!("{{0..{}}}", "9".repeat(39))).contains("more than 38 digits"));
        // The bound counts every part of a spec (and `expand_specs` passes what earlier specs left of it).
        let mut out = vec!["earlier".to_string()];
        assert_eq!(
            expand_into("{0..1}::{0..1}", 3, &mut out),
            Err(Bad::TooMany)
        );
        assert_eq!(out.len(), 1, "nothing appended");
        assert_eq!(expand_into("{0..1}::{0..1}", 4, &mut out), Ok(()));
        assert_eq!(out.len(), 5);
    }
}
