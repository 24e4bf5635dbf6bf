//! Standard NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy) against a real
//! `vstream server`: what they read is what was imported, what they write is
//! what they read back, and exports round-trip through the CLI unchanged.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use common::nbd::text;
use common::{have, random_image, run, TestServer};

const MIB: u64 = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Asserts two files hold the same bytes, naming the first difference.
fn assert_same_file(a: &Path, b: &Path) {
    let x = std::fs::read(a).expect("read a");
    let y = std::fs::read(b).expect("read b");
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(u, v)| u != v) {
        panic!(
            "{} and {} differ first at byte {i}",
            a.display(),
            b.display()
        );
    }
}

/// `vdisk show NAME --json`, parsed.
fn show(server: &TestServer, name: &str) -> serde_json::Value {
    let out = server.cli_ok(&["vdisk", "show", name, "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("vdisk show {name} --json: {e}\n{out}"))
}

fn content_hash(server: &TestServer, name: &str) -> String {
    let v = show(server, name);
    let h = v["content_hash"]
        .as_str()
        .unwrap_or_else(|| panic!("no content_hash in {v}"))
        .to_string();
    assert!(
        h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()),
        "content_hash of {name} is not 64 hex digits: {h:?}"
    );
    h
}

/// `qemu-img compare` of a local image against an NBD export: identical, or panic.
fn compare(fmt_a: &str, a: &str, fmt_b: &str, b: &str) {
    let out = run("qemu-img", &["compare", "-f", fmt_a, a, "-F", fmt_b, b]);
    assert!(out.contains("identical"), "qemu-img compare {a} {b}: {out}");
}

/// Runs qemu-io on a raw NBD export with the given commands; read-only
/// (`-r`) for the vDisk views, which refuse a writable open.
fn qemu_io(url: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    if !url.contains("/device/") {
        c.arg("-r");
    }
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(url).output().expect("running qemu-io")
}

/// qemu-io that must succeed and must not report a failed command or pattern.
fn qemu_io_ok(url: &str, cmds: &[&str]) -> String {
    let out = qemu_io(url, cmds);
    let all = text(&out);
    assert!(out.status.success(), "qemu-io {cmds:?} {url}: {all}");
    let lower = all.to_lowercase();
    assert!(
        !lower.contains("failed") && !lower.contains("error"),
        "qemu-io {cmds:?} {url}: {all}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn raw_import_reads_back_over_nbd_and_exports_byte_identical() {
    if !have("qemu-img") {
        return;
    }
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    random_image(&raw, 32 * MIB, 1);

    server.cli_ok(&["vdisk", "import", "v", p(&raw)]);
    compare("raw", p(&raw), "raw", &server.url("v"));

    let out = dir.path().join("out.raw");
    server.cli_ok(&["vdisk", "export", "v", p(&out)]);
    assert_same_file(&raw, &out);

    let info = show(&server, "v");
    assert_eq!(info["size"].as_u64(), Some(32 * MIB), "{info}");
    let hash = content_hash(&server, "v");

    // Same content under another name: same hash. Different content: another.
    server.cli_ok(&["vdisk", "import", "same", p(&raw)]);
    assert_eq!(content_hash(&server, "same"), hash);
    let other = dir.path().join("other.raw");
    random_image(&other, 32 * MIB, 2);
    server.cli_ok(&["vdisk", "import", "other", p(&other)]);
    assert_ne!(content_hash(&server, "other"), hash);
    // One byte of difference is enough.
    let mut bytes = std::fs::read(&raw).unwrap();
    bytes[5 * MIB as usize] ^= 1;
    let one_off = dir.path().join("one-off.raw");
    std::fs::write(&one_off, &bytes).unwrap();
    server.cli_ok(&["vdisk", "import", "one-off", p(&one_off)]);
    assert_ne!(content_hash(&server, "one-off"), hash);
}

#[test]
fn vhd_fixed_and_dynamic_import_and_vhd_export() {
    if !have("qemu-img") {
        return;
    }
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    // A size a VHD's CHS geometry represents exactly (qemu-img rounds others up).
    let size = 33_562_624;
    let raw = dir.path().join("disk.raw");
    random_image(&raw, size, 3);
    for (name, opts) in [
        ("fixed", &["-o", "subformat=fixed"][..]),
        ("dynamic", &[][..]),
    ] {
        let vhd = dir.path().join(format!("{name}.vhd"));
        let mut args = vec!["convert", "-f", "raw", "-O", "vpc"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[p(&raw), p(&vhd)]);
        run("qemu-img", &args);

        server.cli_ok(&["vdisk", "import", name, p(&vhd)]);
        let info = show(&server, name);
        assert_eq!(info["size"].as_u64(), Some(size), "{name}: {info}");
        compare("raw", p(&raw), "raw", &server.url(name));

        let out = dir.path().join(format!("{name}-out.vhd"));
        server.cli_ok(&["vdisk", "export", name, p(&out), "--format", "vhd"]);
        compare("raw", p(&raw), "vpc", p(&out));
        // And back to raw with qemu-img: byte for byte the original.
        let back = dir.path().join(format!("{name}-back.raw"));
        run(
            "qemu-img",
            &["convert", "-f", "vpc", "-O", "raw", p(&out), p(&back)],
        );
        assert_same_file(&raw, &back);
    }
    // Both imports hold the raw image's content.
    let hash = content_hash(&server, "fixed");
    assert_eq!(content_hash(&server, "dynamic"), hash);
    server.cli_ok(&["vdisk", "import", "raw", p(&raw)]);
    assert_eq!(content_hash(&server, "raw"), hash);
}

#[test]
fn nbdinfo_lists_sizes_and_maps_exports() {
    if !have("nbdinfo") {
        return;
    }
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    // Data at 1 MiB (64 KiB) and at 5 MiB (4 KiB); zeros elsewhere, as holes.
    let raw = dir.path().join("sparse.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(16 * MIB).unwrap();
        f.write_all_at(&vec![0x5a; 64 << 10], MIB).unwrap();
        f.write_all_at(&vec![0xa5; 4 << 10], 5 * MIB).unwrap();
    }
    server.cli_ok(&["vdisk", "import", "sparse", p(&raw)]);
    server.cli_ok(&["vdisk", "create", "empty", "--size", "20MiB"]);

    let list = run(
        "nbdinfo",
        &["--list", &format!("nbd://127.0.0.1:{}", server.nbd_port)],
    );
    for name in ["sparse", "empty"] {
        assert!(
            list.lines()
                .any(|l| l.trim() == format!("export=\"{name}\":")
                    || l.contains(&format!("\"{name}\""))),
            "nbdinfo --list does not show {name}:\n{list}"
        );
    }
    let list_json: serde_json::Value = serde_json::from_str(&run(
        "nbdinfo",
        &[
            "--list",
            "--json",
            &format!("nbd://127.0.0.1:{}", server.nbd_port),
        ],
    ))
    .expect("nbdinfo --list --json");
    let mut names: Vec<&str> = list_json["exports"]
        .as_array()
        .expect("exports array")
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["empty", "sparse"], "{list_json}");

    assert_eq!(
        run("nbdinfo", &["--size", &server.url("sparse")]).trim(),
        (16 * MIB).to_string()
    );
    assert_eq!(
        run("nbdinfo", &["--size", &server.url("empty")]).trim(),
        (20 * MIB).to_string()
    );
    let info = run("nbdinfo", &[&server.url("sparse")]);
    assert!(
        info.contains(&format!("export-size: {}", 16 * MIB)),
        "{info}"
    );
    assert!(
        info.contains("is_read_only: true"),
        "the vDisk view must be read-only:\n{info}"
    );

    let map: serde_json::Value =
        serde_json::from_str(&run("nbdinfo", &["--map", "--json", &server.url("sparse")]))
            .expect("map json");
    let extents: Vec<(u64, u64, String)> = map
        .as_array()
        .expect("map array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["description"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected = vec![
        (0, MIB, "hole,zero".to_string()),
        (MIB, 64 << 10, "data".to_string()),
        (
            MIB + (64 << 10),
            4 * MIB - (64 << 10),
            "hole,zero".to_string(),
        ),
        (5 * MIB, 4 << 10, "data".to_string()),
        (
            5 * MIB + (4 << 10),
            11 * MIB - (4 << 10),
            "hole,zero".to_string(),
        ),
    ];
    assert_eq!(extents, expected, "nbdinfo --map --json:\n{map}");

    let map_text = run("nbdinfo", &["--map", &server.url("empty")]);
    let lines: Vec<&str> = map_text.lines().collect();
    assert_eq!(lines.len(), 1, "{map_text}");
    let words: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(words[..2], ["0", &(20 * MIB).to_string()], "{map_text}");
    assert!(lines[0].ends_with("hole,zero"), "{map_text}");
}

#[test]
fn nbdcopy_round_trip_through_a_private_device_over_tcp_and_unix() {
    if !have("nbdcopy") {
        return;
    }
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    server.cli_ok(&["vdisk", "create", "v", "--size", "24MiB"]);
    server.cli_ok(&[
        "device",
        "add",
        "d1",
        "--mac",
        "aa:bb:cc:00:00:01",
        "--vdisk",
        "v",
    ]);

    for (i, url) in [server.url("device/d1"), server.unix_url("device/d1")]
        .iter()
        .enumerate()
    {
        let src = dir.path().join(format!("src{i}.raw"));
        random_image(&src, 24 * MIB, 10 + i as u64);
        run("nbdcopy", &[p(&src), url]);
        let out = dir.path().join(format!("out{i}.raw"));
        run("nbdcopy", &[url, p(&out)]);
        assert_same_file(&src, &out);
        // The vDisk itself took the writes (Private mode).
        let view = dir.path().join(format!("view{i}.raw"));
        run("nbdcopy", &[&server.url("v"), p(&view)]);
        assert_same_file(&src, &view);
        let exported = dir.path().join(format!("exported{i}.raw"));
        server.cli_ok(&["vdisk", "export", "v", p(&exported)]);
        assert_same_file(&src, &exported);
    }
}

#[test]
fn nbdcopy_cannot_write_the_read_only_vdisk_view() {
    if !have("nbdcopy") {
        return;
    }
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    server.cli_ok(&["vdisk", "create", "v", "--size", "16MiB"]);
    let src = dir.path().join("src.raw");
    random_image(&src, 16 * MIB, 20);
    let out = Command::new("nbdcopy")
        .args([p(&src), &server.url("v")])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "nbdcopy into the read-only vDisk view succeeded: {}",
        text(&out)
    );
    let view = dir.path().join("view.raw");
    run("nbdcopy", &[&server.url("v"), p(&view)]);
    assert!(
        std::fs::read(&view).unwrap().iter().all(|&b| b == 0),
        "the read-only view changed"
    );
}

