//! Tests of import and export against qemu-img (skipped, with a message,
//! where it is not installed; a failure under CI=true) and against corrupt input.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::vhd::{chs_geometry, vhd_size_and_geometry};
use super::*;

const MIB: u64 = 1 << 20;

/// Returns from the test unless qemu-img and qemu-io are here: a skip, which
/// fails the test under CI=true (see `vstream_testkit::skip`).
macro_rules! require_qemu {
    () => {
        if !vstream_testkit::have("qemu-img") || !vstream_testkit::have("qemu-io") {
            return;
        }
    };
}

/// Runs a command, panicking with its output unless it succeeds.
fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Reads a source into a flat buffer, checking the extent rules on the way:
/// increasing, non-overlapping, 1..=MAX_EXTENT bytes, and no zero granule.
fn read_flat(src: &mut dyn SourceImage) -> Vec<u8> {
    let mut out = vec![0u8; src.virtual_size() as usize];
    let mut buf = Vec::new();
    let mut prev_end = 0u64;
    while let Some(off) = src.next_extent(&mut buf).unwrap() {
        assert!(
            !buf.is_empty() && buf.len() <= MAX_EXTENT,
            "extent size {}",
            buf.len()
        );
        assert!(off >= prev_end, "extent at {off} before {prev_end}");
        let end = off + buf.len() as u64;
        assert!(end <= src.virtual_size());
        // Each granule-aligned piece of an extent holds some data.
        let mut at = off;
        while at < end {
            let piece_end = ((at / ZERO_GRANULE + 1) * ZERO_GRANULE).min(end);
            let piece = &buf[(at - off) as usize..(piece_end - off) as usize];
            assert!(!is_zero(piece), "zero granule at {at} in extent at {off}");
            at = piece_end;
        }
        out[off as usize..end as usize].copy_from_slice(&buf);
        prev_end = end;
    }
    out
}

fn open_flat(path: &Path, scratch: &Path) -> (Vec<u8>, &'static str) {
    let mut src = open_source(path, scratch).unwrap();
    let name = src.format_name();
    (read_flat(&mut *src), name)
}

/// What qemu-img makes of an image, as flat bytes.
fn qemu_flat(path: &Path, fmt: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu-flat.raw");
    run(
        "qemu-img",
        &["convert", "-f", fmt, "-O", "raw", p(path), p(&out)],
    );
    let data = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    data
}

fn assert_same(ours: &[u8], theirs: &[u8], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: sizes differ");
    if ours == theirs {
        return;
    }
    if let Some(i) = ours.iter().zip(theirs).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

/// A raw file of `size` bytes with random data scattered over it:
/// unaligned pieces, pieces across 2 MiB block boundaries, the last bytes,
/// and an explicitly written run of zeros.
fn scattered_raw(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut flat = vec![0u8; size as usize];
    let mut put = |off: u64, len: u64, flat: &mut Vec<u8>| {
        let len = len.min(size - off);
        rng.fill(&mut flat[off as usize..(off + len) as usize]);
    };
    put(0, 700, &mut flat);
    put(2 * MIB - 3000, 9000, &mut flat);
    put(5 * MIB + 123, 1, &mut flat);
    put(7 * MIB + 511, 3 * MIB + 77, &mut flat);
    put(size - 4096 - 100, 4096 + 100, &mut flat);
    for i in 0..20 {
        put(12 * MIB + i * 777_777, 1000 + i * 5000, &mut flat);
    }
    let file = fs::File::create(path).unwrap();
    file.set_len(size).unwrap();
    // Write the data, plus 1 MiB of explicit zeros at 30 MiB.
    for (i, chunk) in flat.chunks(MIB as usize).enumerate() {
        let off = i as u64 * MIB;
        if !is_zero(chunk) || off == 30 * MIB {
            file.write_all_at(chunk, off).unwrap();
        }
    }
    flat
}

#[test]
fn raw_sparse_file_skips_holes_and_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let size = 40 * MIB + 1234;
    let flat = scattered_raw(&img, size, 1);
    let mut src = open_source(&img, dir.path()).unwrap();
    assert_eq!(src.format_name(), "raw");
    assert_eq!(src.virtual_size(), size);
    // Collect extents to check how much was read as data.
    let mut total = 0;
    let mut buf = Vec::new();
    let mut got = vec![0u8; size as usize];
    while let Some(off) = src.next_extent(&mut buf).unwrap() {
        assert!(
            !(30 * MIB..31 * MIB).contains(&off),
            "explicit zeros returned as data"
        );
        got[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
        total += buf.len();
    }
    assert_same(&got, &flat, "raw");
    assert!(total < 8 * MIB as usize, "{total} bytes of extents");
    // read_flat's stricter checks too.
    let (again, _) = open_flat(&img, dir.path());
    assert_same(&again, &flat, "raw again");
}

#[test]
fn empty_and_tiny_raw_files() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("empty.img");
    fs::write(&img, b"").unwrap();
    let (flat, name) = open_flat(&img, dir.path());
    assert!(flat.is_empty());
    assert_eq!(name, "raw");
    fs::write(&img, b"x").unwrap();
    assert_eq!(open_flat(&img, dir.path()).0, b"x");
}

