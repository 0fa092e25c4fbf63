//! `hoard-bench ceilings`: this machine's own limits, which a cache's throughput on it is
//! bounded by: single-core SHA-256 (with the `sha2` crate hoard itself uses), sequential write
//! of a file with and without `fdatasync`, reading it back from the page cache, loopback TCP,
//! and memcpy.
//!
//! Every measurement moves the same number of bytes (`--size`), taken in 1 MiB pieces from one
//! buffer of deterministic incompressible data generated once, untimed. It talks to no server
//! and opens no socket but one on 127.0.0.1.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::data;
use super::report::fmt_bytes;

/// Bytes per write, read, hash update and copy.
const PIECE: usize = 1 << 20;

/// Largest source buffer: larger than CPU caches, so every measurement reads memory.
const MAX_BUFFER: usize = 64 << 20;

/// Seed of the data (any fixed value: the data only has to be incompressible).
const SEED: u64 = 0xCE11_1265;

const GIB: f64 = (1u64 << 30) as f64;

/// One measured ceiling.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    pub name: String,
    /// What was timed.
    pub what: String,
    pub bytes: u64,
    pub secs: f64,
    /// 10^6 bytes per second.
    pub mb_per_sec: f64,
    /// 10^9 bytes per second.
    pub gb_per_sec: f64,
    pub secs_per_gib: f64,
}

impl Measurement {
    fn new(name: &str, what: &str, bytes: u64, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64().max(1e-9);
        Measurement {
            name: name.to_string(),
            what: what.to_string(),
            bytes,
            secs,
            mb_per_sec: bytes as f64 / 1e6 / secs,
            gb_per_sec: bytes as f64 / 1e9 / secs,
            secs_per_gib: secs / (bytes as f64 / GIB),
        }
    }
}

/// The filesystem a directory is on, from /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Filesystem {
    pub mount_point: String,
    pub fs_type: String,
    pub source: String,
}

/// The whole run, as printed.
#[derive(Debug, Serialize)]
pub struct CeilingsReport {
    pub workload: String,
    pub params: String,
    /// The directory the temporary file was written in (canonical).
    pub dir: String,
    /// Its filesystem, when /proc/self/mountinfo tells.
    pub filesystem: Option<Filesystem>,
    pub size_bytes: u64,
    /// Whether the CPU has SHA-256 instructions (which `sha2` uses when present).
    pub cpu_sha_instructions: Option<bool>,
    /// The `fdatasync` alone, after the writes.
    pub fdatasync_secs: f64,
    pub measurements: Vec<Measurement>,
}

/// Runs `hoard-bench ceilings` and prints its report.
pub fn main(dir: &Path, size: u64, json: bool) -> Result<(), String> {
    let report = run(dir, size, true)?;
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

/// Measures every ceiling over `size` bytes, writing a temporary file in `dir`.
pub fn run(dir: &Path, size: u64, progress: bool) -> Result<CeilingsReport, String> {
    if size == 0 {
        return Err("--size must be at least 1 byte".into());
    }
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("--dir {}: {e}", dir.display()))?;
    if !dir.is_dir() {
        return Err(format!("--dir {}: not a directory", dir.display()));
    }
    let say = |what: &str| {
        if progress {
            eprintln!("hoard-bench ceilings: {what}");
        }
    };
    let buf_len = usize::try_from(size).map_or(MAX_BUFFER, |s| s.min(MAX_BUFFER));
    say(&format!(
        "generating {} of data (untimed)",
        fmt_bytes(buf_len as u64)
    ));
    let mut buf = vec![0u8; buf_len];
    data::fill(SEED, 0, &mut buf);

    let mut measurements = Vec::new();

    say("SHA-256 on one core");
    let start = Instant::now();
    let (digest, hashed) = hash_cyclic(&buf, size);
    let elapsed = start.elapsed();
    std::hint::black_box(digest);
    check_count("sha256", hashed, size)?;
    measurements.push(Measurement::new(
        "sha256",
        "SHA-256 of data in memory, one core, 1 MiB updates",
        hashed,
        elapsed,
    ));

    say("memcpy");
    let (copied, elapsed) = memcpy(&buf, size);
    check_count("memcpy", copied, size)?;
    measurements.push(Measurement::new(
        "memcpy",
        "copy 1 MiB blocks between two buffers in memory, one core",
        copied,
        elapsed,
    ));

    say("loopback TCP");
    let (sent, elapsed) =
        tcp_loopback(&buf, size).map_err(|e| format!("loopback TCP on 127.0.0.1: {e}"))?;
    check_count("tcp-loopback", sent, size)?;
    measurements.push(Measurement::new(
        "tcp-loopback",
        "127.0.0.1, one thread writing 1 MiB writes, one reading",
        sent,
        elapsed,
    ));

    say(&format!(
        "writing and reading {} in {}",
        fmt_bytes(size),
        dir.display()
    ));
    let disk = disk(&dir, &buf, size)?;
    measurements.push(Measurement::new(
        "disk-write-sync",
        "1 MiB writes to a new file, then fdatasync",
        size,
        disk.write + disk.sync,
    ));
    measurements.push(Measurement::new(
        "disk-write-nosync",
        "the same writes alone (into the page cache)",
        size,
        disk.write,
    ));
    measurements.push(Measurement::new(
        "page-cache-read",
        "1 MiB reads of that file, cached (second read)",
        size,
        disk.read,
    ));

    Ok(CeilingsReport {
        workload: "ceilings".to_string(),
        params: format!(
            "size={} dir={}",
            hoard::config::ByteSize(size),
            dir.display()
        ),
        filesystem: filesystem_of(&dir),
        dir: dir.display().to_string(),
        size_bytes: size,
        cpu_sha_instructions: cpu_sha_instructions(),
        fdatasync_secs: disk.sync.as_secs_f64(),
        measurements,
    })
}

