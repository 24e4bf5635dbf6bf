//! The floor: the least work an NBD server can do per request on this machine, for
//! the benchmarks to measure vstream against. It holds the image in memory, answers
//! every READ from it with one vectored write (header and data), acknowledges WRITE
//! and FLUSH without keeping anything, and runs one thread per connection with plain
//! blocking reads and writes. No storage lookup, no cache, no async runtime. Only for
//! measuring: it forgets every write.
//!
//! ```text
//! storm-floor --listen 127.0.0.1:PORT --image FILE
//! ```

use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use vstream_storm::nbd::{self, Request};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let (Some(listen), Some(image)) = (arg("--listen"), arg("--image")) else {
        eprintln!("usage: storm-floor --listen HOST:PORT --image FILE");
        std::process::exit(2);
    };
    let data = match std::fs::read(&image) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("storm-floor: {image}: {e}");
            std::process::exit(1);
        }
    };
    let listener = match TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("storm-floor: listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    // std listens with a backlog of 128: a storm's 500 connects at once
    // would overflow it, and each SYN dropped waits a second to be sent
    // again, a second the floor would be charged for a full queue, not for
    // its work. Listening again on the bound socket deepens the queue to
    // the system's limit (net.core.somaxconn), as vstream's is.
    if let Err(e) = deepen_backlog(&listener) {
        eprintln!("storm-floor: listen on {listen}: {e}");
        std::process::exit(1);
    }
    eprintln!(
        "storm-floor: serving {image} ({} bytes) on {listen}",
        data.len()
    );
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let data = data.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve(conn, &data) {
                if e.kind() != io::ErrorKind::ConnectionAborted {
                    eprintln!("storm-floor: connection: {e}");
                }
            }
        });
    }
}

fn deepen_backlog(listener: &TcpListener) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    extern "C" {
        fn listen(fd: i32, backlog: i32) -> i32;
    }
    // SAFETY: `listener` owns the descriptor for the call; listen(2) on a
    // listening socket only changes its backlog (a larger one is cut to
    // net.core.somaxconn).
    if unsafe { listen(listener.as_raw_fd(), 65535) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn serve(mut conn: TcpStream, data: &[u8]) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let flags = nbd::TFLAG_HAS_FLAGS | nbd::TFLAG_SEND_FLUSH | nbd::TFLAG_CAN_MULTI_CONN;
    nbd::server_handshake(&mut conn, data.len() as u64, flags)?;
    let mut sink = vec![0u8; 0];
    while let Some(req) = Request::read_from(&mut conn)? {
        let end = req.offset.checked_add(u64::from(req.length));
        let in_range = end.is_some_and(|e| e <= data.len() as u64);
        match req.command {
            nbd::CMD_READ if in_range => {
                let start = req.offset as usize;
                let body = &data[start..start + req.length as usize];
                write_all_vectored(&mut conn, &nbd::simple_reply(0, req.handle), body)?;
            }
            nbd::CMD_WRITE => {
                sink.resize(req.length as usize, 0);
                conn.read_exact(&mut sink)?;
                let err = if in_range { 0 } else { 22 };
                conn.write_all(&nbd::simple_reply(err, req.handle))?;
            }
            nbd::CMD_FLUSH => conn.write_all(&nbd::simple_reply(0, req.handle))?,
            nbd::CMD_DISC => return Ok(()),
            // EINVAL for a read past the end; ENOTSUP for anything else.
            nbd::CMD_READ => conn.write_all(&nbd::simple_reply(22, req.handle))?,
            _ => conn.write_all(&nbd::simple_reply(95, req.handle))?,
        }
    }
    Ok(())
}

fn write_all_vectored(w: &mut TcpStream, head: &[u8], body: &[u8]) -> io::Result<()> {
    let (mut h, mut b) = (head, body);
    while !h.is_empty() || !b.is_empty() {
        let n = w.write_vectored(&[IoSlice::new(h), IoSlice::new(b)])?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_h = n.min(h.len());
        h = &h[from_h..];
        b = &b[n - from_h..];
    }
    Ok(())
}
