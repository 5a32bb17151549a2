//! A zip bomb must be cheap to refuse: this binary counts every heap allocation, so it holds
//! exactly one test, and asserts the peak memory `archive::unpack` uses on a real bomb.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kps_sync::kps::archive::{Limits, Problem, unpack};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One deflated entry named `a.pem` whose headers declare `declared` bytes.
fn zip_with_one_deflated_entry(compressed: &[u8], declared: u32) -> Vec<u8> {
    let name = b"a.pem";
    let fields = |out: &mut Vec<u8>| {
        out.extend_from_slice(&20u16.to_le_bytes()); // version needed
        out.extend_from_slice(&0u16.to_le_bytes()); // flags
        out.extend_from_slice(&8u16.to_le_bytes()); // deflate
        out.extend_from_slice(&[0, 0, 0x21, 0]); // 1980-01-01
        out.extend_from_slice(&0u32.to_le_bytes()); // crc: never reached
        out.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
        out.extend_from_slice(&declared.to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // extra
    };
    let mut out = b"PK\x03\x04".to_vec();
    fields(&mut out);
    out.extend_from_slice(name);
    out.extend_from_slice(compressed);
    let dir_start = out.len();
    out.extend_from_slice(b"PK\x01\x02");
    out.extend_from_slice(&[20, 3]); // made by unix
    fields(&mut out);
    out.extend_from_slice(&[0; 6]); // comment len, disk, internal attributes
    out.extend_from_slice(&(0o100_600u32 << 16).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // local header offset
    out.extend_from_slice(name);
    let dir_len = out.len() - dir_start;
    out.extend_from_slice(b"PK\x05\x06\0\0\0\0\x01\0\x01\0");
    out.extend_from_slice(&(dir_len as u32).to_le_bytes());
    out.extend_from_slice(&(dir_start as u32).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

#[test]
fn a_zip_bomb_is_refused_quickly_with_bounded_memory() {
    // 100 MiB of zeros, deflated to about 100 KiB, declared as 10 bytes.
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    let chunk = vec![0u8; 1024 * 1024];
    for _ in 0..100 {
        encoder.write_all(&chunk).unwrap();
    }
    drop(chunk);
    let zip = zip_with_one_deflated_entry(&encoder.finish().unwrap(), 10);
    let limits = Limits::default();
    assert!(zip.len() < limits.max_zip_bytes);
    let requested = vec!["a".to_owned()];

    let baseline = CURRENT.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);
    let started = Instant::now();
    let err = unpack(&zip, &requested, None, &limits).expect_err("a bomb must be refused");
    let took = started.elapsed();
    let peak = PEAK.load(Ordering::Relaxed) - baseline;

    assert!(
        matches!(
            err.problem,
            Problem::EntryTooLarge {
                declared: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    // The inflater's window and buffers plus one entry's worth of output: far below the
    // 100 MiB the bomb holds.
    assert!(peak < 1024 * 1024, "unpack allocated up to {peak} bytes");
    eprintln!("bomb refused in {took:?} with a peak of {peak} bytes");
}
