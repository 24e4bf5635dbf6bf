//! Power loss, not process death. The server runs inside a QEMU guest (TCG)
//! whose data folder is on a virtio disk, a raw file on the host; the host
//! drives it through forwarded ports with the block writer of
//! common/durable.rs. Killing QEMU (SIGKILL) in the middle of flushed and
//! unflushed writes is a power cut for the server: the guest kernel's page
//! cache dies with it and only what reached the virtual disk survives. (What
//! QEMU itself wrote to the host file stays: the host does not crash.) The
//! guest then boots again on the same disk: the server must start cleanly,
//! every write covered by an acknowledged flush must be there, and every
//! block must hold its old or a newer write, nothing torn, nothing else.
//!
//! durability.rs kills the server process instead, whose writes the host's
//! page cache keeps: it stays green with the syncs of crates/image/src/layer.rs
//! removed. This test fails when the sync that makes a flush's bitmap
//! durable (the second `sync_data` of `Layer::flush`) is removed, and failed
//! on a Standard-mode cache whose base tag was not synced (Store::open_cache).
//! bench/notes/power-loss.md has the runs.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::durable::{check_disk, last_number, last_write_to, write_script, Writer, BLOCKS};
use rand::Rng;

/// Guest RAM, MiB: the server, the initramfs it runs from, and room for the
/// page cache to hold every unsynced write.
const GUEST_MEM: &str = "768";
/// The guest's disk: an ext4 file system holding the data folder.
const DISK_MB: u64 = 256;

/// What the guest boots: the kit's kernel and network-boot initramfs (its
/// /power-init), and its disk.
struct Machine {
    kernel: PathBuf,
    initrd: PathBuf,
    disk: PathBuf,
    dir: PathBuf,
    token: String,
}

impl Machine {
    /// A machine with a new disk in `dir`, booting the kit in `kit`.
    fn new(kit: &Path, dir: &Path) -> Machine {
        let kernel = if kit.join("vmlinux").exists() {
            kit.join("vmlinux")
        } else {
            kit.join("vmlinuz")
        };
        // The kit's initramfs is gzipped; under TCG the guest takes seconds
        // to gunzip it, the host a fraction of one.
        let initrd = dir.join("initrd.cpio");
        let gz = kit.join("netboot-initrd.img");
        let out = Command::new("gzip")
            .arg("-dc")
            .arg(&gz)
            .stdout(std::fs::File::create(&initrd).expect("initrd file"))
            .status()
            .expect("running gzip");
        if !out.success() {
            // Not gzipped (VSTREAM_NETBOOT_COMPRESS=none): as it is.
            std::fs::copy(&gz, &initrd).expect("copying the initramfs");
        }
        let token: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        let disk = make_disk(dir, &token);
        Machine {
            kernel,
            initrd,
            disk,
            dir: dir.to_path_buf(),
            token,
        }
    }

    /// Boots the guest with the guest kernel's writeback set to `writeback`
    /// (hold | fast | default, see tests/guest/power-init.sh) and waits until
    /// its server listens.
    fn boot(&self, writeback: &str) -> Guest {
        let dir = &self.dir;
        // Another process may take a port between picking and QEMU binding it.
        for attempt in 0.. {
            let [nbd_port, api_port] = common::free_ports::<2>();
            let console = dir.join(format!("console-{nbd_port}.txt"));
            let stderr = dir.join(format!("qemu-{nbd_port}.err"));
            let append = format!(
                "console=ttyS0 rdinit=/power-init panic=-1 quiet loglevel=3 mitigations=off \
                 nokaslr no_timer_check tsc=unstable vstest.writeback={writeback}"
            );
            let qemu = Command::new("qemu-system-x86_64")
                .args(["-machine", "pc", "-accel", "tcg", "-cpu", "Nehalem"])
                .args(["-smp", "1", "-m", GUEST_MEM])
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .args(["-no-reboot", "-monitor", "none"])
                .arg("-serial")
                .arg(format!("file:{}", console.display()))
                .arg("-kernel")
                .arg(&self.kernel)
                .arg("-initrd")
                .arg(&self.initrd)
                .args(["-append", &append])
                // The guest sees a disk with a volatile write cache and
                // flushes it as it would a real one. What QEMU has written
                // to the file is what survives the cut (the host does not
                // crash), so QEMU need not pass those flushes on to the
                // host's disk: cache=unsafe spares the fsyncs, nothing else.
                .arg("-drive")
                .arg(format!(
                    "file={},format=raw,if=virtio,cache=unsafe",
                    self.disk.display().to_string().replace(',', ",,")
                ))
                .arg("-netdev")
                .arg(format!(
                    "user,id=n0,hostfwd=tcp:127.0.0.1:{nbd_port}-10.0.2.15:10809,\
                     hostfwd=tcp:127.0.0.1:{api_port}-10.0.2.15:7080"
                ))
                .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&stderr).expect("qemu stderr file"))
                .spawn()
                .expect("starting qemu-system-x86_64");
            let mut guest = Guest {
                qemu,
                console,
                api: format!("http://127.0.0.1:{api_port}"),
                nbd_port,
                token: self.token.clone(),
            };
            match guest.wait_ready() {
                Ok(()) => return guest,
                Err(why) => {
                    let err = std::fs::read_to_string(&stderr).unwrap_or_default();
                    if attempt < 5 && err.contains("host forwarding") {
                        continue;
                    }
                    panic!(
                        "the guest's server did not come up ({why}):\n{}\nqemu: {err}",
                        guest.console_text()
                    );
                }
            }
        }
        unreachable!()
    }
}

