//! The iSCSI front door against libiscsi's own tools and QEMU's iSCSI
//! driver (real initiators), over a layered disk on this machine: login
//! with and without CHAP, discovery, INQUIRY and capacity, reads and
//! writes, and what happens to a wrong secret, an unknown target and a
//! command before login.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;

use futures::future::BoxFuture;
use vstream_iscsi::login::{status, LoginFailure};
use vstream_iscsi::pdu::{LoginRequest, ScsiCommand};
use vstream_iscsi::scsi::Identity;
use vstream_iscsi::{Pdu, Request, Response, Stage};
use vstream_service::iscsi::{self, Chap, Stats, Target, Targets};
use vstream_service::{Client, Export, Limits};
use vstream_testkit::{have, skip};

const TARGET: &str = "iqn.2026-12.org.vstream:device.pc1";
const SECRET: &str = "pc1-secret-0123";

struct TestTargets {
    backend: Arc<dyn vstream_service::Backend>,
    lu: Arc<iscsi::Lu>,
    chap: bool,
    stats: Stats,
}

impl Targets for TestTargets {
    fn authorize<'a>(
        &'a self,
        _initiator: &'a str,
        target: &'a str,
        _client: &'a Client,
    ) -> BoxFuture<'a, Result<Option<Chap>, LoginFailure>> {
        Box::pin(async move {
            if target != TARGET {
                return Err(LoginFailure::new(status::NOT_FOUND, "no such target"));
            }
            Ok(self.chap.then(|| Chap {
                user: "pc1".into(),
                secret: SECRET.as_bytes().to_vec(),
                target: Some(("vstream".into(), b"target-secret-01".to_vec())),
            }))
        })
    }
    fn open<'a>(
        self: Arc<Self>,
        _initiator: &'a str,
        _target: &'a str,
        _client: &'a Client,
    ) -> BoxFuture<'a, Result<Target, LoginFailure>> {
        Box::pin(async move {
            Ok(Target {
                export: Export {
                    name: "device/pc1".into(),
                    description: String::new(),
                    backend: self.backend.clone(),
                    session: None,
                },
                physical_exponent: 0,
                identity: Identity {
                    vendor: "VSTREAM".into(),
                    product: "vDisk root".into(),
                    revision: "0001".into(),
                    serial: "0123456789abcdef".into(),
                    naa: [0x60, 0, 0x2a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
                },
                lu: self.lu.clone(),
            })
        })
    }
    fn discover<'a>(
        &'a self,
        _initiator: &'a str,
        _client: &'a Client,
        local: &'a str,
    ) -> BoxFuture<'a, Vec<(String, Vec<String>)>> {
        Box::pin(async move { vec![(TARGET.to_string(), vec![format!("{local},1")])] })
    }
    fn stats(&self) -> &Stats {
        &self.stats
    }
}

