//! Handing back the start-up pages of the executable and its shared
//! libraries once the servers run.
//!
//! Start-up runs code from all over the binary (config, CLI, descriptor
//! decoding, route derivation, TLS and telemetry setup) and from libc and
//! libm, and the kernel maps in 64 KiB of already-cached file pages around
//! every page fault. An idle keel therefore kept three quarters of its 9 MB
//! of code resident, although a served call runs a small part of it. Once
//! serving begins, every read-only, unmodified file mapping is dropped from
//! the page tables (`MADV_DONTNEED`): the pages stay in the page cache, so
//! the code a call runs is mapped back in by minor faults, and the rest is
//! reclaimable page cache instead of the process's resident set. The shared
//! libraries count too: after the executable's own pages, libc and libm
//! were a fifth of an idle keel's resident set (1.7 MB), almost all of it
//! code and tables only start-up used.
//!
//! No crate does this; it is a few lines over `/proc/self/smaps` and one
//! `madvise` per mapping.

use std::io;

/// What [`release`] handed back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    /// How many file mappings (the executable's and its libraries') were
    /// dropped.
    pub mappings: usize,
    /// Their resident size just before, in bytes.
    pub bytes: u64,
}

/// Drops the read-only, file-backed mappings that hold no private copies
/// (the executable's and its shared libraries') from the page tables. Safe
/// to call at any time; the cost is a minor fault per 64 KiB of code the
/// process runs next.
pub fn release() -> io::Result<Released> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = Released::default();
    for mapping in candidates(&smaps) {
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

/// The file mappings in `smaps` that are private, not writable and hold no
/// anonymous (copy-on-write) pages, with something resident. Such a
/// mapping's every page is the page cache's page of the file, so dropping
/// it loses nothing: the next access maps the same page again. The RELRO
/// regions (read-only after relocation, but with relocated private copies)
/// are excluded by their anonymous pages; the writable data, by its
/// permissions. Only mappings of a named file count: not anonymous memory,
/// not the kernel's `[vdso]` and `[vvar]`, not a file deleted since.
fn candidates(smaps: &str) -> impl Iterator<Item = Mapping> + '_ {
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
            let file = header.path.starts_with('/') && !header.path.ends_with(" (deleted)");
            // Unknown anonymous size: not provably clean, so left alone.
            if file
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
    // SAFETY: the range is one whole file mapping that `candidates` found
    // private, not writable and without anonymous pages: every page mapped
    // is the page cache's page of the file, and the fault after
    // `MADV_DONTNEED` maps that same page again, so what the process reads
    // there is what it would have read without the call. No memory Rust
    // can observe changes; only page-table entries go.
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
55d0a0980000-55d0a0990000 r--p 00000000 fe:00 44                         /usr/lib/old.so (deleted)
Rss:                  64 kB
Anonymous:             0 kB
55d0a0990000-55d0a09a0000 r--p 00000000 00:00 0
Rss:                  64 kB
Anonymous:             0 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                 132 kB
Anonymous:           132 kB
7ffd00030000-7ffd00032000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   8 kB
Anonymous:             0 kB
";

    #[test]
    fn only_clean_resident_read_only_file_mappings_are_candidates() {
        let found: Vec<Mapping> = candidates(SMAPS).collect();
        assert_eq!(
            found,
            [
                Mapping { start: 0x55d0a0000000, end: 0x55d0a0100000, rss_kb: 800 },
                Mapping { start: 0x55d0a0100000, end: 0x55d0a0900000, rss_kb: 6000 },
                Mapping { start: 0x55d0a0950000, end: 0x55d0a0960000, rss_kb: 64 },
            ],
            "RELRO (anonymous pages), data (writable), empty and unknown mappings, a deleted file, \
             anonymous memory, the stack and the vDSO stay"
        );
    }

    #[test]
    fn a_path_with_spaces_is_read_whole() {
        let smaps =
            "1000-2000 r-xp 00000000 fe:00 42                         /opt/my app/keel\nRss: 4 kB\nAnonymous: 0 kB\n";
        let found: Vec<Mapping> = candidates(smaps).collect();
        assert_eq!(found, [Mapping { start: 0x1000, end: 0x2000, rss_kb: 4 }]);
        let header = parse_header(smaps.lines().next().unwrap()).unwrap();
        assert_eq!(header.path, "/opt/my app/keel");
    }

    /// Resident kB of the candidate mappings whose path ends with `path`.
    fn resident_kb(path: &str) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let paths: Vec<(usize, &str)> =
            smaps.lines().filter_map(parse_header).map(|header| (header.start, header.path)).collect();
        candidates(&smaps)
            .filter(|m| paths.iter().any(|&(start, p)| start == m.start && p.ends_with(path)))
            .map(|m| m.rss_kb)
            .sum()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn releasing_drops_resident_code_and_libraries_and_the_process_keeps_running_them() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_string_lossy().into_owned();
        // A static build has no libc.so to release; this machine's has.
        let (code, libc) = (resident_kb(&exe), resident_kb("/libc.so.6"));
        assert!(code > 0, "the test binary runs code, so some is resident");
        let released = release().unwrap();
        assert!(released.mappings >= 1 && released.bytes > 0, "{released:?}");
        // Running on: the code and libc this test runs next are read back
        // from the page cache, and do what they did.
        let sum: u64 = (1..=100).sum();
        assert_eq!(sum, 5050);
        assert!(std::fs::read_to_string("/proc/self/comm").is_ok_and(|comm| !comm.is_empty()));
        assert_eq!(field_kb("Rss:   12 kB", "Rss:"), Some(12));
        let (code_after, libc_after) = (resident_kb(&exe), resident_kb("/libc.so.6"));
        assert!(code_after < code, "resident code {code} kB before, {code_after} kB after");
        if libc > 0 {
            assert!(libc_after < libc, "resident libc {libc} kB before, {libc_after} kB after");
        }
    }
}