/// The vstream server in a QEMU guest, reached through QEMU's port forwards.
struct Guest {
    qemu: Child,
    console: PathBuf,
    api: String,
    nbd_port: u16,
    token: String,
}

impl Guest {
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(150);
        loop {
            let c = self.console_text();
            if c.contains("GUEST-ERROR") || c.contains("GUEST-SERVER exited") {
                return Err("the guest reported an error".into());
            }
            if c.contains("GUEST-SERVER ready") {
                return Ok(());
            }
            if let Ok(Some(st)) = self.qemu.try_wait() {
                return Err(format!("qemu exited with {st}"));
            }
            if Instant::now() > deadline {
                return Err("no GUEST-SERVER ready within 150 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    fn url(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.nbd_port)
    }

    fn cli(&self, args: &[&str]) -> Output {
        common::cli_as(&self.api, &self.token, args)
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        common::ok_stdout("vstream", args, &self.cli(args))
    }

    /// Pulls the plug: SIGKILL to QEMU, nothing the guest holds survives.
    fn power_cut(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }

    /// The server's log so far must show no panic and no error, and the
    /// server must still run.
    fn assert_clean(&self, what: &str) {
        let c = self.console_text();
        let bad: Vec<&str> = c
            .lines()
            .filter(|l| {
                ["panicked", " ERROR ", "GUEST-ERROR", "GUEST-SERVER exited"]
                    .iter()
                    .any(|bad| l.contains(bad))
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{what}: the server did not run cleanly:\n{}\n--- console:\n{c}",
            bad.join("\n")
        );
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.power_cut();
    }
}

fn tools_present() -> bool {
    common::have_guest_tools()
        && common::have("objcopy")
        && common::have("ldd")
        && common::have("nbdcopy")
        && common::have_python_nbd()
}

/// A raw disk image with an ext4 file system holding the data folder
/// `vstream/` and, in it, the admin token the host uses.
fn make_disk(dir: &Path, token: &str) -> PathBuf {
    let seed = dir.join("seed");
    std::fs::create_dir_all(seed.join("vstream")).expect("seed folder");
    std::fs::write(seed.join("vstream/admin.token"), format!("{token}\n")).expect("token");
    let disk = dir.join("disk.img");
    let f = std::fs::File::create(&disk).expect("disk image");
    f.set_len(DISK_MB << 20).expect("disk size");
    drop(f);
    common::run(
        "mkfs.ext4",
        &[
            "-F",
            "-q",
            "-d",
            seed.to_str().expect("path"),
            disk.to_str().expect("path"),
        ],
    );
    disk
}

/// The whole of `export`, read with nbdcopy on one connection, ended
/// cleanly (for a Standard-mode device, the server discards its cache then).
fn read_disk(guest: &Guest, export: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("read.img");
    let _ = std::fs::remove_file(&out);
    common::run(
        "nbdcopy",
        &[
            "--connections=1",
            &guest.url(export),
            out.to_str().expect("path"),
        ],
    );
    std::fs::read(&out).expect("reading the copied disk")
}

/// One vDisk written by one device, as the test follows it.
struct Tracked {
    device: &'static str,
    /// What each block held at the last check.
    found: Vec<Option<u64>>,
}

#[test]
fn power_cut_keeps_every_flushed_write_and_tears_nothing() {
    if !tools_present() {
        return;
    }
    let t0 = Instant::now();
    let kit = common::netboot_kit();
    let dir = tempfile::tempdir().expect("tempdir");
    let machine = Machine::new(&kit, dir.path());
    let script = write_script(dir.path());
    let mut rng = rand::thread_rng();

    // Round by round, the guest kernel's writeback: none of its own (only the
    // server's syncs reach the disk), then within ~50 ms (a cut finds
    // unsynced writes half on the disk), then Linux's defaults.
    let rounds = ["hold", "fast", "default"];
    let mut guest = machine.boot(rounds[0]);
    eprintln!("booted in {:.1?}", t0.elapsed());
    // p: Private mode, the device writes the vDisk's own layer.
    // s: Standard mode, the device writes its cache on the server.
    guest.cli_ok(&["vdisk", "create", "p", "--size", "64MiB"]);
    guest.cli_ok(&["vdisk", "create", "s", "--size", "64MiB"]);
    guest.cli_ok(&["vdisk", "set", "s", "--mode", "standard"]);
    for (dev, mac, vdisk) in [
        ("dp", "52:54:00:d0:00:01", "p"),
        ("ds", "52:54:00:d0:00:02", "s"),
    ] {
        guest.cli_ok(&["device", "add", dev, "--mac", mac, "--vdisk", vdisk]);
    }
    let mut tracked = [
        Tracked {
            device: "dp",
            found: vec![None; BLOCKS as usize],
        },
        Tracked {
            device: "ds",
            found: vec![None; BLOCKS as usize],
        },
    ];

    for (round, writeback) in rounds.iter().enumerate() {
        // Write numbers grow from round to round: "later" means larger.
        let start = round as u64 * 1_000_000;
        let mut writers: Vec<(Writer, Vec<String>)> = tracked
            .iter()
            .map(|t| {
                let url = guest.url(&format!("device/{}", t.device));
                let w = Writer::start(&script, &["crash", &url, &start.to_string()]);
                (w, Vec::new())
            })
            .collect();
        for (w, seen) in &mut writers {
            w.wait_for("FLUSHED ", seen);
        }
        let delay = Duration::from_millis(rng.gen_range(1000..=2500));
        std::thread::sleep(delay);
        guest.power_cut();
        let flushed: Vec<u64> = writers
            .into_iter()
            .zip(&tracked)
            .map(|((w, seen), t)| {
                let lines = w.finish(seen);
                assert!(
                    lines.last().is_some_and(|l| l.starts_with("END ")),
                    "round {round} ({writeback}): {}'s writer did not see the power go: {:?}",
                    t.device,
                    lines.last()
                );
                last_number(&lines, "FLUSHED ").expect("at least one FLUSHED")
            })
            .collect();
        eprintln!(
            "round {round} ({writeback}): power cut {delay:?} after the first flush; \
             flushes covered writes {start}..={} (dp) and {start}..={} (ds)",
            flushed[0], flushed[1]
        );

        let next = rounds.get(round + 1).copied().unwrap_or("default");
        let t = Instant::now();
        guest = machine.boot(next);
        let booted = t.elapsed();
        let what = format!("round {round} ({writeback}) after the power cut");
        // p through its read-only view; ds through the device itself: the
        // read ends its session cleanly, which discards its cache, so every
        // round also cuts the power over a cache made in that round.
        let images = [
            read_disk(&guest, "p", dir.path()),
            read_disk(&guest, "device/ds", dir.path()),
        ];
        common::wait_for(30, "the clean end of ds's session", || {
            guest
                .console_text()
                .contains("write cache discarded")
                .then_some(())
        });
        eprintln!(
            "round {round}: booted again in {booted:.1?}, read back in {:.1?}",
            t.elapsed() - booted
        );
        // Shown if the test fails: what the server said as it started again
        // and served the reads.
        eprintln!("--- {what}: console\n{}---", guest.console_text());
        guest.assert_clean(&what);
        for ((t, last), img) in tracked.iter_mut().zip(&flushed).zip(&images) {
            // The last write to each block covered by the last acknowledged
            // flush, or what an earlier round left there, whichever is newer.
            let lower: Vec<Option<u64>> = (0..BLOCKS)
                .map(|b| t.found[b as usize].max(last_write_to(b, start, *last)))
                .collect();
            t.found = check_disk(img, &lower, last + 8, &format!("{what}, {}", t.device));
        }
        tracked[1].found = vec![None; BLOCKS as usize];
    }
    drop(guest);
    eprintln!("{} rounds in {:.1?}", rounds.len(), t0.elapsed());
}