fn qemu_io_image(fmt: &str, opts: &[&str], dir: &Path) -> std::path::PathBuf {
    let img = dir.join(format!("img.{fmt}"));
    let mut args = vec!["create", "-q", "-f", fmt];
    args.extend_from_slice(opts);
    args.push(p(&img));
    args.push("48M");
    run("qemu-img", &args);
    let writes = [
        "write -P 0x5a 0 4k",
        "write -P 0xa5 1m 64k",
        "write -P 0x11 2044k 8k",   // across a 2 MiB block boundary
        "write -P 0x22 9m 3m",      // several blocks
        "write -P 0x00 20m 2m",     // allocated zeros
        "write -P 0x33 30000k 512", // one sector
        "write -P 0x44 47m 512k",   // near the end
        "write -P 0x55 49147k 512", // the last sector of the (CHS) disk
    ];
    let mut io_args = vec!["-f", fmt];
    for w in &writes {
        io_args.push("-c");
        io_args.push(w);
    }
    io_args.push(p(&img));
    let out = Command::new("qemu-io").args(&io_args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

fn check_against_qemu(fmt: &str, opts: &[&str], expect_name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_io_image(fmt, opts, dir.path());
    let (ours, name) = open_flat(&img, dir.path());
    assert_eq!(name, expect_name);
    let theirs = qemu_flat(&img, fmt, dir.path());
    assert_same(&ours, &theirs, expect_name);
    assert_eq!(ours[1 << 20], 0xa5);
}

#[test]
fn fixed_vhd_matches_qemu() {
    require_qemu!();
    check_against_qemu("vpc", &["-o", "subformat=fixed"], "vhd-fixed");
}

#[test]
fn dynamic_vhd_matches_qemu() {
    require_qemu!();
    check_against_qemu("vpc", &[], "vhd-dynamic");
}

#[test]
fn qcow2_matches_qemu() {
    require_qemu!();
    check_against_qemu("qcow2", &[], "qcow2");
}

#[test]
fn converted_images_match_qemu_and_original() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = 44 * MIB + 4096 + 1536;
    let flat = scattered_raw(&raw, size, 2);
    let cases: &[(&str, &[&str], &str)] = &[
        ("vpc", &["-o", "subformat=fixed"], "vhd-fixed"),
        ("vpc", &[], "vhd-dynamic"),
        ("vpc", &["-o", "force_size=on"], "vhd-dynamic"),
        ("qcow2", &[], "qcow2"),
        ("qcow2", &["-o", "compat=0.10"], "qcow2"),
        ("vhdx", &[], "vhdx"),
        ("vmdk", &[], "vmdk"),
        ("vdi", &[], "vdi"),
    ];
    for (i, (fmt, opts, name)) in cases.iter().enumerate() {
        let img = dir.path().join(format!("img{i}.{fmt}"));
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
        args.extend_from_slice(opts);
        args.push(p(&raw));
        args.push(p(&img));
        run("qemu-img", &args);
        let (ours, got_name) = open_flat(&img, dir.path());
        assert_eq!(&got_name, name, "{fmt} {opts:?}");
        let theirs = qemu_flat(&img, fmt, dir.path());
        assert_same(&ours, &theirs, &format!("{fmt} {opts:?}"));
        // qemu may round the size up (VHD geometry), never down.
        assert!(ours.len() >= flat.len(), "{fmt} {opts:?}");
        assert_same(
            &ours[..flat.len()],
            &flat,
            &format!("{fmt} {opts:?} vs original"),
        );
        assert!(is_zero(&ours[flat.len()..]));
    }
    // Scratch files are gone once the sources are dropped.
    let left: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".vstream-import-")
        })
        .collect();
    assert!(left.is_empty(), "scratch files left: {left:?}");
}

