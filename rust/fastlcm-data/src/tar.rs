//! Streaming tar reader (ustar, pax extended headers, GNU long names): no seek, bounds-checked, and an early
//! end of stream is reported as truncation rather than a silent short shard.

use std::io::{self, Read};

use crate::error::{Error, Result};

/// Largest member accepted; bigger declared sizes are a format error (protects memory).
pub const MAX_MEMBER_BYTES: u64 = 1 << 30;
const BLOCK: usize = 512;

/// One regular-file member.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub data: Vec<u8>,
    /// Byte offset of the member's header in the shard stream.
    pub offset: u64,
}

pub struct TarReader<R> {
    inner: R,
    shard: String,
    pos: u64,
    done: bool,
    /// Bytes read from the source so far (for stats).
    pub bytes_read: u64,
}

enum Fill {
    Full,
    Eof,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R, shard: impl Into<String>) -> Self {
        TarReader {
            inner,
            shard: shard.into(),
            pos: 0,
            done: false,
            bytes_read: 0,
        }
    }

    pub fn shard(&self) -> &str {
        &self.shard
    }

    fn source_err(&self, e: io::Error) -> Error {
        Error::Source {
            shard: self.shard.clone(),
            offset: self.pos,
            message: e.to_string(),
        }
    }

    fn tar_err(
        &self,
        offset: u64,
        member: Option<&str>,
        truncated: bool,
        message: impl Into<String>,
    ) -> Error {
        Error::Tar {
            shard: self.shard.clone(),
            member: member.map(str::to_string),
            offset,
            truncated,
            message: message.into(),
        }
    }

    /// Reads exactly `buf.len()` bytes, or reports a clean EOF if none could be read.
    fn fill(&mut self, buf: &mut [u8]) -> Result<Fill> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    self.pos += n as u64;
                    self.bytes_read += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.source_err(e)),
            }
        }
        if got == buf.len() {
            Ok(Fill::Full)
        } else if got == 0 {
            Ok(Fill::Eof)
        } else {
            Err(self.tar_err(
                self.pos,
                None,
                true,
                format!("stream ended inside a {}-byte block", buf.len()),
            ))
        }
    }

    fn read_data(&mut self, size: u64, header_at: u64, member: &str) -> Result<Vec<u8>> {
        let mut data = Vec::with_capacity(size.min(1 << 24) as usize);
        let got = (&mut self.inner)
            .take(size)
            .read_to_end(&mut data)
            .map_err(|e| Error::Source {
                shard: self.shard.clone(),
                offset: self.pos + data.len() as u64,
                message: e.to_string(),
            })? as u64;
        self.pos += got;
        self.bytes_read += got;
        if got < size {
            return Err(self.tar_err(
                header_at,
                Some(member),
                true,
                format!("member declares {size} bytes but the stream ended after {got}"),
            ));
        }
        let pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        if pad > 0 {
            let mut p = [0u8; BLOCK];
            match self.fill(&mut p[..pad as usize]) {
                Ok(Fill::Full) => {}
                // A missing final padding after the last member is tolerated (like Python's tarfile).
                Ok(Fill::Eof) => self.done = true,
                Err(Error::Tar { .. }) => self.done = true,
                Err(e) => return Err(e),
            }
        }
        Ok(data)
    }

    /// Next regular-file member, or None at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        let mut long_name: Option<String> = None;
        let mut pax_path: Option<String> = None;
        let mut pax_size: Option<u64> = None;
        loop {
            if self.done {
                return Ok(None);
            }
            let header_at = self.pos;
            let mut h = [0u8; BLOCK];
            match self.fill(&mut h)? {
                Fill::Eof => {
                    self.done = true;
                    if long_name.is_some() || pax_path.is_some() {
                        return Err(self.tar_err(
                            header_at,
                            None,
                            true,
                            "stream ended after an extended header",
                        ));
                    }
                    return Ok(None);
                }
                Fill::Full => {}
            }
            if h.iter().all(|&b| b == 0) {
                // End-of-archive marker (the second zero block is not required). Drain the rest so a `pipe:`
                // command's exit status and a transfer error after the archive are still seen.
                self.done = true;
                let n =
                    io::copy(&mut self.inner, &mut io::sink()).map_err(|e| self.source_err(e))?;
                self.pos += n;
                self.bytes_read += n;
                return Ok(None);
            }
            let stored = parse_octal(&h[148..156]).ok_or_else(|| {
                self.tar_err(header_at, None, false, "unreadable header checksum")
            })?;
            let computed = header_checksum(&h);
            if stored != computed {
                return Err(self.tar_err(header_at, None, false, format!("header checksum mismatch (stored {stored}, computed {computed}); not a tar stream?")));
            }
            let mut name = header_name(&h);
            let size = parse_size(&h[124..136]).ok_or_else(|| {
                self.tar_err(header_at, Some(&name), false, "unreadable size field")
            })?;
            let size = pax_size.take().unwrap_or(size);
            if size > MAX_MEMBER_BYTES {
                return Err(self.tar_err(
                    header_at,
                    Some(&name),
                    false,
                    format!("member declares {size} bytes (limit {MAX_MEMBER_BYTES})"),
                ));
            }
            let kind = h[156];
            match kind {
                b'L' => {
                    let d = self.read_data(size, header_at, &name)?;
                    long_name = Some(cstr(&d));
                }
                b'x' => {
                    let d = self.read_data(size, header_at, &name)?;
                    let (p, s) = parse_pax(&d).ok_or_else(|| {
                        self.tar_err(header_at, Some(&name), false, "malformed pax header")
                    })?;
                    if p.is_some() {
                        pax_path = p;
                    }
                    if s.is_some() {
                        pax_size = s;
                    }
                }
                b'0' | 0 | b'7' => {
                    if let Some(n) = pax_path.take().or(long_name.take()) {
                        name = n;
                    }
                    let data = self.read_data(size, header_at, &name)?;
                    return Ok(Some(Entry {
                        name,
                        data,
                        offset: header_at,
                    }));
                }
                _ => {
                    // Directories, links, global headers, GNU long link names (K), …: skip the data.
                    let _ = self.read_data(size, header_at, &name)?;
                    if kind != b'K' && kind != b'g' {
                        long_name = None;
                        pax_path = None;
                    }
                }
            }
        }
    }
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn header_name(h: &[u8; BLOCK]) -> String {
    let name = cstr(&h[0..100]);
    if &h[257..262] == b"ustar" {
        let prefix = cstr(&h[345..500]);
        if !prefix.is_empty() {
            return format!("{prefix}/{name}");
        }
    }
    name
}

