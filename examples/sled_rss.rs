//! sled alone with one entry per blob: how much memory a million 32-byte keys with 21-byte
//! values take at hoard's default cache size (32 MiB), the figure that took small blobs' entries
//! out of sled (format 6; BENCHMARKS.md).
//!
//!     cargo run --release --example sled_rss -- DIR COUNT [atime]
//!
//! `atime` also writes a second tree of 4-byte values per key, as format 5 did for last uses.
use mimalloc::MiMalloc;
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;
fn rss() -> String {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM"))
        .collect::<Vec<_>>()
        .join(" ")
}
fn main() {
    let dir = std::env::args().nth(1).unwrap();
    let n: u64 = std::env::args().nth(2).unwrap().parse().unwrap();
    let atime = std::env::args().nth(3).is_some();
    let db = sled::Config::new()
        .path(&dir)
        .cache_capacity(32 << 20)
        .open()
        .unwrap();
    let cas = db.open_tree("cas").unwrap();
    let at = db.open_tree("atime").unwrap();
    let mut x: u64 = 0x9E3779B97F4A7C15;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut k = [0u8; 32];
        for j in 0..4 {
            k[j * 8..j * 8 + 8].copy_from_slice(&(x.wrapping_mul(j as u64 + 1)).to_le_bytes());
        }
        cas.insert(k, &[1u8; 21][..]).unwrap();
        if atime {
            at.insert(k, &[2u8; 4][..]).unwrap();
        }
        if i % 1000 == 999 {
            db.flush().unwrap();
        }
        if i % 250_000 == 249_999 {
            eprintln!("{} {}", i + 1, rss());
        }
    }
    db.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(5));
    eprintln!("end {}", rss());
}