#[test]
fn scratch_file_lives_as_long_as_the_source() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let img = dir.path().join("x.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "4M"]);
    let src = open_source(&img, &scratch).unwrap();
    assert_eq!(fs::read_dir(&scratch).unwrap().count(), 1);
    drop(src);
    assert_eq!(fs::read_dir(&scratch).unwrap().count(), 0);
}

#[test]
fn missing_qemu_img_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    fs::write(&img, b"QFI\xfb\0\0\0\x03").unwrap();
    let err = match qemu::open(&img, dir.path(), "qcow2", "qemu-img-not-installed-here") {
        Err(e) => e,
        Ok(_) => panic!("opened without qemu-img"),
    };
    assert!(matches!(err, FormatError::QemuImgMissing { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "{} is a qcow2 image; importing it needs qemu-img (apt-get install qemu-utils)",
            img.display()
        )
    );
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        1,
        "scratch file left"
    );
}

#[test]
fn qemu_img_failure_is_reported() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("broken.qcow2");
    let mut bytes = b"QFI\xfb\0\0\0\x03".to_vec();
    bytes.resize(4096, 0xEE);
    fs::write(&img, bytes).unwrap();
    let err = match open_source(&img, dir.path()) {
        Err(e) => e,
        Ok(_) => panic!("opened a broken qcow2"),
    };
    assert!(matches!(err, FormatError::QemuImgFailed { .. }), "{err:?}");
}

#[test]
fn detects_formats_by_content() {
    let tail = [0u8; 512];
    assert_eq!(
        detect(b"QFI\xfb\0\0\0\x03rest", &tail),
        Detected::Qemu("qcow2")
    );
    assert_eq!(
        detect(b"QFI\xfb\0\0\0\x01rest", &tail),
        Detected::Qemu("qcow")
    );
    assert_eq!(detect(b"vhdxfile....", &tail), Detected::Qemu("vhdx"));
    assert_eq!(detect(b"KDMV\x01\0\0\0", &tail), Detected::Qemu("vmdk"));
    assert_eq!(
        detect(b"# Disk DescriptorFile\nversion=1\n", &tail),
        Detected::Qemu("vmdk")
    );
    let mut vdi = [0u8; 512];
    vdi[64..68].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
    assert_eq!(detect(&vdi, &tail), Detected::Qemu("vdi"));
    assert_eq!(detect(b"conectix", &tail), Detected::Vhd);
    let mut t = [0u8; 512];
    t[..8].copy_from_slice(b"conectix");
    assert_eq!(detect(&[0; 512], &t), Detected::Vhd);
    let mut t511 = [0u8; 512];
    t511[1..9].copy_from_slice(b"conectix");
    assert_eq!(detect(&[0; 512], &t511), Detected::Vhd);
    assert_eq!(detect(&[0; 512], &tail), Detected::Raw);
    assert_eq!(detect(b"", b""), Detected::Raw);
}