/// A runtime serving iSCSI over a 64 MiB layered disk; its port.
fn serve(dir: &std::path::Path, chap: bool) -> (tokio::runtime::Runtime, u16, Arc<TestTargets>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let layer = vstream_image::Layer::create(&dir.join("top.layer"), 64 << 20).unwrap();
    let disk = vstream_image::Disk::writable(vec![Arc::new(layer)], None).unwrap();
    let targets = Arc::new(TestTargets {
        backend: vstream_pipeline::Local::new(Arc::new(disk)),
        lu: Arc::default(),
        chap,
        stats: Stats::default(),
    });
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let listener = vstream_service::Listener::Tcp(listener);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let t: Arc<dyn Targets> = targets.clone();
    rt.spawn(async move {
        let _keep = _tx;
        iscsi::serve(listener, t, Limits::new(64, 64), rx).await
    });
    (rt, port, targets)
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn have_tools() -> bool {
    for t in ["iscsi-inq", "iscsi-ls", "iscsi-readcapacity16", "qemu-img"] {
        if !have(t) {
            skip(&format!("{t} is not installed (libiscsi-bin, qemu-utils)"));
            return false;
        }
    }
    true
}

#[test]
fn libiscsi_and_qemu_log_in_read_and_write() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_rt, port, targets) = serve(dir.path(), false);
    let url = format!("iscsi://127.0.0.1:{port}/{TARGET}/0");

    let (ok, out) = run("iscsi-inq", &[&url]);
    assert!(ok, "{out}");
    assert!(out.contains("VSTREAM"), "{out}");
    let (ok, out) = run("iscsi-inq", &["-e", "1", "-c", "0x83", &url]);
    assert!(ok, "{out}");
    let (ok, out) = run("iscsi-readcapacity16", &[&url]);
    assert!(ok, "{out}");
    assert!(out.contains("131071"), "the last LBA of 64 MiB: {out}");
    let (ok, out) = run("iscsi-ls", &["-s", &format!("iscsi://127.0.0.1:{port}")]);
    assert!(ok, "{out}");
    assert!(out.contains(TARGET), "{out}");

    // QEMU's iSCSI driver writes an image and reads it back.
    let src = dir.path().join("src.raw");
    let data: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let (ok, out) = run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-O",
            "raw",
            "-f",
            "raw",
            src.to_str().unwrap(),
            &url,
        ],
    );
    assert!(ok, "qemu-img convert to iSCSI: {out}");
    let back = dir.path().join("back.raw");
    let (ok, out) = run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            "-f",
            "raw",
            &url,
            back.to_str().unwrap(),
        ],
    );
    assert!(ok, "qemu-img convert from iSCSI: {out}");
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), 64 << 20);
    assert!(got[..data.len()] == data[..], "the data read back differs");
    assert!(got[data.len()..].iter().all(|&b| b == 0));
    let s = &targets.stats;
    assert!(s.logins.load(std::sync::atomic::Ordering::Relaxed) >= 5);
    assert!(s.written_bytes.load(std::sync::atomic::Ordering::Relaxed) >= 8 << 20);
}

#[test]
fn chap_is_required_and_checked() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_rt, port, targets) = serve(dir.path(), true);
    let with =
        |user: &str, secret: &str| format!("iscsi://{user}%{secret}@127.0.0.1:{port}/{TARGET}/0");
    let (ok, out) = run("iscsi-inq", &[&with("pc1", SECRET)]);
    assert!(ok, "the right secret: {out}");
    let (ok, out) = run("iscsi-inq", &[&with("pc1", "wrong-secret-99")]);
    assert!(!ok, "a wrong secret logged in: {out}");
    let (ok, _) = run("iscsi-inq", &[&with("pc2", SECRET)]);
    assert!(!ok, "a wrong name logged in");
    let (ok, _) = run(
        "iscsi-inq",
        &[&format!("iscsi://127.0.0.1:{port}/{TARGET}/0")],
    );
    assert!(!ok, "no CHAP at all logged in");
    let (ok, _) = run(
        "iscsi-inq",
        &[&format!(
            "iscsi://127.0.0.1:{port}/iqn.2026-12.org.vstream:device.nope/0"
        )],
    );
    assert!(!ok, "an unknown target logged in");
    assert!(
        targets
            .stats
            .login_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );
}

/// A first Login Request, from security to operational stage, with `data`.
fn login(isid: u8, data: Vec<u8>) -> Request {
    Request::Login(LoginRequest {
        transit: true,
        cont: false,
        csg: Stage::Security,
        nsg: Stage::Operational,
        version_max: 0,
        version_min: 0,
        isid: [0x80, 0, 0, 0, 0, isid],
        tsih: 0,
        itt: 1,
        cid: 0,
        cmd_sn: 0,
        exp_stat_sn: 0,
        data,
    })
}