#[test]
fn qemu_io_writes_and_reads_patterns_on_a_device_export() {
    if !have("qemu-io") {
        return;
    }
    let server = TestServer::start();
    server.cli_ok(&["vdisk", "create", "v", "--size", "16MiB"]);
    server.cli_ok(&[
        "device",
        "add",
        "d1",
        "--mac",
        "aa:bb:cc:00:00:05",
        "--vdisk",
        "v",
    ]);
    let url = server.url("device/d1");

    qemu_io_ok(&url, &["write -P 0xab 0 64k", "read -P 0xab 0 64k"]);
    // A later session sees it, and so does the read-only view (Private mode).
    qemu_io_ok(&url, &["read -P 0xab 0 64k", "read -P 0 64k 64k"]);
    qemu_io_ok(&server.url("v"), &["read -P 0xab 0 64k"]);

    // Unaligned writes across chunk boundaries, then zeroes and discard.
    qemu_io_ok(
        &url,
        &[
            "write -P 0xcd 4000 10000",
            "read -P 0xcd 4000 10000",
            "read -P 0xab 0 4000",
        ],
    );
    qemu_io_ok(&url, &["read -P 0xab 14000 51536"]);
    qemu_io_ok(&url, &["write -z 1M 128k", "read -P 0 1M 128k"]);
    qemu_io_ok(&url, &["write -P 0x11 2M 64k", "discard 2M 64k"]);
    qemu_io_ok(
        &url,
        &["write -P 0x77 16320k 64k", "read -P 0x77 16320k 64k"],
    );
    qemu_io_ok(
        &server.unix_url("device/d1"),
        &["read -P 0x77 16320k 64k", "read -P 0xcd 4000 10000"],
    );

    // A mismatching pattern is noticed (the check itself works).
    let out = qemu_io(&url, &["read -P 0xee 0 64k"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"),
        "{}",
        text(&out)
    );
}