#[test]
fn export_format_parses() {
    assert_eq!("raw".parse::<ExportFormat>().unwrap(), ExportFormat::Raw);
    assert_eq!("VHD".parse::<ExportFormat>().unwrap(), ExportFormat::Vhd);
    assert!("qcow2".parse::<ExportFormat>().is_err());
    assert_eq!(ExportFormat::Vhd.to_string(), "vhd");
    assert_eq!(ExportFormat::Raw.to_string(), "raw");
}

/// Random extents over a disk of `size` bytes, including all-zero ones and
/// ones with zero runs inside, in increasing order.
fn random_extents(size: u64, seed: u64) -> Vec<(u64, Vec<u8>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut pos = rng.gen_range(0..100_000u64);
    while pos < size {
        let len = rng.gen_range(1..=(MAX_EXTENT as u64)).min(size - pos);
        let mut data = vec![0u8; len as usize];
        match rng.gen_range(0..4) {
            0 => {} // all zeros: must not allocate anything
            1 => {
                // Zeros with a few bytes set.
                for _ in 0..5 {
                    let i = rng.gen_range(0..data.len());
                    data[i] = rng.gen_range(1..=255);
                }
            }
            _ => rng.fill(&mut data[..]),
        }
        out.push((pos, data));
        pos += len + rng.gen_range(0..6 * MIB);
    }
    // And the very last byte.
    if let Some(&(o, ref d)) = out.last() {
        if o + (d.len() as u64) < size {
            out.push((size - 1, vec![0x77]));
        }
    }
    out
}

fn write_image(path: &Path, format: ExportFormat, size: u64, extents: &[(u64, Vec<u8>)]) -> u64 {
    let mut w = create_writer(path, format, size).unwrap();
    for (off, data) in extents {
        w.write_extent(*off, data).unwrap();
    }
    let vsize = w.virtual_size();
    w.finish().unwrap();
    vsize
}

fn flatten(size: u64, extents: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut flat = vec![0u8; size as usize];
    for (off, data) in extents {
        flat[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    flat
}

/// Reads the BAT of a VHD this module wrote: (entries, bat offset).
fn our_bat(path: &Path) -> Vec<u32> {
    let bytes = fs::read(path).unwrap();
    let entries = u32::from_be_bytes(bytes[512 + 28..512 + 32].try_into().unwrap()) as usize;
    (0..entries)
        .map(|i| u32::from_be_bytes(bytes[1536 + 4 * i..1540 + 4 * i].try_into().unwrap()))
        .collect()
}

#[test]
fn export_raw_and_vhd_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let size = 57 * MIB + 3 * 512 + 100;
    let extents = random_extents(size, 3);
    let flat = flatten(size, &extents);

    let raw = dir.path().join("out.raw");
    assert_eq!(write_image(&raw, ExportFormat::Raw, size, &extents), size);
    assert_same(&fs::read(&raw).unwrap(), &flat, "raw export");

    let vhd = dir.path().join("out.vhd");
    let vsize = write_image(&vhd, ExportFormat::Vhd, size, &extents);
    assert!(vsize >= size && vsize - size < 4 * MIB, "{vsize}");
    let (back, name) = open_flat(&vhd, dir.path());
    assert_eq!(name, "vhd-dynamic");
    assert_eq!(back.len() as u64, vsize);
    assert_same(&back[..flat.len()], &flat, "vhd read back");
    assert!(is_zero(&back[flat.len()..]));

    // Blocks are allocated exactly where the data is not zero.
    let bat = our_bat(&vhd);
    for (i, entry) in bat.iter().enumerate() {
        let start = i * 2 * MIB as usize;
        let end = (start + 2 * MIB as usize).min(flat.len());
        let has_data = start < end && !is_zero(&flat[start..end]);
        assert_eq!(*entry != u32::MAX, has_data, "block {i}");
    }
}

#[test]
fn export_vhd_matches_qemu() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    for (n, size) in [
        61 * MIB + 12345, // not a whole CHS geometry: rounded up
        32 * MIB,
        MIB + 512,
    ]
    .into_iter()
    .enumerate()
    {
        let extents = random_extents(size, 10 + n as u64);
        let raw = dir.path().join(format!("out{n}.raw"));
        let vhd = dir.path().join(format!("out{n}.vhd"));
        write_image(&raw, ExportFormat::Raw, size, &extents);
        let vsize = write_image(&vhd, ExportFormat::Vhd, size, &extents);

        let out = run(
            "qemu-img",
            &["compare", "-f", "raw", p(&raw), "-F", "vpc", p(&vhd)],
        );
        assert!(out.contains("identical"), "{out}");

        let info = run("qemu-img", &["info", "--output=json", "-f", "vpc", p(&vhd)]);
        assert!(
            info.contains(&format!("\"virtual-size\": {vsize}")),
            "size {vsize}: {info}"
        );

        let check = Command::new("qemu-img")
            .args(["check", "-f", "vpc", p(&vhd)])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&check.stderr);
        if stderr.contains("does not support checks") {
            eprintln!(
                "note: qemu-img check cannot check vpc images: {}",
                stderr.trim()
            );
        } else {
            assert!(check.status.success(), "qemu-img check: {stderr}");
        }
    }
}