/// Raw PDUs: a command before login ends that connection only; a lying
/// data segment length too; the server goes on serving.
#[test]
fn bad_pdus_end_one_connection_only() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_rt, port, _targets) = serve(dir.path(), false);
    let url = format!("iscsi://127.0.0.1:{port}/{TARGET}/0");

    // A SCSI command before any login: the connection is closed.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let cmd = Request::ScsiCommand(ScsiCommand {
        final_bit: true,
        read: true,
        expected_len: 512,
        cdb: [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        ..Default::default()
    });
    s.write_all(&cmd.to_pdu().to_bytes()).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        s.read(&mut buf).unwrap_or(0),
        0,
        "answered a command before login"
    );

    // A login whose data segment claims 16 MiB: refused, closed.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut bytes = login(2, Vec::new()).to_pdu().to_bytes();
    bytes[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    s.write_all(&bytes).unwrap();
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "answered a lying length");

    // A login for an unknown target: a Login Response with its status.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let login = login(
        3,
        b"InitiatorName=iqn.x:y\0TargetName=iqn.x:none\0SessionType=Normal\0AuthMethod=None\0"
            .to_vec(),
    );
    s.write_all(&login.to_pdu().to_bytes()).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let (pdu, _) = Pdu::decode(&got, 1 << 20)
        .unwrap()
        .expect("a login response");
    match Response::parse(pdu).unwrap() {
        Response::Login(r) => assert_eq!((r.status_class, r.status_detail), status::NOT_FOUND),
        other => panic!("{other:?}"),
    }

    // And the server serves on.
    let (ok, out) = run("iscsi-inq", &[&url]);
    assert!(ok, "{out}");
}

/// Sends `req` on `s` and reads the Login Response: its status and flags.
fn login_exchange(s: &mut TcpStream, req: &Request) -> vstream_iscsi::pdu::LoginResponse {
    s.write_all(&req.to_pdu().to_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some((pdu, _)) = Pdu::decode(&got, 1 << 20).unwrap() {
            match Response::parse(pdu).unwrap() {
                Response::Login(r) => return r,
                other => panic!("{other:?}"),
            }
        }
        let n = s.read(&mut buf).expect("a login response");
        assert!(n > 0, "closed without a login response");
        got.extend_from_slice(&buf[..n]);
    }
}

/// A login may not slip past CHAP: not by sending its names after a
/// first PDU with the C bit, not by naming another target once the first
/// one let it in.
#[test]
fn a_login_cannot_change_who_it_is_or_split_its_names_past_chap() {
    let dir = tempfile::tempdir().unwrap();
    let (_rt, port, _t) = serve(dir.path(), true);
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s
    };
    let mut s = connect();
    let Request::Login(mut first) = login(4, b"InitiatorName=iqn.x:y\0".to_vec()) else {
        unreachable!()
    };
    first.cont = true;
    first.transit = false;
    let r = login_exchange(&mut s, &Request::Login(first.clone()));
    assert_eq!((r.status_class, r.status_detail), status::SUCCESS);
    let mut rest = first;
    rest.cont = false;
    rest.transit = true;
    rest.data = format!("TargetName={TARGET}\0SessionType=Normal\0AuthMethod=None\0").into_bytes();
    let r = login_exchange(&mut s, &Request::Login(rest));
    assert_eq!(
        (r.status_class, r.status_detail),
        status::AUTHENTICATION_FAILURE,
        "the target needs CHAP"
    );

    // Without CHAP: in as one target, then naming another.
    let dir = tempfile::tempdir().unwrap();
    let (_rt, port, _t) = serve(dir.path(), false);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let text = format!(
        "InitiatorName=iqn.x:y\0TargetName={TARGET}\0SessionType=Normal\0AuthMethod=None\0"
    );
    let r = login_exchange(&mut s, &login(5, text.into_bytes()));
    assert_eq!((r.status_class, r.status_detail), status::SUCCESS);
    assert!(r.transit && r.nsg == Stage::Operational, "{r:?}");
    let Request::Login(mut next) = login(
        5,
        b"TargetName=iqn.2026-12.org.vstream:device.pc2\0".to_vec(),
    ) else {
        unreachable!()
    };
    next.csg = Stage::Operational;
    next.nsg = Stage::FullFeature;
    let r = login_exchange(&mut s, &Request::Login(next));
    assert_eq!((r.status_class, r.status_detail), status::INITIATOR_ERROR);
}