/// ustar header checksum: the byte sum with the checksum field (148..156) counted as spaces.
fn header_checksum(h: &[u8; BLOCK]) -> u64 {
    h.iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u64
            }
        })
        .sum()
}

fn parse_octal(f: &[u8]) -> Option<u64> {
    let s: Vec<u8> = f
        .iter()
        .copied()
        .skip_while(|&c| c == b' ' || c == 0)
        .take_while(|&c| c != b' ' && c != 0)
        .collect();
    if s.is_empty() {
        return Some(0);
    }
    let mut v: u64 = 0;
    for c in s {
        if !(b'0'..=b'7').contains(&c) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add((c - b'0') as u64)?;
    }
    Some(v)
}

/// Size field: octal, or GNU base-256 when the high bit of the first byte is set.
fn parse_size(f: &[u8]) -> Option<u64> {
    if f[0] & 0x80 != 0 {
        if f[0] & 0x40 != 0 {
            return None; // negative
        }
        let mut v: u64 = (f[0] & 0x3f) as u64;
        for &b in &f[1..] {
            v = v.checked_mul(256)?.checked_add(b as u64)?;
        }
        return Some(v);
    }
    parse_octal(f)
}

/// Records are `"<len> <key>=<value>\n"`; returns (path, size) if present.
fn parse_pax(d: &[u8]) -> Option<(Option<String>, Option<u64>)> {
    let (mut path, mut size) = (None, None);
    let mut rest = d;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        if len <= sp + 1 || len > rest.len() {
            return None;
        }
        let rec = &rest[sp + 1..len];
        let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
        let eq = rec.iter().position(|&b| b == b'=')?;
        let (k, v) = (&rec[..eq], &rec[eq + 1..]);
        match k {
            b"path" => path = Some(String::from_utf8_lossy(v).into_owned()),
            b"size" => size = Some(std::str::from_utf8(v).ok()?.parse().ok()?),
            _ => {}
        }
        rest = &rest[len..];
    }
    Some((path, size))
}