#[test]
fn vhd_geometry_matches_qemu_img_create() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("g.vhd");
    for size in [
        10 * MIB,
        61 * MIB + 12345,
        100 * MIB,
        4 << 30,
        40 << 30,
        200 << 30,
    ] {
        run(
            "qemu-img",
            &["create", "-q", "-f", "vpc", p(&img), &size.to_string()],
        );
        let mut footer = [0u8; 512];
        fs::File::open(&img)
            .unwrap()
            .read_exact_at(&mut footer, 0)
            .unwrap();
        let qemu_size = u64::from_be_bytes(footer[48..56].try_into().unwrap());
        let qemu_geom = (
            u16::from_be_bytes([footer[56], footer[57]]),
            footer[58],
            footer[59],
        );
        let (sectors, geom) = vhd_size_and_geometry(size);
        if size < 127 << 30 {
            assert_eq!((sectors * 512, geom), (qemu_size, qemu_geom), "size {size}");
        } else {
            // qemu goes beyond the spec's 16 heads here; the spec caps the
            // geometry and keeps the exact size.
            assert_eq!((sectors * 512, geom), (size, (65535, 16, 255)));
        }
    }
}

#[test]
fn chs_geometry_follows_the_spec() {
    // Worked values from the algorithm in the VHD specification.
    assert_eq!(chs_geometry(20480), (301, 4, 17)); // 10 MiB
    assert_eq!(chs_geometry(65535 * 16 * 255 + 1000), (65535, 16, 255));
    assert_eq!(chs_geometry(0), (0, 4, 17));
    // Rounding up always covers the disk, by less than one track group.
    let mut rng = StdRng::seed_from_u64(4);
    for _ in 0..2000 {
        let size = rng.gen_range(0..(128u64 << 30));
        let (sectors, (c, h, s)) = vhd_size_and_geometry(size);
        assert!(sectors * 512 >= size);
        assert!(sectors - size.div_ceil(512) < 16 * 255 * 2, "{size}");
        if sectors < 65535 * 16 * 255 {
            assert_eq!(u64::from(c) * u64::from(h) * u64::from(s), sectors);
        }
    }
}

#[test]
fn writer_rejects_bad_extents() {
    let dir = tempfile::tempdir().unwrap();
    for format in [ExportFormat::Raw, ExportFormat::Vhd] {
        let path = dir.path().join(format!("bad.{format}"));
        let mut w = create_writer(&path, format, 10 * MIB).unwrap();
        w.write_extent(MIB, &[1; 100]).unwrap();
        assert!(matches!(
            w.write_extent(MIB + 50, &[1; 10]),
            Err(FormatError::ExtentOutOfOrder { .. })
        ));
        assert!(matches!(
            w.write_extent(10 * MIB - 5, &[1; 10]),
            Err(FormatError::ExtentPastEnd { .. })
        ));
        w.write_extent(10 * MIB - 5, &[1; 5]).unwrap();
        w.finish().unwrap();
    }
    assert!(matches!(
        create_writer(&dir.path().join("huge.vhd"), ExportFormat::Vhd, 3 << 40),
        Err(FormatError::TooLargeForVhd { .. })
    ));
}

