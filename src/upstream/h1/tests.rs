use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

/// What the server sends for one request: pieces written one after the other (with a
/// pause between them, so that the client reads them apart), then maybe a close.
struct Reply {
    pieces: Vec<&'static [u8]>,
    close: Close,
}

/// What the server does with the connection after an answer.
#[derive(Clone, Copy, PartialEq)]
enum Close {
    /// Keeps it for the next request.
    No,
    Now,
    /// Waits for the client to hang up, and counts it.
    WhenClientDoes,
}

fn reply(pieces: &[&'static [u8]]) -> Reply {
    Reply {
        pieces: pieces.to_vec(),
        close: Close::No,
    }
}

/// A raw HTTP/1.1 server on a free port: answers each request with what `answer` says for
/// (connection number, request number on it), and keeps the requests it read.
struct Server {
    url: String,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
    /// Connections that saw the client hang up (EOF) mid-answer.
    hung_up: Arc<AtomicUsize>,
}

impl Server {
    async fn start(answer: impl Fn(usize, usize) -> Reply + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let hung_up = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(answer);
        let (c, r, h) = (connections.clone(), requests.clone(), hung_up.clone());
        tokio::spawn(async move {
            loop {
                let (mut io, _) = listener.accept().await.unwrap();
                let conn = c.fetch_add(1, Ordering::SeqCst);
                let (answer, requests, hung_up) = (answer.clone(), r.clone(), h.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for n in 0.. {
                        let Some(request) = read_request(&mut io, &mut buf).await else {
                            return;
                        };
                        requests.lock().unwrap().push(request);
                        let reply = answer(conn, n);
                        for (i, piece) in reply.pieces.iter().enumerate() {
                            if i > 0 {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            if io.write_all(piece).await.is_err() {
                                hung_up.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        }
                        match reply.close {
                            Close::No => {}
                            Close::Now => return,
                            Close::WhenClientDoes => {
                                // A hang-up while the answer is unfinished is what a
                                // dropped body must cause.
                                let mut rest = [0u8; 64];
                                if matches!(io.read(&mut rest).await, Ok(0) | Err(_)) {
                                    hung_up.fetch_add(1, Ordering::SeqCst);
                                }
                                return;
                            }
                        }
                    }
                });
            }
        });
        Server {
            url,
            connections,
            requests,
            hung_up,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// One request (head and `content-length` body) as text; `None` when the client closed.
async fn read_request(io: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = parsed.parse(buf) {
            let body_len: usize = parsed
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map_or(0, |h| {
                    std::str::from_utf8(h.value).unwrap().parse().unwrap()
                });
            if buf.len() >= len + body_len {
                let request = String::from_utf8(buf.drain(..len + body_len).collect()).unwrap();
                return Some(request);
            }
        }
        let mut chunk = [0u8; 4096];
        match io.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn client() -> H1Client {
    H1Client::new(Duration::from_secs(2), Duration::from_secs(90))
}

fn post(url: &str, body: &'static str) -> Request<Bytes> {
    let mut request = Request::new(Bytes::from_static(body.as_bytes()));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = format!("{url}/v1/chat/completions").parse().unwrap();
    request
        .headers_mut()
        .insert("x-request-id", HeaderValue::from_static("r-1"));
    request
}

async fn body_text(response: Response<H1Body>) -> Result<String, H1Error> {
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8(bytes.to_vec()).unwrap())
}

#[tokio::test]
async fn a_sized_answer_is_read_and_its_connection_reused() {
    let server = Server::start(|_, _| {
        reply(&[b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{\"a\":", b"\"b\"}\n"])
    })
    .await;
    let client = client();
    for _ in 0..3 {
        let response = client.send(post(&server.url, "{\"x\":1}")).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(body_text(response).await.unwrap(), "{\"a\":\"b\"}\n");
    }
    assert_eq!(
        server.connections(),
        1,
        "one connection serves the three calls"
    );
    let request = server.requests.lock().unwrap()[0].clone();
    let host = server.url.trim_start_matches("http://");
    assert!(
        request.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(request.contains(&format!("host: {host}\r\n")), "{request}");
    assert!(request.contains("x-request-id: r-1\r\n"), "{request}");
    assert!(request.contains("content-length: 7\r\n"), "{request}");
    assert!(request.ends_with("\r\n\r\n{\"x\":1}"), "{request}");
}

#[tokio::test]
async fn a_chunked_answer_is_put_together_across_reads() {
    let server = Server::start(|_, _| {
        reply(&[
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6;ext=1\r\ndata: ",
            b"\r\n",
            b"A\r\n{\"n\":\"1\"}\n\r",
            b"\n0\r\nx-trailer: t\r\n\r\n",
        ])
    })
    .await;
    let client = client();
    for _ in 0..2 {
        let response = client.send(post(&server.url, "{}")).await.unwrap();
        assert_eq!(body_text(response).await.unwrap(), "data: {\"n\":\"1\"}\n");
    }
    assert_eq!(server.connections(), 1);
}

#[tokio::test]
async fn an_answer_without_length_ends_at_the_close_and_is_not_reused() {
    let server = Server::start(|_, _| Reply {
        pieces: vec![b"HTTP/1.1 200 OK\r\n\r\npart one, ", b"part two"],
        close: Close::Now,
    })
    .await;
    let client = client();
    for _ in 0..2 {
        let response = client.send(post(&server.url, "{}")).await.unwrap();
        assert_eq!(body_text(response).await.unwrap(), "part one, part two");
    }
    assert_eq!(server.connections(), 2);
}

#[tokio::test]
async fn connection_close_and_http_1_0_are_not_reused() {
    let server = Server::start(|_, n| {
        reply(&[if n == 0 {
            b"HTTP/1.1 200 OK\r\nconnection: keep-alive, close\r\ncontent-length: 2\r\n\r\nok"
        } else {
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"
        }])
    })
    .await;
    let client = client();
    for _ in 0..3 {
        let response = client.send(post(&server.url, "{}")).await.unwrap();
        assert_eq!(body_text(response).await.unwrap(), "ok");
    }
    assert_eq!(server.connections(), 3);
}

#[tokio::test]
async fn a_pooled_connection_the_server_closed_is_replaced() {
    // The server closes each connection after its answer, as an idle keep-alive timeout
    // would, without saying so.
    let server = Server::start(|_, _| Reply {
        pieces: vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
        close: Close::Now,
    })
    .await;
    let client = client();
    for _ in 0..3 {
        let response = client.send(post(&server.url, "{}")).await.unwrap();
        assert_eq!(body_text(response).await.unwrap(), "ok");
        // The server's close reaches the pooled connection.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.connections(), 3);
    assert_eq!(
        server.requests.lock().unwrap().len(),
        3,
        "each request sent once"
    );
}

/// A close the runtime has not polled yet: the connection was idle past
/// `ASK_KERNEL_AFTER`, so the kernel is asked before the connection is used again.
#[tokio::test]
async fn a_long_idle_connection_closed_unseen_by_the_runtime_is_replaced() {
    use std::io::{Read, Write};
    // A server on a thread of its own: the test blocks the runtime's only thread below, so
    // that the runtime cannot see the server's close.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (closed_tx, closed_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        let mut requests = 0;
        for round in 0..2 {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request).unwrap();
            requests += 1;
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .unwrap();
            if round == 0 {
                // As an idle keep-alive timeout would, without saying so.
                drop(conn);
                closed_tx.send(()).unwrap();
            } else {
                // A second request on this connection would be read here.
                conn.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                if conn.read(&mut request).is_ok_and(|n| n > 0) {
                    requests += 1;
                }
            }
        }
        requests
    });
    let client = client();
    let response = client.send(post(&url, "{}")).await.unwrap();
    assert_eq!(body_text(response).await.unwrap(), "ok");
    // Blocking, so the runtime does not poll its sockets in between.
    closed_rx.recv().unwrap();
    std::thread::sleep(ASK_KERNEL_AFTER + Duration::from_millis(100));
    let response = client.send(post(&url, "{}")).await.unwrap();
    assert_eq!(body_text(response).await.unwrap(), "ok");
    drop(client);
    assert_eq!(
        server.join().unwrap(),
        2,
        "each request sent once, on a new connection"
    );
}

#[tokio::test]
async fn interim_answers_are_passed_over_and_empty_answers_have_no_body() {
    let server = Server::start(|_, n| {
        reply(&[match n {
            0 => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nyes",
        }])
    })
    .await;
    let client = client();
    let response = client.send(post(&server.url, "{}")).await.unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(body_text(response).await.unwrap(), "");
    let response = client.send(post(&server.url, "{}")).await.unwrap();
    assert_eq!(body_text(response).await.unwrap(), "yes");
    assert_eq!(server.connections(), 1);
}

#[tokio::test]
async fn broken_answers_are_errors() {
    let server = Server::start(|conn, _| match conn {
        // A head that never ends.
        0 => Reply {
            pieces: vec![
                b"HTTP/1.1 200 OK\r\n",
                &[b'x'; MAX_HEAD_BYTES],
                b": y\r\n\r\n",
            ],
            close: Close::Now,
        },
        // A body cut short.
        1 => Reply {
            pieces: vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"],
            close: Close::Now,
        },
        // Not HTTP.
        2 => Reply {
            pieces: vec![b"SSH-2.0-OpenSSH\r\n\r\n"],
            close: Close::Now,
        },
        // A chunk longer than its size.
        _ => Reply {
            pieces: vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
            ],
            close: Close::Now,
        },
    })
    .await;
    let client = client();
    let error = client.send(post(&server.url, "{}")).await.unwrap_err();
    assert!(matches!(error, H1Error::HeadTooLarge), "{error}");
    let response = client.send(post(&server.url, "{}")).await.unwrap();
    let error = body_text(response).await.unwrap_err();
    assert!(matches!(error, H1Error::ClosedInBody), "{error}");
    let error = client.send(post(&server.url, "{}")).await.unwrap_err();
    assert!(matches!(error, H1Error::Malformed(_)), "{error}");
    let response = client.send(post(&server.url, "{}")).await.unwrap();
    let error = body_text(response).await.unwrap_err();
    assert!(
        error.to_string().contains("longer than its size"),
        "{error}"
    );
}

#[tokio::test]
async fn lengths_are_digits_only_and_both_framings_are_not_trusted_again() {
    let server = Server::start(|conn, _| {
        reply(&[match conn {
            0 => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n000000000000000002\r\nok\r\n0\r\n\r\n",
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok",
        }])
    })
    .await;
    let client = client();
    // Chunked wins over the length; a size with leading zeros is a size.
    let response = client.send(post(&server.url, "{}")).await.unwrap();
    assert_eq!(body_text(response).await.unwrap(), "ok");
    // Not reused: the next call opens a new connection, which gets a signed length.
    let error = client.send(post(&server.url, "{}")).await.unwrap_err();
    assert!(error.to_string().contains("content-length"), "{error}");
    assert_eq!(server.connections(), 2);
}

#[tokio::test]
async fn user_info_in_the_url_stays_out_of_the_host_header() {
    let server =
        Server::start(|_, _| reply(&[b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"])).await;
    let url = server.url.replace("http://", "http://someone:secret@");
    let response = client().send(post(&url, "{}")).await.unwrap();
    assert_eq!(response.status(), 200);
    let request = server.requests.lock().unwrap()[0].clone();
    let host = server.url.trim_start_matches("http://");
    assert!(request.contains(&format!("host: {host}\r\n")), "{request}");
    assert!(!request.contains("secret"), "{request}");
}

#[tokio::test]
async fn no_server_is_a_connect_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let error = client()
        .send(post(&format!("http://127.0.0.1:{port}"), "{}"))
        .await
        .unwrap_err();
    assert!(error.is_connect(), "{error}");
}

#[tokio::test]
async fn a_dropped_body_closes_its_connection_and_a_waiting_one_holds_no_buffer() {
    let server = Server::start(|_, _| Reply {
        pieces: vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\ndata: 1\r\n"],
        close: Close::WhenClientDoes,
    })
    .await;
    let client = client();
    let mut body = client
        .send(post(&server.url, "{}"))
        .await
        .unwrap()
        .into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: 1");
    // The next chunk never comes: the body waits with an empty buffer, holding no room.
    let waited = tokio::time::timeout(Duration::from_millis(50), body.frame()).await;
    assert!(waited.is_err());
    assert_eq!(body.buf.capacity(), 0);
    drop(body);
    for _ in 0..100 {
        if server.hung_up.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        server.hung_up.load(Ordering::SeqCst),
        1,
        "the server saw the hang-up"
    );
    // Nothing went back to the pool: the next call needs a new connection.
    let _ = client.send(post(&server.url, "{}")).await.unwrap();
    assert_eq!(server.connections(), 2);
}