fn check_count(name: &str, got: u64, want: u64) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{name}: moved {got} bytes instead of {want}"))
    }
}

/// The ranges of a buffer of `buf_len` bytes that make up `total` bytes of it repeated: pieces
/// of at most `piece` bytes, never crossing the buffer's end.
#[derive(Clone, Debug)]
pub struct Cycle {
    buf_len: usize,
    piece: usize,
    left: u64,
    off: usize,
}

impl Cycle {
    pub fn new(buf_len: usize, piece: usize, total: u64) -> Self {
        assert!(buf_len > 0 && piece > 0, "empty buffer or piece");
        Cycle {
            buf_len,
            piece,
            left: total,
            off: 0,
        }
    }
}

impl Iterator for Cycle {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        if self.left == 0 {
            return None;
        }
        let n = self
            .piece
            .min(self.buf_len - self.off)
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let range = self.off..self.off + n;
        self.off += n;
        if self.off == self.buf_len {
            self.off = 0;
        }
        self.left -= n as u64;
        Some(range)
    }
}

/// SHA-256 of `total` bytes of `buf` repeated, in 1 MiB updates; the digest and bytes hashed.
pub fn hash_cyclic(buf: &[u8], total: u64) -> ([u8; 32], u64) {
    let mut hasher = Sha256::new();
    let mut hashed = 0u64;
    for r in Cycle::new(buf.len(), PIECE, total) {
        hashed += r.len() as u64;
        hasher.update(&buf[r]);
    }
    (hasher.finalize().into(), hashed)
}

/// Copies `total` bytes of `src` repeated, 1 MiB at a time, into a second buffer of its size.
fn memcpy(src: &[u8], total: u64) -> (u64, Duration) {
    let mut dst = vec![0u8; src.len()];
    // Touch every page first, so that page faults are not timed.
    dst.copy_from_slice(src);
    let mut copied = 0u64;
    let start = Instant::now();
    for r in Cycle::new(src.len(), PIECE, total) {
        copied += r.len() as u64;
        dst[r.clone()].copy_from_slice(&src[r]);
        std::hint::black_box(&mut dst);
    }
    (copied, start.elapsed())
}