// ---- Hand-made and corrupt VHDs -------------------------------------------

/// A dynamic VHD written by this module with data in blocks 0, 2 and 3.
fn small_dynamic_vhd(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let size = 8 * MIB;
    let mut rng = StdRng::seed_from_u64(5);
    let mut extents = Vec::new();
    for off in [0, 4 * MIB + 100, 6 * MIB + 4096] {
        let mut d = vec![0u8; 2 * MIB as usize - 5000];
        rng.fill(&mut d[..]);
        extents.push((off, d));
    }
    let path = dir.join("small.vhd");
    write_image(&path, ExportFormat::Vhd, size, &extents);
    let mut flat = flatten(size, &extents);
    let vsize = vhd_size_and_geometry(size).0 * 512;
    flat.resize(vsize as usize, 0);
    (path, flat)
}

/// Recomputes the checksum of the 512-byte footer at `at` in `bytes`.
fn fix_footer_checksum(bytes: &mut [u8], at: usize) {
    bytes[at + 64..at + 68].fill(0);
    let sum: u32 = bytes[at..at + 512].iter().map(|&b| u32::from(b)).sum();
    bytes[at + 64..at + 68].copy_from_slice(&(!sum).to_be_bytes());
}

fn fix_dyn_header_checksum(bytes: &mut [u8]) {
    bytes[512 + 36..512 + 40].fill(0);
    let sum: u32 = bytes[512..1536].iter().map(|&b| u32::from(b)).sum();
    bytes[512 + 36..512 + 40].copy_from_slice(&(!sum).to_be_bytes());
}

fn open_err(bytes: &[u8], dir: &Path) -> FormatError {
    let path = dir.join("corrupt.vhd");
    fs::write(&path, bytes).unwrap();
    match open_source(&path, dir) {
        Err(e) => e,
        Ok(mut src) => {
            // Opening may pass; then reading must fail.
            let mut buf = Vec::new();
            loop {
                match src.next_extent(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("corrupt image read without error"),
                    Err(e) => panic!("corrupt image opened, failed only on read: {e}"),
                }
            }
        }
    }
}

#[test]
fn dynamic_vhd_honours_sector_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut flat) = small_dynamic_vhd(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    let bat = our_bat(&path);
    let bitmap_at = bat[0] as usize * 512;
    // Clear the bits of sectors 10 and 11 and of the whole of sector 64..72.
    bytes[bitmap_at + 1] &= !0b0011_0000;
    bytes[bitmap_at + 8] = 0;
    fs::write(&path, &bytes).unwrap();
    flat[10 * 512..12 * 512].fill(0);
    flat[64 * 512..72 * 512].fill(0);
    let (back, _) = open_flat(&path, dir.path());
    assert_same(&back, &flat, "bitmap");
}

#[test]
fn vhd_without_end_footer_still_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (path, flat) = small_dynamic_vhd(dir.path());
    let bytes = fs::read(&path).unwrap();
    let cut = dir.path().join("nofooter.vhd");
    fs::write(&cut, &bytes[..bytes.len() - 512]).unwrap();
    let (back, _) = open_flat(&cut, dir.path());
    assert_same(&back, &flat, "no end footer");
}

