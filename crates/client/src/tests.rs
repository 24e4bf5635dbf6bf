//! Requests against a one-shot HTTP responder on 127.0.0.1: what goes out
//! on the wire, and what each answer becomes.

use std::io::{BufRead, BufReader, Read, Write};
use std::thread::JoinHandle;
use std::time::Duration;

use super::*;

/// Answers one HTTP request on 127.0.0.1 with `response`; the thread
/// returns the request it saw (head, then body).
fn serve_once(response: impl Into<Vec<u8>>) -> (String, JoinHandle<(String, Vec<u8>)>) {
    let response = response.into();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        // Read the body too: closing with unread bytes would reset the
        // connection under the client.
        let lower = head.to_ascii_lowercase();
        let len = lower.lines().find_map(|l| {
            l.strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        });
        let body = if let Some(len) = len {
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            body
        } else if lower.contains("transfer-encoding: chunked") {
            read_chunked(&mut reader)
        } else {
            Vec::new()
        };
        reader.get_mut().write_all(&response).unwrap();
        (head, body)
    });
    (base, handle)
}

fn read_chunked(r: &mut impl BufRead) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let n = usize::from_str_radix(line.trim(), 16).unwrap();
        let mut chunk = vec![0; n + 2];
        r.read_exact(&mut chunk).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

fn answer(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

fn client(base: &str) -> Client {
    Agent::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .build()
        .client(base)
        .unwrap()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn paths_are_encoded_per_segment() {
    assert_eq!(api_path(&["vdisks"]), "/api/v1/vdisks");
    assert_eq!(
        api_path(&["vdisks", "win10", "content"]),
        "/api/v1/vdisks/win10/content"
    );
    assert_eq!(api_path(&["vdisks", "win10@3"]), "/api/v1/vdisks/win10%403");
    assert_eq!(api_path(&["vdisks", "a/b c"]), "/api/v1/vdisks/a%2Fb%20c");
    assert_eq!(api_path(&["vdisks", "ä"]), "/api/v1/vdisks/%C3%A4");
    assert_eq!(api_path(&["vdisks", "x-y.z_~"]), "/api/v1/vdisks/x-y.z_~");
    assert_eq!(
        version_path("win 10", 3, &["promote"]),
        "/api/v1/vdisks/win%2010/versions/3/promote"
    );
    assert_eq!(version_path("a", 12, &[]), "/api/v1/vdisks/a/versions/12");
    assert_eq!(
        peer_path(&["vdisks", "w", "layers", "0001.layer", "meta"]),
        "/peer/v1/vdisks/w/layers/0001.layer/meta"
    );
}

#[test]
fn status_errors_show_the_api_sentence_or_the_status() {
    let e = |status, text: &str, body: &str| Error::Status {
        url: "http://h/x".into(),
        status,
        status_text: text.into(),
        error: serde_json::from_str::<ErrorBody>(body)
            .ok()
            .map(|b| b.error),
        body: body.into(),
    };
    assert_eq!(
        e(
            404,
            "Not Found",
            r#"{"error": "vDisk win10 does not exist"}"#
        )
        .to_string(),
        "vDisk win10 does not exist"
    );
    assert_eq!(
        e(502, "Bad Gateway", "<html>proxy down</html>\n").to_string(),
        "the vstream API answered 502 Bad Gateway: <html>proxy down</html>"
    );
    assert_eq!(
        e(500, "Internal Server Error", "").to_string(),
        "the vstream API answered 500 Internal Server Error"
    );
    assert_eq!(
        e(410, "Gone", "{}").http_text(),
        "http://h/x: status code 410"
    );
}

#[test]
fn only_http_urls() {
    let agent = Agent::builder().build();
    let err = agent.client("127.0.0.1:7080").err().unwrap();
    assert_eq!(
        err.to_string(),
        r#""127.0.0.1:7080" is not an http:// or https:// URL"#
    );
    assert_eq!(agent.client("http://h:1/").unwrap().base(), "http://h:1");
    let c = agent.client("http://h:1").unwrap().with_token("t");
    assert_eq!(c.at("https://g:2//").unwrap().base(), "https://g:2");
    assert!(c.at("g:2").is_err());
}

#[test]
fn refused_connection_is_explained() {
    // Bind and drop to find a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let err = client(&base)
        .get::<serde_json::Value>("/api/v1/vdisks")
        .unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("cannot reach the vstream API at {base}: ")),
        "{msg}"
    );
    assert!(msg.ends_with("(is `vstream server` running?)"), "{msg}");
    // The HTTP layer's own wording names the URL asked.
    assert!(
        err.http_text()
            .starts_with(&format!("{base}/api/v1/vdisks: Connection Failed")),
        "{}",
        err.http_text()
    );
}