/// Sends `total` bytes of `buf` repeated from one thread to another over 127.0.0.1; the bytes
/// received and the time from the first write to the end of the stream.
fn tcp_loopback(buf: &[u8], total: u64) -> io::Result<(u64, Duration)> {
    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    let mut client = TcpStream::connect(listener.local_addr()?)?;
    let (mut server, _) = listener.accept()?;
    drop(listener);
    let mut inbox = vec![0u8; PIECE];
    std::thread::scope(|s| {
        let start = Instant::now();
        let writer = s.spawn(move || -> io::Result<()> {
            for r in Cycle::new(buf.len(), PIECE, total) {
                client.write_all(&buf[r])?;
            }
            client.shutdown(Shutdown::Write)
        });
        let mut received = 0u64;
        let read = loop {
            match server.read(&mut inbox) {
                Ok(0) => break Ok(()),
                Ok(n) => received += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        let elapsed = start.elapsed();
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the writing thread panicked")));
        written?;
        read?;
        Ok((received, elapsed))
    })
}

/// Times of the file test.
struct DiskTimes {
    write: Duration,
    sync: Duration,
    read: Duration,
}

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `total` bytes of `buf` repeated to a new file in `dir` and syncs it, then reads it
/// back twice: once checking every byte (warming the page cache), once timed. Removes the file.
fn disk(dir: &Path, buf: &[u8], total: u64) -> Result<DiskTimes, String> {
    let path = dir.join(format!(
        ".hoard-bench-ceilings-{}-{}.tmp",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let shown = path.display().to_string();
    let io_err = |what: &str, e: io::Error| format!("{what} {shown}: {e}");
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io_err("cannot create", e))?;
    let _guard = TempFile(path.clone());

    let start = Instant::now();
    for r in Cycle::new(buf.len(), PIECE, total) {
        file.write_all(&buf[r])
            .map_err(|e| io_err("cannot write", e))?;
    }
    let write = start.elapsed();
    file.sync_data().map_err(|e| io_err("cannot sync", e))?;
    let sync = start.elapsed() - write;
    drop(file);

    let mut inbox = vec![0u8; PIECE];
    // Warm-up read, checking the contents.
    let mut file = File::open(&path).map_err(|e| io_err("cannot open", e))?;
    let mut pos = 0u64;
    let buf_len = buf.len() as u64;
    loop {
        let n = read_some(&mut file, &mut inbox).map_err(|e| io_err("cannot read", e))?;
        if n == 0 {
            break;
        }
        for (i, b) in inbox[..n].iter().enumerate() {
            let at = pos + i as u64;
            if *b != buf[(at % buf_len) as usize] {
                return Err(format!(
                    "{shown}: byte {at} read back differs from the one written"
                ));
            }
        }
        pos += n as u64;
    }
    check_count("disk read (warm-up)", pos, total)?;

    let mut file = File::open(&path).map_err(|e| io_err("cannot open", e))?;
    let mut read_bytes = 0u64;
    let start = Instant::now();
    loop {
        let n = read_some(&mut file, &mut inbox).map_err(|e| io_err("cannot read", e))?;
        if n == 0 {
            break;
        }
        read_bytes += n as u64;
    }
    let read = start.elapsed();
    std::hint::black_box(&inbox);
    check_count("page-cache-read", read_bytes, total)?;
    Ok(DiskTimes { write, sync, read })
}

fn read_some(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match file.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Whether the CPU has the SHA-256 instructions `sha2` picks at run time.
fn cpu_sha_instructions() -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        Some(std::arch::is_x86_feature_detected!("sha"))
    }
    #[cfg(target_arch = "aarch64")]
    {
        Some(std::arch::is_aarch64_feature_detected!("sha2"))
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        None
    }
}

/// The filesystem `dir` (canonical) is on.
fn filesystem_of(dir: &Path) -> Option<Filesystem> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mount_of(&text, dir)
}

/// The mount of a mountinfo listing that holds `path`: the longest mount point above it, the
/// last listed on a tie (the one on top).
fn mount_of(mountinfo: &str, path: &Path) -> Option<Filesystem> {
    let mut best: Option<Filesystem> = None;
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = pre.split(' ').nth(4).map(unescape) else {
            continue;
        };
        let mut post = post.split(' ');
        let (Some(fs_type), Some(source)) = (post.next(), post.next()) else {
            continue;
        };
        if !path.starts_with(&mount_point) {
            continue;
        }
        if best
            .as_ref()
            .is_some_and(|b| b.mount_point.len() > mount_point.len())
        {
            continue;
        }
        best = Some(Filesystem {
            mount_point,
            fs_type: fs_type.to_string(),
            source: unescape(source),
        });
    }
    best
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl CeilingsReport {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = (|| -> std::fmt::Result {
            writeln!(
                out,
                "hoard-bench ceilings ({}): this machine's own limits",
                self.params
            )?;
            match &self.filesystem {
                Some(fs) => writeln!(
                    out,
                    "dir {}: {} on {} (mounted at {})",
                    self.dir, fs.fs_type, fs.source, fs.mount_point
                )?,
                None => writeln!(out, "dir {}: filesystem unknown", self.dir)?,
            }
            if let Some(sha) = self.cpu_sha_instructions {
                writeln!(
                    out,
                    "CPU SHA-256 instructions: {}",
                    if sha { "yes (used by sha2)" } else { "no" }
                )?;
            }
            writeln!(out)?;
            writeln!(
                out,
                "{:<18} {:>10} {:>8} {:>9} {:>7} {:>7}  what",
                "ceiling", "bytes", "seconds", "MB/s", "GB/s", "s/GiB"
            )?;
            for m in &self.measurements {
                writeln!(
                    out,
                    "{:<18} {:>10} {:>8.3} {:>9.1} {:>7.2} {:>7.3}  {}",
                    m.name,
                    fmt_bytes(m.bytes),
                    m.secs,
                    m.mb_per_sec,
                    m.gb_per_sec,
                    m.secs_per_gib,
                    m.what
                )?;
            }
            writeln!(out)?;
            writeln!(
                out,
                "fdatasync after the writes: {:.3} s",
                self.fdatasync_secs
            )?;
            Ok(())
        })();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycle_covers_exactly_total_bytes() {
        for (buf_len, piece, total) in [
            (10, 3, 0),
            (10, 3, 1),
            (10, 3, 10),
            (10, 3, 25),
            (10, 10, 30),
            (10, 64, 95),
            (7, 1, 13),
        ] {
            let ranges: Vec<_> = Cycle::new(buf_len, piece, total).collect();
            assert_eq!(
                ranges.iter().map(|r| r.len() as u64).sum::<u64>(),
                total,
                "{buf_len} {piece} {total}"
            );
            let mut expect = 0;
            for r in &ranges {
                assert!(!r.is_empty() && r.len() <= piece && r.end <= buf_len);
                assert_eq!(r.start, expect, "pieces follow each other, wrapping around");
                expect = if r.end == buf_len { 0 } else { r.end };
            }
        }
    }

    #[test]
    fn hashing_hashes_exactly_size_bytes_of_the_repeated_buffer() {
        let mut buf = vec![0u8; 3 * PIECE + 17];
        data::fill(SEED, 0, &mut buf);
        for total in [
            1u64,
            5,
            PIECE as u64,
            3 * PIECE as u64 + 17,
            7 * PIECE as u64 + 3,
        ] {
            let (digest, hashed) = hash_cyclic(&buf, total);
            assert_eq!(hashed, total);
            let repeated: Vec<u8> = buf.iter().copied().cycle().take(total as usize).collect();
            let expect: [u8; 32] = Sha256::digest(&repeated).into();
            assert_eq!(digest, expect, "total {total}");
        }
    }

    #[test]
    fn a_small_run_measures_everything_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let size = 2 * PIECE as u64 + 5;
        let report = run(dir.path(), size, false).unwrap();
        let names: Vec<_> = report
            .measurements
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "sha256",
                "memcpy",
                "tcp-loopback",
                "disk-write-sync",
                "disk-write-nosync",
                "page-cache-read"
            ]
        );
        for m in &report.measurements {
            assert_eq!(m.bytes, size, "{}", m.name);
            assert!(m.secs > 0.0 && m.gb_per_sec > 0.0, "{}", m.name);
            assert!((m.mb_per_sec / m.gb_per_sec - 1000.0).abs() < 1e-6);
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(report.to_text().contains("tcp-loopback"));
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["workload"], "ceilings");
        assert_eq!(json["size_bytes"], size);
        assert_eq!(json["measurements"].as_array().unwrap().len(), 6);
        assert!(run(dir.path(), 0, false).is_err());
        assert!(run(&dir.path().join("absent"), 1, false).is_err());
    }

    #[test]
    fn mountinfo_gives_the_innermost_mount() {
        let info = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
30 27 0:27 / /tmp rw,relatime - tmpfs tmpfs rw\n\
31 27 0:28 / /mnt/my\\040disk rw shared:1 - xfs /dev/sdb1 rw\n\
32 30 0:29 / /tmp rw,relatime - btrfs /dev/sdc rw\n";
        let fs = |p: &str| mount_of(info, Path::new(p)).map(|f| (f.fs_type, f.mount_point));
        assert_eq!(fs("/home/x"), Some(("ext4".into(), "/".into())));
        assert_eq!(fs("/tmp/a"), Some(("btrfs".into(), "/tmp".into())));
        assert_eq!(fs("/tmpx"), Some(("ext4".into(), "/".into())));
        assert_eq!(
            fs("/mnt/my disk/data"),
            Some(("xfs".into(), "/mnt/my disk".into()))
        );
        assert_eq!(mount_of("", Path::new("/")), None);
    }
}