#[test]
fn fixed_vhd_with_511_byte_footer() {
    let dir = tempfile::tempdir().unwrap();
    // Build a fixed VHD by hand from the dynamic footer: data, then footer.
    let (path, _) = small_dynamic_vhd(dir.path());
    let dynamic = fs::read(&path).unwrap();
    let mut footer = dynamic[..512].to_vec();
    footer[60..64].copy_from_slice(&2u32.to_be_bytes());
    footer[16..24].fill(0xFF);
    fix_footer_checksum(&mut footer, 0);
    let size = u64::from_be_bytes(footer[48..56].try_into().unwrap()) as usize;
    let mut rng = StdRng::seed_from_u64(6);
    let mut data = vec![0u8; size];
    rng.fill(&mut data[100_000..300_000]);
    data[size - 1] = 9;
    // Disk content that happens to look like a footer copy does not matter.
    data[..8].copy_from_slice(b"conectix");
    for footer_len in [512, 511] {
        let mut bytes = data.clone();
        bytes.extend_from_slice(&footer[..footer_len]);
        let img = dir.path().join(format!("fixed{footer_len}.vhd"));
        fs::write(&img, &bytes).unwrap();
        let (back, name) = open_flat(&img, dir.path());
        assert_eq!(name, "vhd-fixed");
        assert_same(&back, &data, &format!("{footer_len}-byte footer"));
    }
    // Truncated: the footer promises more data than there is.
    let mut bytes = data[..size - 4096].to_vec();
    bytes.extend_from_slice(&footer);
    assert!(matches!(
        open_err(&bytes, dir.path()),
        FormatError::InvalidVhd { .. }
    ));
    // Bad footer checksum.
    let mut bytes = data.clone();
    bytes.extend_from_slice(&footer);
    let n = bytes.len();
    bytes[n - 100] ^= 1;
    let err = open_err(&bytes, dir.path());
    assert!(
        matches!(err, FormatError::VhdChecksum { what: "footer", .. }),
        "{err}"
    );
}