#[test]
fn sends_the_token_and_reads_json() {
    let (base, server) = serve_once(answer("200 OK", "application/json", "[]"));
    let c = client(&base).with_token("s3cret");
    let got: Vec<serde_json::Value> = c.get("/api/v1/vdisks").unwrap();
    assert!(got.is_empty());
    let (head, _) = server.join().unwrap();
    assert!(
        head.starts_with("GET /api/v1/vdisks HTTP/1.1\r\n"),
        "{head}"
    );
    assert_eq!(header(&head, "authorization"), Some("Bearer s3cret"));
    assert_eq!(header(&head, SERVER_HEADER), None);
    assert_eq!(
        header(&head, "user-agent"),
        Some(concat!("vstream/", env!("CARGO_PKG_VERSION")))
    );
}

#[test]
fn error_answers_keep_status_sentence_and_body() {
    let body = r#"{"error":"vDisk win10 does not exist"}"#;
    let (base, server) = serve_once(answer("404 Not Found", "application/json", body));
    let err = client(&base)
        .with_token("t")
        .delete("/api/v1/vdisks/win10")
        .unwrap_err();
    assert_eq!(err.status(), Some(404));
    assert_eq!(err.server_message(), Some("vDisk win10 does not exist"));
    assert_eq!(err.to_string(), "vDisk win10 does not exist");
    match &err {
        Error::Status { body: b, url, .. } => {
            assert_eq!(b, body);
            assert_eq!(url, &format!("{base}/api/v1/vdisks/win10"));
        }
        other => panic!("{other:?}"),
    }
    let (head, _) = server.join().unwrap();
    assert!(head.starts_with("DELETE /api/v1/vdisks/win10 "), "{head}");
}