/// Logs in on `s` from the security stage straight to full feature phase,
/// without CHAP; returns the ExpCmdSN to use next.
fn login_plain(s: &mut TcpStream, isid: u8) -> u32 {
    let Request::Login(mut req) = login(
        isid,
        format!(
            "InitiatorName=iqn.x:y\0TargetName={TARGET}\0SessionType=Normal\0AuthMethod=None\0"
        )
        .into_bytes(),
    ) else {
        unreachable!()
    };
    req.nsg = Stage::FullFeature;
    let r = login_exchange(s, &Request::Login(req));
    assert_eq!((r.status_class, r.status_detail), status::SUCCESS);
    assert_eq!(r.nsg, Stage::FullFeature, "{r:?}");
    r.sn.exp_cmd_sn
}

/// The bad input, past the login: a login text of 10,000 keys,
/// and a data segment longer than the MaxRecvDataSegmentLength the target
/// declared. Each ends its own connection with a clear answer; a session
/// beside them, logged in before, goes on as if nothing happened.
#[test]
fn oversized_texts_and_segments_end_their_own_connection_only() {
    if !have_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_rt, port, targets) = serve(dir.path(), false);
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s
    };
    // A bystander, in full feature phase throughout.
    let mut bystander = connect();
    let mut cmd_sn = login_plain(&mut bystander, 9);
    let read_block = |s: &mut TcpStream, cmd_sn: &mut u32| {
        let cmd = Request::ScsiCommand(ScsiCommand {
            final_bit: true,
            read: true,
            expected_len: 512,
            itt: *cmd_sn,
            cmd_sn: *cmd_sn,
            cdb: [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
            ..Default::default()
        });
        *cmd_sn += 1;
        s.write_all(&cmd.to_pdu().to_bytes()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some((pdu, _)) = Pdu::decode(&got, 1 << 20).unwrap() {
                match Response::parse(pdu).unwrap() {
                    Response::DataIn(d) => {
                        assert_eq!(d.data.len(), 512);
                        return;
                    }
                    other => panic!("{other:?}"),
                }
            }
            let n = s.read(&mut buf).expect("the bystander's read");
            assert!(n > 0, "the bystander's connection closed");
            got.extend_from_slice(&buf[..n]);
        }
    };
    read_block(&mut bystander, &mut cmd_sn);

    // 10,000 keys, in continued login PDUs of at most 8 KiB each.
    let mut s = connect();
    let mut text = b"InitiatorName=iqn.x:y\0".to_vec();
    for i in 0..10_000 {
        text.extend_from_slice(format!("X-vstream.k{i}=v\0").as_bytes());
    }
    let chunks: Vec<&[u8]> = text.chunks(8192).collect();
    let mut refused = None;
    for (i, chunk) in chunks.iter().enumerate() {
        let Request::Login(mut req) = login(7, chunk.to_vec()) else {
            unreachable!()
        };
        req.cont = i + 1 < chunks.len();
        req.transit = !req.cont;
        let r = login_exchange(&mut s, &Request::Login(req));
        if (r.status_class, r.status_detail) != status::SUCCESS {
            refused = Some((r.status_class, r.status_detail));
            break;
        }
    }
    assert_eq!(refused, Some(status::INITIATOR_ERROR), "10,000 keys");
    let mut buf = [0u8; 64];
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "left open after refusal");

    // A write whose immediate data is longer than the 256 KiB the target
    // declared (MaxRecvDataSegmentLength).
    let mut s = connect();
    let sn = login_plain(&mut s, 8);
    let cmd = Request::ScsiCommand(ScsiCommand {
        final_bit: true,
        write: true,
        expected_len: 320 * 1024,
        itt: 1,
        cmd_sn: sn,
        cdb: [0x2a, 0, 0, 0, 0, 0, 0, 0x02, 0x80, 0, 0, 0, 0, 0, 0, 0],
        data: vec![0xee; 320 * 1024],
        ..Default::default()
    });
    let _ = s.write_all(&cmd.to_pdu().to_bytes());
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    // Either a Reject, or nothing, then the end of the connection; never
    // a write done.
    if let Some((pdu, _)) = Pdu::decode(&got, 1 << 20).unwrap() {
        match Response::parse(pdu).unwrap() {
            Response::Reject(_) => {}
            other => panic!("an oversized segment was answered {other:?}"),
        }
    }
    assert_eq!(
        targets
            .stats
            .written_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the oversized write reached the disk"
    );

    // The bystander noticed nothing.
    read_block(&mut bystander, &mut cmd_sn);
}

