//! Handing back the executable's start-up pages once the servers run.
//!
//! Start-up runs code from all over the binary (config, CLI, descriptor
//! decoding, route derivation, TLS and telemetry setup), and the kernel maps
//! in 64 KiB of already-cached file pages around every page fault. An idle
//! keel therefore kept three quarters of its 9 MB of code resident, although
//! a served call runs a small part of it. Once serving begins, the
//! executable's read-only, unmodified mappings are dropped from the page
//! tables (`MADV_DONTNEED`): the pages stay in the page cache, so the code a
//! call runs is mapped back in by minor faults, and the rest is reclaimable
//! page cache instead of the process's resident set.
//!
//! No crate does this; it is a few lines over `/proc/self/smaps` and one
//! `madvise` per mapping.

use std::io;

/// What [`release`] handed back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    /// How many of the executable's mappings were dropped.
    pub mappings: usize,
    /// Their resident size just before, in bytes.
    pub bytes: u64,
}

/// Drops the executable's read-only, file-backed mappings that hold no
/// private copies from the page tables. Safe to call at any time; the cost
/// is a minor fault per 64 KiB of code the process runs next.
pub fn release() -> io::Result<Released> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let exe = exe.to_string_lossy();
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = Released::default();
    for mapping in candidates(&smaps, &exe) {
        drop_pages(mapping.start, mapping.end - mapping.start)?;
        released.mappings += 1;
        released.bytes += mapping.rss_kb * 1024;
    }
    Ok(released)
}

/// A mapping [`release`] may drop.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    rss_kb: u64,
}

/// The mappings of `exe` in `smaps` that are private, not writable and hold
/// no anonymous (copy-on-write) pages, with something resident. Such a
/// mapping's every page equals the file's, so dropping it loses nothing. The
/// RELRO region (read-only after relocation, but with relocated private
/// copies) is excluded by its anonymous pages; the writable data, by its
/// permissions.
fn candidates<'a>(smaps: &'a str, exe: &'a str) -> impl Iterator<Item = Mapping> + 'a {
    let mut lines = smaps.lines().peekable();
    std::iter::from_fn(move || {
        loop {
            let header = lines.next()?;
            let Some(header) = parse_header(header) else { continue };
            let (mut rss_kb, mut anonymous_kb) = (None, None);
            while let Some(line) = lines.peek() {
                if parse_header(line).is_some() {
                    break;
                }
                if let Some(kb) = field_kb(line, "Rss:") {
                    rss_kb = Some(kb);
                } else if let Some(kb) = field_kb(line, "Anonymous:") {
                    anonymous_kb = Some(kb);
                }
                lines.next();
            }
            let clean =
                header.perms.starts_with('r') && header.perms.get(1..2) == Some("-") && header.perms.ends_with('p');
            // Unknown anonymous size: not provably clean, so left alone.
            if header.path == exe
                && clean
                && anonymous_kb == Some(0)
                && let Some(rss_kb @ 1..) = rss_kb
            {
                return Some(Mapping { start: header.start, end: header.end, rss_kb });
            }
        }
    })
}

struct Header<'a> {
    start: usize,
    end: usize,
    perms: &'a str,
    path: &'a str,
}

/// `start-end perms offset dev inode   path`; `None` for a field line.
fn parse_header(line: &str) -> Option<Header<'_>> {
    let (range, rest) = line.split_once(' ')?;
    let (start, end) = range.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let mut fields = rest.splitn(5, ' ');
    let perms = fields.next()?;
    if perms.len() != 4 || end <= start {
        return None;
    }
    let (_offset, _dev, _inode) = (fields.next()?, fields.next()?, fields.next()?);
    let path = fields.next().unwrap_or("").trim_start();
    Some(Header { start, end, perms, path })
}

fn field_kb(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse().ok()
}

#[cfg(target_os = "linux")]
fn drop_pages(start: usize, len: usize) -> io::Result<()> {
    // SAFETY: the range is one whole mapping of the executable that
    // `candidates` found private, not writable and without anonymous pages:
    // every page is the file's own content, and Linux refuses writes to a
    // running executable (ETXTBSY), so a page read back after
    // `MADV_DONTNEED` has the same bytes. No memory Rust can observe
    // changes; only page-table entries go.
    #[allow(unsafe_code)]
    let done = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if done == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(not(target_os = "linux"))]
fn drop_pages(_start: usize, _len: usize) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "releasing start-up pages needs Linux"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0100000 r--p 00000000 fe:00 42                         /srv/keel
Size:               1024 kB
Rss:                 800 kB
Anonymous:             0 kB
55d0a0100000-55d0a0900000 r-xp 00100000 fe:00 42                         /srv/keel
Size:               8192 kB
Rss:                6000 kB
Anonymous:             0 kB
55d0a0900000-55d0a0940000 r--p 00900000 fe:00 42                         /srv/keel
Rss:                 256 kB
Anonymous:           256 kB
55d0a0940000-55d0a0950000 rw-p 00940000 fe:00 42                         /srv/keel
Rss:                  64 kB
Anonymous:            12 kB
55d0a0950000-55d0a0960000 r-xp 00000000 fe:00 43                         /usr/lib/libc.so.6
Rss:                  64 kB
Anonymous:             0 kB
55d0a0960000-55d0a0970000 r-xp 00000000 fe:00 42                         /srv/keel
Rss:                   0 kB
Anonymous:             0 kB
55d0a0970000-55d0a0980000 r-xp 00000000 fe:00 42                         /srv/keel
Rss:                  64 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                 132 kB
Anonymous:           132 kB
";

    #[test]
    fn only_clean_resident_read_only_mappings_of_the_executable_are_candidates() {
        let found: Vec<Mapping> = candidates(SMAPS, "/srv/keel").collect();
        assert_eq!(
            found,
            [
                Mapping { start: 0x55d0a0000000, end: 0x55d0a0100000, rss_kb: 800 },
                Mapping { start: 0x55d0a0100000, end: 0x55d0a0900000, rss_kb: 6000 },
            ],
            "RELRO (anonymous pages), data (writable), libc, empty and unknown mappings stay"
        );
    }

    #[test]
    fn a_path_with_spaces_is_read_whole() {
        let smaps =
            "1000-2000 r-xp 00000000 fe:00 42                         /opt/my app/keel\nRss: 4 kB\nAnonymous: 0 kB\n";
        assert_eq!(candidates(smaps, "/opt/my app/keel").count(), 1);
        assert_eq!(candidates(smaps, "/opt/my").count(), 0);
    }

    fn resident_code_kb() -> u64 {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        candidates(&smaps, &exe.to_string_lossy()).map(|m| m.rss_kb).sum()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn releasing_drops_resident_code_and_the_process_keeps_running_it() {
        let before = resident_code_kb();
        assert!(before > 0, "the test binary runs code, so some is resident");
        let released = release().unwrap();
        assert!(released.mappings >= 1 && released.bytes > 0, "{released:?}");
        // Running on: the code this test runs next is read back from the
        // page cache, and does what it did.
        let sum: u64 = (1..=100).sum();
        assert_eq!(sum, 5050);
        assert_eq!(field_kb("Rss:   12 kB", "Rss:"), Some(12));
        let after = resident_code_kb();
        assert!(after < before, "resident code {before} kB before, {after} kB after");
    }
}