/// Test helpers: build tar bytes in memory (ustar headers, optional pax / GNU long names).
#[cfg(test)]
pub mod build {
    fn header(name: &[u8], size: u64, kind: u8) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        let sum = super::header_checksum(&h);
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h[155] = b' ';
        h
    }

    fn push(out: &mut Vec<u8>, name: &[u8], data: &[u8], kind: u8) {
        out.extend_from_slice(&header(name, data.len() as u64, kind));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    pub enum Long {
        None,
        Pax,
        Gnu,
    }

    pub fn tar(members: &[(&str, &[u8])], long: Long) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in members {
            if name.len() > 100 {
                match long {
                    Long::Pax => {
                        let body = format!("path={name}\n");
                        let mut len = body.len() + 2;
                        while format!("{len} {body}").len() != len {
                            len += 1;
                        }
                        push(
                            &mut out,
                            b"PaxHeader",
                            format!("{len} {body}").as_bytes(),
                            b'x',
                        );
                    }
                    Long::Gnu => push(
                        &mut out,
                        b"././@LongLink",
                        format!("{name}\0").as_bytes(),
                        b'L',
                    ),
                    Long::None => {}
                }
            }
            push(&mut out, name.as_bytes(), data, b'0');
        }
        out.extend_from_slice(&[0u8; 1024]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::build::{tar, Long};
    use super::*;

    fn all(bytes: &[u8]) -> Result<Vec<Entry>> {
        let mut r = TarReader::new(bytes, "t.tar");
        let mut v = Vec::new();
        while let Some(e) = r.next_entry()? {
            v.push(e);
        }
        Ok(v)
    }

    #[test]
    fn reads_members_and_offsets() {
        let t = tar(&[("a.jpg", b"xyz"), ("a.txt", &[7u8; 600])], Long::None);
        let v = all(&t).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].name.as_str(), v[0].data.as_slice(), v[0].offset),
            ("a.jpg", &b"xyz"[..], 0)
        );
        assert_eq!(
            (v[1].name.as_str(), v[1].data.len(), v[1].offset),
            ("a.txt", 600, 1024)
        );
    }

    #[test]
    fn long_names_pax_and_gnu() {
        let long = format!("{}/key.jpg", "d".repeat(150));
        for mode in [Long::Pax, Long::Gnu] {
            let t = tar(&[(&long, b"1"), ("b.txt", b"2")], mode);
            let v = all(&t).unwrap();
            assert_eq!(
                v.iter().map(|e| e.name.clone()).collect::<Vec<_>>(),
                vec![long.clone(), "b.txt".to_string()]
            );
        }
    }

    #[test]
    fn truncation_is_detected_with_member_name() {
        let t = tar(&[("a.jpg", &[1u8; 2000])], Long::None);
        let err = all(&t[..1500]).unwrap_err();
        match &err {
            Error::Tar {
                truncated: true,
                member: Some(m),
                offset: 0,
                ..
            } => assert_eq!(m, "a.jpg"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            all(&t[..300]).unwrap_err(),
            Error::Tar {
                truncated: true,
                ..
            }
        ));
    }

    #[test]
    fn garbage_and_huge_sizes_are_errors() {
        let err = all(&[0x41u8; 1024]).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        let mut t = tar(&[("a.jpg", b"x")], Long::None);
        // Declare 8 GiB in base-256 and fix the checksum.
        t[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0]);
        let sum: u64 = t[..512]
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    b as u64
                }
            })
            .sum();
        t[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let err = all(&t).unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
    }

    #[test]
    fn empty_stream_is_an_empty_archive() {
        assert!(all(&[]).unwrap().is_empty());
    }
}