/// One SCSI command on a raw session: its status, the data read, and the
/// sense. Data to the target goes as immediate data.
fn scsi(
    s: &mut TcpStream,
    cmd_sn: &mut u32,
    cdb: &[u8],
    out: Vec<u8>,
    read: u32,
) -> (u8, Vec<u8>, Vec<u8>) {
    let mut c = [0u8; 16];
    c[..cdb.len()].copy_from_slice(cdb);
    let cmd = Request::ScsiCommand(ScsiCommand {
        final_bit: true,
        read: read > 0,
        write: !out.is_empty(),
        expected_len: if out.is_empty() {
            read
        } else {
            out.len() as u32
        },
        itt: *cmd_sn,
        cmd_sn: *cmd_sn,
        cdb: c,
        data: out,
        ..Default::default()
    });
    *cmd_sn += 1;
    s.write_all(&cmd.to_pdu().to_bytes()).unwrap();
    let mut got = Vec::new();
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        while let Some((pdu, n)) = Pdu::decode(&got, 1 << 20).unwrap() {
            got.drain(..n);
            match Response::parse(pdu).unwrap() {
                Response::DataIn(d) => {
                    data.extend_from_slice(&d.data);
                    if let Some(status) = d.status {
                        return (status, data, Vec::new());
                    }
                }
                Response::ScsiResponse(r) => return (r.status, data, r.sense),
                other => panic!("{other:?}"),
            }
        }
        let n = s.read(&mut buf).expect("a SCSI response");
        assert!(n > 0, "closed without a SCSI response");
        got.extend_from_slice(&buf[..n]);
    }
}

/// PERSISTENT RESERVE OUT `action` with `key` and `sa_key`, type `ty`.
fn prout(s: &mut TcpStream, sn: &mut u32, action: u8, ty: u8, key: u64, sa_key: u64) -> u8 {
    let params = vstream_iscsi::pr::encode_out_params(&vstream_iscsi::pr::OutParams {
        key,
        sa_key,
        ..Default::default()
    });
    let cdb = [0x5f, action, ty, 0, 0, 0, 0, 0, 24, 0];
    scsi(s, sn, &cdb, params, 0).0
}