#[test]
fn corrupt_dynamic_vhds_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = small_dynamic_vhd(dir.path());
    let good = fs::read(&path).unwrap();
    let bat = our_bat(&path);
    let last_block = *bat.iter().filter(|&&e| e != u32::MAX).max().unwrap() as usize * 512;
    let d = dir.path();

    // Truncated in the middle of the last block (footer gone too).
    let err = open_err(&good[..last_block + 4096], d);
    assert!(matches!(err, FormatError::InvalidVhd { .. }), "{err}");
    assert!(err.to_string().contains("past the end"), "{err}");

    // Truncated inside the BAT.
    let err = open_err(&good[..1600], d);
    assert!(matches!(err, FormatError::InvalidVhd { .. }), "{err}");

    // Bad checksum in the footer copy at the start.
    let mut b = good.clone();
    b[100] ^= 0x40;
    let err = open_err(&b, d);
    assert!(
        matches!(
            err,
            FormatError::VhdChecksum {
                what: "footer copy",
                ..
            }
        ),
        "{err}"
    );

    // Bad checksum in the dynamic header.
    let mut b = good.clone();
    b[512 + 900] ^= 1;
    let err = open_err(&b, d);
    assert!(
        matches!(
            err,
            FormatError::VhdChecksum {
                what: "dynamic header",
                ..
            }
        ),
        "{err}"
    );

    // BAT entry pointing past the end of the file.
    let mut b = good.clone();
    b[1536 + 4..1536 + 8].copy_from_slice(&0x00F0_0000u32.to_be_bytes());
    let err = open_err(&b, d);
    assert!(matches!(err, FormatError::InvalidVhd { .. }), "{err}");
    assert!(err.to_string().contains("BAT entry 1"), "{err}");

    // Block size not a power of two.
    let mut b = good.clone();
    b[512 + 32..512 + 36].copy_from_slice(&(3u32 << 20).to_be_bytes());
    fix_dyn_header_checksum(&mut b);
    let err = open_err(&b, d);
    assert!(err.to_string().contains("power of two"), "{err}");

    // Block size absurdly large.
    let mut b = good.clone();
    b[512 + 32..512 + 36].copy_from_slice(&(1u32 << 31).to_be_bytes());
    fix_dyn_header_checksum(&mut b);
    assert!(matches!(open_err(&b, d), FormatError::InvalidVhd { .. }));

    // BAT too small for the disk.
    let mut b = good.clone();
    b[512 + 28..512 + 32].copy_from_slice(&1u32.to_be_bytes());
    fix_dyn_header_checksum(&mut b);
    assert!(matches!(open_err(&b, d), FormatError::InvalidVhd { .. }));

    // Absurd size (by current_size, as Hyper-V images are read), in both
    // footers so that the end one is what is judged.
    let mut b = good.clone();
    let end = b.len() - 512;
    for at in [0, end] {
        b[at + 28..at + 32].copy_from_slice(b"win ");
        b[at + 48..at + 56].copy_from_slice(&(1u64 << 60).to_be_bytes());
        fix_footer_checksum(&mut b, at);
    }
    let err = open_err(&b, d);
    assert!(err.to_string().contains("size"), "{err}");

    // Large but valid size whose BAT is missing from the file.
    let mut b = good.clone();
    for at in [0, end] {
        b[at + 28..at + 32].copy_from_slice(b"win ");
        b[at + 48..at + 56].copy_from_slice(&(1000u64 << 30).to_be_bytes());
        fix_footer_checksum(&mut b, at);
    }
    b[512 + 28..512 + 32].copy_from_slice(&500_000u32.to_be_bytes());
    fix_dyn_header_checksum(&mut b);
    let err = open_err(&b, d);
    assert!(err.to_string().contains("BAT"), "{err}");

    // Dynamic header offset past the end of the file.
    let mut b = good.clone();
    for at in [0, end] {
        b[at + 16..at + 24].copy_from_slice(&(1u64 << 40).to_be_bytes());
        fix_footer_checksum(&mut b, at);
    }
    assert!(matches!(open_err(&b, d), FormatError::InvalidVhd { .. }));

    // Differencing disk.
    let mut b = good.clone();
    for at in [0, end] {
        b[at + 60..at + 64].copy_from_slice(&4u32.to_be_bytes());
        fix_footer_checksum(&mut b, at);
    }
    let err = open_err(&b, d);
    assert!(matches!(err, FormatError::DifferencingVhd { .. }), "{err}");
    assert!(err.to_string().contains("not supported"));

    // Unknown disk type.
    let mut b = good.clone();
    for at in [0, end] {
        b[at + 60..at + 64].copy_from_slice(&9u32.to_be_bytes());
        fix_footer_checksum(&mut b, at);
    }
    assert!(matches!(open_err(&b, d), FormatError::InvalidVhd { .. }));
}

#[test]
fn mangled_vhds_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = small_dynamic_vhd(dir.path());
    let good = fs::read(&path).unwrap();
    let img = dir.path().join("mangled.vhd");
    let mut rng = StdRng::seed_from_u64(7);
    let try_read = |bytes: &[u8]| {
        fs::write(&img, bytes).unwrap();
        if let Ok(mut src) = open_source(&img, dir.path()) {
            let mut buf = Vec::new();
            let mut n = 0;
            while let Ok(Some(_)) = src.next_extent(&mut buf) {
                n += 1;
                assert!(n < 10_000);
            }
        }
    };
    // Truncations at every sector of the metadata and some of the data.
    for cut in (0..8192)
        .step_by(512)
        .chain((8192..good.len()).step_by(300_001))
    {
        try_read(&good[..cut]);
    }
    // Random byte changes in the footers, header and BAT, with and without
    // fixed-up checksums.
    for i in 0..400 {
        let mut b = good.clone();
        let end = b.len() - 512;
        for _ in 0..rng.gen_range(1..4) {
            let at = match rng.gen_range(0..3) {
                0 => rng.gen_range(0..512),
                1 => rng.gen_range(512..2048),
                _ => rng.gen_range(end..b.len()),
            };
            b[at] = rng.gen();
        }
        if i % 2 == 0 {
            fix_footer_checksum(&mut b, 0);
            fix_footer_checksum(&mut b, end);
            fix_dyn_header_checksum(&mut b);
        }
        try_read(&b);
    }
}