#[test]
fn empty_answers_are_none_and_needed_answers_errors() {
    let (base, server) = serve_once("HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
    let got: Option<serde_json::Value> = client(&base)
        .patch("/api/v1/vdisks/a", &serde_json::json!({"mode": "standard"}))
        .unwrap();
    assert!(got.is_none());
    let (head, body) = server.join().unwrap();
    assert!(head.starts_with("PATCH /api/v1/vdisks/a "), "{head}");
    assert_eq!(body, br#"{"mode":"standard"}"#);

    let (base, server) = serve_once("HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
    let err = client(&base)
        .post_for::<_, serde_json::Value>("/api/v1/vdisks/a/merge", &serde_json::json!({}))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("the vstream API at {base} answered with an empty body")
    );
    server.join().unwrap();
}

#[test]
fn json_it_does_not_understand_is_a_decode_error() {
    let (base, server) = serve_once(answer("200 OK", "application/json", r#"{"x":1}"#));
    let err = client(&base).stores().unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("{base}/api/v1/stores answered with JSON this vstream does not understand")
    );
    server.join().unwrap();
}

#[test]
fn login_posts_the_request_without_a_token() {
    let req = LoginRequest {
        mac: "52:54:00:12:34:56".into(),
        avoid: vec!["http://10.0.0.9:7080".into()],
        pin: None,
        boot: Some("b00t".into()),
    };
    let (base, server) = serve_once(answer(
        "410 Gone",
        "application/json",
        r#"{"error":"version 3 of vDisk w is gone"}"#,
    ));
    let err = client(&base).login(&req).unwrap_err();
    assert_eq!(err.status(), Some(410));
    assert_eq!(err.server_message(), Some("version 3 of vDisk w is gone"));
    let (head, body) = server.join().unwrap();
    assert!(
        head.starts_with("POST /api/v1/login HTTP/1.1\r\n"),
        "{head}"
    );
    assert_eq!(header(&head, "authorization"), None);
    let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(sent, serde_json::to_value(&req).unwrap());
}

#[test]
fn peer_requests_name_the_server_and_stream_the_data() {
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        data.len()
    )
    .into_bytes();
    resp.extend_from_slice(&data);
    let (base, server) = serve_once(resp);
    let peer = client(&base).with_token("farm-secret").as_server("s1");
    let mut got = Vec::new();
    peer.layer_data("win 10", "0002.layer", 64, 128)
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert_eq!(got, data);
    let (head, _) = server.join().unwrap();
    assert!(
        head.starts_with(
            "GET /peer/v1/vdisks/win%2010/layers/0002.layer/data?from=64&to=128 HTTP/1.1\r\n"
        ),
        "{head}"
    );
    assert_eq!(header(&head, "authorization"), Some("Bearer farm-secret"));
    assert_eq!(header(&head, SERVER_HEADER), Some("s1"));
}

#[test]
fn in_memory_peer_answers_stop_at_the_limit() {
    let (base, server) = serve_once(answer("200 OK", "application/octet-stream", "0123456789"));
    let got = client(&base).layer_meta("w", "0001.layer", 4).unwrap();
    assert_eq!(got, b"0123");
    let (head, _) = server.join().unwrap();
    assert!(head.starts_with("GET /peer/v1/vdisks/w/layers/0001.layer/meta "));
}

#[test]
fn peer_refusals_keep_the_raw_body() {
    let body = r#"{"error":"not a server of this farm: wrong peer secret"}"#;
    let (base, server) = serve_once(answer("403 Forbidden", "application/json", body));
    let err = client(&base)
        .with_token("bad")
        .as_server("s2")
        .boot_file("w", "ab12")
        .err()
        .unwrap();
    match &err {
        Error::Status {
            status, body: b, ..
        } => {
            assert_eq!(*status, 403);
            assert_eq!(b, body);
        }
        other => panic!("{other:?}"),
    }
    let (head, _) = server.join().unwrap();
    assert!(
        head.starts_with("GET /peer/v1/vdisks/w/boot/ab12 "),
        "{head}"
    );
}

#[test]
fn typed_calls_use_their_paths_and_methods() {
    let ok = || answer("200 OK", "application/json", "[]");
    let (base, server) = serve_once(ok());
    assert!(client(&base).versions("win 10").unwrap().is_empty());
    assert!(server
        .join()
        .unwrap()
        .0
        .starts_with("GET /api/v1/vdisks/win%2010/versions "));

    let (base, server) = serve_once(ok());
    assert!(client(&base).replication().unwrap().is_empty());
    assert!(server
        .join()
        .unwrap()
        .0
        .starts_with("GET /api/v1/replication "));

    let no_content = "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n";
    let (base, server) = serve_once(no_content);
    client(&base).reset_device("pc 1", true).unwrap();
    assert!(server
        .join()
        .unwrap()
        .0
        .starts_with("POST /api/v1/devices/pc%201/reset?force=true "));

    let (base, server) = serve_once(no_content);
    client(&base).delete_version("w", 7).unwrap();
    assert!(server
        .join()
        .unwrap()
        .0
        .starts_with("DELETE /api/v1/vdisks/w/versions/7 "));

    // A version call needs its answer.
    let (base, server) = serve_once(no_content);
    let err = client(&base).rollback("w").unwrap_err();
    assert!(matches!(err, Error::EmptyAnswer { .. }), "{err:?}");
    assert!(server
        .join()
        .unwrap()
        .0
        .starts_with("POST /api/v1/vdisks/w/rollback "));
}

#[test]
fn boot_files_upload_under_their_kind_and_name() {
    let (base, server) = serve_once(answer(
        "400 Bad Request",
        "application/json",
        r#"{"error":"too big"}"#,
    ));
    let err = client(&base)
        .upload_boot_file("root", BootFileKind::Initrd, "initrd 1.img", &b"cpio"[..])
        .unwrap_err();
    assert_eq!(err.to_string(), "too big");
    let (head, body) = server.join().unwrap();
    assert!(
        head.starts_with("PUT /api/v1/vdisks/root/boot/initrd?name=initrd%201.img HTTP/1.1\r\n"),
        "{head}"
    );
    assert_eq!(
        header(&head, "content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(body, b"cpio");
}

#[test]
fn poke_and_cache_report_post() {
    let (base, server) = serve_once("HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
    client(&base).as_server("s1").poke().unwrap();
    let (head, _) = server.join().unwrap();
    assert!(head.starts_with("POST /peer/v1/poke "), "{head}");

    let (base, server) = serve_once("HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
    let report = CacheReport {
        mac: "52:54:00:00:00:01".into(),
        cache_bytes: 4096,
    };
    client(&base).cache_report(&report).unwrap();
    let (head, body) = server.join().unwrap();
    assert!(head.starts_with("POST /api/v1/cache-report "), "{head}");
    let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(sent["cache_bytes"], 4096);
}

#[test]
fn imports_stream_chunked_and_exports_stream_back() {
    let info = r#"{"vdisk":{"name":"w"}}"#;
    let (base, server) = serve_once(answer("201 Created", "application/json", info));
    // An answer that does not decode still proves what went out.
    let _ = client(&base).import("w", Some("fast ssd"), &b"extent bytes"[..]);
    let (head, body) = server.join().unwrap();
    assert!(
        head.starts_with("PUT /api/v1/vdisks/w/content?store=fast%20ssd HTTP/1.1\r\n"),
        "{head}"
    );
    assert_eq!(
        header(&head, "content-type"),
        Some(vstream_api::extents::CONTENT_TYPE)
    );
    assert_eq!(header(&head, "transfer-encoding"), Some("chunked"));
    assert_eq!(body, b"extent bytes");

    let (base, server) = serve_once(answer("200 OK", "application/octet-stream", "frames"));
    let mut got = String::new();
    client(&base)
        .export("w@3")
        .unwrap()
        .read_to_string(&mut got)
        .unwrap();
    assert_eq!(got, "frames");
    let (head, _) = server.join().unwrap();
    assert!(
        head.starts_with("GET /api/v1/vdisks/w%403/content "),
        "{head}"
    );
    assert_eq!(
        header(&head, "accept"),
        Some(vstream_api::extents::CONTENT_TYPE)
    );
}