/// Persistent reservations over the wire, between two sessions of one
/// initiator (two ISIDs, two I_T nexuses), as libiscsi's tests and a
/// multipath initiator use them: an Exclusive Access reservation keeps
/// the other session's writes and reads off the disk with RESERVATION
/// CONFLICT, outlives its holder's connection, and a PREEMPT takes it
/// over and tells the preempted nexus when it comes back.
#[test]
fn persistent_reservations_hold_across_sessions_and_connections() {
    use vstream_iscsi::scsi::status::{CHECK_CONDITION, GOOD, RESERVATION_CONFLICT};
    let dir = tempfile::tempdir().unwrap();
    let (_rt, port, targets) = serve(dir.path(), false);
    let connect = |isid: u8| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let sn = login_plain(&mut s, isid);
        (s, sn)
    };
    let written = || {
        targets
            .stats
            .written_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let (mut a, mut a_sn) = connect(1);
    let (mut b, mut b_sn) = connect(2);
    // REGISTER AND IGNORE EXISTING KEY, then RESERVE Exclusive Access.
    assert_eq!(prout(&mut a, &mut a_sn, 0x06, 0, 0, 0xaa), GOOD);
    assert_eq!(prout(&mut a, &mut a_sn, 0x01, 0x03, 0xaa, 0), GOOD);
    let write = [0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0];
    let read = [0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0];
    let before = written();
    let (st, ..) = scsi(&mut b, &mut b_sn, &write, vec![0x5a; 512], 0);
    assert_eq!(st, RESERVATION_CONFLICT, "another nexus wrote");
    assert_eq!(written(), before, "the refused write reached the disk");
    let (st, data, _) = scsi(&mut b, &mut b_sn, &read, Vec::new(), 512);
    assert_eq!((st, data.len()), (RESERVATION_CONFLICT, 0));
    // TEST UNIT READY and PERSISTENT RESERVE IN always go through.
    assert_eq!(scsi(&mut b, &mut b_sn, &[0], Vec::new(), 0).0, GOOD);
    // The holder writes.
    let (st, ..) = scsi(&mut a, &mut a_sn, &write, vec![0x5a; 512], 0);
    assert_eq!(st, GOOD);
    // Its connection goes; the reservation stays (READ RESERVATION).
    drop(a);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (st, r, _) = scsi(
        &mut b,
        &mut b_sn,
        &[0x5e, 0x01, 0, 0, 0, 0, 0, 0, 64, 0],
        Vec::new(),
        64,
    );
    assert_eq!(st, GOOD);
    assert_eq!(
        r[4..8],
        16u32.to_be_bytes(),
        "no reservation after the holder left: {r:?}"
    );
    assert_eq!(r[8..16], 0xaau64.to_be_bytes());
    assert_eq!(r[21], 0x03);
    let (st, ..) = scsi(&mut b, &mut b_sn, &write, vec![0x5a; 512], 0);
    assert_eq!(st, RESERVATION_CONFLICT);
    // B registers and preempts A's key: B holds it now, A's key is gone.
    assert_eq!(prout(&mut b, &mut b_sn, 0x06, 0, 0, 0xbb), GOOD);
    assert_eq!(prout(&mut b, &mut b_sn, 0x04, 0x03, 0xbb, 0xaa), GOOD);
    let (st, ..) = scsi(&mut b, &mut b_sn, &write, vec![0x5a; 512], 0);
    assert_eq!(st, GOOD);
    let (st, keys, _) = scsi(
        &mut b,
        &mut b_sn,
        &[0x5e, 0x00, 0, 0, 0, 0, 0, 0, 64, 0],
        Vec::new(),
        64,
    );
    assert_eq!(st, GOOD);
    assert_eq!(
        keys[4..],
        [&8u32.to_be_bytes()[..], &0xbbu64.to_be_bytes()[..]].concat()
    );
    // A comes back on its nexus: told its registration was preempted,
    // then kept out.
    let (mut a, mut a_sn) = connect(1);
    let (st, _, sense) = scsi(&mut a, &mut a_sn, &[0], Vec::new(), 0);
    assert_eq!(st, CHECK_CONDITION);
    assert_eq!((sense[2] & 0x0f, sense[12], sense[13]), (0x6, 0x2a, 0x05));
    let (st, ..) = scsi(&mut a, &mut a_sn, &read, Vec::new(), 512);
    assert_eq!(st, RESERVATION_CONFLICT);
    // A wrong key is a conflict; the right one releases.
    assert_eq!(
        prout(&mut b, &mut b_sn, 0x02, 0x03, 0x99, 0),
        RESERVATION_CONFLICT
    );
    assert_eq!(prout(&mut b, &mut b_sn, 0x02, 0x03, 0xbb, 0), GOOD);
    let (st, ..) = scsi(&mut a, &mut a_sn, &read, Vec::new(), 512);
    assert_eq!(st, GOOD);
}
