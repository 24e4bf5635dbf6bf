//! A full store file system: writes get ENOSPC, imports get a clear error,
//! nothing already written is lost, and the server keeps serving.

use crate::common;

use std::process::Command;

use common::{have, random_image, skip, TestServer};

/// A small tmpfs, unmounted on drop.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount(size: &str) -> Option<SmallFs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            skip("cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[test]
fn a_full_store_gives_enospc_and_loses_nothing() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let Some(fs) = SmallFs::mount("48m") else {
        return;
    };
    let server = TestServer::start_in(fs.0.path().join("data"));
    server.cli_ok(&["vdisk", "create", "big", "--size", "256MiB"]);
    server.cli_ok(&[
        "device",
        "add",
        "pc",
        "--mac",
        "52:54:00:00:00:0f",
        "--vdisk",
        "big",
    ]);
    let url = server.url("device/pc");

    // 8 MiB fits and is flushed.
    let out = common::run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 8M", "-c", "flush", &url],
    );
    assert!(out.contains("wrote 8388608/8388608"), "{out}");

    // 128 MiB does not fit: the write fails with ENOSPC, the connection and server live on.
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x22 16M 128M",
            "-c",
            "read -P 0x11 0 8M",
            &url,
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(text.contains("No space left on device"), "{text}");
    assert!(
        text.contains("read 8388608/8388608"),
        "reads after ENOSPC failed:\n{text}"
    );

    // An import that does not fit gets a clear error and leaves nothing behind.
    let local = tempfile::tempdir().unwrap();
    let img = local.path().join("import.raw");
    random_image(&img, 96 << 20, 3);
    common::run(
        "sh",
        &[
            "-c",
            &format!(
                "dd if=/dev/urandom of={} bs=1M count=64 conv=notrunc status=none",
                img.display()
            ),
        ],
    );
    let err = server.cli_err(&["vdisk", "import", "toobig", img.to_str().unwrap()]);
    eprintln!("import error: {err}");
    assert!(
        err.contains("No space left") || err.contains("no space left"),
        "unclear error: {err}"
    );
    let list = server.cli_ok(&["vdisk", "list"]);
    assert!(
        !list.contains("toobig"),
        "a failed import left a vDisk behind:\n{list}"
    );

    // Everything written before is intact after a restart.
    let mut server = server;
    assert!(server.stop().success());
    server.restart();
    let out = common::run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0x11 0 8M",
            &server.url("big"),
        ],
    );
    assert!(out.contains("read 8388608/8388608"), "{out}");
    assert!(!server.log_text().contains("panicked"));
}

/// A full data folder does not wedge the embedded farm store: an admin
/// write on the full disk fails with a clear error, and once space is freed
/// the next one succeeds, without a restart, with every earlier record kept.
/// (redb refused every write after one I/O error until the database was
/// opened again.)
#[test]
fn the_farm_database_takes_writes_again_once_space_is_freed() {
    let Some(fs) = SmallFs::mount("16m") else {
        return;
    };
    let mut server = TestServer::start_in(fs.0.path().join("data"));
    let pid = server.child.as_ref().map(|c| c.id());
    server.cli_ok(&["vdisk", "create", "v", "--size", "1MiB"]);
    let add = |i: usize| {
        let mac = format!("52:54:00:aa:{:02x}:{:02x}", i / 256, i % 256);
        server.cli(&[
            "device",
            "add",
            &format!("pc{i}"),
            "--mac",
            &mac,
            "--vdisk",
            "v",
        ])
    };
    let mut kept = Vec::new();
    for i in 0..5 {
        assert!(add(i).status.success());
        kept.push(format!("pc{i}"));
    }

    // Fill the file system (as devices writing to server-side caches would).
    let filler = fs.0.path().join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "status=none"])
        .arg(format!("of={}", filler.display()))
        .status();
    // redb may have room left in its file: write until a write fails.
    let mut failure = None;
    for i in 5..2000 {
        let out = add(i);
        if out.status.success() {
            kept.push(format!("pc{i}"));
        } else {
            failure = Some(String::from_utf8_lossy(&out.stderr).into_owned());
            break;
        }
    }
    let failure = failure.expect("no admin write failed on a full disk");
    eprintln!("write on a full disk: {failure}");
    assert!(failure.contains("space"), "unclear error: {failure}");
    // Still full: still a clear error, not a wedged database.
    let out = add(9000);
    let again = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        kept.push("pc9000".into());
    } else {
        assert!(!again.contains("Previous I/O"), "{again}");
    }

    std::fs::remove_file(&filler).unwrap();
    let out = add(10000);
    assert!(
        out.status.success(),
        "the first admin write after freeing space failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    kept.push("pc10000".into());
    assert_eq!(
        server.child.as_ref().map(|c| c.id()),
        pid,
        "the server was restarted"
    );
    let list: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["device", "list", "--json"])).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    for name in &kept {
        assert!(names.contains(&name.as_str()), "{name} was lost");
    }
    assert_eq!(names.len(), kept.len(), "{names:?}");
    // And after a restart too.
    assert!(server.stop().success());
    server.restart();
    let list = server.cli_ok(&["device", "list"]);
    for name in &kept {
        assert!(
            list.contains(name.as_str()),
            "{name} was lost at the restart"
        );
    }
}
