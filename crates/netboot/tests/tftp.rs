//! The TFTP server over real loopback sockets.
//!
//! Downloads go through curl, a real client that negotiates `tsize`, `blksize` and
//! `timeout` (skipped with a message when this curl lacks TFTP). Behaviour curl
//! cannot show (OVMF's size probe, write requests, foreign transfer IDs, lost and
//! duplicate ACKs, exact error codes) is driven by a hand-written client that
//! builds its requests byte by byte.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vstream_netboot::tftp::{parse, ErrorCode, Packet, TftpServer, TftpStats, MAX_BLKSIZE};

/// How long the hand-written client waits for any one packet.
const PATIENCE: Duration = Duration::from_secs(5);

struct Running {
    addr: SocketAddr,
    stats: Arc<TftpStats>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.send(true).expect("server still running");
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("server stops within 5 s")
            .expect("server task did not panic");
    }
}

async fn serve(root: &Path) -> Running {
    let server = TftpServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), root.to_path_buf())
        .await
        .expect("bind the TFTP server");
    let (shutdown, rx) = watch::channel(false);
    Running {
        addr: server.local_addr(),
        stats: server.stats(),
        shutdown,
        task: tokio::spawn(server.run(rx)),
    }
}

/// Deterministic bytes that do not compress or repeat with any block size.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Waits until `counter` reaches `value`: transfer tasks count after their last packet.
async fn wait_for(counter: &AtomicU64, value: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while counter.load(Ordering::Relaxed) != value {
        assert!(
            Instant::now() < deadline,
            "counter stuck at {} instead of {value}",
            counter.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------

fn curl_has_tftp() -> bool {
    match Command::new("curl").arg("-V").stdin(Stdio::null()).output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|line| line.starts_with("Protocols:") && line.contains(" tftp")),
        Err(_) => false,
    }
}

/// Returns from the test unless curl speaks TFTP: a skip, which fails the
/// test under CI=true (see `vstream_testkit::skip`).
macro_rules! require_curl {
    () => {
        if !curl_has_tftp() {
            vstream_testkit::skip(
                "no curl with TFTP support (`curl -V` does not list tftp; .ci/install-deps installs curl)",
            );
            return;
        }
    };
}

/// Runs curl to fetch `name` into `out`, off the runtime's worker threads.
async fn curl(server: SocketAddr, name: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<String> = ["-s", "-S", "--max-time", "120", "--path-as-is", "-o"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(out.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(format!("tftp://{server}/{name}"));
    tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run curl")
    })
    .await
    .expect("curl thread")
}

async fn curl_download_matches(size: usize, extra: &[&str]) {
    let root = tempfile::tempdir().expect("tempdir");
    let scratch = tempfile::tempdir().expect("tempdir");
    let content = noise(size, size as u64);
    std::fs::write(root.path().join("ipxe.efi"), &content).expect("write");
    let server = serve(root.path()).await;

    let out = scratch.path().join("ipxe.efi");
    let started = Instant::now();
    let result = curl(server.addr, "ipxe.efi", &out, extra).await;
    assert!(
        result.status.success(),
        "curl {extra:?} failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    eprintln!(
        "curl {extra:?}: {size} bytes in {} ms",
        started.elapsed().as_millis()
    );
    let received = std::fs::read(&out).expect("curl wrote the file");
    assert_eq!(received.len(), content.len());
    assert!(received == content, "downloaded bytes differ");
    wait_for(&server.stats.transfers_completed, 1).await;
    assert_eq!(server.stats.bytes_sent.load(Ordering::Relaxed), size as u64);
    assert_eq!(server.stats.transfers_failed.load(Ordering::Relaxed), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_downloads_3_mib_with_default_blksize() {
    require_curl!();
    curl_download_matches(3 * 1024 * 1024 + 123, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_downloads_3_mib_with_blksize_1468() {
    require_curl!();
    curl_download_matches(3 * 1024 * 1024 + 7, &["--tftp-blksize", "1468"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_downloads_without_options() {
    require_curl!();
    curl_download_matches(100_000, &["--tftp-no-options"]).await;
}

/// More than 65535 blocks of 512 bytes: block numbers wrap from 65535 to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_downloads_past_block_65535() {
    require_curl!();
    curl_download_matches(65_535 * 512 + 600 * 512 + 99, &["--tftp-blksize", "512"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_cannot_leave_the_boot_folder() {
    require_curl!();
    let boot = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    let scratch = tempfile::tempdir().expect("tempdir");
    let root = boot.path().join("boot");
    std::fs::create_dir(&root).expect("mkdir");
    std::fs::write(boot.path().join("secret"), b"next to the boot folder").expect("write");
    std::fs::write(outside.path().join("secret"), b"far away").expect("write");
    std::os::unix::fs::symlink(outside.path().join("secret"), root.join("link")).expect("symlink");
    let server = serve(&root).await;

    let absolute = outside.path().join("secret").display().to_string();
    // curl's exit codes: 68 is TFTP "file not found", 69 "permission problem".
    let cases = [
        ("../secret", 69),
        ("../../../../../../etc/passwd", 69),
        (&absolute[..], 68),
        ("/etc/passwd", 68),
        ("link", 69),
    ];
    for (i, (name, code)) in cases.into_iter().enumerate() {
        let out = scratch.path().join(format!("out{i}"));
        let result = curl(server.addr, name, &out, &[]).await;
        assert_eq!(
            result.status.code(),
            Some(code),
            "curl {name}: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        let written = std::fs::read(&out).unwrap_or_default();
        assert!(written.is_empty(), "{name}: curl wrote {written:?}");
    }
    assert_eq!(server.stats.bytes_sent.load(Ordering::Relaxed), 0);
    assert_eq!(server.stats.transfers_completed.load(Ordering::Relaxed), 0);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Hand-written client
// ---------------------------------------------------------------------------

/// An RRQ (opcode 1) or WRQ (opcode 2), spelled out as on the wire.
fn request(opcode: u8, filename: &str, mode: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut out = vec![0, opcode];
    for part in [filename, mode]
        .into_iter()
        .chain(options.iter().flat_map(|(n, v)| [*n, *v]))
    {
        out.extend_from_slice(part.as_bytes());
        out.push(0);
    }
    out
}

fn rrq(filename: &str, options: &[(&str, &str)]) -> Vec<u8> {
    request(1, filename, "octet", options)
}

fn ack(block: u16) -> Vec<u8> {
    let [hi, lo] = block.to_be_bytes();
    vec![0, 4, hi, lo]
}

async fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.expect("bind client")
}

async fn recv(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65536];
    let (len, from) = tokio::time::timeout(PATIENCE, socket.recv_from(&mut buf))
        .await
        .expect("the server answers in time")
        .expect("recv");
    buf.truncate(len);
    (buf, from)
}

/// Asserts that nothing arrives for `quiet`.
async fn expect_silence(socket: &UdpSocket, quiet: Duration) {
    let mut buf = vec![0u8; 65536];
    if let Ok(received) = tokio::time::timeout(quiet, socket.recv_from(&mut buf)).await {
        let (len, _) = received.expect("recv");
        panic!("unexpected packet {:?}", parse(&buf[..len]));
    }
}

fn as_error(datagram: &[u8]) -> (u16, String) {
    match parse(datagram) {
        Ok(Packet::Error { code, message }) => (code, message.into_owned()),
        other => panic!("expected an ERROR, got {other:?}"),
    }
}

fn as_data(datagram: &[u8]) -> (u16, &[u8]) {
    match parse(datagram) {
        Ok(Packet::Data { block, data }) => (block, data),
        other => panic!("expected DATA, got {other:?}"),
    }
}

fn as_oack(datagram: &[u8]) -> Vec<(String, String)> {
    match parse(datagram) {
        Ok(Packet::Oack { options }) => options
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        other => panic!("expected an OACK, got {other:?}"),
    }
}

/// Sends `request` and expects an ERROR back.
async fn refused(server: SocketAddr, request: &[u8]) -> (u16, String) {
    let socket = client().await;
    socket.send_to(request, server).await.expect("send");
    let (datagram, _) = recv(&socket).await;
    as_error(&datagram)
}

/// What a download by the hand-written client saw.
struct Download {
    data: Vec<u8>,
    oack: Option<Vec<(String, String)>>,
    tid: SocketAddr,
}

/// Sends `request` and downloads to the end, checking that every packet comes
/// from one transfer ID that is not the listening port.
async fn download(socket: &UdpSocket, server: SocketAddr, request: &[u8]) -> Download {
    socket.send_to(request, server).await.expect("send");
    let (first, tid) = recv(socket).await;
    assert_ne!(tid, server, "transfers run on their own port");
    let (data, oack) = match parse(&first) {
        Ok(Packet::Oack { .. }) => {
            let options = as_oack(&first);
            let blksize = options
                .iter()
                .find(|(n, _)| n == "blksize")
                .map_or(512, |(_, v)| v.parse().expect("numeric blksize"));
            socket.send_to(&ack(0), tid).await.expect("send");
            let data = receive_blocks(socket, tid, blksize, 1, Vec::new()).await;
            (data, Some(options))
        }
        Ok(Packet::Data { block: 1, data }) => {
            socket.send_to(&ack(1), tid).await.expect("send");
            let data = if data.len() < 512 {
                data.to_vec()
            } else {
                receive_blocks(socket, tid, 512, 2, data.to_vec()).await
            };
            (data, None)
        }
        other => panic!("expected OACK or DATA 1, got {other:?}"),
    };
    Download { data, oack, tid }
}

/// ACKs DATA blocks from `tid`, starting at block `next`, until a short block;
/// returns `data` with their payloads appended.
async fn receive_blocks(
    socket: &UdpSocket,
    tid: SocketAddr,
    blksize: usize,
    mut next: u16,
    mut data: Vec<u8>,
) -> Vec<u8> {
    loop {
        let (datagram, from) = recv(socket).await;
        assert_eq!(from, tid, "DATA from the transfer's port only");
        let (block, payload) = as_data(&datagram);
        if block == next {
            data.extend_from_slice(payload);
            socket.send_to(&ack(block), tid).await.expect("send");
            if payload.len() < blksize {
                return data;
            }
            next = next.wrapping_add(1);
        } else if block == next.wrapping_sub(1) {
            // Our ACK was lost or slow: acknowledge again.
            socket.send_to(&ack(block), tid).await.expect("send");
        }
    }
}

/// OVMF asks for the size first: RRQ with tsize, OACK, then ERROR 8 to refuse the
/// options; a fresh RRQ then downloads the file.
#[tokio::test]
async fn ovmf_size_probe_then_download() {
    let root = tempfile::tempdir().expect("tempdir");
    let content = noise(1_000_000, 3);
    std::fs::write(root.path().join("snponly.efi"), &content).expect("write");
    let server = serve(root.path()).await;
    let socket = client().await;

    let probe = b"\x00\x01snponly.efi\x00octet\x00tsize\x000\x00blksize\x001468\x00";
    socket.send_to(probe, server.addr).await.expect("send");
    let (oack, tid) = recv(&socket).await;
    assert_ne!(tid, server.addr);
    assert_eq!(
        as_oack(&oack),
        [("blksize", "1468"), ("tsize", "1000000")].map(|(n, v)| (n.to_string(), v.to_string()))
    );
    socket
        .send_to(b"\x00\x05\x00\x08Option negotiation refused\x00", tid)
        .await
        .expect("send");
    // The aborted transfer is over: no retransmitted OACK, no ERROR in reply.
    expect_silence(&socket, Duration::from_millis(1500)).await;
    wait_for(&server.stats.transfers_aborted, 1).await;

    let fetched = download(
        &socket,
        server.addr,
        &rrq("snponly.efi", &[("blksize", "1468")]),
    )
    .await;
    assert_ne!(fetched.tid, tid, "a fresh transfer gets a fresh port");
    assert_eq!(
        fetched.oack,
        Some(vec![("blksize".to_string(), "1468".to_string())])
    );
    assert!(fetched.data == content, "downloaded bytes differ");
    wait_for(&server.stats.transfers_completed, 1).await;
    assert_eq!(server.stats.transfers_failed.load(Ordering::Relaxed), 0);
    assert_eq!(server.stats.transfers_aborted.load(Ordering::Relaxed), 1);
    server.stop().await;
}

#[tokio::test]
async fn refused_requests_get_the_right_error_codes() {
    let boot = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    let root = boot.path().join("boot");
    std::fs::create_dir_all(root.join("efi")).expect("mkdir");
    std::fs::write(root.join("ipxe.efi"), b"efi").expect("write");
    std::fs::write(boot.path().join("secret"), b"secret").expect("write");
    std::fs::write(outside.path().join("secret"), b"secret").expect("write");
    std::os::unix::fs::symlink(outside.path().join("secret"), root.join("escape"))
        .expect("symlink");
    std::os::unix::fs::symlink(outside.path(), root.join("escape-dir")).expect("symlink");
    let server = serve(&root).await;

    let not_found = u16::from(ErrorCode::FileNotFound);
    let access = u16::from(ErrorCode::AccessViolation);
    let illegal = u16::from(ErrorCode::IllegalOperation);
    let absolute = outside.path().join("secret").display().to_string();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("parent", rrq("../secret", &[]), access),
        (
            "deep parent",
            rrq("efi/../../secret", &[("tsize", "0")]),
            access,
        ),
        ("absolute outside", rrq(&absolute, &[]), not_found),
        ("etc/passwd", rrq("/etc/passwd", &[]), not_found),
        ("backslash", rrq("..\\secret", &[]), access),
        ("symlink out", rrq("escape", &[]), access),
        (
            "through symlinked dir",
            rrq("escape-dir/secret", &[]),
            access,
        ),
        (
            "missing",
            rrq("undionly.kpxe", &[("tsize", "0")]),
            not_found,
        ),
        ("directory", rrq("efi", &[]), access),
        ("root itself", rrq("/", &[]), access),
        (
            "write request",
            request(2, "ipxe.efi", "octet", &[]),
            access,
        ),
        (
            "write new file",
            request(2, "new", "octet", &[("tsize", "3")]),
            access,
        ),
        ("netascii", request(1, "ipxe.efi", "netascii", &[]), illegal),
        ("mail", request(1, "ipxe.efi", "mail", &[]), illegal),
        ("no mode", b"\x00\x01ipxe.efi\x00".to_vec(), illegal),
        ("not utf-8", b"\x00\x01\xffx\x00octet\x00".to_vec(), illegal),
        ("ack to port 69", ack(1), illegal),
    ];
    for (what, datagram, code) in cases {
        let (got, message) = refused(server.addr, &datagram).await;
        assert_eq!(got, code, "{what}: got ERROR {got} ({message})");
        assert!(!message.is_empty(), "{what}: the error explains itself");
    }
    // Mode names are case-insensitive.
    let fetched = download(
        &client().await,
        server.addr,
        &request(1, "ipxe.efi", "OCTET", &[]),
    )
    .await;
    assert_eq!(fetched.data, b"efi");
    assert_eq!(server.stats.bytes_sent.load(Ordering::Relaxed), 3);
    server.stop().await;
}

#[tokio::test]
async fn garbage_and_errors_on_the_listening_port_do_not_hurt() {
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::write(root.path().join("f"), b"ok").expect("write");
    let server = serve(root.path()).await;
    let illegal = Some(u16::from(ErrorCode::IllegalOperation));
    // ERRORs, even truncated ones, are never answered: two peers could loop.
    let cases: [(&[u8], Option<u16>); 6] = [
        (b"", illegal),
        (b"\x00", illegal),
        (b"\xff\xff\xff", illegal),
        (b"\x00\x03\x00\x01data", illegal),
        (b"\x00\x05", None),
        (b"\x00\x05\x00\x01x\x00", None),
    ];
    for (junk, expected) in cases {
        let socket = client().await;
        socket.send_to(junk, server.addr).await.expect("send");
        let mut buf = vec![0u8; 2048];
        let reply = tokio::time::timeout(Duration::from_millis(300), socket.recv_from(&mut buf))
            .await
            .ok()
            .map(|received| as_error(&buf[..received.expect("recv").0]).0);
        assert_eq!(reply, expected, "answer to {junk:?}");
    }
    let fetched = download(&client().await, server.addr, &rrq("f", &[])).await;
    assert_eq!(fetched.data, b"ok");
    server.stop().await;
}

/// A packet from another port gets ERROR 5 and the real transfer goes on.
#[tokio::test]
async fn foreign_transfer_id_is_turned_away() {
    let root = tempfile::tempdir().expect("tempdir");
    let content = noise(2000, 5);
    std::fs::write(root.path().join("f"), &content).expect("write");
    let server = serve(root.path()).await;
    let socket = client().await;
    let intruder = client().await;

    socket
        .send_to(&rrq("f", &[]), server.addr)
        .await
        .expect("send");
    let (first, tid) = recv(&socket).await;
    let (block, payload) = as_data(&first);
    assert_eq!((block, payload.len()), (1, 512));

    intruder.send_to(&ack(1), tid).await.expect("send");
    let (reply, from) = recv(&intruder).await;
    assert_eq!(from, tid);
    assert_eq!(as_error(&reply).0, u16::from(ErrorCode::UnknownTransferId));

    socket.send_to(&ack(1), tid).await.expect("send");
    let data = receive_blocks(&socket, tid, 512, 2, payload.to_vec()).await;
    assert!(data == content, "downloaded bytes differ");
    wait_for(&server.stats.transfers_completed, 1).await;
    server.stop().await;
}

/// A lost ACK brings the DATA back after the timeout; a duplicate ACK does not
/// (the sorcerer's apprentice bug).
#[tokio::test]
async fn retransmits_on_timeout_but_not_on_duplicate_ack() {
    let root = tempfile::tempdir().expect("tempdir");
    let content = noise(3 * 512 + 10, 9);
    std::fs::write(root.path().join("f"), &content).expect("write");
    let server = serve(root.path()).await;
    let socket = client().await;

    socket
        .send_to(&rrq("f", &[]), server.addr)
        .await
        .expect("send");
    let (first, tid) = recv(&socket).await;
    let sent = Instant::now();
    assert_eq!(as_data(&first).0, 1);
    let (again, _) = recv(&socket).await;
    let waited = sent.elapsed();
    assert_eq!(again, first, "the same DATA comes again");
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_millis(2500),
        "retransmitted after {waited:?}, expected about 1 s"
    );

    socket.send_to(&ack(1), tid).await.expect("send");
    let (second, _) = recv(&socket).await;
    assert_eq!(as_data(&second).0, 2);
    socket.send_to(&ack(1), tid).await.expect("send");
    expect_silence(&socket, Duration::from_millis(500)).await;

    socket.send_to(&ack(2), tid).await.expect("send");
    let mut data = content[..512].to_vec();
    data.extend_from_slice(as_data(&second).1);
    let data = receive_blocks(&socket, tid, 512, 3, data).await;
    assert!(data == content, "downloaded bytes differ");
    wait_for(&server.stats.transfers_completed, 1).await;
    // Each block counted once, retransmission or not.
    assert_eq!(
        server.stats.bytes_sent.load(Ordering::Relaxed),
        content.len() as u64
    );
    server.stop().await;
}

/// A client that never answers: the OACK is sent 1 + 5 times, then the transfer
/// is given up and counted as failed. The `timeout` option sets the pace.
#[tokio::test]
async fn silent_client_is_given_up_after_five_retransmissions() {
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::write(root.path().join("f"), b"data").expect("write");
    let server = serve(root.path()).await;
    let socket = client().await;

    let started = Instant::now();
    socket
        .send_to(&rrq("f", &[("timeout", "1"), ("tsize", "0")]), server.addr)
        .await
        .expect("send");
    let mut oacks = 0;
    let mut buf = vec![0u8; 2048];
    while let Ok(received) =
        tokio::time::timeout(Duration::from_millis(2500), socket.recv_from(&mut buf)).await
    {
        let (len, _) = received.expect("recv");
        assert_eq!(
            as_oack(&buf[..len]),
            [("timeout", "1"), ("tsize", "4")].map(|(n, v)| (n.to_string(), v.to_string()))
        );
        oacks += 1;
    }
    assert_eq!(oacks, 6);
    wait_for(&server.stats.transfers_failed, 1).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(6), "gave up after {took:?}");
    assert_eq!(server.stats.transfers_completed.load(Ordering::Relaxed), 0);
    server.stop().await;
}

#[tokio::test]
async fn file_sizes_at_block_boundaries() {
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::write(root.path().join("empty"), b"").expect("write");
    let exact = noise(1024, 11);
    std::fs::write(root.path().join("exact"), &exact).expect("write");
    let server = serve(root.path()).await;

    // An empty file is one empty DATA block.
    let socket = client().await;
    socket
        .send_to(&rrq("empty", &[]), server.addr)
        .await
        .expect("send");
    let (first, tid) = recv(&socket).await;
    assert_eq!(as_data(&first), (1, &b""[..]));
    socket.send_to(&ack(1), tid).await.expect("send");

    // A multiple of the block size ends with an empty block too.
    let socket = client().await;
    socket
        .send_to(&rrq("exact", &[("blksize", "512")]), server.addr)
        .await
        .expect("send");
    let (oack, tid) = recv(&socket).await;
    assert_eq!(as_oack(&oack), [("blksize".to_string(), "512".to_string())]);
    socket.send_to(&ack(0), tid).await.expect("send");
    let mut sizes = Vec::new();
    loop {
        let (datagram, _) = recv(&socket).await;
        let (block, payload) = as_data(&datagram);
        sizes.push(payload.len());
        socket.send_to(&ack(block), tid).await.expect("send");
        if payload.len() < 512 {
            break;
        }
    }
    assert_eq!(sizes, [512, 512, 0]);
    wait_for(&server.stats.transfers_completed, 2).await;
    server.stop().await;
}

/// Block sizes above the maximum are answered with the maximum, and such blocks
/// still fit one (loopback) datagram.
#[tokio::test]
async fn oversized_blksize_is_clamped() {
    let root = tempfile::tempdir().expect("tempdir");
    let content = noise(200_000, 13);
    std::fs::write(root.path().join("big"), &content).expect("write");
    let server = serve(root.path()).await;
    let fetched = download(
        &client().await,
        server.addr,
        &rrq(
            "big",
            &[("BLKSIZE", "100000"), ("windowsize", "8"), ("timeout", "2")],
        ),
    )
    .await;
    assert_eq!(
        fetched.oack,
        Some(vec![
            ("blksize".to_string(), MAX_BLKSIZE.to_string()),
            ("timeout".to_string(), "2".to_string()),
        ])
    );
    assert!(fetched.data == content, "downloaded bytes differ");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_running_transfers() {
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::write(root.path().join("f"), noise(10_000, 17)).expect("write");
    let server = serve(root.path()).await;
    let stats = server.stats.clone();
    let socket = client().await;
    socket
        .send_to(&rrq("f", &[]), server.addr)
        .await
        .expect("send");
    let (first, _) = recv(&socket).await;
    assert_eq!(as_data(&first).0, 1);

    let started = Instant::now();
    server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(1));
    let (datagram, _) = recv(&socket).await;
    assert_eq!(as_error(&datagram).0, u16::from(ErrorCode::NotDefined));
    assert_eq!(stats.transfers_failed.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn bind_needs_an_existing_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file");
    std::fs::write(&file, b"").expect("write");
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    assert!(TftpServer::bind(addr, dir.path().join("missing"))
        .await
        .is_err());
    assert!(TftpServer::bind(addr, file).await.is_err());
}
